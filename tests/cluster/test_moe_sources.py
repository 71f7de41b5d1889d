"""Whole jobs on mixture-of-experts sources stored otherwise than the released per-expert bf16 names: DeepSeek-V3's
FP8 release (block scales, a multi-token-prediction layer), gpt-oss's MXFP4 release, and experts saved fused by
transformers 5 (bf16 and FP8). Each gives the artifact its dequantized or per-expert twin gives, byte for byte."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cluster.moe_jobs import artifact_tensors, gptq_jobs, moe_checkpoints, shards
from tests.factory import tiny_config, write_checkpoint, write_fp8_checkpoint, write_mxfp4_checkpoint
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import CheckpointError, ConfigError
from wq_ops.io.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return moe_checkpoints(tmp_path_factory.mktemp("moe"))


def test_an_fp8_release_quantizes_as_its_dequantized_weights_would(tmp_path, checkpoints):
    """DeepSeek-V3 as released: block linears in FP8 with 32x32 block scales (partial blocks included), a
    multi-token-prediction layer past num_hidden_layers. The artifact is byte for byte the one from the same
    weights dequantized to bfloat16 beforehand; the MTP layer is carried into it unquantized (dequantized from
    FP8), its linears in the config's ignore; the report names it and the block size."""
    models, calib = checkpoints
    fp8_dir, reference_dir = write_fp8_checkpoint(models["deepseek_v3"], tmp_path / "fp8", tmp_path / "reference")
    from_fp8, reference = gptq_jobs(tmp_path, calib, from_fp8=fp8_dir, ref_out=reference_dir).values()
    assert shards(from_fp8.out_dir) == shards(reference.out_dir)
    n = tiny_config("deepseek_v3").num_hidden_layers
    carried = from_fp8.report["source_carried"]
    assert from_fp8.report["source_not_written"] == []
    # The reference holds the same layer, dequantized: the same names, and no scales to consume.
    assert carried and all(name.startswith(f"model.layers.{n}.") for name in carried)
    assert reference.report["source_carried"] == carried and not any(x.endswith("_scale_inv") for x in carried)
    from safetensors import safe_open

    written = artifact_tensors(from_fp8.out_dir)
    source = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name in carried:
        with safe_open(str(reference_dir / source[name]), "pt") as f:
            assert torch.equal(written[name], f.get_tensor(name)), name
    assert "fp8_block" not in reference.report["source"]
    assert from_fp8.report["source"]["fp8_block"] == [32, 32]
    config = json.loads((from_fp8.out_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    ignored = set(config["ignore"])
    assert f"model.layers.{n}.self_attn.q_a_proj" in ignored and f"model.layers.{n}.mlp.experts.0.down_proj" in ignored
    assert f"model.layers.{n}.mlp.gate" in ignored and not any("norm" in x for x in ignored if f".{n}." in x)
    # transformers builds no such layer and loads the artifact regardless (the keys are unexpected, not missing).
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(from_fp8.out_dir, use_kernels=False,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert len(model.model.layers) == n


def test_an_mxfp4_release_quantizes_as_its_dequantized_weights_would(tmp_path, checkpoints):
    """gpt-oss as released: each block's fused experts in MXFP4 (`_blocks`/`_scales`, the scales of some in the
    other shard), everything else in bf16, quantization_config mxfp4. The artifact is byte for byte the one from
    the same weights dequantized to bfloat16 beforehand and stored fused as transformers saves them; every source
    tensor is read; the report says how the experts were stored."""
    models, calib = checkpoints
    mxfp4_dir, reference_dir = write_mxfp4_checkpoint(models["gpt_oss"], tmp_path / "mxfp4", tmp_path / "reference")
    from_mxfp4, reference = gptq_jobs(tmp_path, calib, from_mxfp4=mxfp4_dir, ref_out=reference_dir).values()
    assert shards(from_mxfp4.out_dir) == shards(reference.out_dir)
    for result in (from_mxfp4, reference):
        assert result.report["source_not_written"] == [] and result.report["source_carried"] == []
    assert from_mxfp4.report["source"]["experts_stored"] == "fused, gate and up interleaved, MXFP4"
    assert reference.report["source"]["experts_stored"] == "fused, gate and up interleaved"
    config = json.loads((from_mxfp4.out_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # vLLM's gpt-oss loader drops per-expert experts, quantized or kept dense: the report says so either way.
    assert any(n.startswith("gpt-oss: vLLM") for n in from_mxfp4.report["compatibility"]["loader"]["notes"])
    dense = gptq_jobs(tmp_path, calib, dense=reference_dir, method="rtn", ignore=[r"re:.*mlp\.experts\..*"])["dense"]
    assert any(n.startswith("gpt-oss: vLLM") for n in dense.report["compatibility"]["loader"]["notes"])
    with pytest.raises(ConfigError, match="format=gptq: gpt-oss's experts, written one by one, load in no engine"):
        gptq_jobs(tmp_path, calib, as_gptq=reference_dir, format="gptq")


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_experts_saved_fused_quantize_as_the_released_per_expert_names_do(tmp_path, checkpoints, arch):
    """transformers 5 can save a mixture of experts' experts fused (`save_original_format=False`: gate_up_proj
    (experts, 2 x intermediate, hidden), gate the first half): the same weights give the same artifact, byte for
    byte, as the per-expert checkpoint, and nothing of the source is left unread."""
    models, calib = checkpoints
    fused_dir = write_checkpoint(tmp_path / "fused", arch, fused=True)
    assert not any(".experts.0." in n for n in open_checkpoint(str(fused_dir)).weight_map)
    fused, released = gptq_jobs(tmp_path, calib, from_fused=fused_dir, released=models[arch]).values()
    assert shards(fused.out_dir) == shards(released.out_dir)
    assert fused.report["source_not_written"] == [] and fused.report["source"]["experts_stored"] == "fused"


def test_mixtral_saved_fused_is_refused_with_how_to_save_it(tmp_path, checkpoints):
    """Mixtral saved fused renames its router and experts (`mlp.*`, not `block_sparse_moe.*`): refused before
    work, in one line that says how to save it so wq reads it."""
    models, calib = checkpoints
    fused_dir = write_checkpoint(tmp_path / "fused", "mixtral", fused=True)
    with pytest.raises(CheckpointError, match=r"index lacks .*block_sparse_moe.*stored fused.*"
                                              r"save_original_format=True") as e:
        run_job(JobConfig.from_dict({"model": str(fused_dir), "out": str(tmp_path / "out"), "calib": str(calib),
                                     "method": "rtn", "runtime": "local"}), cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_fused_fp8_experts_read_with_their_block_scales(tmp_path, checkpoints):
    """DeepSeek-V3 saved fused in FP8 (transformers 5's FP8 experts: `gate_up_proj` (experts, 2 x intermediate,
    hidden) float8 with `gate_up_proj_scale_inv` per expert), its multi-token-prediction layer fused too: the
    decoder blocks' shards are byte for byte those of the per-expert FP8 release with the same blocks (32 divides
    the intermediate size, so gate's and up's blocks are the same), and the MTP layer is carried, fused as stored,
    dequantized to the per-expert release's values."""
    models, calib = checkpoints
    fused = write_checkpoint(tmp_path / "fused", "deepseek_v3", fused=True)
    fused_fp8, _ = write_fp8_checkpoint(fused, tmp_path / "fused_fp8", tmp_path / "fused_reference")
    released_fp8, _ = write_fp8_checkpoint(models["deepseek_v3"], tmp_path / "fp8", tmp_path / "reference")
    from_fused, from_released = gptq_jobs(tmp_path, calib, from_fused=fused_fp8, released=released_fp8).values()
    n = tiny_config("deepseek_v3").num_hidden_layers
    ours, theirs = artifact_tensors(from_fused.out_dir), artifact_tensors(from_released.out_dir)
    mtp = f"model.layers.{n}."
    assert {k: v for k, v in ours.items() if not k.startswith(mtp)}.keys() == \
        {k: v for k, v in theirs.items() if not k.startswith(mtp)}.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith(mtp))
    carried = ours[f"{mtp}mlp.experts.gate_up_proj"]
    assert carried.dtype == torch.bfloat16 and from_fused.report["source_not_written"] == []
    for e in range(len(carried)):
        gate, up = (theirs[f"{mtp}mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up"))
        assert torch.equal(carried[e], torch.cat([gate, up]))



def test_a_crash_and_a_resume_from_an_mxfp4_release_write_the_same_bytes(tmp_path, checkpoints):
    """The resume check reads the MXFP4 experts again (an expert's gate and up from one dequantization) and finds
    the staged blocks' source digests unchanged: they are reused, and the artifact is the uninterrupted one's."""
    models, calib = checkpoints
    mxfp4_dir, _ = write_mxfp4_checkpoint(models["gpt_oss"], tmp_path / "mxfp4", tmp_path / "reference")
    whole = gptq_jobs(tmp_path, calib, whole=mxfp4_dir)["whole"]
    with pytest.raises(RuntimeError, match="injected crash"):
        gptq_jobs(tmp_path, calib, resumed=mxfp4_dir, fail_after_blocks=2)
    resumed = gptq_jobs(tmp_path, calib, resumed=mxfp4_dir)["resumed"]
    assert shards(resumed.out_dir) == shards(whole.out_dir)
    assert sum(b.get("resumed", False) for b in resumed.report["blocks"]) >= 2
