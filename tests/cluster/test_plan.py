import itertools
import re

import pytest

from tests.factory import tiny_config
from wq_ops.cluster.plan import (
    GIB,
    QUANTIZE_COST,
    check_fits,
    make_plan,
    pipeline_finish_times,
    pipeline_spans,
    split_spans,
)
from wq_ops.config import JobConfig, Method
from wq_ops.errors import ConfigError, ResourceError
from wq_ops.io.checkpoint import Checkpoint
from wq_ops.model.architecture import describe_model


def test_spans_are_contiguous_and_balanced():
    assert split_spans(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert split_spans(4, 4) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ConfigError, match="actors=5: the model has only 4 decoder blocks"):
        split_spans(4, 5)


def test_pipelined_spans_are_balanced_by_cost_not_count():
    # Under float propagation a later actor starts after the float forward of every block before it, so it
    # gets fewer blocks; two actors come out equal (each forwards then quantizes the same amount).
    for n_blocks, n_actors, cost in ((32, 2, 3.3), (32, 4, 3.3), (32, 8, 3.3), (80, 8, 3.3), (16, 3, 7.4),
                                     (5, 5, 2.5), (9, 4, 0.5)):
        spans = pipeline_spans(n_blocks, n_actors, cost)
        assert [b for span in spans for b in span] == list(range(n_blocks))      # contiguous, in order
        assert all(spans) and len(spans) == n_actors
        sizes = [len(s) for s in spans]
        finish = max(pipeline_finish_times(sizes, cost))
        assert finish <= max(pipeline_finish_times([len(s) for s in split_spans(n_blocks, n_actors)], cost))
        # No single block moved to a neighbour makes the slowest actor faster.
        for k in range(n_actors - 1):
            for give, take in ((k, k + 1), (k + 1, k)):
                if sizes[give] > 1:
                    trial = list(sizes)
                    trial[give] -= 1
                    trial[take] += 1
                    assert max(pipeline_finish_times(trial, cost)) >= finish - 1e-9
    assert [len(s) for s in pipeline_spans(32, 2, 3.3)] == [16, 16]
    # The last of 4 actors starts after 25 block-forwards and quantizes 7 blocks: 25 + 7 x 3.3 = 48.1,
    # against 24 + 8 x 3.3 = 50.4 with equal spans.
    assert max(pipeline_finish_times([len(s) for s in pipeline_spans(32, 4, 3.3)], 3.3)) == pytest.approx(48.1)
    # The optimum, against every split of a small model.
    for cost in (0.5, 3.3, 7.4):
        for n_actors in (2, 3, 4):
            optimum = min(max(pipeline_finish_times(list(sizes), cost))
                          for sizes in itertools.product(range(1, 10), repeat=n_actors) if sum(sizes) == 10)
            got = max(pipeline_finish_times([len(s) for s in pipeline_spans(10, n_actors, cost)], cost))
            assert got == pytest.approx(optimum)
    with pytest.raises(ConfigError, match="actors=5: the model has only 4 decoder blocks"):
        pipeline_spans(4, 5, 3.3)


def test_plan_balances_spans_only_when_the_actors_pipeline_span_by_span():
    assert [len(a.blocks) for a in _plan(actors=4, n_blocks=32).actors] == [8, 8, 8, 8]          # quantized
    by_block = _plan(actors=4, n_blocks=32, propagation="float", span_mode="block")
    assert not by_block.streamed
    assert [a.blocks for a in by_block.actors] == pipeline_spans(32, 4, QUANTIZE_COST[Method.GPTQ])
    assert len(by_block.actors[-1].blocks) < 8
    streamed = _plan(actors=4, n_blocks=32, propagation="float")            # auto: every actor busy at once
    assert streamed.streamed and [len(a.blocks) for a in streamed.actors] == [8, 8, 8, 8]
    assert "stream through resident spans" in streamed.describe()


def test_resident_spans_grow_with_the_span_and_fall_back_or_refuse_with_the_fewest_actors():
    # An 8B-shaped block: 0.41 GiB of bf16 weights and 1.14 GiB of float32 statistics (6 x 4096^2 + 14336^2).
    four = _plan(actors=4, n_blocks=32, propagation="float", span_mode="stream")
    eight = _plan(actors=8, n_blocks=32, propagation="float", span_mode="stream")
    per_block = four.actors[1].memory.total - eight.actors[1].memory.total
    assert 4 * 1.5 * GIB < per_block < 4 * 1.6 * GIB
    check_fits(four)
    # On 22 GiB GPUs 4 actors' resident spans do not fit: auto falls back to one block at a time, and a
    # forced stream is refused with the fewest actors that would fit.
    auto = _plan(actors=4, n_blocks=32, propagation="float", capacity_gib=22.0)
    assert not auto.streamed and "would not fit" in auto.describe()
    check_fits(auto)
    forced = _plan(actors=4, n_blocks=32, propagation="float", span_mode="stream", capacity_gib=22.0)
    with pytest.raises(ResourceError, match=r"with --actors (\d+) \(or more\) the resident spans fit") as e:
        check_fits(forced)
    fewest = int(re.search(r"--actors (\d+)", str(e.value)).group(1))
    check_fits(_plan(actors=fewest, n_blocks=32, propagation="float", span_mode="stream", capacity_gib=22.0))
    with pytest.raises(ResourceError):
        check_fits(_plan(actors=fewest - 1, n_blocks=32, propagation="float", span_mode="stream",
                         capacity_gib=22.0))


def _plan(samples=128, seq_len=2048, actors=2, capacity_gib=80.0, n_blocks=8, propagation="quantized",
          span_mode="auto", method="gptq", **options):
    config = tiny_config("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_blocks,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256)
    layout = describe_model(config)
    names = {layout.block_tensor_name(i, n): "model.safetensors" for i in range(n_blocks) for n in layout.block_params}
    names.update({n: "model.safetensors" for n in layout.outer_params})
    ckpt = Checkpoint(local_dir=None, weight_map=names)  # type: ignore[arg-type]
    job = JobConfig.from_dict({"out": "o", "samples": samples, "seq_len": seq_len, "actors": actors,
                                "propagation": propagation, "span_mode": span_mode, "method": method, **options})
    return make_plan(layout, ckpt, job, capacity_bytes=int(capacity_gib * GIB))


def test_memory_grows_with_a_block_not_the_model():
    small = _plan()
    assert [a.blocks for a in small.actors] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    m = small.actors[1].memory
    # An 8B-shaped block is 436 MB of bf16 (two held: this one and the next); activations: 3 buffers of
    # 128 x 2048 x 4096 bf16 = 2 GiB each, and the kept inputs of down_proj (128 x 2048 x 14336 bf16).
    assert 0.8 * GIB < m.weights < 2.5 * GIB
    assert small.actors[1].stash_tails
    assert m.activations == 3 * 128 * 2048 * 4096 * 2 + 128 * 2048 * 14336 * 2
    # The same job on a model 4x deeper needs the same per-actor memory.
    assert _plan(n_blocks=32).actors[1].memory == m
    # The first actor also holds the embedding table (128256 x 4096 bf16).
    assert small.actors[0].memory.weights - m.weights == 128256 * 4096 * 2
    check_fits(small)


def test_tail_inputs_are_kept_only_where_they_fit_and_help():
    """GPTQ and RTN under quantized propagation keep the stages' last linears' inputs when the actor has room
    (then the plan counts them); not AWQ (two passes per stage anyway), nor float propagation (its capture
    pass gives the outputs)."""
    roomy, tight = _plan(capacity_gib=80.0), _plan(capacity_gib=20.0)
    assert all(a.stash_tails for a in roomy.actors) and not any(a.stash_tails for a in tight.actors)
    assert roomy.actors[1].memory.activations - tight.actors[1].memory.activations == 128 * 2048 * 14336 * 2
    check_fits(tight)
    assert "inputs kept" in roomy.describe() and "inputs kept" not in tight.describe()
    assert all(a.stash_tails for a in _plan(method="rtn").actors)
    assert not any(a.stash_tails for a in _plan(method="awq").actors)
    assert not any(a.stash_tails for a in _plan(propagation="float", actors=1).actors)


def test_refusal_states_the_numbers():
    plan = _plan(capacity_gib=8.0)
    with pytest.raises(ResourceError) as e:
        check_fits(plan)
    message = str(e.value)
    assert "actor 0 (blocks 0-3) needs" in message and "activations 6.00" in message
    assert "may use 7.20 GiB (90% of 8.00)" in message and "--samples" in message


def test_awq_plans_its_kept_search_samples_only_for_the_replayed_search():
    """The module loss keeps awq_search_samples samples of the widest input per block; the layer loss
    keeps none."""
    module, layer = _plan(method="awq", awq_loss="module"), _plan(method="awq")
    for a, b in zip(module.actors, layer.actors):
        assert a.memory.workspace - b.memory.workspace == 3 * 32 * 2048 * 14336 * 2


def _moe_plan(n_experts=128, capacity_gib=80, **options):
    """A Qwen3-30B-A3B-shaped model (4 routed blocks), the experts under the checkpoint's per-expert names."""
    config = tiny_config("qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=n_experts,
                         num_experts_per_tok=8, mlp_only_layers=[], decoder_sparse_step=1, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)
    layout = describe_model(config)
    names = {layout.block_tensor_name(i, n): "model.safetensors" for i in range(4) for n in layout.block(i).params}
    names.update({n: "model.safetensors" for n in layout.outer_params})
    ckpt = Checkpoint(local_dir=None, weight_map=names)  # type: ignore[arg-type]
    job = JobConfig.from_dict({"out": "o", "samples": 128, "seq_len": 2048, "actors": 1, "method": "gptq", **options})
    return make_plan(layout, ckpt, job, capacity_bytes=int(capacity_gib * GIB))


def test_moe_memory_counts_routed_tokens():
    """A routed MLP runs an expert at a time on its tokens: the workspace holds top-k experts' outputs per
    token, whatever the number of experts; GPTQ stacks one expert's gate and up, never every expert's, and
    solves a batch of experts at once within the batch budget (`experts_per_batch`)."""
    from wq_ops.block.experts import BATCH_BYTES

    m128, m256 = _moe_plan().actors[0].memory, _moe_plan(n_experts=256).actors[0].memory
    h, i = 2048, 768
    rtn128, rtn256 = (_moe_plan(n_experts=n, method="rtn").actors[0].memory.workspace for n in (128, 256))
    assert rtn128 == rtn256
    # GPTQ's batch of experts on top, within its budget.
    assert 0 < m128.workspace - rtn128 <= BATCH_BYTES and 0 <= m256.workspace - rtn256 <= BATCH_BYTES
    # Before: every expert's output at once in the workspace, 128 x 3584 values per token (31 GB here).
    assert m128.workspace < 4 * GIB
    all_tokens = _moe_plan(moe_calibration="all").actors[0].memory
    # Every token's states and act(gate) * up once more: at least the capture of every expert's outputs.
    assert all_tokens.workspace - m128.workspace >= 2 * 8 * 2048 * (2 * i + h) * 2


def test_a_routed_mlp_holds_one_experts_hessians_at_a_time():
    """Quantized propagation takes the experts one at a time: 128 or 256 experts, the same Hessians; float
    propagation, which captures every stage in one pass, holds every expert's."""
    h, i = 2048, 768
    assert _moe_plan().actors[0].memory.hessians == _moe_plan(n_experts=256).actors[0].memory.hessians
    floated = _moe_plan(propagation="float").actors[0].memory.hessians
    more = _moe_plan(propagation="float", n_experts=256).actors[0].memory.hessians - floated
    assert more == 128 * 4 * (h * h + i * i)


def test_expert_actors_hold_the_routed_experts_and_the_block_actors_none():
    """--expert-actors 4 on the Qwen3-30B-A3B shape: the block actor's weights lose the routed experts (this
    block's and the prefetched next one's); each expert actor holds 32 experts' weights, 64 with 2 actors."""
    h, i, e = 2048, 768, 128
    alone, spread = _moe_plan(), _moe_plan(expert_actors=4)
    experts = 3 * h * i * 2
    assert alone.actors[0].memory.weights - spread.actors[0].memory.weights >= 2 * e * experts
    assert alone.experts is None and spread.experts is not None and spread.experts_per_actor == 32
    two = _moe_plan(expert_actors=2).experts
    assert two.weights - spread.experts.weights == 32 * 3 * h * i * (2 + 1)      # as read, and packed
    assert "x0-3   32 experts" in spread.describe()


def test_experts_that_do_not_fit_are_refused_with_the_fewest_expert_actors_that_would():
    """A 2.5 GiB device and a small calibration set: one actor cannot hold a routed block's 256 experts (and
    the next block's); the refusal says how many expert actors would each fit, and with that many it fits."""
    small = dict(n_experts=256, capacity_gib=2.5, samples=16, seq_len=512)
    with pytest.raises(ResourceError, match=r"--expert-actors N spreads them over N more actors \((\d+) would") as e:
        check_fits(_moe_plan(**small))
    fewest = int(re.search(r"\((\d+) would each fit\)", str(e.value)).group(1))
    assert fewest > 1
    check_fits(_moe_plan(expert_actors=fewest, **small))
    with pytest.raises(ResourceError, match=f"each of {fewest - 1} expert actors needs"):
        check_fits(_moe_plan(expert_actors=fewest - 1, **small))


def _gpt_oss_plan(micro_batch_samples: int, capacity_gib: float = 80, eager: bool = True):
    """gpt-oss-120b's shape (4 of its 36 blocks), its experts stored fused in MXFP4 as released."""
    import dataclasses

    from wq_ops.io.fused_experts import FusedExperts

    config = tiny_config("gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=128,
                         num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, vocab_size=201088, sliding_window=128, max_position_embeddings=4096)
    layout = describe_model(config)
    if not eager:                  # as if its attention ran through SDPA
        layout = dataclasses.replace(layout, eager_attention_heads=0)
    names = {n: "model.safetensors" for n in layout.outer_params}
    for i in range(4):
        for n in layout.block(i).params:
            if ".experts." not in n:
                names[layout.block_tensor_name(i, n)] = "model.safetensors"
        for stored in ("gate_up_proj", "down_proj"):
            for suffix in ("_blocks", "_scales", "_bias"):
                names[f"model.layers.{i}.mlp.experts.{stored}{suffix}"] = "model.safetensors"
    block_names = [layout.block_tensor_name(i, n) for i in range(4) for n in layout.block(i).params]
    fused = FusedExperts.of(layout.architecture, block_names, names)
    assert fused is not None and fused.mxfp4 and all(n in names or fused.source(n, names) for n in block_names)
    ckpt = dataclasses.replace(Checkpoint(local_dir=None, weight_map=names), fused_experts=fused)  # type: ignore[arg-type]
    job = JobConfig.from_dict({"out": "o", "samples": 128, "seq_len": 2048, "actors": 1, "method": "gptq",
                               "group_size": 32, "micro_batch_samples": micro_batch_samples})
    return layout, make_plan(layout, ckpt, job, capacity_bytes=int(capacity_gib * GIB))


def test_gpt_oss_plans_its_eager_attention_scores():
    """gpt-oss's attention runs eagerly (its sinks have no SDPA path): a micro-batch's (64 heads, 2048, 2049)
    scores are held five times over, 2.7 GB a sample in bf16, and the plan counts them in the workspace, sample by
    sample of a micro-batch (21.5 GB for 8), which without them would be under 6 GB; the plan reads the fused
    MXFP4 experts' shard for every block."""
    layout, one = _gpt_oss_plan(1)
    _, eight = _gpt_oss_plan(8)
    _, plain = _gpt_oss_plan(8, eager=False)
    scores = 5 * 64 * 2048 * 2049 * 2
    assert one.actors[0].memory.workspace >= scores and eight.actors[0].memory.workspace >= 8 * scores
    assert plain.actors[0].memory.workspace < 6e9
    assert layout.eager_attention_heads == 64 and {b.shard_files for b in one.blocks} == {("model.safetensors",)}
