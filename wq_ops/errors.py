"""The error hierarchy: every failure wq reports on purpose is a `WqError`.

A message says what failed, where (tensor, block, shard, field), what was expected, what was found,
and what to do next. Input is checked at the boundaries, before any work starts.
"""

__all__ = ["WqError", "ConfigError", "CheckpointError", "KernelError", "ArtifactError", "ResourceError",
           "QuantizationError", "ActorLostError"]


class WqError(Exception):
    """Base of every error wq raises on purpose."""


class ConfigError(WqError):
    """A job option or a combination of options is invalid."""


class CheckpointError(WqError):
    """The input checkpoint is missing, corrupt, or of an unsupported architecture."""


class KernelError(WqError):
    """A kernel was asked for what it cannot do (wrong device, dtype, shape), or is not built."""


class ArtifactError(WqError):
    """The output artifact cannot be written, or an existing one is in the way."""


class ResourceError(WqError):
    """The job does not fit the cluster: memory, GPUs or CPUs."""


class QuantizationError(WqError):
    """A layer could not be quantized, e.g. its Hessian cannot be made positive definite."""


class ActorLostError(WqError):
    """Actors died more often than --max-actor-restarts allows (preempted nodes, OOM kills)."""
