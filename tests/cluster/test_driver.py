"""The whole job on Ray with tiny checkpoints: the artifact, identity across actor counts, and every
refusal that must happen before any work."""

import json
import re
from pathlib import Path

import pytest
import torch

from tests.factory import write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig
from wq_ops.errors import ArtifactError, CheckpointError, ConfigError, ResourceError

pytestmark = pytest.mark.usefixtures("ray_session")


def job(tmp_path: Path, **options) -> JobConfig:
    base = {"out": str(tmp_path / "out"), "samples": 6, "seq_len": 64, "micro_batch_samples": 4}
    return JobConfig.from_dict({**base, **options})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return write_checkpoint(d / "m", "llama", num_hidden_layers=4), write_text(d / "calib.txt")


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


def test_bundled_default_job(tmp_path):
    """No --model: the bundled tiny model and text, written into a cache, then a complete artifact."""
    import ray

    if not ray.is_initialized():
        pytest.skip("needs the session's Ray")
    result = run_job(job(tmp_path), cache_dir=tmp_path / "cache", command="wq")
    out = result.out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards(out)) and len(shards(out)) == 6
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    for name in ("tokenizer.json", "README.md", "wq_report.json", "wq_report.html"):
        assert (out / name).is_file(), name
    assert not (out / ".wq-staging").exists()
    report = json.loads((out / "wq_report.json").read_text())
    assert report["totals"]["layers_quantized"] == 28 and len(report["layers"]) == 28
    layer = report["layers"][0]
    assert {"output_error", "damp_frac", "seconds", "outliers"} <= set(layer)
    assert 0 < layer["output_error"] < 0.1 and layer["damp_frac"] == 0.01
    assert "<svg" in (out / "wq_report.html").read_text()
    [startup] = report["startup"]["actors"]
    assert set(startup) == {"spawn_and_imports_s", "device_s", "kernels_s", "warmup_s", "transformers_s", "ready_s",
                            "node"}
    assert 0 <= startup["ready_s"] <= report["startup"]["ready_s"] <= report["totals"]["wall_seconds"]
    assert 0 <= report["startup"]["runtime_start_s"] <= report["startup"]["ready_s"]
    assert 0 <= report["startup"]["prepare_s"] <= report["startup"]["ready_s"]
    [memory] = report["memory"]                      # a CPU actor: the plan's number, no device peaks
    assert memory == {"rank": 0, "planned_bytes": result.plan.actors[0].memory.total}


def test_artifact_loads_in_transformers_and_matches_our_weights(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    model_dir, calib = llama
    result = run_job(job(tmp_path, model=str(model_dir), calib=str(calib), group_size=64), cache_dir=tmp_path)
    # A user's plain call, with transformers' defaults and Hugging Face's `kernels` installed (use_kernels on).
    model = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 32, 258) and bool(torch.isfinite(logits).all())
    from safetensors import safe_open

    from wq_ops.formats.compressed_tensors import decode_linear
    from wq_ops.quant.result import dequantize

    name = "model.layers.2.mlp.down_proj"
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name + ".weight_packed"]
    with safe_open(str(result.out_dir / shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
    ours = dequantize(decode_linear(name, tensors, bits=4, group_size=64), torch.bfloat16)
    module = model.get_submodule(name)
    if hasattr(module, "weight"):
        assert torch.equal(module.weight, ours)


def test_same_bytes_with_one_and_three_actors(tmp_path, llama, caplog):
    model_dir, calib = llama
    one = run_job(job(tmp_path / "a", model=str(model_dir), calib=str(calib), group_size=64), cache_dir=tmp_path)
    with caplog.at_level("INFO", logger="wq_ops.report.progress"):
        three = run_job(job(tmp_path / "b", model=str(model_dir), calib=str(calib), group_size=64, actors=3),
                        cache_dir=tmp_path)
    progress = [r.getMessage() for r in caplog.records if "done=" in r.getMessage()]
    assert len(progress) == 4 and all("tokens_per_s=" in m and "eta_s=" in m for m in progress)
    assert any("actor=0 actor_done=2/2" in m for m in progress) and "done=4/4" in progress[-1]
    assert [len(a.blocks) for a in three.plan.actors] == [2, 1, 1]
    assert shards(one.out_dir) == shards(three.out_dir)
    assert (one.out_dir / "model.safetensors.index.json").read_bytes() == \
        (three.out_dir / "model.safetensors.index.json").read_bytes()


@pytest.mark.parametrize("arch,method", [("mistral", "rtn"), ("qwen2", "awq"), ("qwen3", "gptq"), ("llama", "awq")])
def test_each_architecture_and_method(tmp_path, arch, method):
    model_dir = write_checkpoint(tmp_path / "m", arch, num_key_value_heads=4 if method == "awq" else 2)
    result = run_job(job(tmp_path, model=str(model_dir), calib=str(write_text(tmp_path / "c.txt")), method=method,
                         group_size=32, **({"awq_search_samples": 2} if method == "awq" else {})), cache_dir=tmp_path)
    report = result.report
    assert report is not None and report["totals"]["layers_quantized"] == 21
    errors = [x["output_error"] for x in report["layers"]]
    assert max(errors) < 0.2 and min(errors) > 0
    if method == "awq":
        assert any(x["awq_ratio"] is not None for x in report["layers"])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_native_and_transformers_modeling_write_the_same_bytes(tmp_path, llama, method):
    """A plain Llama runs wq's native modules by default; transformers' classes give the same artifact."""
    model_dir, calib = llama
    results = {m: run_job(job(tmp_path / m, model=str(model_dir), calib=str(calib), group_size=64, method=method,
                              modeling=m), cache_dir=tmp_path)
               for m in ("auto", "transformers")}
    assert results["auto"].report["source"]["modeling"] == "native"
    assert results["transformers"].report["source"]["modeling"] == "transformers"
    assert shards(results["auto"].out_dir) == shards(results["transformers"].out_dir)


def test_stray_config_keys_give_the_same_bytes_either_way(tmp_path, llama):
    """A sliding_window (Llama's model applies none) and an attention_dropout (none outside training) in a
    Llama config.json: transformers' classes and the native modules still write the same artifact."""
    import shutil

    model_dir, calib = llama
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "sliding_window": 16, "attention_dropout": 0.1}))
    out = {m: shards(run_job(job(tmp_path / m, model=str(d), calib=str(calib), group_size=64, modeling=m),
                             cache_dir=tmp_path).out_dir) for m in ("auto", "transformers")}
    assert out["auto"] == out["transformers"]


def test_the_fingerprint_follows_the_classes_that_ran(tmp_path, llama):
    """auto and native run the same modules on a plain Llama, so a job stopped under one resumes under the
    other; transformers' classes are another computation."""
    from wq_ops.cluster.driver import prepare_job

    model_dir, calib = llama
    prints = {m: prepare_job(job(tmp_path, model=str(model_dir), calib=str(calib), modeling=m, dry_run=True),
                             cache_dir=tmp_path).artifact.fingerprint for m in ("auto", "native", "transformers")}
    assert prints["auto"] == prints["native"] != prints["transformers"]


def test_native_modeling_refuses_what_it_does_not_compute(tmp_path):
    model_dir = write_checkpoint(tmp_path / "m", "mistral")
    with pytest.raises(ConfigError, match="modeling=native: .*is not one of.*--modeling auto or transformers"):
        run_job(job(tmp_path, model=str(model_dir), calib=str(write_text(tmp_path / "c.txt")), modeling="native"),
                cache_dir=tmp_path)
    assert nothing_written(tmp_path / "out")
    auto = run_job(job(tmp_path / "auto", model=str(model_dir), calib=str(tmp_path / "c.txt")), cache_dir=tmp_path)
    assert auto.report["source"]["modeling"] == "transformers"


def test_ignored_layers_stay_dense(tmp_path, llama):
    model_dir, calib = llama
    result = run_job(job(tmp_path, model=str(model_dir), calib=str(calib), group_size=64,
                         ignore=["*.mlp.down_proj"]), cache_dir=tmp_path)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["ignore"]
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.3.mlp.down_proj.weight" in index and "model.layers.3.mlp.up_proj.weight_packed" in index


def test_llm_compressor_regex_patterns_keep_layers_dense_and_a_pattern_matching_nothing_is_refused(tmp_path, llama):
    model_dir, calib = llama
    result = run_job(job(tmp_path / "re", model=str(model_dir), calib=str(calib), group_size=64,
                         ignore=["re:.*gate_proj$", "re:model\\.layers\\.0\\."]), cache_dir=tmp_path)
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.3.mlp.gate_proj.weight" in index and "model.layers.3.mlp.up_proj.weight_packed" in index
    assert "model.layers.0.self_attn.q_proj.weight" in index and "model.layers.1.self_attn.q_proj.weight_packed" \
        in index
    for pattern in ["re:gate_proj$", "*.mlp.gate"]:     # re: matches from the name's start; fnmatch the whole name
        with pytest.raises(ConfigError, match=f"ignore='{re.escape(pattern)}': this .* matches no linear module "
                                              "of the model"):
            run_job(job(tmp_path / "none", model=str(model_dir), calib=str(calib), ignore=[pattern]),
                    cache_dir=tmp_path)
        assert nothing_written(tmp_path / "none")


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_unsupported_architecture_refused_before_work(tmp_path, llama):
    import shutil

    model_dir, calib = llama
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    config["model_type"] = "falcon"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture FalconForCausalLM"):
        run_job(job(tmp_path, model=str(d), calib=str(calib)), cache_dir=tmp_path)
    assert nothing_written(tmp_path / "out")


def test_corrupt_shard_refused_before_work(tmp_path, llama):
    import shutil

    model_dir, calib = llama
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=victim.name):
        run_job(job(tmp_path, model=str(d), calib=str(calib)), cache_dir=tmp_path)
    assert nothing_written(tmp_path / "out")


def test_group_size_that_does_not_divide_names_layers_and_options(tmp_path, llama):
    model_dir, calib = llama
    with pytest.raises(ConfigError) as e:
        run_job(job(tmp_path, model=str(model_dir), calib=str(calib), group_size=96), cache_dir=tmp_path)
    message = str(e.value)
    assert "group_size=96" in message and "self_attn.q_proj (in=128)" in message and "--group-size 128" in message
    assert "--ignore" in message
    assert nothing_written(tmp_path / "out")


def test_plan_that_does_not_fit_is_refused_with_numbers(tmp_path, llama):
    model_dir, calib = llama
    with pytest.raises(ResourceError, match=r"needs .* GiB of cpu memory .* but may use"):
        run_job(job(tmp_path, model=str(model_dir), calib=str(calib), actor_memory_gib=0.0001), cache_dir=tmp_path)
    assert nothing_written(tmp_path / "out")


def test_complete_artifact_is_not_overwritten_without_asking(tmp_path, llama):
    model_dir, calib = llama
    options = dict(model=str(model_dir), calib=str(calib), method="rtn", group_size=64)
    first = run_job(job(tmp_path, **options), cache_dir=tmp_path)
    before = shards(first.out_dir)
    with pytest.raises(ArtifactError, match="already holds a complete artifact"):
        run_job(job(tmp_path, **{**options, "bits": 8}), cache_dir=tmp_path)
    assert shards(first.out_dir) == before
    second = run_job(job(tmp_path, **{**options, "bits": 8, "overwrite": True}), cache_dir=tmp_path)
    assert shards(second.out_dir) != before
    assert json.loads((second.out_dir / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["num_bits"] == 8


def test_dry_run_writes_nothing(tmp_path, llama):
    model_dir, calib = llama
    result = run_job(job(tmp_path, model=str(model_dir), calib=str(calib), dry_run=True, actors=2), cache_dir=tmp_path)
    assert result.report is None and len(result.plan.actors) == 2
    assert "weights" in result.plan.describe()
    assert nothing_written(tmp_path / "out")


def _timeline(out: Path) -> dict[int, list[tuple[float, float]]]:
    """Per actor: (compute start, staged) of each block, from the report. The start is the block's
    staging time minus its compute and write seconds (its load ran ahead, in the loader thread)."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for b in json.loads((out / "wq_report.json").read_text())["blocks"]:
        busy = sum(v for k, v in b["seconds"].items() if k != "load")
        spans.setdefault(b["rank"], []).append((b["finished_at"] - busy, b["finished_at"]))
    return spans


def test_float_propagation_pipelines_the_actors_with_the_same_bytes(tmp_path):
    """With float propagation each actor hands its span's float outputs on before it quantizes a block,
    so the next actor's inputs never wait for the previous actor's quantization; with quantized
    propagation they can only leave after the last block. The checks follow causality (one actor's own
    sequence of calls, and a receiver after its sender), not wall-clock overlap between processes, which a
    loaded machine may not give. The artifact does not depend on the actor count."""
    model_dir = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=8)
    calib = write_text(tmp_path / "calib.txt")
    kw = dict(model=str(model_dir), calib=str(calib), group_size=64, propagation="float", span_mode="block")
    one = run_job(job(tmp_path / "a", **kw), cache_dir=tmp_path)
    two = run_job(job(tmp_path / "b", actors=2, **kw), cache_dir=tmp_path)
    assert shards(one.out_dir) == shards(two.out_dir)
    spans, handoff = _timeline(two.out_dir), _handoff(two.out_dir)
    assert handoff[0]["handed_on_at"] <= min(start for start, _ in spans[0]), \
        "the first actor quantized before handing its outputs on"
    assert handoff[1]["inputs_at"] >= handoff[0]["handed_on_at"]
    assert "handed_on_at" not in handoff[1]          # the last actor hands nothing on
    chained = run_job(job(tmp_path / "c", actors=2, **{**kw, "propagation": "quantized"}), cache_dir=tmp_path)
    assert shards(chained.out_dir) != shards(one.out_dir)
    spans, handoff = _timeline(chained.out_dir), _handoff(chained.out_dir)
    assert handoff[0]["handed_on_at"] >= max(end for _, end in spans[0])
    assert handoff[1]["inputs_at"] >= handoff[0]["handed_on_at"]


def _handoff(out: Path) -> dict[int, dict[str, float]]:
    return {h["rank"]: h for h in json.loads((out / "wq_report.json").read_text())["handoff"]}


def test_streamed_spans_give_the_same_bytes_as_one_block_at_a_time(tmp_path):
    """Float propagation with micro-batches streaming through resident spans, actor to actor: the artifact
    is byte-identical to one actor's and to the span-by-span pipeline's, for GPTQ and AWQ."""
    model_dir = write_checkpoint(tmp_path / "m", "llama", num_hidden_layers=6)
    calib = write_text(tmp_path / "calib.txt")
    for method in ("gptq", "awq"):
        kw = dict(model=str(model_dir), calib=str(calib), group_size=64, propagation="float", method=method,
                  micro_batch_samples=2)
        one = run_job(job(tmp_path / f"{method}-1", **kw), cache_dir=tmp_path)
        assert not one.plan.streamed
        streamed = run_job(job(tmp_path / f"{method}-3", actors=3, **kw), cache_dir=tmp_path)
        assert streamed.plan.streamed
        by_block = run_job(job(tmp_path / f"{method}-3b", actors=3, span_mode="block", **kw), cache_dir=tmp_path)
        assert not by_block.plan.streamed
        assert shards(one.out_dir) == shards(streamed.out_dir) == shards(by_block.out_dir)
        handoff = _handoff(streamed.out_dir)
        assert handoff[0]["handed_on_at"] <= handoff[1]["inputs_at"]
        assert handoff[1]["handed_on_at"] <= handoff[2]["inputs_at"] and "handed_on_at" not in handoff[2]
