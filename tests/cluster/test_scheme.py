"""--scheme: llm-compressor's preset names set the grid; the artifact is the preset's, as compressed-tensors
describes it, and loads with transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ArtifactError, ConfigError
from wq_ops.evaluate.load import load_causal_lm
from wq_ops.quant.fp8 import fp8_scale_of


@pytest.mark.parametrize("scheme,bits,sym", [("W8A16", 8, True), ("W4A16_ASYM", 4, False)])
def test_a_scheme_writes_its_preset(tmp_path, scheme, bits, sym):
    model = write_checkpoint(tmp_path / "m", "llama")
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": scheme})
    result = run_job(job, cache_dir=tmp_path / "cache")
    weights = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    grid = (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["type"])
    assert grid == (bits, 128, sym, "int")
    assert result.report["job"]["scheme"] == scheme
    names = json.loads((result.out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith(".weight_zero_point") for n in names) is not sym
    if not sym:
        return                  # transformers cannot load asymmetric pack-quantized yet (llm-compressor#1618)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_causal_lm(model, dtype=torch.float32)(ids).logits
        got = load_causal_lm(result.out_dir, dtype=torch.float32)(ids).logits
    # 8-bit groups of 128 on this random 3-block model: 3.4% of the logits' norm.
    assert float((got - want).norm() / want.norm()) < 0.05


def _tensors(directory):
    found = {}
    for path in directory.glob("*.safetensors"):
        found.update(load_file(path))
    return found


def _jobs_eval(model, text, tmp_path) -> float:
    """jobs.eval's perplexity of `model`, as it prints it (4 decimals), in the setting of the jobs' --eval."""
    from jobs import eval as eval_job

    out = tmp_path / "jobs_eval.json"
    assert eval_job.main(["--model", str(model), "--text", str(text), "--seq-len", "96", "--max-windows", "5",
                          "--device", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text())["ppl"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("activation-schemes")
    return (write_checkpoint(d / "m", "llama"), write_text(d / "calib.txt"),
            write_text(d / "eval.txt", n_chars=6000, seed=1))


@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC", "FP8", "FP8_BLOCK", "NVFP4", "NVFP4A16"])
def test_an_activation_scheme_is_served_and_scored_as_an_engine_runs_it(tmp_path, tiny, scheme):
    """The artifact is the preset's (format, dtypes, scales' shapes); transformers loads it; the job's --eval,
    which quantizes each linear's input on the actors, gives jobs.eval's number on the written artifact."""
    model, calib, text = tiny
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": scheme,
                               "eval": str(text), "eval_seq_len": 96, "eval_max_windows": 5})
    result = run_job(job, cache_dir=tmp_path / "cache")
    config = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == {"W8A8": "int-quantized", "NVFP4": "nvfp4-pack-quantized",
                                "NVFP4A16": "nvfp4-pack-quantized"}.get(scheme, "float-quantized")
    assert config["ignore"] == ["lm_head"]
    assert result.report["job"]["scheme"] == scheme
    tensors = _tensors(result.out_dir)
    q = "model.layers.0.self_attn.q_proj"
    if scheme.startswith("NVFP4"):
        assert tensors[q + ".weight_packed"].dtype == torch.uint8
        # q, k and v share one global scale (vLLM fuses them); an input global scale only where FP4 activations.
        assert float(tensors[q + ".weight_global_scale"]) == \
            float(tensors["model.layers.0.self_attn.v_proj.weight_global_scale"])
        assert (q + ".input_global_scale" in tensors) is (scheme == "NVFP4")
    else:
        assert tensors[q + ".weight"].dtype == (torch.int8 if scheme == "W8A8" else torch.float8_e4m3fn)
    assert (q + ".input_scale" in tensors) is (scheme == "FP8")
    if scheme == "FP8":
        # The static input scale: the calibration inputs' largest magnitude (the report's) over 448.
        layer = next(x for x in result.report["layers"] if x["name"] == "model.layers.0.self_attn.q_proj")
        want = fp8_scale_of(torch.tensor(layer["outliers"]["absmax"]), scale_dtype=torch.bfloat16)
        assert float(tensors["model.layers.0.self_attn.q_proj.input_scale"]) == float(want)

    assert round(result.report["eval"]["perplexity"], 4) == _jobs_eval(result.out_dir, text, tmp_path)

    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = load_causal_lm(model, dtype=torch.float32)(ids).logits
        got = load_causal_lm(result.out_dir, dtype=torch.float32)(ids).logits
    # On this random 3-block model, of the logits' norm: INT8 4.4%; FP8 (3 mantissa bits, every weight and input
    # rounded by up to 1/16) 13 to 14%; NVFP4A16 (1 mantissa bit) 36.7%, near INT4 RTN in groups of 32 (31.7%);
    # NVFP4, its inputs in FP4 too, 48.6%.
    bound = {"W8A8": 0.05, "NVFP4": 0.6, "NVFP4A16": 0.45}.get(scheme, 0.2)
    assert float((got - want_logits).norm() / want_logits.norm()) < bound


def test_a_scheme_that_groups_activations_refuses_widths_it_cannot_group(tmp_path):
    model = write_checkpoint(tmp_path / "m", "llama", intermediate_size=160)
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": "FP8_BLOCK"})
    with pytest.raises(ConfigError, match=r"^scheme=FP8_BLOCK scales groups of 128 columns, which do not divide "
                                          r"the input width of mlp.down_proj \(in=160\)"
                                          r".*--ignore 'model.layers.\*.mlp.down_proj'"):
        run_job(job, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    ignored = JobConfig.from_dict({**job.to_dict(), "ignore": ["model.layers.*.mlp.down_proj"]})
    result = run_job(ignored, cache_dir=tmp_path / "cache")
    config = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in config["ignore"]


def test_eval_of_an_activation_scheme_on_a_routed_model_is_refused_before_work(tmp_path):
    model = write_checkpoint(tmp_path / "m", "qwen3_moe")
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": "FP8_DYNAMIC",
                               "eval": str(calib)})
    with pytest.raises(ConfigError, match="does not quantize routed experts' inputs yet"):
        run_job(job, cache_dir=tmp_path / "cache")


def test_smoothquant_folds_into_the_norms_and_reports_the_maxima_before_and_after(tmp_path, tiny):
    """W8A8 smooths by default: each norm that feeds q/k/v or gate/up is divided by the factors its linears'
    columns were multiplied by, the report has each smoothed layer's input absmax before (and after, as its
    outliers), and the artifact (norms included) scores as --eval said. --smoothquant off keeps the norms."""
    model, calib, text = tiny
    base = {"model": str(model), "calib": str(calib), "samples": 6, "seq_len": 64, "runtime": "local",
            "scheme": "W8A8", "eval": str(text), "eval_seq_len": 96, "eval_max_windows": 5}
    smoothed = run_job(JobConfig.from_dict({**base, "out": str(tmp_path / "sq")}), cache_dir=tmp_path / "c")
    plain = run_job(JobConfig.from_dict({**base, "out": str(tmp_path / "off"), "smoothquant": "off"}),
                    cache_dir=tmp_path / "c")
    assert smoothed.report["job"]["smoothquant"] == 0.5 and plain.report["job"]["smoothquant"] is None
    source, sq, off = _tensors(model), _tensors(smoothed.out_dir), _tensors(plain.out_dir)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        name = f"model.layers.1.{norm}.weight"
        assert torch.equal(off[name], source[name])
        assert not torch.equal(sq[name], source[name])
    assert sq["model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
    layers = {x["name"]: x for x in smoothed.report["layers"]}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        assert layers[name]["absmax_before_smoothing"] > layers[name]["outliers"]["absmax"]
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):   # fed by a linear: not smoothed
        assert layers[name]["absmax_before_smoothing"] is None
    assert all(x["absmax_before_smoothing"] is None for x in plain.report["layers"])

    assert round(smoothed.report["eval"]["perplexity"], 4) == _jobs_eval(smoothed.out_dir, text, tmp_path)


def test_fp8_experts_are_written_under_their_names_and_load_in_transformers(tmp_path):
    """A routed model in FP8_DYNAMIC: every expert's linear FP8 under the checkpoint's per-expert names, the
    router kept in its dtype and listed in ignore; transformers (dequantizing) gives logits near the source's.
    jobs.eval refuses to score it: transformers fuses the experts, so their inputs cannot be quantized as served.
    (transformers 5.25 cannot load W8A8 experts, and loads NVFP4 experts without their global scale; README,
    Quantizing activations.)"""
    model = write_checkpoint(tmp_path / "m", "qwen3_moe")
    calib = write_text(tmp_path / "calib.txt")
    job = JobConfig.from_dict({"out": str(tmp_path / "out"), "model": str(model), "calib": str(calib),
                               "samples": 6, "seq_len": 64, "runtime": "local", "scheme": "FP8_DYNAMIC"})
    result = run_job(job, cache_dir=tmp_path / "cache")
    tensors = _tensors(result.out_dir)
    experts = [n for n in tensors if ".mlp.experts." in n and n.endswith(".weight")]
    assert experts and all(tensors[n].dtype == torch.float8_e4m3fn for n in experts)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    config = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.gate" in config["ignore"]
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_causal_lm(model, dtype=torch.float32)(ids).logits
        weights_only = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32,
                                                            quantization_config=CompressedTensorsConfig(dequantize=True))
        got = weights_only(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.2         # FP8 weights alone; the dense bound
    with pytest.raises(ArtifactError, match=r"quantized layer\(s\), e.g. model.layers.1.mlp.experts.0.down_proj, "
                                            r"are not linear modules in transformers' model"):
        load_causal_lm(result.out_dir)
