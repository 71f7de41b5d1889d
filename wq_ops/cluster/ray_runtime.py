"""The Ray runtime: block actors as Ray actors, on the cluster at --address or on a local Ray it starts. A
call names the actor's method by the method itself; only here does its name become Ray's string."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Iterator, ParamSpec, Sequence, TypeVar, cast

from wq_ops.cluster.runtime import ActorHandle, Pending
from wq_ops.config import JobConfig, RunConfig
from wq_ops.errors import ResourceError

if TYPE_CHECKING:
    from wq_ops.cluster.actor import BlockActor

__all__ = ["RayRuntime"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _RayPending(Pending[R]):
    def __init__(self, ref: Any) -> None:
        self.ref = ref


class RayRuntime:
    name = "ray"

    def __init__(self) -> None:
        self._started = False

    def start(self, job: JobConfig) -> None:
        """Connect to the cluster at `address`, or start a local Ray."""
        import ray

        if ray.is_initialized():
            return
        run = job.run
        if run.address:
            ray.init(address=run.address, logging_level=logging.WARNING)
        else:
            # Exactly the CPUs the actors ask for: Ray starts idle workers for every logical CPU it is given,
            # and os.cpu_count() can be the whole host's count inside a container; the driver needs none.
            ray.init(num_cpus=run.actors * run.cpus_per_actor, include_dashboard=False,
                     logging_level=logging.WARNING)
        self._started = True

    def start_actors(self, job: JobConfig) -> list[ActorHandle]:
        """One warm actor per --actors: each starts its process, device and kernels while the driver reads
        the checkpoint's config and the calibration data."""
        import ray

        from wq_ops.cluster.actor import BlockActor
        from wq_ops.device.warm_up import job_needs_transformers, job_shapes

        self._check_resources(job.run)
        remote_actor: Any = ray.remote(BlockActor)
        shapes, preload = job_shapes(job), job_needs_transformers(job)
        return [ActorHandle(remote_actor.options(num_cpus=job.run.cpus_per_actor, num_gpus=job.run.gpus_per_actor,
                                                 max_restarts=0).remote(job.run, job.quant.backend, shapes,
                                                                        preload_transformers=preload))
                for _ in range(job.run.actors)]

    @staticmethod
    def _check_resources(run: RunConfig) -> None:
        """Enough GPUs or CPUs in the cluster for every actor, else the actors would wait forever."""
        import ray

        resources = ray.cluster_resources()
        if run.gpus_per_actor > 0:
            need = run.actors * run.gpus_per_actor
            if resources.get("GPU", 0) < need:
                raise ResourceError(f"{run.actors} actors x {run.gpus_per_actor} GPU need {need:g} GPUs; the Ray "
                                    f"cluster has {resources.get('GPU', 0):g}")
            return
        need_cpus = run.actors * run.cpus_per_actor
        if resources.get("CPU", 0) < need_cpus:
            raise ResourceError(f"{run.actors} actors x {run.cpus_per_actor} CPUs need {need_cpus}; the Ray "
                                f"cluster has {resources.get('CPU', 0):g}")

    def put(self, value: T) -> T:
        import ray

        return cast(T, ray.put(value))

    def call(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], R], *args: P.args,
             **kwargs: P.kwargs) -> Pending[R]:
        handle: Any = actor
        return _RayPending(getattr(handle, method.__name__).remote(*args, **kwargs))

    def stream(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], Iterator[R]],
               *args: P.args, **kwargs: P.kwargs) -> Iterator[Pending[R]]:
        handle: Any = actor
        refs = getattr(handle, method.__name__).options(num_returns="streaming").remote(*args, **kwargs)
        return (_RayPending(ref) for ref in refs)

    def passed(self, pending: Pending[T]) -> T:
        return cast(T, _ref(pending))

    def get(self, pending: Pending[T], timeout: float | None = None) -> T:
        import ray

        return cast(T, ray.get(_ref(pending), timeout=timeout))

    def get_all(self, pendings: Sequence[Pending[T]], timeout: float | None = None) -> list[T]:
        import ray

        return cast(list[T], ray.get([_ref(p) for p in pendings], timeout=timeout))

    def stop(self, actors: list[ActorHandle]) -> None:
        import ray

        for actor in actors:
            handle: Any = actor
            ray.kill(handle)
        if self._started:
            ray.shutdown()


def _ref(pending: Pending[Any]) -> Any:
    if not isinstance(pending, _RayPending):
        raise TypeError(f"not a Ray call's result: {type(pending).__name__}")
    return pending.ref
