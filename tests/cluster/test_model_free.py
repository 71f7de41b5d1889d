"""--model-free: any safetensors checkpoint, shard by shard, no model class, no calibration. The artifact's tensors
are the scheme's (checked against the source weights), 1 and 3 workers and a resumed run write the same bytes,
and an architecture transformers knows loads with it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.factory import artifact_files, write_checkpoint
from wq_ops.api import quantize
from wq_ops.config import JobConfig
from wq_ops.errors import ConfigError
from wq_ops.evaluate.load import load_causal_lm
from wq_ops.formats import compressed_tensors, naive_quantized
from wq_ops.quant.result import dequantize
from wq_ops.quant.rtn import quantize_rtn

HIDDEN, INTER, EXPERTS, LAYERS = 128, 64, 4, 2


def write_unknown_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """A checkpoint of an architecture no library knows ("NovaForCausalLM"): attention linears, a router, fused
    3-D experts (experts, out, in) with biases, a projection whose width no group divides, norms, embeddings
    and lm_head, over 3 shards with an index."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.05).to(dtype)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(300, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape in [("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (64, HIDDEN)), ("v_proj", (64, HIDDEN)),
                            ("o_proj", (HIDDEN, HIDDEN))]:
            tensors[f"{p}.self_attn.{name}.weight"] = rand(*shape)
        tensors[f"{p}.self_attn.sinks"] = rand(4, dtype=torch.float32)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[f"{p}.mlp.gate.weight"] = rand(EXPERTS, HIDDEN, dtype=torch.float32)      # the router
        tensors[f"{p}.mlp.experts.gate_up_proj"] = rand(EXPERTS, 2 * INTER, HIDDEN)
        tensors[f"{p}.mlp.experts.gate_up_proj_bias"] = rand(EXPERTS, 2 * INTER)
        tensors[f"{p}.mlp.experts.down_proj"] = rand(EXPERTS, HIDDEN, INTER)
        tensors[f"{p}.mlp.odd_proj.weight"] = rand(HIDDEN, 100)                           # 100: no group divides it
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = rand(300, HIDDEN)
    directory.mkdir(parents=True)
    names = sorted(tensors)
    shards = [names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3], names[2 * len(names) // 3:]]
    weight_map = {}
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"architectures": ["NovaForCausalLM"], "model_type": "nova",
                                                       "hidden_size": HIDDEN, "torch_dtype": "bfloat16"}))
    return directory


def _run(model: Path, out: Path, **options) -> dict:
    result = quantize(str(model), out=str(out), model_free=True, progress=False, **options)
    return result.report


def _decode(tensors: dict, module: str, quant) -> torch.Tensor:
    if f"{module}.weight_packed" in tensors:
        return dequantize(compressed_tensors.decode_linear(module, tensors, bits=quant.bits,
                                                           group_size=quant.group_size))
    return dequantize(naive_quantized.decode_linear(module, tensors, quant=quant))


def _all_tensors(out: Path) -> dict:
    found = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        found.update(load_file(str(shard)))
    return found


def test_hqq_w4_of_an_unknown_architecture(tmp_path):
    model = write_unknown_checkpoint(tmp_path / "nova")
    source = {n: t for f in sorted(model.glob("*.safetensors")) for n, t in load_file(str(f)).items()}
    report = _run(model, tmp_path / "out", scheme="W4A16", group_size=64)
    out = tmp_path / "out"
    quant = JobConfig.from_dict({"out": "x", "model": str(model), "model_free": True, "scheme": "W4A16",
                                 "group_size": 64}).quant
    tensors = _all_tensors(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    ignore = set(config["ignore"])
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.odd_proj"} <= ignore
    assert not any("embed" in n or "norm" in n for n in ignore)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = f"{p}.self_attn.{name}"
            w = source[module + ".weight"].float()
            got = _decode(tensors, module, quant)
            rtn = dequantize(quantize_rtn(w, bits=4, group_size=64, sym=True, scale_dtype=torch.bfloat16))
            assert (got - w).square().sum() < (rtn - w).square().sum()     # HQQ beats min-max RTN
            assert module + ".weight" not in tensors
        for name in ("gate_up_proj", "down_proj"):        # fused experts: each slice quantized, stacked
            module = f"{p}.mlp.experts.{name}"
            w = source[module].float()
            packed = tensors[module + ".weight_packed"]
            assert packed.shape == (EXPERTS, w.shape[1], w.shape[2] * 4 // 32)
            for e in range(EXPERTS):
                got = _decode({k: v[e] for k, v in tensors.items() if k.startswith(module + ".")}, module, quant)
                step = tensors[module + ".weight_scale"][e].float().repeat_interleave(64, dim=1)
                assert ((got - w[e]).abs() <= step * 1.01).all()
        for kept in (f"{p}.mlp.gate.weight", f"{p}.mlp.odd_proj.weight", f"{p}.mlp.experts.gate_up_proj_bias",
                     f"{p}.self_attn.sinks", f"{p}.input_layernorm.weight"):
            assert torch.equal(tensors[kept], source[kept]) and tensors[kept].dtype == source[kept].dtype
    reasons = {t["name"]: t["reason"] for t in report["tensors"]}
    assert "not a multiple" in reasons["model.layers.0.mlp.odd_proj.weight"]
    assert report["totals"]["tensors_quantized"] == LAYERS * 6
    assert not (out / ".wq-staging").exists()
    card = (out / "README.md").read_text()
    assert "| method | hqq (symmetric" in card and "| bits / group size | 4 / 64 |" in card
    assert "| calibration | none: model-free" in card and f"| tensors | {LAYERS * 6} quantized" in card


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_fp8_of_an_unknown_architecture(tmp_path, scheme):
    model = write_unknown_checkpoint(tmp_path / "nova")
    source = {n: t for f in sorted(model.glob("*.safetensors")) for n, t in load_file(str(f)).items()}
    _run(model, tmp_path / "out", scheme=scheme)
    quant = JobConfig.from_dict({"out": "x", "model": str(model), "model_free": True, "scheme": scheme}).quant
    tensors = _all_tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    assert "model.layers.1.mlp.odd_proj" not in config["ignore"]     # per channel or partial blocks: any width
    for module in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.odd_proj"):
        w = source[module + ".weight"].float()
        assert tensors[module + ".weight"].dtype == torch.float8_e4m3fn
        scale = tensors[module + ".weight_scale"].float()
        if scheme == "FP8_BLOCK":            # one scale per 128 x 128 block, the last ones partial
            assert scale.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
            scale = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        # FP8 E4M3 keeps 3 mantissa bits: half an ulp is 2**-4 of the value (or of the scale, near zero).
        bound = torch.maximum(w.abs() * 2**-4, scale * 2**-9) * 1.01
        assert ((_decode(tensors, module, quant) - w).abs() <= bound).all()


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W4A16"])
def test_three_workers_a_lost_worker_and_a_resumed_run_write_the_same_bytes(tmp_path, ray_session, scheme):
    model = write_unknown_checkpoint(tmp_path / "nova")
    options = dict(scheme=scheme, group_size=64) if scheme == "W4A16" else dict(scheme=scheme)
    _run(model, tmp_path / "one", **options)
    one = artifact_files(tmp_path / "one")
    # Three Ray workers; shard 1's task dies once, as on a lost node (its process exits): Ray runs it again.
    report = _run(model, tmp_path / "three", actors=3, fail_after_blocks=1, **options)
    assert report["totals"]["shards_resumed"] == 0
    assert [s["rerun_after_crash"] for s in report["shards"]] == [False, True, False]
    assert artifact_files(tmp_path / "three") == one
    # In the driver's process, the crash ends the job; the rerun finds shard 0 staged and computes the rest.
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(model, tmp_path / "resumed", fail_after_blocks=1, **options)
    assert not (tmp_path / "resumed" / "model.safetensors.index.json").exists()
    report = _run(model, tmp_path / "resumed", **options)
    assert report["totals"]["shards_resumed"] == 1
    assert artifact_files(tmp_path / "resumed") == one


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme,options,bound", [("W4A16", {"group_size": 32}, 0.5), ("W8A8", {}, 0.1),
                                                  ("FP8_DYNAMIC", {}, 0.2)])
def test_a_known_architecture_loads_with_transformers(tmp_path, tied, scheme, options, bound):
    """A tied lm_head has no tensor of its own, yet loaders take it for a linear: the ignore list names it.
    (Logits as `jobs.eval` computes them: weights dequantized by compressed-tensors, inputs quantized as an engine
    serves the scheme.)"""
    model = write_checkpoint(tmp_path / "llama", "llama", tie_word_embeddings=tied)
    _run(model, tmp_path / "out", scheme=scheme, **options)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_causal_lm(model, dtype=torch.float32)(ids).logits
        got = load_causal_lm(tmp_path / "out", dtype=torch.float32)(ids).logits
    assert float((got - ref).norm() / ref.norm()) < bound


@pytest.mark.parametrize("options,message", [
    ({"calib": "text.txt"}, "--calib: it uses no calibration data"),
    ({"method": "gptq"}, "--method gptq: needs calibration"),
    ({"scheme": "FP8"}, "--scheme FP8: needs calibration"),
    ({"scheme": "NVFP4A16"}, "--scheme NVFP4A16: needs calibration"),
    ({"scheme": "W8A8", "smoothquant": 0.5}, "--smoothquant"),
    ({"eval": "text.txt"}, "--eval"),
])
def test_what_needs_calibration_is_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({"out": str(tmp_path / "o"), "model": str(tmp_path), "model_free": True, **options})


def test_dry_run_states_the_plan(tmp_path, capsys):
    from jobs.quantize import main

    model = write_unknown_checkpoint(tmp_path / "nova")
    assert main(["--model", str(model), "--model-free", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "2 fused expert tensor(s)" in capsys.readouterr().out      # down_proj's 64 inputs: no group of 128
    assert main(["--model", str(model), "--model-free", "--group-size", "64", "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{LAYERS * 4} linear weight(s) and {LAYERS * 2} fused expert tensor(s)" in printed
    assert "worker(s) at once, each needing about" in printed and "nothing written" in printed
    assert not (tmp_path / "o").exists()


def test_an_mxfp4_source_writes_what_its_dequantized_weights_write(tmp_path):
    """gpt-oss releases store fused experts as MXFP4 blocks and scales (here the scales in another shard than
    their blocks): read dequantized, they give the artifact the same values stored in bfloat16 give."""
    from wq_ops.io.mxfp4_source import dequantize_mxfp4

    dense, mx = write_unknown_checkpoint(tmp_path / "dense"), tmp_path / "mxfp4"
    mx.mkdir()
    gen = torch.Generator().manual_seed(3)
    files = sorted(set(json.loads((dense / "model.safetensors.index.json").read_text())["weight_map"].values()))
    dense_shards = {f: load_file(str(dense / f)) for f in files}
    mx_shards: dict = {f: {} for f in files}
    mx_map = {}
    for k, f in enumerate(files):
        for name, value in dense_shards[f].items():
            if ".experts." not in name or not name.endswith(("gate_up_proj", "down_proj")):
                mx_shards[f][name], mx_map[name] = value, f
                continue
            experts, out_features, in_features = value.shape
            blocks = torch.randint(0, 256, (experts, out_features, in_features // 32, 16), generator=gen,
                                   dtype=torch.uint8)
            scales = torch.randint(118, 124, (experts, out_features, in_features // 32), generator=gen,
                                   dtype=torch.uint8)
            dense_shards[f][name] = dequantize_mxfp4(blocks, scales, torch.bfloat16)      # the same values
            other = files[(k + 1) % len(files)]
            mx_shards[f][name + "_blocks"], mx_shards[other][name + "_scales"] = blocks, scales
            mx_map[name + "_blocks"], mx_map[name + "_scales"] = f, other
    for f in files:
        save_file(dense_shards[f], str(dense / f), metadata={"format": "pt"})
        save_file(mx_shards[f], str(mx / f), metadata={"format": "pt"})
    (mx / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": mx_map}))
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (mx / "config.json").write_text(json.dumps(config))

    report = _run(mx, tmp_path / "from-mxfp4", scheme="W4A16", group_size=32, method="rtn")
    _run(dense, tmp_path / "from-dense", scheme="W4A16", group_size=32, method="rtn")
    got, want = artifact_files(tmp_path / "from-mxfp4"), artifact_files(tmp_path / "from-dense")
    assert got == want            # config.json too: the source's quantization_config is replaced
    assert report["source"]["mxfp4"] is True
    assert "model.layers.0.mlp.experts.gate_up_proj" in {t["name"] for t in report["tensors"] if t["weight_error"]}


@pytest.mark.parametrize("scheme", ["BNB_NF4", "BNB_FP4"])
def test_a_bnb_4bit_artifact_is_transformers_own(tmp_path, scheme):
    """--scheme BNB_NF4 writes what QLoRA users download: transformers + bitsandbytes load it and compute exactly
    the logits of the same weights quantized by bitsandbytes itself as they load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = write_checkpoint(tmp_path / "llama", "llama")
    report = _run(model, tmp_path / "out", scheme=scheme)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_use_double_quant"] is True
    assert "lm_head" in config["llm_int8_skip_modules"]
    assert report["totals"]["tensors_quantized"] == 3 * 7
    kind = scheme.removeprefix("BNB_").lower()
    theirs = AutoModelForCausalLM.from_pretrained(
        model, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.gpu
def test_a_gpu_worker_writes_the_cpus_bytes(tmp_path):
    """FP8 rounding and the packing are exact on the GPU: its tasks write the CPU's artifact. (HQQ's float32
    iterations may round a last bit differently on the GPU: its own GPU test bounds that.)"""
    model = write_unknown_checkpoint(tmp_path / "nova")
    for scheme in ("FP8_DYNAMIC", "W4A16"):
        options = dict(scheme=scheme, method="rtn", group_size=64) if scheme == "W4A16" else dict(scheme=scheme)
        _run(model, tmp_path / f"cpu-{scheme}", **options)
        _run(model, tmp_path / f"gpu-{scheme}", gpus_per_actor=1, **options)
        assert artifact_files(tmp_path / f"gpu-{scheme}") == artifact_files(tmp_path / f"cpu-{scheme}")


def test_model_free_hqq_writes_the_calibrated_jobs_hqq_weights(tmp_path):
    """HQQ needs no data: the calibrated job with --method hqq (whose calibration only measures the error)
    stores the very tensors the model-free job does, layer by layer."""
    from tests.factory import write_text

    model = write_checkpoint(tmp_path / "llama", "llama")
    _run(model, tmp_path / "free", method="hqq", group_size=32)
    calibrated = quantize(str(model), out=str(tmp_path / "calibrated"), method="hqq", group_size=32,
                          calib=str(write_text(tmp_path / "calib.txt")), samples=4, seq_len=32, progress=False)
    free, calib = _all_tensors(tmp_path / "free"), _all_tensors(calibrated.out_dir)
    packed = sorted(n for n in free if n.endswith(".weight_packed"))
    assert len(packed) == 3 * 7
    for name in packed:
        module = name.removesuffix(".weight_packed")
        for leaf in ("weight_packed", "weight_scale", "weight_shape"):
            assert torch.equal(free[f"{module}.{leaf}"], calib[f"{module}.{leaf}"]), f"{module}.{leaf}"
    assert calibrated.report["totals"]["layers_quantized"] == 3 * 7


def test_a_worker_that_cannot_fit_is_refused_with_the_numbers(tmp_path):
    from wq_ops.errors import ResourceError

    model = write_unknown_checkpoint(tmp_path / "nova")
    with pytest.raises(ResourceError, match=r"the largest shard's task needs about [0-9.]+ MiB and --actor-memory-gib "
                                            r"gives 0\.10 MiB"):
        _run(model, tmp_path / "o", actor_memory_gib=0.0001)
    assert not (tmp_path / "o").exists()


def test_fused_experts_kept_dense_are_ignored_under_the_names_vllm_asks_about(tmp_path):
    """vLLM decides a fused MoE layer's scheme by asking about `<experts>.0.gate_proj` (and up, down): fused
    experts kept dense must be listed by a pattern those names match, layer by layer, or vLLM gives the layer
    the quantized MoE method and fails to load them. None where they are quantized, or only half kept."""
    import re

    model = write_unknown_checkpoint(tmp_path / "nova")

    def experts_entries(out: Path, **options) -> list[str]:
        _run(model, out, scheme="W4A16", **options)
        ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
        return [x for x in ignore if x.startswith("re:")]

    kept = experts_entries(tmp_path / "kept", group_size=64, ignore=[r"re:.*mlp\.experts\..*"])
    assert kept == [r"re:model\.layers\.0\.mlp\.experts\..*", r"re:model\.layers\.1\.mlp\.experts\..*"]
    for i, entry in enumerate(kept):
        assert re.match(entry[3:], f"model.layers.{i}.mlp.experts.0.gate_proj")
        assert not re.match(entry[3:], f"model.layers.{1 - i}.mlp.experts.0.down_proj")
        assert not re.match(entry[3:], f"model.layers.{i}.self_attn.q_proj")
    assert experts_entries(tmp_path / "quantized", group_size=64) == []
    # Groups of 128: gate_up (in 128) quantized, down (in 64) kept: a layer no engine loads half and half.
    assert experts_entries(tmp_path / "half", group_size=128) == []
