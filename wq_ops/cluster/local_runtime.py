"""The in-process runtime: one block actor inside the driver's process, for a job of one actor on this
machine. Its calls run when they are made (a streaming call when its generator is iterated), in order, which
is the order a single Ray actor runs them in, and all on the actor's one thread, as on Ray: the libraries
keep some caches per thread (cuDNN its attention graphs), and what the actor's warm-up built on its thread
is then there for its blocks. Unlike Ray, a call's error is raised at the call: the driver does not fetch
every result (embed's, stage_head's), and a failure in one must stop the job with its own cause."""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Concatenate, Iterator, ParamSpec, Sequence, TypeVar, cast

from wq_ops.cluster.runtime import ActorHandle, Pending
from wq_ops.config import Backend, JobConfig, RunConfig
from wq_ops.errors import ResourceError

if TYPE_CHECKING:      # the actor imports torch, which this module leaves to the runtimes that need it
    from wq_ops.cluster.actor import BlockActor
    from wq_ops.device.warm_up import JobShapes

__all__ = ["LocalRuntime"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _Done(Pending[R]):
    """An in-process call that has run: its value."""

    def __init__(self, value: R) -> None:
        self.value = value


class _LocalActor:
    """A BlockActor on a thread of its own. It is built there first (CUDA context, kernels, warm-up), so
    that it starts while the driver prepares the job; every call then runs there too, in the order made,
    each waiting for the ones before it."""

    def __init__(self, run: RunConfig, backend: Backend, shapes: "JobShapes | None" = None, *,
                 preload_transformers: bool = True) -> None:
        import torch

        from wq_ops.cluster.actor import BlockActor

        self.threads_before = torch.get_num_threads()     # the actor sets the process's; given back at stop
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="wq-actor")
        self._ident: int | None = None

        def start() -> BlockActor:
            self._ident = threading.get_ident()
            return BlockActor(run, backend, shapes, preload_transformers=preload_transformers)

        self._instance: Future[BlockActor] = self._thread.submit(start)

    def instance(self) -> "BlockActor":
        return self._instance.result()

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on the actor's thread, once the calls made before it have run; its result or its error."""
        if threading.get_ident() == self._ident:        # from the actor's own thread: waiting would hang
            return fn()
        return self._thread.submit(fn).result()

    def stop(self) -> None:
        """Close the actor (if it started) on its thread, after any call still queued, and end the thread."""
        try:
            if self._instance.exception() is None:        # waits for the start-up
                self.run(lambda: self.instance().close())
        finally:
            self._thread.shutdown(wait=True)


class LocalRuntime:
    name = "local"

    def start(self, job: JobConfig) -> None:
        return None

    def start_actors(self, job: JobConfig) -> list[ActorHandle]:
        run = job.run
        if run.gpus_per_actor > 0:
            import torch

            have = torch.cuda.device_count()
            if have < math.ceil(run.gpus_per_actor):
                raise ResourceError(f"gpus_per_actor={run.gpus_per_actor:g}: the in-process actor needs a GPU and "
                                    f"torch sees {have} on this machine")
        from wq_ops.device.warm_up import job_needs_transformers, job_shapes

        return [ActorHandle(_LocalActor(run, job.quant.backend, job_shapes(job),
                                        preload_transformers=job_needs_transformers(job)))]

    def put(self, value: T) -> T:
        return value

    def call(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], R], *args: P.args,
             **kwargs: P.kwargs) -> Pending[R]:
        local = _local(actor)
        return _Done(local.run(lambda: method(local.instance(), *args, **kwargs)))

    def stream(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], Iterator[R]],
               *args: P.args, **kwargs: P.kwargs) -> Iterator[Pending[R]]:
        """The generator's items, each computed on the actor's thread when it is asked for."""
        local = _local(actor)
        items = local.run(lambda: method(local.instance(), *args, **kwargs))
        while True:
            try:
                item = local.run(lambda: next(items))
            except StopIteration:
                return
            yield _Done(item)

    def passed(self, pending: Pending[T]) -> T:
        return _value(pending)

    def get(self, pending: Pending[T], timeout: float | None = None) -> T:
        """The call behind `pending` has already run (or raised), so there is nothing to wait for."""
        return _value(pending)

    def get_all(self, pendings: Sequence[Pending[T]], timeout: float | None = None) -> list[T]:
        return [_value(p) for p in pendings]

    def stop_actors(self, actors: list[ActorHandle]) -> None:
        self.stop(actors)

    def actor_lost(self, error: BaseException) -> bool:
        return False                     # the in-process actor dies only with the driver

    def stop(self, actors: list[ActorHandle]) -> None:
        """Wait for an actor still starting (its thread would hold the process open anyway), let it finish
        staging, and give the process its torch thread count back, whether the job worked or not."""
        import torch

        for actor in actors:
            local = _local(actor)
            try:
                local.stop()
            finally:
                torch.set_num_threads(local.threads_before)


def _local(actor: ActorHandle) -> _LocalActor:
    if not isinstance(actor, _LocalActor):
        raise TypeError(f"not an in-process actor: {type(actor).__name__}")
    return actor


def _value(pending: Pending[T]) -> T:
    if not isinstance(pending, _Done):
        raise TypeError(f"not an in-process call's result: {type(pending).__name__}")
    return cast(T, pending.value)
