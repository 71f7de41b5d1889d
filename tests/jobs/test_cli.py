import pytest

import jobs.quantize as cli
from wq_ops.config import Method


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run_job(job, *, cache_dir, command, hub_token=None):
        seen["job"], seen["command"] = job, command
        raise SystemExit(0)

    monkeypatch.setattr(cli, "run_job", fake_run_job)
    return seen


def test_yaml_then_flags_override(tmp_path, captured):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: /models/x\nmethod: awq\nbits: 3\ngroup_size: 64\nsamples: 16\nignore: ['*.down_proj']\n")
    with pytest.raises(SystemExit):
        cli.main(["--config", str(cfg), "--bits", "4", "--out", str(tmp_path / "o"), "--asym"])
    job = captured["job"]
    assert job.quant.method is Method.AWQ and job.quant.bits == 4 and job.quant.group_size == 64
    assert job.quant.sym is False and job.calib.n_samples == 16 and job.quant.ignore == ("*.down_proj",)
    assert job.quant.act_order is False
    assert captured["command"].startswith("wq --config")


def test_gptq_defaults_to_act_order(tmp_path, captured):
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--out", str(tmp_path)])
    assert captured["job"].quant.act_order is True
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--out", str(tmp_path), "--no-act-order", "--group-size", "channel"])
    assert captured["job"].quant.act_order is False and captured["job"].quant.group_size is None


def test_bad_values_exit_2_naming_the_field(tmp_path, capsys):
    assert cli.main(["--model", "m", "--out", str(tmp_path), "--bits", "5"]) == 2
    assert "wq: error: bits=5: expected one of 2, 3, 4, 8" in capsys.readouterr().err
    cfg = tmp_path / "job.yaml"
    cfg.write_text("grup_size: 64\n")
    assert cli.main(["--config", str(cfg)]) == 2
    assert "unknown option(s) grup_size" in capsys.readouterr().err


def test_ray_address_comes_from_the_environment(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(SystemExit):
        cli.main(["--model", "m", "--out", str(tmp_path)])
    assert captured["job"].run.address == "ray://head:10001"


def test_the_command_line_exits_fast_with_everything_written(tmp_path):
    """`python -m jobs.quantize` skips the interpreter's teardown: the artifact, its index, report and the
    closing line must all be out first, and the exit code must still say what happened."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

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
