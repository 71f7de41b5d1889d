"""Calls to Ray actors, from the driver or from an actor (a block actor calling its expert actors): a method is
named by the method itself, and only here does its name become Ray's string. Imports no actor: the caller
hands the method in."""

from __future__ import annotations

from typing import Any, Callable, Concatenate, ParamSpec, TypeVar, cast

from wq_ops.cluster.protocol import Pending

__all__ = ["RayPending", "call_remote", "get_remote", "ref_of"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class RayPending(Pending[R]):
    def __init__(self, ref: Any) -> None:
        self.ref = ref


def call_remote(actor: Any, method: Callable[Concatenate[Any, P], R], *args: P.args,
                **kwargs: P.kwargs) -> Pending[R]:
    """A call of `method` on a Ray actor, from the driver or from another actor (a block's actor calling its
    expert actors)."""
    return RayPending(getattr(actor, method.__name__).remote(*args, **kwargs))


def get_remote(pending: Pending[T]) -> T:
    """The result of a `call_remote`, waited for."""
    import ray

    return cast(T, ray.get(ref_of(pending)))


def ref_of(pending: Pending[Any]) -> Any:
    if not isinstance(pending, RayPending):
        raise TypeError(f"not a Ray call's result: {type(pending).__name__}")
    return pending.ref
