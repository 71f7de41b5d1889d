"""One routed block quantized in-process: GPTQ beats RTN on every fed expert, and an expert no token reaches is
quantized with RTN, counted as starved, never skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.factory import tiny_config
from wq_ops.block.quantized import quantize_block_
from wq_ops.block.work import BlockTask
from wq_ops.config import Format, JobConfig
from wq_ops.model.anatomy import discover_anatomy
from wq_ops.model.architecture import describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, make_sequence_context


@pytest.fixture(scope="module")
def routed():
    """A Qwen3-MoE block whose router never picks expert 3: its inputs carry a large component along one
    direction m (the norm keeps its sign), and the router's row for expert 3 is -m."""
    config = tiny_config("qwen3_moe")
    layout = describe_model(config)
    kind = layout.block(1)
    meta = instantiate_on_meta(config)
    gen = torch.Generator().manual_seed(0)
    params = {n: ((1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in n else torch.randn(s, generator=gen) * 0.08)
              for n, s in kind.params.items()}
    m = torch.randn(128, generator=gen)
    m /= m.norm()
    params["post_attention_layernorm.weight"] = params["post_attention_layernorm.weight"].abs()
    params["mlp.gate.weight"][3] = -8 * m / params["post_attention_layernorm.weight"]
    params = {n: v.to(torch.bfloat16) for n, v in params.items()}
    rotary = type(meta.model.rotary_emb)(config=config)
    ctx = make_sequence_context(rotary, seq_len=64, hidden_size=128, window=None, device="cpu", dtype=torch.bfloat16)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu",
                                  dtype=torch.bfloat16)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[1], probe, moe=kind.moe), params, kind.linears,
                               hidden_size=128)
    x = (torch.randn(8, 64, 128, generator=gen) + 6 * m).to(torch.bfloat16)
    return layout, DecoderBlock(meta.model.layers[1], ctx, moe=kind.moe), params, anatomy, list(x.split(4))


def run(routed, propagation="quantized", **options):
    from wq_ops.config import Propagation

    layout, block, params, anatomy, batches = routed
    quant = JobConfig.from_dict({"out": "unused", "bits": 4, "group_size": 32, **options}).quant
    task = BlockTask(quant=quant, fmt=Format.COMPRESSED_TENSORS, block_index=1, prefix="model.layers",
                     linears=layout.block(1).linears, moe=layout.block(1).moe)
    outcome, _ = quantize_block_(block, params, anatomy, list(batches), task, propagation=Propagation(propagation))
    return {r.name.removeprefix("model.layers.1."): r for r in outcome.layers}, outcome


def test_an_expert_no_token_reaches_is_quantized_with_rtn_and_counted(routed):
    layers, outcome = run(routed, method="gptq", moe_min_tokens=16)
    for which in ("gate_proj", "up_proj", "down_proj"):
        starved = layers[f"mlp.experts.3.{which}"]
        assert starved.tokens == 0 and starved.starved and starved.quantized
        assert f"model.layers.1.mlp.experts.3.{which}.weight_packed" in outcome.tensors
    fed = [r for name, r in layers.items() if ".experts." in name and not name.startswith("mlp.experts.3.")]
    assert len(fed) == 9 and not any(r.starved for r in fed) and all(r.tokens > 16 for r in fed)
    assert sum(layers[f"mlp.experts.{e}.gate_proj"].tokens for e in range(4)) == 8 * 64 * 2


@pytest.mark.parametrize("method", ["awq"])
def test_awq_leaves_a_starved_expert_unscaled_and_unclipped(routed, method):
    layers, _ = run(routed, method=method, moe_min_tokens=16)
    assert layers["mlp.experts.3.down_proj"].starved and layers["mlp.experts.3.down_proj"].awq_ratio is None


def test_gptq_beats_rtn_on_every_fed_expert(routed):
    # Float propagation: every linear's statistics come from the float block, the same in both runs, so each
    # layer's error compares on one Hessian. GPTQ solves on the min-max grid, so it is measured against RTN
    # on that grid; RTN's clipping search (its default) also uses each expert's Hessian, and lowers its error.
    gptq, _ = run(routed, "float", method="gptq", moe_min_tokens=16)
    rtn, _ = run(routed, "float", method="rtn", moe_min_tokens=16, rtn_clip_search=False)
    searched, _ = run(routed, "float", method="rtn", moe_min_tokens=16)
    names = [f"mlp.experts.{e}.{which}" for e in range(3) for which in ("gate_proj", "up_proj", "down_proj")]
    for name in names:
        assert gptq[name].output_error < rtn[name].output_error, name
    assert sum(searched[n].output_error for n in names) < sum(rtn[n].output_error for n in names)


@pytest.mark.parametrize("options", [{}, {"moe_calibration": "all"}])
def test_experts_solved_in_batches_give_what_one_at_a_time_gives(routed, monkeypatch, options):
    """GPTQ's experts solved as batches (the default: here all 4 at once, the starved one apart) and one at
    a time (a batch budget of one byte): the same artifact tensors and records, bit for bit."""
    from wq_ops.block import experts

    assert experts.experts_per_batch(routed[1].moe, tokens=8 * 64, elt=2, gptq=True) > 1
    batched_layers, batched = run(routed, method="gptq", moe_min_tokens=16, **options)
    monkeypatch.setattr(experts, "BATCH_BYTES", 1)
    single_layers, single = run(routed, method="gptq", moe_min_tokens=16, **options)
    assert batched.tensors.keys() == single.tensors.keys()
    assert all(torch.equal(batched.tensors[k], single.tensors[k]) for k in single.tensors)
    assert list(batched_layers) == list(single_layers)
    assert [(r.output_error, r.tokens, r.starved) for r in batched_layers.values()] == \
        [(r.output_error, r.tokens, r.starved) for r in single_layers.values()]


def test_a_batch_of_experts_fits_its_budget():
    """experts_per_batch: as many experts as their Hessians, solve copies and act(gate)*up rows (at the
    planned rows: four times the mean) fit in BATCH_BYTES (at most MAX_BATCH), one where a single expert is
    larger, one for methods that solve none."""
    from wq_ops.block.experts import BATCH_BYTES, MAX_BATCH, expert_batch_bytes, experts_per_batch

    def spec(h, i, n):
        return dataclasses.replace(describe_model(tiny_config("qwen3_moe")).block(1).moe, hidden_size=h,
                                   expert_intermediate=i, n_experts=n)

    qwen3, tokens = spec(2048, 768, 128), 128 * 2048
    rows = 4 * tokens * qwen3.top_k // 128
    k = experts_per_batch(qwen3, tokens=tokens, elt=2, gptq=True)
    assert 1 < k <= MAX_BATCH and k * expert_batch_bytes(qwen3, rows=rows, elt=2) <= BATCH_BYTES
    assert (k + 1) * expert_batch_bytes(qwen3, rows=rows, elt=2) > BATCH_BYTES or k == MAX_BATCH
    assert experts_per_batch(spec(4096, 14336, 8), tokens=tokens, elt=2, gptq=True) == 1       # Mixtral's
    assert experts_per_batch(qwen3, tokens=tokens, elt=2, gptq=False) == 1
