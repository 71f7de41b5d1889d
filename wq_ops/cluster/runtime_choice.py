"""Which runtime a job's actors run on (`choose_runtime`). Imports no torch: the command line chooses while torch
imports, to make an in-process GPU actor's CUDA context meanwhile."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wq_ops.config import RunConfig, Runtime
from wq_ops.errors import ConfigError

if TYPE_CHECKING:
    from wq_ops.cluster.runtime import ActorRuntime

__all__ = ["choose_runtime"]


def choose_runtime(run: RunConfig) -> "ActorRuntime":
    """`--runtime auto` runs a one-actor job without a cluster address or expert actors in-process, everything
    else on Ray."""
    if run.runtime is Runtime.LOCAL:
        if run.address or run.actors != 1:
            raise ConfigError(f"runtime=local runs exactly one actor in the driver's process; this job has "
                              f"actors={run.actors}" + (f" and address={run.address}" if run.address else "")
                              + ": use --runtime ray (or auto)")
        return _local()
    if run.runtime is Runtime.AUTO and run.address is None and run.actors == 1 and not run.expert_actors:
        return _local()
    from wq_ops.cluster.ray_runtime import RayRuntime

    return RayRuntime()


def _local() -> "ActorRuntime":
    from wq_ops.cluster.local_runtime import LocalRuntime

    return LocalRuntime()
