"""wq's Python API, for notebooks and pipelines: `quantize(model, out=..., method=..., calib=...)` runs the
same job as the command line (`wq`, `python -m jobs.quantize`), with the same option table, defaults and
checks, and returns a `QuantizeResult`. The command line is this function behind argparse.

    from wq_ops.api import quantize
    result = quantize("/models/Llama-3.1-8B", out="out/llama-w4", calib="wiki.txt", actors=4, gpus_per_actor=1)
    result.out_dir, result.totals["mean_output_error"], result.worst_layers(5)

Every option of `wq --help` is a keyword argument here, with '_' for '-' (`group_size=64`, `calib_allow_repeats=True`).
It imports no torch, Ray or transformers until it runs: an in-process GPU actor's CUDA context is made while
torch imports. Inside a Ray driver the user already has (`ray.init()` done), the actors join that Ray.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from wq_ops.cluster.runtime_choice import choose_runtime
from wq_ops.config import JobConfig
from wq_ops.report.progress import BarReporter, BlockProgress, CallbackReporter, LogReporter, ProgressReporter

if TYPE_CHECKING:
    from wq_ops.calib.data import CalibrationSummary
    from wq_ops.cluster.plan import JobPlan
    from wq_ops.cluster.shard_plan import ShardPlan

__all__ = ["quantize", "job_config", "QuantizeResult", "LayerError", "BlockProgress", "cache_dir"]

@dataclass(frozen=True)
class LayerError:
    """One linear layer's result: output_error = ||(W - Q) X||^2 / ||W X||^2 on its block's calibration inputs
    (0 for a layer left unquantized)."""

    name: str
    block: int
    quantized: bool
    output_error: float
    tokens: int | None                    # calibration tokens its statistics came from (an expert: those routed)
    starved: bool                         # an expert with too few tokens, quantized with RTN


@dataclass(frozen=True)
class QuantizeResult:
    """What a job made. After a dry run: the plan, the calibration summary and the disk check only."""

    out_dir: Path
    plan: "JobPlan | ShardPlan"          # a model-free job's: its shards, tensors and memory
    report: dict[str, Any] | None        # wq_report.json's content (None after a dry run)
    layers: tuple[LayerError, ...]       # in block order
    calibration: "CalibrationSummary | None"
    disk: str                            # the room the artifact needs at out, and what is free there

    @property
    def dry_run(self) -> bool:
        return self.report is None

    @property
    def model_free(self) -> bool:
        return bool(self.report and self.report.get("model_free"))

    def summary(self) -> str:
        """One line on what the job wrote (the command line prints it)."""
        t = self.totals
        if self.model_free:
            return (f"wrote {self.out_dir}: {t['tensors_quantized']} tensors quantized without calibration, mean "
                    f"weight error {t['mean_weight_error']:.3e}, {t['wall_seconds']:.1f} s; report in "
                    f"{self.out_dir / 'wq_report.json'}")
        return (f"wrote {self.out_dir}: {t['layers_quantized']} layers quantized, mean output error "
                f"{t['mean_output_error']:.3e}, {t['wall_seconds']:.1f} s; report in {self.report_html}")

    @property
    def totals(self) -> dict[str, Any]:
        """The report's totals: layers quantized and kept, mean and worst output error, wall seconds, ..."""
        return dict(self.report["totals"]) if self.report else {}

    @property
    def perplexity(self) -> float | None:
        """The artifact's perplexity on `eval`'s text (None where the job was not asked to evaluate)."""
        evaluation = self.report.get("eval") if self.report else None
        return float(evaluation["perplexity"]) if evaluation else None

    @property
    def report_html(self) -> Path:
        return self.out_dir / "wq_report.html"

    def worst_layers(self, n: int = 10) -> list[LayerError]:
        """The `n` quantized layers of largest output error, largest first."""
        return sorted((layer for layer in self.layers if layer.quantized), key=lambda layer: -layer.output_error)[:n]


def cache_dir() -> Path:
    """Where wq keeps the bundled model and Hub downloads: $WQ_CACHE_DIR, else $XDG_CACHE_HOME/wq, else
    ~/.cache/wq."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("WQ_CACHE_DIR") or root / "wq")


def job_config(model: str | os.PathLike[str] | None = None, **options: Any) -> JobConfig:
    """The job `quantize` would run: the option table's defaults and checks (a ConfigError names a bad or
    unknown option, with a "did you mean"); $RAY_ADDRESS where no `address` is given, as the CLI reads it."""
    given = dict(options)
    if model is not None:
        given["model"] = os.fspath(model)
    if given.get("address") is None and os.environ.get("RAY_ADDRESS"):
        given["address"] = os.environ["RAY_ADDRESS"]
    return JobConfig.from_dict(given)


def quantize(model: str | os.PathLike[str] | None = None, *,
             progress: bool | Callable[[BlockProgress], None] = True, hub_token: str | None = None,
             command: str = "", **options: Any) -> QuantizeResult:
    """Quantize `model` (a checkpoint directory or Hub repo id; None: wq's bundled tiny model) with the
    options of `wq --help` as keyword arguments. Raises a WqError subclass naming the problem for anything
    that can be checked before the work starts.

    progress: True shows a live bar on a terminal or in a notebook (one log line per block otherwise), False
    logs the lines only, a function is called with each block's `BlockProgress`. hub_token: for push_to_hub
    (default: HF_TOKEN or the huggingface_hub login). command: the command line to record in the report."""
    job = job_config(model, **options)
    if job.model_free:
        from wq_ops.cluster.model_free import run_model_free
        from wq_ops.io.hub_push import resolve_token as resolve

        done_free = run_model_free(job, cache_dir=cache_dir(), command=command,
                                   hub_token=resolve(hub_token) if job.push_to_hub and not job.dry_run else None)
        return QuantizeResult(out_dir=done_free.out_dir, plan=done_free.plan, report=done_free.report, layers=(),
                              calibration=None, disk=done_free.disk)
    if job.run.gpus_per_actor > 0 and choose_runtime(job.run).name == "local":
        # The in-process actor's CUDA context, made while torch imports (the driver imports it). torch's
        # own default, set first: the CUDA driver reads it once, at cuInit.
        from wq_ops.device import cuda_context

        os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
        cuda_context.start_primary_context(0)
    from wq_ops.cluster.driver import run_job
    from wq_ops.io.hub_push import resolve_token

    token = resolve_token(hub_token) if job.push_to_hub and not job.dry_run else None
    done = run_job(job, cache_dir=cache_dir(), command=command, hub_token=token, progress=_reporter(progress))
    layers = tuple(LayerError(name=layer["name"], block=layer["block"], quantized=layer["quantized"],
                              output_error=layer["output_error"], tokens=layer.get("tokens"),
                              starved=bool(layer.get("starved")))
                   for layer in (done.report or {}).get("layers", ()))
    return QuantizeResult(out_dir=done.out_dir, plan=done.plan, report=done.report, layers=layers,
                          calibration=done.calibration, disk=done.disk)


def _reporter(progress: bool | Callable[[BlockProgress], None]) -> ProgressReporter:
    if callable(progress):
        return CallbackReporter(progress)
    if not progress:
        return LogReporter()
    # A terminal, or a notebook (whose stderr is no terminal, but shows a bar's redraws).
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
        return BarReporter(sys.stderr)
    return LogReporter()
