"""quantize_block_ in-process (no Ray): outputs track the float block, methods rank as expected."""

import pytest
import torch

from tests.factory import tiny_config
from wq_ops.block.quantized import quantize_block_
from wq_ops.block.work import BlockTask
from wq_ops.config import AWQParams, Format, JobConfig, QuantConfig
from wq_ops.model.anatomy import discover_anatomy
from wq_ops.model.architecture import describe_model, instantiate_on_meta
from wq_ops.model.block import DecoderBlock, make_sequence_context


@pytest.fixture(scope="module")
def block_setup():
    config = tiny_config("llama", num_key_value_heads=4)
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in layout.block_params.items():
        params[name] = (1 + 0.1 * torch.randn(shape, generator=gen)) if "norm" in name else \
            torch.randn(shape, generator=gen) * 0.08
        params[name] = params[name].to(torch.bfloat16)
    rotary = type(meta.model.rotary_emb)(config=config)
    ctx = make_sequence_context(rotary, seq_len=64, hidden_size=128, window=None, device="cpu", dtype=torch.bfloat16)
    block = DecoderBlock(meta.model.layers[0], ctx)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cpu", dtype=torch.bfloat16)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[0], probe), params, layout.linears, hidden_size=128)
    x = torch.randn(8, 64, 128, generator=gen).to(torch.bfloat16)
    x[..., 5] *= 30                             # an outlier channel
    return layout, block, params, anatomy, list(x.split(4))


def task(layout, quant, linears=None) -> BlockTask:
    return BlockTask(quant=quant, fmt=Format.COMPRESSED_TENSORS, block_index=0, prefix="model.layers",
                     linears=linears or layout.linears)


def quant_config(**options) -> QuantConfig:
    """A QuantConfig from flat options (the command line's names), with the job's defaults."""
    return JobConfig.from_dict({"out": "unused", **options}).quant


def run(setup, **quant):
    layout, block, params, anatomy, batches = setup
    q = quant_config(**{"bits": 4, "group_size": 32, **quant})
    outcome, outputs = quantize_block_(block, params, anatomy, list(batches), task(layout, q))
    ref = [block.forward(params, x) for x in batches]
    err = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, ref)) / \
        sum(float((r.float() ** 2).sum()) for r in ref)
    return outcome, err


@pytest.mark.parametrize("method,stash", [("awq", False), ("gptq", True), ("gptq", False), ("rtn", True)])
def test_params_and_input_tensors_are_not_modified(block_setup, method, stash):
    layout, block, params, anatomy, batches = block_setup
    before = {k: v.clone() for k, v in params.items()}, [b.clone() for b in batches]
    consumed = list(batches)
    quantize_block_(block, params, anatomy, consumed, task(layout, QuantConfig(method=method, group_size=32)),
                    stash_tails=stash)
    assert consumed == []                              # the list is consumed, the tensors are not written
    assert all(torch.equal(before[0][k], params[k]) for k in params)
    assert all(torch.equal(a, b) for a, b in zip(before[1], batches))


def test_methods_rank_on_block_output_error(block_setup):
    _, rtn = run(block_setup, method="rtn")
    _, gptq = run(block_setup, method="gptq", act_order=True)
    _, awq = run(block_setup, method="awq")
    _, awq_layer = run(block_setup, method="awq", awq_loss="layer")
    assert gptq < rtn and awq < rtn and awq_layer < rtn, (rtn, gptq, awq, awq_layer)
    assert rtn < 0.05


@pytest.mark.parametrize("device,rel", [("cpu", 1e-5), pytest.param("cuda", 1e-2, marks=pytest.mark.gpu)])
def test_awq_layer_loss_is_the_groups_output_error_over_every_token(gen, device, rel):
    """_layer_loss(weights, H)(candidate) = sum over the group of ||(C_i - W_i) X^T||^2 / n_tokens, against
    float64 on fresh random data with a spread of channel scales. On CUDA the products take bf16 operands
    (quadratic_sum): a relative error of about 1e-3."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wq_ops.block.awq_stage import _layer_loss

    x = torch.randn(300, 256, generator=gen) * torch.logspace(-1, 1, 256)
    weights = {"a": torch.randn(96, 256, generator=gen).to(torch.bfloat16),
               "b": torch.randn(32, 256, generator=gen).to(torch.bfloat16)}
    cand = {n: w.float() + 0.05 * torch.randn(w.shape, generator=gen) for n, w in weights.items()}
    x64 = x.double()
    want = sum(float((((cand[n].double() - w.double()) @ x64.T) ** 2).sum()) for n, w in weights.items()) / x.shape[0]
    h = (x.T @ x) / x.shape[0]
    loss_of = _layer_loss({n: w.to(device) for n, w in weights.items()}, h.to(device))
    got = float(loss_of({n: c.to(device) for n, c in cand.items()}))
    assert got == pytest.approx(want, rel=rel)


def test_awq_layer_loss_replays_nothing(block_setup):
    """With the layer loss the scale search reads the Hessians only: each linear runs in the stage's capture
    pass and its output pass, at most twice per micro-batch; the module loss replays the attention and MLP
    for every candidate on the kept samples."""
    layout, block, params, anatomy, batches = block_setup
    counts = {}
    for loss in ("layer", "module"):
        calls: dict[str, int] = {}
        hooks = [module.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(
            name, calls.get(name, 0) + (out.numel() > 0))) for name, module in block.layer.named_modules()
            if isinstance(module, torch.nn.Linear)]
        try:
            q = QuantConfig(method="awq", group_size=32, awq=AWQParams(loss=loss))
            outcome, _ = quantize_block_(block, params, anatomy, list(batches), task(layout, q))
        finally:
            for hook in hooks:
                hook.remove()
        counts[loss] = calls
        assert any(r.awq_ratio is not None for r in outcome.layers)
    assert max(counts["layer"].values()) <= 2 * len(batches), counts["layer"]
    assert counts["module"]["mlp.gate_proj"] > 20 * len(batches), counts["module"]


def test_outcome_tensors_and_records(block_setup):
    outcome, _ = run(block_setup, method="gptq", ignore=("*.mlp.down_proj",))
    names = set(outcome.tensors)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert "model.layers.0.mlp.down_proj.weight" in names            # ignored: kept dense
    assert "model.layers.0.input_layernorm.weight" in names
    kept = [r for r in outcome.layers if not r.quantized]
    assert [r.name for r in kept] == ["model.layers.0.mlp.down_proj"]
    assert set(outcome.seconds) == {"forward", "solve", "pack"}


def test_awq_folds_scales_into_the_norms(block_setup):
    outcome, _ = run(block_setup, method="awq")
    _, _, params, _, _ = block_setup
    norm = outcome.tensors["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(norm, params["input_layernorm.weight"])   # 1/s folded in
    assert any(r.awq_ratio is not None for r in outcome.layers)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_float_propagation_passes_the_float_block_outputs_on(block_setup, method):
    """Propagation.FLOAT: the outputs are the float block's, bit for bit; the layers that read the block's
    input (q, k, v) are calibrated on the same inputs either way, the MLP on the float attention's output
    instead (and, for GPTQ, o_proj on the float q, k, v's output; for AWQ, whose stage is calibrated in one
    pass, o_proj sees the float q, k, v either way)."""
    from wq_ops.config import Propagation

    layout, block, params, anatomy, batches = block_setup
    q = QuantConfig(method=method, bits=4, group_size=32)
    floated, outputs = quantize_block_(block, params, anatomy, list(batches), task(layout, q),
                                       propagation=Propagation.FLOAT)
    for out, x in zip(outputs, batches):
        assert torch.equal(out, block.forward(params, x))
    quantized, q_outputs = quantize_block_(block, params, anatomy, list(batches), task(layout, q))
    assert not all(torch.equal(a, b) for a, b in zip(outputs, q_outputs))
    same = (".q_proj.", ".k_proj.", ".v_proj.") + ((".o_proj.",) if method == "awq" else ())
    tensors = {n: floated.tensors[n] for n in floated.tensors if any(k in n for k in same)}
    assert len(tensors) >= 3 * 2 and all(torch.equal(v, quantized.tensors[n]) for n, v in tensors.items())
    if method == "gptq":
        assert not torch.equal(floated.tensors["model.layers.0.self_attn.o_proj.weight_packed"],
                               quantized.tensors["model.layers.0.self_attn.o_proj.weight_packed"])
    mlp = [n for n in floated.tensors if ".mlp." in n and n.endswith("weight_packed")]
    assert mlp and not all(torch.equal(floated.tensors[n], quantized.tensors[n]) for n in mlp)


@pytest.mark.parametrize("propagation,stash,passes", [("float", True, 1), ("quantized", True, 1),
                                                     ("quantized", False, 2)])
def test_each_linear_runs_once_per_micro_batch_with_gptq(block_setup, propagation, stash, passes):
    """Float propagation takes each stage's outputs from the pass that captures its inputs; quantized
    propagation captures q/k/v and gate/up from the norm outputs, o_proj and down_proj in passes that give
    them no output rows, and computes their outputs from their kept inputs: one forward of the block either
    way. Without those kept inputs the stages run again after their solves: every linear but o_proj and
    down_proj twice. A linear counts as run when it produced an output (an empty product is free)."""
    from wq_ops.config import Propagation

    layout, block, params, anatomy, batches = block_setup
    calls: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(
        name, calls.get(name, 0) + (out.numel() > 0))) for name, module in block.layer.named_modules()
        if isinstance(module, torch.nn.Linear)]
    try:
        quantize_block_(block, params, anatomy, list(batches), task(layout, QuantConfig(method="gptq", group_size=32)),
                        propagation=Propagation(propagation), stash_tails=stash)
    finally:
        for h in hooks:
            h.remove()
    assert set(calls) == {s.name for s in layout.linears}
    once = {"self_attn.o_proj", "mlp.down_proj"}
    assert calls == {name: (1 if name in once else passes) * len(batches) for name in calls}, calls


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantized_propagation_goes_one_group_at_a_time(block_setup, method, stash):
    """Each group (q/k/v, o, gate/up, down) is quantized from its input as the block computes it with every
    earlier group already quantized, and the outputs are the quantized block's forward, bit for bit:
    rebuilt here with plain full forwards of the block, group by group, from the artifact's codes."""
    from wq_ops.formats.compressed_tensors import decode_linear
    from wq_ops.quant.gptq import quantize_gptq
    from wq_ops.quant.hessian import accumulate_input_stats_, hessian_of, new_input_stats
    from wq_ops.quant.result import dequantize

    layout, block, params, anatomy, batches = block_setup
    q = QuantConfig(method=method, bits=4, group_size=32)
    outcome, outputs = quantize_block_(block, params, anatomy, list(batches), task(layout, q), stash_tails=stash)
    assert len(anatomy.groups) == 4 and set(anatomy.direct_tails) == {"self_attn", "mlp"}
    assert anatomy.direct_heads == ("self_attn.q_proj", "mlp.gate_proj")
    quantized = dict(params)
    for group in anatomy.groups:
        seen = []
        with torch.no_grad(), block.capturing((group.names[0],), lambda _n, x: seen.append(x)):
            for x in batches:
                block.forward(quantized, x)
        stats = new_input_stats(seen[0].shape[-1], "cpu")
        for x in seen:
            accumulate_input_stats_(stats, x)
        stacked = torch.cat([params[n + ".weight"] for n in group.names])
        if method == "gptq":
            expected = dequantize(quantize_gptq(stacked, hessian_of(stats), bits=4, group_size=32, sym=True,
                                                damp_frac=q.gptq.damp_frac, act_order=q.act_order,
                                                block_size=q.gptq.block_size, scale_dtype=torch.bfloat16))
        else:
            expected = None
        got = []
        for name in group.names:
            result = decode_linear(f"model.layers.0.{name}", outcome.tensors, bits=4, group_size=32)
            quantized[name + ".weight"] = dequantize(result, torch.bfloat16)
            got.append(dequantize(result))
        if expected is not None:
            assert torch.equal(torch.cat(got), expected), group.names
    with torch.no_grad():
        for out, x in zip(outputs, batches):
            assert torch.equal(out, block.forward(quantized, x))


class _MlpWithEpilogue(torch.nn.Module):
    """An MLP that does something after its down_proj: its output is not down_proj's output tensor."""

    def __init__(self, mlp: torch.nn.Module, in_place: bool) -> None:
        super().__init__()
        self.inner, self.in_place = mlp, in_place

    def forward(self, x):
        y = self.inner(x)
        return y.mul_(0.5) if self.in_place else y * 0.5


@pytest.mark.parametrize("in_place", [False, True])
def test_a_stage_with_an_epilogue_runs_again_for_its_outputs(block_setup, in_place):
    """Where the module does something after its last linear (into a new tensor, or in place on the
    linear's output), that linear's input alone does not give the stage's output: the anatomy says so, and
    the stage is recomputed, giving the block's forward."""
    import copy

    from wq_ops.config import Propagation
    from wq_ops.formats.compressed_tensors import decode_linear
    from wq_ops.quant.result import dequantize

    layout, block, params, anatomy, batches = block_setup
    layer = copy.deepcopy(block.layer)
    layer.mlp = _MlpWithEpilogue(layer.mlp, in_place)
    renamed = {k.replace("mlp.", "mlp.inner.", 1) if k.startswith("mlp.") else k: v for k, v in params.items()}
    linears = tuple(type(s)(**{**s.__dict__, "name": s.name.replace("mlp.", "mlp.inner.", 1)})
                    if s.name.startswith("mlp.") else s for s in layout.linears)
    odd = DecoderBlock(layer, block.ctx)
    found = discover_anatomy(odd, renamed, linears, hidden_size=128)
    assert found.direct_tails == ("self_attn",)
    outcome, outputs = quantize_block_(odd, renamed, found, list(batches),
                                       task(layout, QuantConfig(method="gptq", group_size=32), linears),
                                       propagation=Propagation.QUANTIZED, stash_tails=True)
    quantized = dict(renamed)
    for spec in linears:
        result = decode_linear(f"model.layers.0.{spec.name}", outcome.tensors, bits=4, group_size=32)
        quantized[spec.name + ".weight"] = dequantize(result, torch.bfloat16)
    with torch.no_grad():
        for out, x in zip(outputs, batches):
            assert torch.equal(out, odd.forward(quantized, x))


def test_awq_where_no_scaling_wins_leaves_the_bytes_alone(block_setup, monkeypatch):
    """The scales are folded in even when plain RTN wins (all ones, so that nothing reads the winner back
    from the device): the norms come out bit for bit, and the report says no scaling."""
    from wq_ops.block import awq_stage

    search = awq_stage.awq.search_scales

    def no_scaling_wins(weights, x_mean, loss_of, **kw):
        found = search(weights, x_mean, lambda cand: torch.zeros(()), **kw)
        assert torch.equal(found.scales, torch.ones_like(found.scales))
        return found

    monkeypatch.setattr(awq_stage.awq, "search_scales", no_scaling_wins)
    outcome, _ = run(block_setup, method="awq", awq_loss="layer")
    _, _, params, _, _ = block_setup
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert torch.equal(outcome.tensors[f"model.layers.0.{norm}.weight"], params[f"{norm}.weight"])
    assert all(r.awq_ratio is None for r in outcome.layers)


def _gpu_block(quant):
    """A tiny Llama block on the GPU, its inputs, and a quantize_block_ call for it (timed by CUDA events, as
    in an actor) that has already run once (every kernel loaded before a strict run)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wq_ops.device.timing import CudaEventClock

    config = tiny_config("llama", num_key_value_heads=4)
    layout = describe_model(config)
    meta = instantiate_on_meta(config)
    gen = torch.Generator().manual_seed(1)
    params = {n: ((1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in n else torch.randn(s, generator=gen) * 0.08)
              .to(torch.bfloat16).cuda() for n, s in layout.block_params.items()}
    rotary = type(meta.model.rotary_emb)(config=config).cuda()
    ctx = make_sequence_context(rotary, seq_len=64, hidden_size=128, window=None, device="cuda", dtype=torch.bfloat16)
    probe = make_sequence_context(rotary, seq_len=16, hidden_size=128, window=None, device="cuda", dtype=torch.bfloat16)
    anatomy = discover_anatomy(DecoderBlock(meta.model.layers[0], probe), params, layout.linears, hidden_size=128)
    batches = list(torch.randn(8, 64, 128, generator=gen).to(torch.bfloat16).cuda().split(4))
    q = quant_config(bits=4, group_size=32, gpus_per_actor=1, **quant)      # the CUDA backend

    def quantize():
        return quantize_block_(DecoderBlock(meta.model.layers[0], ctx), params, anatomy, list(batches), task(layout, q),
                               clock=CudaEventClock(torch.device("cuda")))

    quantize()
    return quantize


def _strict(monkeypatch, owner, name: str) -> None:
    """`owner.name` (a function or method) raises on any read of the device."""
    plain = getattr(owner, name)

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return plain(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(owner, name, strict)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [dict(method="awq", awq_loss="layer"), dict(method="awq"), dict(method="rtn")])
def test_a_stage_solve_never_waits_on_the_gpu(monkeypatch, quant):
    """AWQ's and RTN's solves queue their work and read nothing back until the block's report is read
    (one read for its numbers): the GPU is not drained after each layer. GPTQ reads the device once per
    factorization (its damping check), by design."""
    from wq_ops.block import quantized

    quantize = _gpu_block(quant)
    _strict(monkeypatch, quantized, "solve_stage")
    outcome, _ = quantize()
    assert all(r.quantized and r.output_error > 0 for r in outcome.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [dict(method="gptq"), dict(method="gptq", ignore=("*.mlp.down_proj",)),
                                   dict(method="awq"), dict(method="rtn")])
def test_a_blocks_outcome_packs_without_waiting_on_the_gpu(monkeypatch, quant):
    """The outcome (artifact tensors packed, the report's numbers gathered on the device) reads nothing back:
    the actor's compute thread goes on to queue the next block, and the writer reads the report. Read
    afterwards, the report has every layer's numbers."""
    from wq_ops.block.work import BlockWork

    quantize = _gpu_block(quant)
    _strict(monkeypatch, BlockWork, "outcome")
    outcome, _ = quantize()
    assert outcome.report.numbers.is_cuda
    assert len(outcome.layers) == 7 and outcome.seconds["forward"] > 0
    assert all(r.output_error > 0 for r in outcome.layers if r.quantized)
    assert sum(r.quantized for r in outcome.layers) == (6 if "ignore" in quant else 7)


@pytest.mark.parametrize("quant", [dict(method="gptq", ignore=("*.mlp.down_proj",)), dict(method="awq")])
def test_records_read_back_in_one_copy_match_each_layers_own_numbers(block_setup, monkeypatch, quant):
    """`pending_report` gathers every layer's numbers into one vector for one copy: each record matches that
    layer's output error, proxy loss, outlier summary and scale search read on their own (a layer left
    unquantized has error 0)."""
    from wq_ops.block import work as work_module
    from wq_ops.quant.hessian import outlier_summary

    pending = []
    gather = work_module.pending_report

    def keep(layers, *checks):
        pending.extend(layers)
        return gather(layers, *checks)

    monkeypatch.setattr(work_module, "pending_report", keep)
    outcome, _ = run(block_setup, **quant)
    assert len(pending) == len(outcome.layers) == 7
    for r, got in zip(pending, outcome.layers):
        assert got.name == r.name and got.quantized == (r.error is not None)
        assert got.output_error == (0.0 if r.error is None else float(r.error))
        assert got.proxy_loss == (r.result.loss if r.result is not None else None)
        assert got.damp_frac == (r.result.damp_frac if r.result is not None else None)
        assert got.outliers == outlier_summary(r.channels)
        assert got.awq_ratio == (r.search.ratio if r.search else None)
        assert got.awq_loss == (r.search.loss if r.search else None)
        assert got.awq_loss_unscaled == (r.search.loss_unscaled if r.search else None)
    assert any(not r.quantized for r in outcome.layers) == ("ignore" in quant)
    assert any(r.awq_ratio is not None for r in outcome.layers) == (quant["method"] == "awq")


def test_a_block_report_raises_a_failed_packing_check_before_its_records():
    """The packing's checks ride at the end of the report's numbers: a false one raises ArtifactError with
    its message when the records are read (by the actor's writer, before the shard is staged)."""
    from wq_ops.block.records import PendingReport
    from wq_ops.errors import ArtifactError

    checks = ("layer a: bad zero points", "layer b: bad zero points")
    ok = PendingReport(torch.tensor([1.0, 1.0], dtype=torch.float64), (), checks)
    assert ok.resolve(ok.numbers) == ()
    failed = PendingReport(torch.tensor([1.0, 0.0], dtype=torch.float64), (), checks)
    with pytest.raises(ArtifactError, match="layer b: bad zero points"):
        failed.resolve(failed.numbers)
