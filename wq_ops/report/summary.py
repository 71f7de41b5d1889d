"""Build `wq_report.json`'s content from the actors' shard records. Pure: dicts in, a dict out.

Schema (`schema_version`): 2 since every instant is one format, Unix epoch seconds (UTC) under a key ending
in `_at` (`created_at`, blocks' `finished_at`, handoffs, restarts); durations are seconds under `_s` or
`seconds` keys. Version 1 had an ISO `created`."""

from __future__ import annotations

import math
import platform
import time
from typing import Any, Mapping, Sequence

__all__ = ["build_report", "library_versions", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2


def library_versions() -> dict[str, str]:
    """Versions of the libraries the job ran with, from package metadata: importing Ray only to read its
    version cost a second at the end of every job that ran without it."""
    from importlib.metadata import PackageNotFoundError, version

    import wq_ops

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"wq": wq_ops.__version__, "python": platform.python_version(),
            **{name: installed(name) for name in ("torch", "transformers", "safetensors", "ray")}}


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values)) if values else 0.0


def _phase_totals(blocks: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for b in blocks:
        for phase, s in b["seconds"].items():
            totals[phase] = totals.get(phase, 0.0) + s
    return {k: round(v, 4) for k, v in totals.items()}


def build_report(*, job: Mapping[str, Any], source: Mapping[str, Any], plan: Mapping[str, Any],
                 records: Sequence[Mapping[str, Any]], shard_names: Mapping[str, str], wall_seconds: float,
                 versions: Mapping[str, str]) -> dict[str, Any]:
    """records: ShardRecord dicts (embed, blocks, head); shard_names: staged path -> final shard name."""
    blocks = sorted((r for r in records if r["part"] == "block"), key=lambda r: r["block"])
    layers = [layer for b in blocks for layer in b["layers"]]
    quantized = [layer for layer in layers if layer["quantized"]]
    errors = [layer["output_error"] for layer in quantized]
    worst = max(quantized, key=lambda layer: layer["output_error"], default=None)
    actors: dict[int, dict[str, Any]] = {}
    for b in blocks:
        a = actors.setdefault(b["rank"], {"rank": b["rank"], "blocks": [], "seconds": {}})
        a["blocks"].append(b["block"])
        for phase, s in b["seconds"].items():
            a["seconds"][phase] = round(a["seconds"].get(phase, 0.0) + s, 4)
    return {
        "schema_version": SCHEMA_VERSION,
        "time_format": "unix epoch seconds (UTC)",
        "wq_version": versions.get("wq"),
        "created_at": round(time.time(), 3),
        "job": dict(job),
        "source": dict(source),
        "versions": dict(versions),
        "plan": dict(plan),
        "totals": {
            "wall_seconds": round(wall_seconds, 3),
            "blocks": len(blocks),
            "blocks_resumed": sum(1 for b in blocks if b.get("resumed")),   # staged by an earlier run
            "layers_quantized": len(quantized),
            "layers_kept": len(layers) - len(quantized),
            "mean_output_error": sum(errors) / len(errors) if errors else 0.0,
            "geomean_output_error": _geomean(errors),
            "worst_layer": {"name": worst["name"], "output_error": worst["output_error"]} if worst else None,
            "phase_seconds": _phase_totals(blocks),
            # Expert actors (--expert-actors): their seconds per phase, summed over blocks and actors.
            "expert_actor_phase_seconds": _phase_totals([{"seconds": {k: v for k, v in a.items() if k != "rank"}}
                                                         for b in blocks for a in b.get("expert_actors", ())]),
            "artifact_tensor_bytes": sum(r["nbytes"] for r in records),
            # Mixture-of-experts: expert linears, and those whose statistics had too few tokens (RTN'd).
            "expert_layers": sum(1 for layer in layers if ".experts." in layer["name"]),
            "starved_expert_layers": sum(1 for layer in layers if layer.get("starved")),
        },
        "actors": [actors[k] for k in sorted(actors)],
        "blocks": [{"block": b["block"], "rank": b["rank"], "shard": shard_names.get(b["staged_path"]),
                    "nbytes": b["nbytes"], "sha256": b["sha256"], "seconds": b["seconds"],
                    "expert_actors": list(b.get("expert_actors", ())),
                    "resumed": bool(b.get("resumed")), "finished_at": b.get("finished_at")} for b in blocks],
        "layers": layers,
    }
