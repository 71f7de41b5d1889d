import pytest

from wq_ops.config import JobConfig
from wq_ops.dist.plan import GIB, check_fits, make_plan, split_spans
from wq_ops.errors import ConfigError, ResourceError
from wq_ops.io.checkpoint import Checkpoint
from wq_ops.model.architecture import describe_model
from tests.factory import tiny_config


def test_spans_are_contiguous_and_balanced():
    assert split_spans(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert split_spans(4, 4) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ConfigError, match="actors=5: the model has only 4 decoder blocks"):
        split_spans(4, 5)


def _plan(samples=128, seq_len=2048, actors=2, capacity_gib=80.0, n_blocks=8):
    config = tiny_config("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_blocks,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256)
    layout = describe_model(config)
    names = {layout.block_tensor_name(i, n): "model.safetensors" for i in range(n_blocks) for n in layout.block_params}
    names.update({n: "model.safetensors" for n in layout.outer_params})
    ckpt = Checkpoint(local_dir=None, weight_map=names)  # type: ignore[arg-type]
    job = JobConfig.from_dict({"out": "o", "samples": samples, "seq_len": seq_len, "actors": actors})
    return make_plan(layout, ckpt, job, capacity_bytes=int(capacity_gib * GIB))


def test_memory_grows_with_a_block_not_the_model():
    small = _plan()
    assert [a.blocks for a in small.actors] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    m = small.actors[1].memory
    # An 8B-shaped block is 436 MB of bf16 (two held: this one and the next); activations: 3 buffers of
    # 128 x 2048 x 4096 bf16 = 2 GiB each.
    assert 0.8 * GIB < m.weights < 2.5 * GIB
    assert m.activations == 3 * 128 * 2048 * 4096 * 2
    # The same job on a model 4x deeper needs the same per-actor memory.
    assert _plan(n_blocks=32).actors[1].memory == m
    # The first actor also holds the embedding table (128256 x 4096 bf16).
    assert small.actors[0].memory.weights - m.weights == 128256 * 4096 * 2
    check_fits(small)


def test_refusal_states_the_numbers():
    plan = _plan(capacity_gib=8.0)
    with pytest.raises(ResourceError) as e:
        check_fits(plan)
    message = str(e.value)
    assert "actor 0 (blocks 0-3) needs" in message and "activations 6.00" in message
    assert "may use 7.20 GiB (90% of 8.00)" in message and "--samples" in message
