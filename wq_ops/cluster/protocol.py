"""The driver/actor protocol's messages: what crosses between the driver and a block actor, typed. (What a
runtime offers the driver, calls named by the actor's method itself, is `runtime.ActorRuntime`.)

Sent to actors: `ActorSpec` (small descriptors, never weights). Returned: `ShardRecord` per staged shard,
`Capacity`, `HandoffTimes`, `MemoryPeak`. Activations travel actor to actor as `ActivationRef`s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    NewType,
    TypeVar,
)

from wq_ops.block.records import LayerRecord
from wq_ops.config import JobConfig
from wq_ops.io.artifact import ArtifactLayout
from wq_ops.io.checkpoint import Checkpoint
from wq_ops.model.architecture import ModelLayout
from wq_ops.model.native_llama import NativeLlamaConfig
from wq_ops.quant.hessian import OutlierSummary

if TYPE_CHECKING:       # transformers is imported only where the job's blocks run its classes
    from transformers import PretrainedConfig

__all__ = ["ActorSpec", "ShardRecord", "StartupMarks", "Capacity", "HandoffTimes", "MemoryPeak", "ActivationRef",
           "ActorHandle", "Pending"]

R = TypeVar("R")

# An actor as a runtime hands it out: a Ray actor handle, or the in-process actor.
ActorHandle = NewType("ActorHandle", object)


class Pending(Generic[R]):
    """The result of an actor call still to come (a Ray object ref, or an in-process call's outcome): the
    runtime that made it gives its value (`ActorRuntime.get`)."""

# An activation micro-batch in the object store, put there by one actor and fetched by the next: the driver
# only passes these on (Ray resolves refs given as call arguments, not refs inside a list).
ActivationRef = NewType("ActivationRef", object)


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs, sent once: small descriptors and configs, never weights."""

    rank: int
    checkpoint: Checkpoint
    hf_config: "PretrainedConfig | NativeLlamaConfig"
    layout: ModelLayout
    job: JobConfig
    artifact: ArtifactLayout
    pad_intermediate: int = 0            # zero rows/columns added to the MLP's intermediate dim (--tp-policy pad)
    stash_tails: bool = False            # the plan's: keep each stage's last linear's inputs (quantize_block_)
    carried: tuple[str, ...] = ()        # source tensors past the blocks, staged with the head unquantized
    expert_actors: tuple[Any, ...] = ()  # Ray handles of the expert actors (--expert-actors): range j on actor j


@dataclass(frozen=True)
class ShardRecord:
    """What an actor reports for one staged shard. part: "embed", "block" or "head"."""

    part: str
    block: int | None
    staged_path: str
    tensor_names: tuple[str, ...]
    nbytes: int
    sha256: str
    rank: int
    layers: tuple[LayerRecord, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)     # by phase: load, forward, solve, pack, write
    resumed: bool = False                # staged by an earlier run of the same job, replayed, not recomputed
    finished_at: float = 0.0             # wall clock (time.time()) when it was staged: pipeline timelines
    source_sha256: str = ""              # a block's source tensors as read (`tensors_sha256`): resume checks it
    device_peak_bytes: int | None = None     # the actor's GPU memory peak so far, when staged (progress; None: CPU)
    # A routed block quantized on expert actors: each one's rank and seconds per phase (`ExpertsPart.timing`).
    expert_actors: tuple[dict[str, float | int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (the staged record file, the report)."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self), default=float))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardRecord":
        layers = tuple(LayerRecord(**{**layer, "outliers": _outliers(layer["outliers"])}) for layer in data["layers"])
        return cls(**{**data, "tensor_names": tuple(data["tensor_names"]), "layers": layers,
                      "expert_actors": tuple(data.get("expert_actors", ()))})


def _outliers(data: dict[str, Any]) -> OutlierSummary:
    return OutlierSummary(**{**data, "top_channels": tuple(data["top_channels"]),
                             "top_channel_max": tuple(data["top_channel_max"])})


@dataclass(frozen=True)
class StartupMarks:
    """An actor's warm start, for the report: wall-clock marks (time.time()) and durations in seconds."""

    imported_at: float                   # its modules (torch, transformers, wq) imported in its process
    init_at: float                       # its __init__ began
    device_s: float                      # device and streams
    kernels_s: float                     # our CUDA extension built or loaded
    transformers_s: float                # transformers' import, where the job's blocks run its classes
    ready_at: float                      # its __init__ returned
    node: str                            # the Ray node it runs on ("local": in the driver's process, no Ray)


@dataclass(frozen=True)
class Capacity:
    """Memory an actor may plan with (its GPU's, or its host's shared by the job's actors), in bytes."""

    nbytes: int
    startup: StartupMarks


@dataclass(frozen=True)
class HandoffTimes:
    """When an actor's inputs arrived from the previous actor and its outputs were handed on (wall clock;
    None where that did not happen: the first actor receives nothing, the last hands nothing on)."""

    inputs_at: float | None = None
    handed_on_at: float | None = None


@dataclass(frozen=True)
class MemoryPeak:
    """The most device memory an actor's tensors took at once during the job, and what torch's caching
    allocator held at most (bytes); None on a CPU actor."""

    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
