"""Where the block actors run: on Ray (a cluster at --address, or a local Ray the driver starts), or, for a
job of one actor on this machine, inside the driver's own process.

Both give the driver the same few verbs: start the actors, `put` a value, `get` results, and call an actor
method with `actor.method.remote(...)` (`.options(num_returns="streaming")` for a generator method). The
in-process runtime exists because a one-actor job gains nothing from Ray but pays for it: starting a local
Ray, and a second process that imports torch and transformers again, took 25 s of a 65 s job on an H100
machine. Its calls run when they are made (a streaming call when its generator is iterated), in order,
which is the order a single Ray actor runs them in, and all on the actor's one thread, as on Ray: the
libraries keep some caches per thread (cuDNN its attention graphs), and what the actor's warm-up built
on its thread is then there for its blocks.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from wq_ops.config import Backend, JobConfig, RunConfig, Runtime
from wq_ops.errors import ConfigError, ResourceError

if TYPE_CHECKING:      # the module imports torch, which this one leaves to the runtimes that need it
    from wq_ops.device.warm_up import JobShapes

__all__ = ["ActorRuntime", "RayRuntime", "LocalRuntime", "choose_runtime"]


def choose_runtime(run: RunConfig) -> "ActorRuntime":
    """`--runtime auto` runs a one-actor job without a cluster address in-process, everything else on Ray."""
    if run.runtime is Runtime.LOCAL:
        if run.address or run.actors != 1:
            raise ConfigError(f"runtime=local runs exactly one actor in the driver's process; this job has "
                              f"actors={run.actors}" + (f" and address={run.address}" if run.address else "")
                              + ": use --runtime ray (or auto)")
        return LocalRuntime()
    if run.runtime is Runtime.AUTO and run.address is None and run.actors == 1:
        return LocalRuntime()
    return RayRuntime()


class ActorRuntime(Protocol):
    """What the driver needs of a runtime."""

    name: str

    def start(self, job: JobConfig) -> None:
        """Whatever must run before actors exist (a local Ray, or the connection to a cluster)."""

    def start_actors(self, job: JobConfig) -> list[Any]:
        """The job's warm actors; they start in the background."""

    def put(self, value: Any) -> Any:
        """A ref to `value`, passable to actor methods."""

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        """The value(s) behind a ref or a list of refs; raises the error of a failed call."""

    def stop(self, actors: list[Any]) -> None:
        """End the actors and whatever `start` started."""


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

    def start_actors(self, job: JobConfig) -> list[Any]:
        """One warm actor per --actors: each starts its process, device and kernels while the driver reads
        the checkpoint's config and the calibration data."""
        import ray

        from wq_ops.cluster.actor import BlockActor
        from wq_ops.device.warm_up import job_needs_transformers, job_shapes

        self._check_resources(job.run)
        remote_actor: Any = ray.remote(BlockActor)
        shapes, preload = job_shapes(job), job_needs_transformers(job)
        return [remote_actor.options(num_cpus=job.run.cpus_per_actor, num_gpus=job.run.gpus_per_actor,
                                     max_restarts=0).remote(job.run, job.quant.backend, shapes,
                                                            preload_transformers=preload)
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

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        import ray

        return ray.get(refs, timeout=timeout)

    def stop(self, actors: list[Any]) -> None:
        import ray

        for actor in actors:
            ray.kill(actor)
        if self._started:
            ray.shutdown()


@dataclass(frozen=True)
class _Done:
    """The result of an in-process call (or a value put): what `get` gives back."""

    value: Any = None


class _LocalMethod:
    def __init__(self, actor: "_LocalActor", name: str, streaming: bool = False) -> None:
        self.actor, self.name, self.streaming = actor, name, streaming

    def options(self, *, num_returns: str | int | None = None) -> "_LocalMethod":
        return _LocalMethod(self.actor, self.name, streaming=num_returns == "streaming")

    def remote(self, *args: Any) -> Any:
        """Run the call now (a streaming call as it is iterated), on the actor's thread. Unlike Ray, an error
        is raised here, at the call: the driver does not fetch every result (embed's, stage_head's), and a
        failure in one must stop the job with its own cause, not with a confusing one later."""
        # Ray resolves refs passed as arguments before the call: so does this.
        args = tuple(a.value if isinstance(a, _Done) else a for a in args)
        actor, name = self.actor, self.name
        if self.streaming:
            return actor.stream(lambda: getattr(actor.instance(), name)(*args))
        return _Done(actor.call(lambda: getattr(actor.instance(), name)(*args)))


class _LocalActor:
    """A BlockActor on a thread of its own. It is built there first (CUDA context, kernels, warm-up), so
    that it starts while the driver prepares the job; every call then runs there too, in the order made,
    each waiting for the ones before it."""

    def __init__(self, run: RunConfig, backend: Backend, shapes: JobShapes | None = None, *,
                 preload_transformers: bool = True) -> None:
        import torch

        from wq_ops.cluster.actor import BlockActor

        self.threads_before = torch.get_num_threads()     # the actor sets the process's; given back at stop
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wq-actor")
        self._ident: int | None = None

        def start() -> Any:
            self._ident = threading.get_ident()
            return BlockActor(run, backend, shapes, preload_transformers=preload_transformers)

        self._instance: Future[Any] = self._thread.submit(start)

    def instance(self) -> Any:
        return self._instance.result()

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the actor's thread, once the calls made before it have run; its result or its error."""
        if threading.get_ident() == self._ident:        # from the actor's own thread: waiting would hang
            return fn()
        return self._thread.submit(fn).result()

    def stream(self, make: Callable[[], Iterator[Any]]) -> Iterator["_Done"]:
        """A generator method's items, each computed on the actor's thread when it is asked for."""
        items = self.call(make)
        while True:
            try:
                item = self.call(lambda: next(items))
            except StopIteration:
                return
            yield _Done(item)

    def stop(self) -> None:
        """Close the actor (if it started) on its thread, after any call still queued, and end the thread."""
        try:
            if self._instance.exception() is None:        # waits for the start-up
                self.call(lambda: self.instance().close())
        finally:
            self._thread.shutdown(wait=True)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(self, name)


class LocalRuntime:
    name = "local"

    def start(self, job: JobConfig) -> None:
        return None

    def start_actors(self, job: JobConfig) -> list[Any]:
        run = job.run
        if run.gpus_per_actor > 0:
            import torch

            have = torch.cuda.device_count()
            if have < math.ceil(run.gpus_per_actor):
                raise ResourceError(f"gpus_per_actor={run.gpus_per_actor:g}: the in-process actor needs a GPU and "
                                    f"torch sees {have} on this machine")
        from wq_ops.device.warm_up import job_needs_transformers, job_shapes

        return [_LocalActor(run, job.quant.backend, job_shapes(job), preload_transformers=job_needs_transformers(job))]

    def put(self, value: Any) -> Any:
        return _Done(value)

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        """The calls behind refs have already run (or raised), so there is nothing to wait for."""
        if isinstance(refs, list):
            return [r.value for r in refs]
        return refs.value

    def stop(self, actors: list[Any]) -> None:
        """Wait for an actor still starting (its thread would hold the process open anyway), let it finish
        staging, and give the process its torch thread count back, whether the job worked or not."""
        import torch

        for actor in actors:
            try:
                actor.stop()
            finally:
                torch.set_num_threads(actor.threads_before)

