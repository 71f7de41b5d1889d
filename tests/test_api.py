"""The Python API: the command line's job with the same defaults and checks, a result to read, progress as a
callback, and a Ray the user already started."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

import jobs.quantize as cli
from wq_ops.api import QuantizeResult, job_config, quantize
from wq_ops.errors import ConfigError

SMALL = {"samples": 8, "seq_len": 128}           # the bundled model, a few windows: seconds per job


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WQ_CACHE_DIR", str(tmp_path / "cache"))


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name != "wq_report.json"}


def instants(value, key=""):
    """Every (key, value) of the report whose key names an instant (ends in `_at`), at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from instants(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from instants(v, key)
    elif key.endswith("_at"):
        yield key, value


def test_the_api_writes_the_artifact_the_command_line_writes(tmp_path):
    started = time.time()
    assert cli.main(["--out", str(tmp_path / "cli"), "--samples", "8", "--seq-len", "128"]) == 0
    seen = []
    result = quantize(out=tmp_path / "api", progress=seen.append, **SMALL)
    assert isinstance(result, QuantizeResult) and not result.dry_run
    assert files(tmp_path / "cli") == files(result.out_dir)            # same defaults: the same bytes
    assert result.report_html.is_file()
    # Progress: one call per block, in the order staged, the last with nothing left.
    assert [p.done for p in seen] == [1, 2, 3, 4] and all(p.total == 4 for p in seen)
    assert seen[-1].eta_s == 0.0 and all(p.tokens_per_s > 0 for p in seen)
    # The per-layer errors are the report's, in block order; the worst first.
    totals = result.totals
    assert len(result.layers) == totals["layers_quantized"] + totals["layers_kept"]
    assert [layer.block for layer in result.layers] == sorted(layer.block for layer in result.layers)
    worst = result.worst_layers(3)
    assert worst[0].name == totals["worst_layer"]["name"]
    assert [w.output_error for w in worst] == sorted((w.output_error for w in worst), reverse=True)
    # The report's schema: versioned, and every instant in one format (epoch seconds, during this job).
    report = result.report
    assert report["schema_version"] == 2 and report["time_format"] == "unix epoch seconds (UTC)"
    found = dict(instants(report))
    assert {"created_at", "finished_at"} <= set(found)
    assert all(isinstance(v, float) and started <= v <= time.time() for _, v in instants(report))


def test_a_dry_run_returns_the_plan_and_writes_nothing(tmp_path):
    result = quantize(out=tmp_path / "o", dry_run=True, **SMALL)
    assert result.dry_run and result.layers == () and result.totals == {}
    assert "4 blocks" in result.plan.describe() and result.calibration is not None
    assert not (tmp_path / "o").exists()


def test_a_misspelt_option_is_an_error_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"grop_size \(did you mean group_size\?\)"):
        quantize(out=tmp_path / "o", grop_size=64)
    with pytest.raises(ConfigError, match="bits=5"):
        quantize(out=tmp_path / "o", bits=5)
    assert not (tmp_path / "o").exists()


def test_the_api_takes_the_cluster_address_from_the_environment_as_the_cli_does(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert job_config("m", out="o", calib="c.txt").run.address == "ray://head:10001"
    assert job_config("m", out="o", calib="c.txt", address="ray://other:10001").run.address == "ray://other:10001"


def test_importing_the_api_imports_no_torch_ray_or_transformers():
    """So that `from wq_ops.api import quantize` is cheap, and an in-process GPU actor's CUDA context can be
    made while torch imports."""
    code = ("import sys, wq_ops.api; heavy = {'torch', 'ray', 'transformers'} & set(sys.modules); "
            "sys.exit(', '.join(sorted(heavy)) or None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_inside_a_ray_driver_the_user_started_the_actors_join_it_and_it_stays_up(tmp_path):
    import ray

    ray.shutdown()                   # a Ray another test in this process left up is not this test's user's
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = quantize(out=tmp_path / "o", actors=2, progress=False, **SMALL)
        assert ray.is_initialized()                      # wq did not shut the user's Ray down
        assert len(result.plan.actors) == 2 and result.totals["blocks"] == 4
    finally:
        ray.shutdown()
