"""What the whole-job tests on tiny mixture-of-experts checkpoints share: the checkpoints of every MoE
architecture and calibration text, a job on one of them, the same GPTQ job on several sources, and an artifact's
shards and tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.factory import MOE_ARCHS, write_checkpoint, write_text
from wq_ops.cluster.driver import run_job
from wq_ops.config import JobConfig


def moe_checkpoints(root: Path) -> tuple[dict[str, Path], Path]:
    """A tiny checkpoint of every MoE architecture (released names), and calibration text."""
    return {arch: write_checkpoint(root / arch, arch) for arch in MOE_ARCHS}, write_text(root / "calib.txt")


def quantize(tmp_path: Path, checkpoints, arch: str, name: str, **options):
    models, calib = checkpoints
    base = {"model": str(models[arch]), "out": str(tmp_path / name), "calib": str(calib), "samples": 8,
            "seq_len": 64, "micro_batch_samples": 4, "group_size": 32}
    return run_job(JobConfig.from_dict({**base, **options}), cache_dir=tmp_path / "cache")


def gptq_jobs(tmp_path: Path, calib: Path, **options_and_models):  # type: ignore[no-untyped-def]
    """The same GPTQ job (8 samples of 64 tokens, groups of 32, in-process) on each model given by name (a Path),
    each into tmp_path / name; other keywords are job options. Returns {name: result}, in the order given."""
    models = {k: v for k, v in options_and_models.items() if isinstance(v, Path)}
    options = {k: v for k, v in options_and_models.items() if not isinstance(v, Path)}
    base = {"calib": str(calib), "samples": 8, "seq_len": 64, "micro_batch_samples": 4, "group_size": 32,
            "method": "gptq", "runtime": "local", **options}
    return {name: run_job(JobConfig.from_dict({**base, "model": str(model), "out": str(tmp_path / name)}),
                          cache_dir=tmp_path / "cache") for name, model in models.items()}


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def artifact_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for p in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(p)))
    return tensors
