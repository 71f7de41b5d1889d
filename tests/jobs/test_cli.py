import os
import subprocess
import sys
from pathlib import Path

import pytest

import jobs.quantize as cli
from wq_ops.cluster import driver
from wq_ops.config import Method
from wq_ops.device import cuda_context


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run_job(job, *, cache_dir, command, hub_token=None, progress=None):
        seen["job"], seen["command"] = job, command
        raise SystemExit(0)

    monkeypatch.setattr(driver, "run_job", fake_run_job)     # main imports it when it runs
    return seen


def test_the_command_line_module_imports_no_torch():
    """The CLI makes a GPU job's CUDA context while torch imports, so its module must not import torch."""
    code = "import sys, jobs.quantize; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr or "importing jobs.quantize imported torch"


@pytest.mark.parametrize("flags, starts", [
    ([], False),                                                  # a CPU job
    (["--gpus-per-actor", "1"], True),                            # one GPU actor in this process
    (["--gpus-per-actor", "1", "--runtime", "local"], True),
    (["--gpus-per-actor", "1", "--actors", "2"], False),          # actors in Ray's processes
    (["--gpus-per-actor", "1", "--address", "ray://head:10001"], False),
])
def test_only_an_in_process_gpu_job_starts_its_cuda_context_early(tmp_path, captured, monkeypatch, flags, starts):
    started = []
    monkeypatch.setattr(cuda_context, "start_primary_context", lambda ordinal=0: started.append(ordinal))
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path), *flags])
    assert started == ([0] if starts else [])
    # torch's default module loading, set before the driver reads it (at cuInit); a user's choice stays.
    assert os.environ.get("CUDA_MODULE_LOADING") == ("LAZY" if starts else None)
    if starts:
        monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
        with pytest.raises(SystemExit):
            cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path), *flags])
        assert os.environ["CUDA_MODULE_LOADING"] == "EAGER"


def test_yaml_then_flags_override(tmp_path, captured):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: /models/x\ncalib: c.txt\nmethod: awq\nbits: 3\ngroup_size: 64\nsamples: 16\n"
                   "ignore: ['*.down_proj']\n")
    with pytest.raises(SystemExit):
        cli.main(["--config", str(cfg), "--bits", "4", "--out", str(tmp_path / "o"), "--asym"])
    job = captured["job"]
    assert job.quant.method is Method.AWQ and job.quant.bits == 4 and job.quant.group_size == 64
    assert job.quant.sym is False and job.calib.n_samples == 16 and job.quant.ignore == ("*.down_proj",)
    assert job.quant.act_order is False
    assert captured["command"].startswith("wq --config")


def test_gptq_defaults_to_act_order(tmp_path, captured):
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path)])
    assert captured["job"].quant.act_order is True
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path), "--no-act-order",
                  "--group-size", "channel"])
    assert captured["job"].quant.act_order is False and captured["job"].quant.group_size is None


def test_bad_values_exit_2_naming_the_field(tmp_path, capsys):
    assert cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path), "--bits", "5"]) == 2
    assert "wq: error: bits=5: expected one of 2, 3, 4, 8" in capsys.readouterr().err
    cfg = tmp_path / "job.yaml"
    cfg.write_text("grup_size: 64\n")
    assert cli.main(["--config", str(cfg)]) == 2
    assert "unknown option(s) grup_size" in capsys.readouterr().err


def test_ray_address_comes_from_the_environment(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--calib", "c.txt", "--out", str(tmp_path)])
    assert captured["job"].run.address == "ray://head:10001"


def test_the_command_line_exits_fast_with_everything_written(tmp_path):
    """`python -m jobs.quantize` skips the interpreter's teardown: the artifact, its index, report and the
    closing line must all be out first, and the exit code must still say what happened."""
    import json

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WQ_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "jobs.quantize", "--out", str(out), "--runtime", "local"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"wrote {out}:"), done.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / shard).is_file() for shard in set(index["weight_map"].values()))
    assert json.loads((out / "wq_report.json").read_text())["totals"]["layers_quantized"] > 0
    bad = subprocess.run([sys.executable, "-m", "jobs.quantize", "--out", str(out), "--bits", "5"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "wq: error: bits=5" in bad.stderr


def test_a_dry_run_prints_the_plan_and_the_calibration_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "o"
    assert cli.main(["--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "plan: " in printed and "dry run: the plan fits; nothing written" in printed
    assert "calibration: the text bundled with wq: 32 windows of 512 tokens, 32 distinct" in printed
    assert "disk: the artifact needs about " in printed and " GiB free at " in printed
    assert not out.exists()


def test_a_real_model_without_calibration_text_is_refused_naming_good_choices(tmp_path, capsys):
    assert cli.main(["--model", "org/some-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wq: error: calib: none given for org/some-model") and err.count("\n") == 1
    assert "WikiText-2" in err and "--calib wq:bundled" in err
    assert not (tmp_path / "o").exists()
