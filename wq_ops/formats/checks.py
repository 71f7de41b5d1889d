"""Conditions an artifact's tensors must meet, checked without waiting on the device.

Checking a condition on a GPU tensor reads it back, which drains the queue: done per linear while a block
is packed, the GPU stood idle between them. A `Checks` collects the conditions instead; the caller reads
them back once, with the block's other numbers (`values`), and `raise_failed` raises the first that did not
hold, before anything is written. Without a `Checks`, or for a tensor on the host, `require` checks at once."""

from __future__ import annotations

from torch import Tensor

from wq_ops.errors import ArtifactError

__all__ = ["Checks", "raise_failed", "require"]


class Checks:
    def __init__(self) -> None:
        self._conditions: list[Tensor] = []
        self._messages: list[str] = []

    def add(self, holds: Tensor, message: str) -> None:
        """Queue `holds` (a bool tensor with one element) with the error message if it turns out false."""
        self._conditions.append(holds.reshape(1))
        self._messages.append(message)

    def values(self) -> list[Tensor]:
        """The conditions, in order, each as a one-element tensor (for one read-back with other numbers)."""
        return list(self._conditions)

    @property
    def messages(self) -> tuple[str, ...]:
        return tuple(self._messages)


def raise_failed(messages: tuple[str, ...], values: Tensor) -> None:
    """Raise ArtifactError with the first message whose condition (read back, in `values`) is false."""
    for message, holds in zip(messages, values.tolist(), strict=True):
        if not holds:
            raise ArtifactError(message)


def require(holds: Tensor, message: str, checks: Checks | None) -> None:
    """Raise ArtifactError(message) unless `holds`: at once without `checks` or on the host, else queued."""
    if checks is not None and holds.is_cuda:
        checks.add(holds, message)
    elif not bool(holds):
        raise ArtifactError(message)
