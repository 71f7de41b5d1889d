"""What a runtime offers the driver (`ActorRuntime`). The block actors run on Ray (a cluster at --address, or a
local Ray the driver starts: `ray_runtime`), or, for a job of one actor on this machine, inside the driver's
own process (`local_runtime`); `runtime_choice.choose_runtime` picks one. The driver names an actor's method by
the method itself (`runtime.call(actor, BlockActor.embed, spec, ids)`), so a renamed method or a changed
signature fails type checking in the driver, not at run time on a cluster. The in-process runtime exists
because a one-actor job gains nothing from Ray but pays for it: starting a local Ray, and a second process that
imports torch and transformers again, took 25 s of a 65 s job on an H100 machine."""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Callable,
    Concatenate,
    Iterator,
    ParamSpec,
    Protocol,
    Sequence,
    TypeVar,
)

from wq_ops.cluster.protocol import ActorHandle, Pending
from wq_ops.config import JobConfig

if TYPE_CHECKING:
    from wq_ops.cluster.actor import BlockActor

__all__ = ["ActorHandle", "Pending", "ActorRuntime"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

class ActorRuntime(Protocol):
    """What the driver needs of a runtime. Calls to one actor run in the order they were made."""

    name: str

    def start(self, job: JobConfig) -> None:
        """Whatever must run before actors exist (a local Ray, or the connection to a cluster)."""

    def start_actors(self, job: JobConfig) -> list[ActorHandle]:
        """The job's warm actors, by rank; they start in the background."""

    def put(self, value: T) -> T:
        """A stand-in for `value` that a call's argument resolves back to it: sent once, however many calls
        take it (a Ray object ref; the value itself in-process). Typed as the value, which is what the
        callee receives."""

    def call(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], R], *args: P.args,
             **kwargs: P.kwargs) -> Pending[R]:
        """actor.method(*args, **kwargs), queued behind the actor's earlier calls."""

    def stream(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], Iterator[R]],
               *args: P.args, **kwargs: P.kwargs) -> Iterator[Pending[R]]:
        """A generator method's items, each as soon as the actor yields it."""

    def passed(self, pending: Pending[T]) -> T:
        """An earlier call's result as an argument of a later call (to another actor too): the callee
        receives the value, and the driver never fetches it."""

    def get(self, pending: Pending[T], timeout: float | None = None) -> T:
        """The value of a call; raises the call's error."""

    def get_all(self, pendings: Sequence[Pending[T]], timeout: float | None = None) -> list[T]:
        """The values of several calls, in order; raises the first error."""

    def stop_actors(self, actors: list[ActorHandle]) -> None:
        """End the actors (and their placement), keeping what `start` started, so that new ones can start."""

    def actor_lost(self, error: BaseException) -> bool:
        """Whether `error` means an actor's process is gone (a preempted node, an OOM kill), which a new actor
        can make good, rather than a failure of the job itself."""

    def stop(self, actors: list[ActorHandle]) -> None:
        """End the actors and whatever `start` started."""
