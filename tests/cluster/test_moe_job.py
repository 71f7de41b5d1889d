"""Whole jobs on tiny mixture-of-experts checkpoints (Qwen3-MoE with a dense first block, Mixtral, DeepSeek-V3,
gpt-oss): RTN within half a step for every expert, the same bytes from 1 and 3 actors, from expert actors and
after a crash and resume, the routers kept and listed in `ignore`, and transformers reading back exactly the
weights wq wrote. Sources stored otherwise (FP8, MXFP4, fused): test_moe_sources.py."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.cluster.moe_jobs import artifact_tensors, moe_checkpoints, quantize, shards
from tests.factory import MOE_ARCHS, tiny_config, write_checkpoint
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ConfigError
from wq_ops.evaluate.gpt_oss_experts import per_expert_gpt_oss
from wq_ops.formats.compressed_tensors import decode_linear
from wq_ops.io.checkpoint import open_checkpoint, read_tensors
from wq_ops.io.fused_experts import FusedExperts
from wq_ops.model.moe import moe_spec
from wq_ops.quant.result import dequantize

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return moe_checkpoints(tmp_path_factory.mktemp("moe"))


def source_experts(model: Path, arch: str) -> dict[str, torch.Tensor]:
    """Every routed expert's weight as the source holds it, under its per-expert name (gpt-oss's split from its
    fused tensors, as a job reads them)."""
    spec = moe_spec(tiny_config(arch))
    checkpoint = open_checkpoint(str(model))
    names = [f"model.layers.{b}.{spec.expert(e, which)}.weight" for b in spec.sparse_blocks
             for e in range(spec.n_experts) for which in ("gate", "up", "down")]
    fused = FusedExperts.of(spec.architecture, names, checkpoint.weight_map)
    assert (fused is not None) == (arch == "gpt_oss")
    return read_tensors(dataclasses.replace(checkpoint, fused_experts=fused), names)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_rtn_puts_every_expert_weight_within_half_a_step(tmp_path, checkpoints, arch):
    # Min-max RTN (no clipping search): every weight within half a step is then a bound the artifact must meet.
    result = quantize(tmp_path, checkpoints, arch, "rtn", method="rtn", moe_min_tokens=0, rtn_clip_search=False)
    models, _ = checkpoints
    source = source_experts(models[arch], arch)
    tensors = artifact_tensors(result.out_dir)
    spec = moe_spec(tiny_config(arch))
    assert len(source) == 3 * spec.n_experts * len(spec.sparse_blocks)
    for name, w in source.items():
        module = name.removesuffix(".weight")
        decoded = decode_linear(module, tensors, bits=4, group_size=32)
        step = decoded.scale.float().repeat_interleave(32, dim=1)
        error = (w.float() - dequantize(decoded, torch.float32)).abs()
        # Half a step, plus what rounding the scale to bfloat16 can leave the top code short of the range
        # (tests/quant/test_rtn.py states the bound).
        assert bool((error <= step * (0.5 + 2**4 * 2**-8) + w.float().abs() * 4 * torch.finfo(torch.float32).eps)
                    .all()), module
    config = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    routers = [n for n in config["ignore"] if n.endswith("." + spec.router)]
    assert len(routers) == len(spec.sparse_blocks)
    assert result.report["source_not_written"] == []
    # Kept in the checkpoint's dtype: DeepSeek-V3's router is float32 (its checkpoint stores it so).
    want = torch.float32 if arch == "deepseek_v3" else torch.bfloat16
    assert {tensors[f"{r}.weight"].dtype for r in routers} == {want}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gptq_beats_rtn_on_every_fed_expert_of_every_architecture(tmp_path, checkpoints, arch):
    """Float propagation, so both methods see one Hessian per layer: every expert fed at least 16 tokens (not
    starved) has a lower output error under GPTQ than under min-max RTN on the same grid."""
    gptq = quantize(tmp_path, checkpoints, arch, "gptq", method="gptq", propagation="float", moe_min_tokens=16,
                    runtime="local")
    rtn = quantize(tmp_path, checkpoints, arch, "rtn", method="rtn", propagation="float", moe_min_tokens=16,
                   rtn_clip_search=False, runtime="local")
    theirs = {x["name"]: x for x in rtn.report["layers"]}
    fed = [x for x in gptq.report["layers"] if ".experts." in x["name"] and not x["starved"]]
    assert len(fed) >= 3 * len(moe_spec(tiny_config(arch)).sparse_blocks)
    assert [x["name"] for x in fed if x["output_error"] >= theirs[x["name"]]["output_error"]] == []


def test_experts_report_their_tokens_and_starvation(tmp_path, checkpoints):
    result = quantize(tmp_path, checkpoints, "qwen3_moe", "gptq", method="gptq", moe_min_tokens=300)
    experts = [x for x in result.report["layers"] if ".experts." in x["name"]]
    assert len(experts) == 2 * 4 * 3
    for e in range(4):
        gate = next(x for x in experts if x["name"] == f"model.layers.1.mlp.experts.{e}.gate_proj")
        assert gate["starved"] == (gate["tokens"] < 300)
    assert sum(x["tokens"] for x in experts if x["name"].startswith("model.layers.1.") and "gate_proj" in x["name"]) \
        == 8 * 64 * 2                                              # every token reaches its top-2 experts
    dense = next(x for x in result.report["layers"] if x["name"] == "model.layers.0.mlp.gate_proj")
    assert dense["tokens"] == 8 * 64 and not dense["starved"]
    totals = result.report["totals"]
    assert totals["expert_layers"] == 24 and totals["starved_expert_layers"] == sum(x["starved"] for x in experts)
    page = (result.out_dir / "wq_report.html").read_text()
    assert "Calibration tokens routed to each expert" in page
    assert f"<b>starved expert linears</b> (quantized with RTN): {totals['starved_expert_layers']}" in page


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_one_and_three_actors_write_the_same_bytes(tmp_path, checkpoints, method):
    one = quantize(tmp_path, checkpoints, "qwen3_moe", "one", method=method, runtime="local")
    three = quantize(tmp_path, checkpoints, "qwen3_moe", "three", method=method, actors=3)
    assert shards(one.out_dir) == shards(three.out_dir) and len(shards(one.out_dir)) == 5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_split_over_expert_actors_write_the_same_bytes(tmp_path, checkpoints, arch):
    """One block's experts over 2 expert actors (Ray), their weights never loaded by the block's actor: the
    bytes of one in-process actor; and with 2 block actors and 3 expert actors (ranges of 2, 1 and 1 expert
    of a 4-expert block, or 3, 3 and 2 of 8)."""
    one = quantize(tmp_path, checkpoints, arch, "one", runtime="local")
    split = quantize(tmp_path, checkpoints, arch, "split", expert_actors=2)
    wide = quantize(tmp_path, checkpoints, arch, "wide", actors=1, expert_actors=3)
    assert shards(split.out_dir) == shards(one.out_dir) == shards(wide.out_dir)
    assert [x["name"] for x in split.report["layers"]] == [x["name"] for x in one.report["layers"]]
    experts = [m for m in split.report["memory"] if m.get("expert_actor")]
    assert [m["rank"] for m in experts] == [1, 2] and all(m["planned_bytes"] > 0 for m in experts)
    # Each routed block's expert actors' time by phase, and the totals over them; none without expert actors.
    routed = [b for b in split.report["blocks"] if b["expert_actors"]]
    assert routed and all([a["rank"] for a in b["expert_actors"]] == [1, 2] for b in routed)
    assert all(a["read"] >= 0 and a["forward"] > 0 and a["solve"] > 0 and a["send"] > 0
               for b in routed for a in b["expert_actors"])
    totals = split.report["totals"]["expert_actor_phase_seconds"]
    assert totals.keys() >= {"read", "upload", "forward", "solve", "pack", "send"}
    assert totals["solve"] == pytest.approx(sum(a["solve"] for b in routed for a in b["expert_actors"]), abs=1e-3)
    assert one.report["totals"]["expert_actor_phase_seconds"] == {}


@pytest.mark.parametrize("options", [{"method": "rtn"}, {"method": "hqq"}, {"scheme": "FP8_DYNAMIC"},
                                     {"method": "gptq", "moe_calibration": "all", "moe_min_tokens": 40}],
                         ids=["rtn", "hqq", "fp8-dynamic", "gptq-all-tokens"])
def test_expert_actors_write_the_same_bytes_for_every_method_they_take(tmp_path, checkpoints, options):
    if "scheme" in options:
        options = {**options, "group_size": "channel"}
    one = quantize(tmp_path, checkpoints, "deepseek_v3", "one", runtime="local", **options)
    split = quantize(tmp_path, checkpoints, "deepseek_v3", "split", expert_actors=3, **options)
    assert shards(split.out_dir) == shards(one.out_dir)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_actors_on_a_gpu_write_the_bytes_of_one_gpu_actor(tmp_path, checkpoints, arch):
    """GPU actors (CUDA kernels): one block actor and two expert actors sharing the GPU write what one
    in-process GPU actor writes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gpu = {"gpus_per_actor": 0.3, "backend": "cuda"}
    one = quantize(tmp_path, checkpoints, arch, "one", runtime="local", **gpu)
    split = quantize(tmp_path, checkpoints, arch, "split", expert_actors=2, **gpu)
    assert shards(split.out_dir) == shards(one.out_dir)


def test_a_replayed_block_keeps_its_routed_experts_on_the_host_when_expert_actors_quantize_them(tmp_path,
                                                                                                 checkpoints):
    """Resume and --eval replay staged blocks on the block actor, whose memory was planned without the routed
    experts: those stay on the host (moe_mlp moves each expert's weights to the device as it reaches it), and so
    do the source's for --eval-baseline. Without expert actors everything goes to the device."""
    from wq_ops.cluster.loader import BlockLoader

    routed = moe_spec(tiny_config("qwen3_moe")).sparse_blocks[0]
    with_experts = BlockLoader(_actor_job(tmp_path, checkpoints, "qwen3_moe", expert_actors=("x",)), None)
    alone = BlockLoader(_actor_job(tmp_path, checkpoints, "qwen3_moe"), None)
    assert with_experts.host_resident(routed) == "mlp.experts." and alone.host_resident(routed) is None
    assert any(".experts." in n for n in with_experts.load_float(routed).params)     # --eval-baseline runs them


def test_expert_actors_are_refused_where_there_is_nothing_for_them(tmp_path, checkpoints):
    calib = checkpoints[1]
    dense = write_checkpoint(tmp_path / "dense", "llama")
    with pytest.raises(ConfigError, match="expert_actors=2: LlamaForCausalLM has no routed experts"):
        run_job(JobConfig.from_dict({"model": str(dense), "out": str(tmp_path / "o"), "calib": str(calib),
                                     "expert_actors": 2}), cache_dir=tmp_path / "cache")
    n = moe_spec(tiny_config("mixtral")).n_experts
    with pytest.raises(ConfigError, match=f"expert_actors={n + 1}: a routed block has {n} experts"):
        quantize(tmp_path, checkpoints, "mixtral", "many", expert_actors=n + 1)


def _actor_job(tmp_path, checkpoints, arch, **spec_fields):
    """A CPU ActorJob of a dry-run-prepared job (no Ray), as an actor's first call makes it."""
    from wq_ops.cluster.actor_job import ActorJob
    from wq_ops.cluster.prepare import prepare_job
    from wq_ops.cluster.protocol import ActorSpec

    models, calib = checkpoints
    job = JobConfig.from_dict({"model": str(models[arch]), "out": str(tmp_path / "o"), "calib": str(calib),
                               "samples": 8, "seq_len": 64, "group_size": 32, "expert_actors": 2, "dry_run": True})
    prepared = prepare_job(job, cache_dir=tmp_path / "cache")
    return ActorJob(ActorSpec(rank=0, checkpoint=prepared.checkpoint, hf_config=prepared.hf_config,
                              layout=prepared.layout, job=job, artifact=prepared.artifact, **spec_fields),
                    torch.device("cpu"))


def test_the_block_actor_reads_no_routed_expert_when_expert_actors_quantize_them(tmp_path, checkpoints):
    from wq_ops.cluster.loader import BlockLoader

    routed = moe_spec(tiny_config("qwen3_moe")).sparse_blocks[0]
    read = {}
    for handles in ((), ("an expert actor",)):
        job = _actor_job(tmp_path, checkpoints, "qwen3_moe", expert_actors=handles)
        read[len(handles)] = set(BlockLoader(job, None).load(routed).params)
    assert {n for n in read[0] if ".experts." in n} and not {n for n in read[1] if ".experts." in n}
    assert read[1] == {n for n in read[0] if ".experts." not in n}


def test_a_routed_block_is_probed_with_stand_in_experts(tmp_path, checkpoints, monkeypatch):
    """Probing a block copies what it takes to float32: a routed block's own experts (DeepSeek-V3's 45 GB) are
    left out for stand-ins of width 8, also where the block's actor holds them, and the groups are the same."""
    from wq_ops.cluster import actor_job
    from wq_ops.cluster.loader import BlockLoader

    routed = moe_spec(tiny_config("gpt_oss")).sparse_blocks[1]
    job = _actor_job(tmp_path, checkpoints, "gpt_oss", expert_actors=())
    params = BlockLoader(job, None).load(routed).params
    assert params["mlp.experts.0.gate_proj.weight"].shape[0] == 64
    seen = {}
    real = actor_job.discover_anatomy
    monkeypatch.setattr(actor_job, "discover_anatomy", lambda block, p, *a, **k: seen.update(p) or real(block, p, *a,
                                                                                                        **k))
    anatomy = job.ensure_anatomy(routed, params)
    assert seen["mlp.experts.0.gate_proj.weight"].shape[0] == 8 and seen["mlp.experts.3.down_proj.bias"].shape == (128,)
    assert seen["self_attn.q_proj.weight"] is params["self_attn.q_proj.weight"]
    assert len(anatomy.stage_groups("mlp")) == 8


def test_an_expert_actor_reads_its_range_of_the_next_routed_block_ahead(tmp_path, checkpoints, monkeypatch):
    from wq_ops.cluster import expert_pool
    from wq_ops.io.digest import tensor_entries

    job = _actor_job(tmp_path, checkpoints, "qwen3_moe")
    routed = moe_spec(tiny_config("qwen3_moe")).sparse_blocks
    calls = []
    real = expert_pool._read_range
    monkeypatch.setattr(expert_pool, "_read_range", lambda j, i, e: calls.append((i, e)) or real(j, i, e))
    reader = expert_pool.ExpertReader()
    try:
        first, entries = reader.read(job, routed[0], range(1, 3))
        names = [f"mlp.experts.{e}.{w}_proj.weight" for e in (1, 2) for w in ("gate", "up", "down")]
        assert sorted(first) == sorted(names)
        # The digest entries the block's record combines: the loader's, under the checkpoint's full names.
        assert entries == tensor_entries({f"model.layers.{routed[0]}.{n}": t for n, t in first.items()})
        second, _ = reader.read(job, routed[1], range(1, 3))   # read ahead while the first was quantized
        assert calls[:2] == [(routed[0], range(1, 3)), (routed[1], range(1, 3))]
        again, _ = expert_pool._read_range(job, routed[1], range(1, 3))
        assert all(torch.equal(second[k], v) for k, v in again.items())
    finally:
        reader.close()


def test_a_rerun_after_a_crash_with_expert_actors_resumes_the_staged_blocks(tmp_path, checkpoints):
    """The staged blocks' source digests cover the experts the expert actors read (their digest entries go
    back with their results), so a rerun keeps them rather than finding every block's source changed."""
    whole = quantize(tmp_path, checkpoints, "mixtral", "whole", runtime="local")
    with pytest.raises(RuntimeError, match="injected crash"):
        quantize(tmp_path, checkpoints, "mixtral", "resumed", expert_actors=2, fail_after_blocks=2)
    resumed = quantize(tmp_path, checkpoints, "mixtral", "resumed", expert_actors=2)
    assert shards(resumed.out_dir) == shards(whole.out_dir)
    assert sum(b.get("resumed", False) for b in resumed.report["blocks"]) >= 2


def test_a_crash_and_a_resume_write_the_same_bytes(tmp_path, checkpoints):
    whole = quantize(tmp_path, checkpoints, "mixtral", "whole", runtime="local")
    with pytest.raises(RuntimeError, match="injected crash"):
        quantize(tmp_path, checkpoints, "mixtral", "resumed", runtime="local", fail_after_blocks=2)
    resumed = quantize(tmp_path, checkpoints, "mixtral", "resumed", runtime="local")
    assert shards(resumed.out_dir) == shards(whole.out_dir)
    assert sum(b.get("resumed", False) for b in resumed.report["blocks"]) >= 2     # the writer may stage one more


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_transformers_reads_back_the_weights_wq_wrote(tmp_path, checkpoints, arch):
    """transformers with compressed-tensors, dequantizing on load, holds exactly wq's dequantized experts
    (fused as its module keeps them), and its logits are those of the float model with those weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    result = quantize(tmp_path, checkpoints, arch, "gptq", method="gptq", runtime="local")
    # transformers has no mapping from per-expert gpt-oss tensors: wq's own (jobs.eval's), while it loads.
    with per_expert_gpt_oss() if arch == "gpt_oss" else contextlib.nullcontext():
        loaded = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32,
                                                      quantization_config=CompressedTensorsConfig(run_compressed=False))
    if arch == "gpt_oss":       # and after it, a gpt-oss model saves fused again (transformers reverses a mapping)
        loaded.save_pretrained(tmp_path / "resaved")
        assert "model.layers.1.mlp.experts.gate_up_proj" in open_checkpoint(str(tmp_path / "resaved")).weight_map
    tensors = artifact_tensors(result.out_dir)
    spec = moe_spec(tiny_config(arch))
    prefix, gate, up, down = spec.prefix, spec.gate_name, spec.up_name, spec.down_name

    def ours(module: str) -> torch.Tensor:
        return dequantize(decode_linear(module, tensors, bits=4, group_size=32), torch.bfloat16).float()

    layer = loaded.model.layers[1]
    base = f"model.layers.1.{prefix}.experts"
    for e in range(spec.n_experts):
        if arch == "gpt_oss":   # gate and up interleaved, stored (in, out), with biases
            fused = torch.stack([ours(f"{base}.{e}.{gate}"), ours(f"{base}.{e}.{up}")], dim=1).flatten(0, 1).T
            assert torch.equal(layer.mlp.experts.down_proj[e].detach(), ours(f"{base}.{e}.{down}").T)
            bias = torch.stack([tensors[f"{base}.{e}.{gate}.bias"], tensors[f"{base}.{e}.{up}.bias"]], 1).flatten()
            assert torch.equal(layer.mlp.experts.gate_up_proj_bias[e].detach(), bias.float())
        else:
            fused = torch.cat([ours(f"{base}.{e}.{gate}"), ours(f"{base}.{e}.{up}")])
            assert torch.equal(layer.mlp.experts.down_proj[e].detach(), ours(f"{base}.{e}.{down}"))
        assert torch.equal(layer.mlp.experts.gate_up_proj[e].detach(), fused)
    router = layer.get_submodule(f"mlp.{spec.router_leaf}")
    assert torch.equal(router.weight.detach(), tensors[f"model.layers.1.{spec.router}.weight"].float())
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.shape == (1, 24, 258) and bool(torch.isfinite(logits).all())


def test_all_tokens_feed_every_expert(tmp_path, checkpoints):
    """--moe-calibration all: every expert's statistics see every calibration token (none starves), while the
    outputs stay the routed ones: the artifact differs from the routed statistics' from block 1's experts on."""
    every = quantize(tmp_path, checkpoints, "qwen3_moe", "all", method="gptq", moe_calibration="all",
                     runtime="local")
    experts = [x for x in every.report["layers"] if ".experts." in x["name"]]
    assert {x["tokens"] for x in experts} == {8 * 64} and not any(x["starved"] for x in experts)
    routed = quantize(tmp_path, checkpoints, "qwen3_moe", "routed", method="gptq", runtime="local")
    a, b = artifact_tensors(every.out_dir), artifact_tensors(routed.out_dir)
    differ = {n for n in a if not torch.equal(a[n], b[n])}
    # Block 1's experts, and block 2 (its inputs come from block 1's quantized experts); nothing before them.
    assert differ and all(".experts." in n or n.startswith("model.layers.2.") for n in differ), differ
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.self_attn")) for n in differ)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_gptq_v1_artifact_holds_every_expert_under_its_name(tmp_path, checkpoints, arch):
    """--format gptq writes every expert under the checkpoint's per-expert names; AutoGPTQ's reader
    dequantizes each RTN expert weight to within half a step of the source; the routers stay as the source
    holds them and are excluded in the config's `dynamic` (GPTQModel's negative patterns)."""
    from tests.formats.test_gptq import dequantize_like_autogptq

    out = quantize(tmp_path, checkpoints, arch, "v1", method="rtn", moe_min_tokens=0, format="gptq",
                   rtn_clip_search=False).out_dir          # min-max: the half-step bound holds
    tensors = artifact_tensors(out)
    models, _ = checkpoints
    checkpoint = open_checkpoint(str(models[arch]))
    spec = moe_spec(tiny_config(arch))
    routers = [f"model.layers.{b}.{spec.router}" for b in spec.sparse_blocks]
    source = read_tensors(checkpoint, [n for n in checkpoint.weight_map if ".experts." in n]
                          + [f"{r}.weight" for r in routers])
    experts = [n for n in source if ".experts." in n]
    assert len(experts) == 3 * spec.n_experts * len(spec.sparse_blocks)
    for name in experts:
        module = name.removesuffix(".weight")
        qweight, qzeros, scales, g_idx = (tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        got = dequantize_like_autogptq(qweight, qzeros, scales, g_idx, bits=4)
        w = source[name].float()
        step = scales.float().t().repeat_interleave(32, dim=1)
        assert got.shape == w.shape, module
        assert bool(((w - got).abs() <= step * (0.5 + 2**4 * 2**-10) + w.abs() * 4 * torch.finfo(torch.float32).eps)
                    .all()), module
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(config["dynamic"]) == {"-:" + r.replace(".", r"\.") + "$" for r in routers}
    side = json.loads((out / "quantize_config.json").read_text())      # GPTQModel reads this one
    assert {k: side[k] for k in config} == config and side["damp_percent"] == 0.01
    for r in routers:
        assert torch.equal(tensors[f"{r}.weight"], source[f"{r}.weight"])


def test_a_group_size_the_experts_cannot_take_is_refused_naming_them_once(tmp_path, checkpoints):
    """Groups of 128 over gpt-oss's 64-wide down projections: refused before work in one line that names each
    expert linear once, with how many experts share it (gpt-oss-120b has 384 such linears a block), and an
    --ignore pattern covering all of them."""
    with pytest.raises(ConfigError) as e:
        quantize(tmp_path, checkpoints, "gpt_oss", "g128", method="rtn", group_size=128, runtime="local")
    assert str(e.value).startswith("group_size=128 does not divide the input width of 4 linear layer(s) in every "
                                   "block: mlp.experts.*.down_proj (in=64, 4 experts). Use --group-size 64")
    assert str(e.value).endswith("--ignore 'model.layers.*.mlp.experts.*.down_proj')") and "\n" not in str(e.value)
