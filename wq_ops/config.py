"""Job configuration: frozen dataclasses, validated on construction, built from one flat options dict.

The option names are the command line's long flags with `-` turned into `_`, so a YAML job file and the
flags share one vocabulary. `JobConfig.from_dict` rejects unknown keys. Nothing below `jobs/` reads the
environment or the command line: every function gets its config as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from wq_ops.errors import ConfigError

__all__ = [
    "Method",
    "Format",
    "Backend",
    "Propagation",
    "Modeling",
    "AwqLoss",
    "SpanMode",
    "TpPolicy",
    "QuantConfig",
    "CalibConfig",
    "RunConfig",
    "JobConfig",
    "OPTION_FIELDS",
    "default_options",
    "parse_enum",
    "positive_int",
]


class Method(str, Enum):
    GPTQ = "gptq"
    AWQ = "awq"
    RTN = "rtn"


class Format(str, Enum):
    COMPRESSED_TENSORS = "compressed-tensors"   # pack-quantized, as vLLM and llm-compressor read it
    GPTQ = "gptq"                               # GPTQ v1 layout (qweight/qzeros/scales/g_idx)


class Backend(str, Enum):
    REFERENCE = "reference"   # plain PyTorch, any device
    CUDA = "cuda"             # our CUDA kernels; an error if they are not built


class TpPolicy(str, Enum):
    """What to do with a requested tensor-parallel size the artifact cannot be loaded with."""

    REFUSE = "refuse"     # stop at plan time, naming the layer and dimension
    PAD = "pad"           # pad intermediate_size with zero rows/columns so the size loads (exact outputs)


class Modeling(str, Enum):
    """Whose module classes compute the model's blocks."""

    AUTO = "auto"                     # native for the configs it reads (Llama, Qwen2, Qwen3), else transformers
    NATIVE = "native"                 # wq's Llama modules (the same bits); an error for any other config
    TRANSFORMERS = "transformers"     # transformers' classes, imported at start-up (about 4 s on an H100 host)


class Propagation(str, Enum):
    """Where a block's calibration inputs come from."""

    QUANTIZED = "quantized"   # outputs of the already-quantized blocks before it (the GPTQ paper's scheme)
    FLOAT = "float"           # outputs of the unquantized model: every block's statistics in one forward pass


class AwqLoss(str, Enum):
    """What AWQ's scale search measures for a group of linears that share one input."""

    # The output of the module that reads the group (the attention or the MLP), replayed on
    # awq_search_samples kept samples for every candidate: AutoAWQ's and llm-compressor's choice.
    MODULE = "module"
    # The group's own linear outputs, ||Q(W diag(s)) diag(s)^-1 X - W X||^2 summed over its layers (the AWQ
    # paper's Eq. 4), over every calibration token, from the input Hessian: no replay, no kept samples.
    # The default: on SmolLM2 its perplexity was lower in 3 of 4 runs (benchmarks/quality.md).
    LAYER = "layer"


class SpanMode(str, Enum):
    """How float propagation moves the calibration set through an actor's span."""

    AUTO = "auto"         # stream where there are several actors and the resident span fits, else block
    STREAM = "stream"     # the span's weights stay resident; micro-batches stream through it, actor to actor
    BLOCK = "block"       # one block resident at a time; the span's outputs leave after its last block


class Runtime(str, Enum):
    """Where the block actors run."""

    AUTO = "auto"         # local for one actor and no cluster address, else ray
    RAY = "ray"           # Ray actors: on the cluster at --address, or on a local Ray the driver starts
    LOCAL = "local"       # one actor inside the driver's process (no Ray): single-machine, single-actor jobs


def parse_enum(kind: type[Enum], value: Any, name: str) -> Any:
    """`value` as a member of the str enum `kind`; a ConfigError naming the field and the allowed values."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"{name}={value!r}: expected one of {allowed}") from None


def positive_int(value: Any, name: str) -> int:
    """`value` if it is an int > 0 (not a bool); else a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive integer")
    return value


@dataclass(frozen=True)
class QuantConfig:
    """What to do to each linear layer of each decoder block."""

    method: Method = Method.GPTQ
    bits: int = 4
    group_size: int | None = 128       # None: one group spans the whole input dim (per-channel scales)
    sym: bool = True                   # symmetric grid (zero point fixed at 2**(bits-1)); False stores zero points
    damp_frac: float = 0.01            # GPTQ: fraction of mean(diag(H)) added before Cholesky
    act_order: bool = False            # GPTQ: columns in order of decreasing diag(H), groups kept static
                                       # (the command line turns it on for GPTQ)
    block_size: int = 128              # GPTQ: columns solved together before the lazy trailing update
    awq_grid: int = 20                 # AWQ: points on the alpha grid of the scale search
    awq_clip_grid: int = 20            # AWQ: steps of the clipping search
    awq_max_shrink: float = 0.5        # AWQ: clip the range down to at most (1 - this) of max|w|
    awq_search_samples: int = 32       # AWQ with awq_loss=module: samples replayed per scale candidate
    awq_loss: AwqLoss = AwqLoss.LAYER   # AWQ: what the scale search measures (AwqLoss)
    ignore: tuple[str, ...] = ()       # module-name patterns (fnmatch) left unquantized
    backend: Backend = Backend.REFERENCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_enum(Method, self.method, "method"))
        object.__setattr__(self, "backend", parse_enum(Backend, self.backend, "backend"))
        object.__setattr__(self, "awq_loss", parse_enum(AwqLoss, self.awq_loss, "awq_loss"))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits={self.bits!r}: expected one of 2, 3, 4, 8")
        if self.group_size is not None:
            positive_int(self.group_size, "group_size")
            if self.group_size % 32:
                raise ConfigError(
                    f"group_size={self.group_size}: must be a multiple of 32 (engines' kernels read whole "
                    "32-value words per group), or 'channel' for one group per row"
                )
        if self.backend is Backend.CUDA and self.method is Method.AWQ and self.group_size is not None \
                and self.group_size > 256:
            raise ConfigError(f"group_size={self.group_size}: the CUDA AWQ search handles groups of 32 to 256 "
                              "columns; use --backend reference for wider groups")
        if not (0.0 < self.damp_frac <= 1.0):
            raise ConfigError(f"damp_frac={self.damp_frac!r}: expected a fraction in (0, 1]; the usual value is 0.01")
        positive_int(self.block_size, "block_size")
        if self.act_order and self.method is not Method.GPTQ:
            raise ConfigError(f"act_order=True: only GPTQ orders columns by activation; method is {self.method.value}")
        if positive_int(self.awq_grid, "awq_grid") < 2:
            raise ConfigError(f"awq_grid={self.awq_grid}: expected at least 2 points")
        positive_int(self.awq_clip_grid, "awq_clip_grid")
        positive_int(self.awq_search_samples, "awq_search_samples")
        if not (0.0 <= self.awq_max_shrink < 1.0):
            raise ConfigError(f"awq_max_shrink={self.awq_max_shrink!r}: expected a fraction in [0, 1)")

    @property
    def kept_search_samples(self) -> int:
        """Calibration samples a block keeps for AWQ's replayed scale search (0 where nothing is replayed)."""
        return self.awq_search_samples if self.method is Method.AWQ and self.awq_loss is AwqLoss.MODULE else 0


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: where it comes from and how much of it."""

    source: str | None = None          # file or directory; None: the small public-domain text bundled with wq
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    text_column: str = "text"          # column read from parquet files and datasets directories

    def __post_init__(self) -> None:
        positive_int(self.n_samples, "samples")
        positive_int(self.seq_len, "seq_len")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: expected a non-negative integer")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the job runs: Ray cluster, actors, resources."""

    actors: int = 1
    gpus_per_actor: float = 0.0        # 0: actors run on CPU
    cpus_per_actor: int = 1            # also the actor's torch thread count
    micro_batch_samples: int = 8       # calibration samples per forward call inside an actor
    actor_memory_gib: float | None = None   # None: measured from the actor's device (GPU memory or host RAM)
    address: str | None = None         # Ray cluster address; None: a local Ray, or in-process (see runtime)
    propagation: Propagation = Propagation.QUANTIZED
    span_mode: SpanMode = SpanMode.AUTO
    runtime: Runtime = Runtime.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", parse_enum(Runtime, self.runtime, "runtime"))
        object.__setattr__(self, "propagation", parse_enum(Propagation, self.propagation, "propagation"))
        object.__setattr__(self, "span_mode", parse_enum(SpanMode, self.span_mode, "span_mode"))
        if self.span_mode is SpanMode.STREAM and self.propagation is not Propagation.FLOAT:
            raise ConfigError("span_mode=stream needs propagation=float: with quantized propagation a block's "
                              "inputs exist only once every block before it is quantized")
        positive_int(self.actors, "actors")
        positive_int(self.cpus_per_actor, "cpus_per_actor")
        positive_int(self.micro_batch_samples, "micro_batch_samples")
        if isinstance(self.gpus_per_actor, bool) or not isinstance(self.gpus_per_actor, (int, float)) \
                or self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor={self.gpus_per_actor!r}: expected a number >= 0 (0 runs on CPU)")
        if self.actor_memory_gib is not None and not (self.actor_memory_gib > 0):
            raise ConfigError(f"actor_memory_gib={self.actor_memory_gib!r}: expected a positive number of GiB")

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


@dataclass(frozen=True)
class JobConfig:
    """One quantization job: input checkpoint, output directory, and the three sections above."""

    out: str
    model: str | None = None           # local directory or Hub repo id; None: wq's bundled tiny model
    revision: str | None = None        # Hub revision (branch, tag or commit); None: the default branch
    format: Format = Format.COMPRESSED_TENSORS
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    run: RunConfig = field(default_factory=RunConfig)
    overwrite: bool = False
    dry_run: bool = False
    trust_remote_code: bool = False
    modeling: Modeling = Modeling.AUTO
    fail_after_blocks: int | None = None   # testing hook: crash an actor after this many finished blocks
    tp_sizes: tuple[int, ...] | None = None  # vLLM tensor-parallel sizes the artifact must load with; None:
                                             # report 1, 2, 4 and 8 without refusing any
    tp_policy: TpPolicy = TpPolicy.REFUSE   # a tp size in tp_sizes that cannot load: refuse, or pad the MLP
    push_to_hub: str | None = None     # Hub repo id (org/name) to publish the artifact to
    push_revision: str | None = None   # branch of that repo; None: its default branch
    private: bool = False              # create the repo private (when it does not exist yet)
    commit_message: str | None = None

    def __post_init__(self) -> None:
        if self.quant.backend is Backend.CUDA and self.run.gpus_per_actor <= 0:
            raise ConfigError("backend=cuda: the actors have no GPU (gpus_per_actor=0); give --gpus-per-actor 1, "
                              "or --backend reference to run on CPU")
        if self.tp_sizes is not None:
            object.__setattr__(self, "tp_sizes", tuple(self.tp_sizes))
            if not self.tp_sizes or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tp_sizes):
                raise ConfigError(f"tp_sizes={list(self.tp_sizes)}: expected positive integers, e.g. 1,2,4,8")
        object.__setattr__(self, "tp_policy", parse_enum(TpPolicy, self.tp_policy, "tp_policy"))
        if self.tp_policy is TpPolicy.PAD and self.tp_sizes is None:
            raise ConfigError("tp_policy=pad: give the sizes to pad for with --tp-sizes, e.g. 1,2,4,8")
        if self.push_to_hub is not None and (not isinstance(self.push_to_hub, str) or self.push_to_hub.count("/") != 1):
            raise ConfigError(f"push_to_hub={self.push_to_hub!r}: expected a Hub repo id ORG/NAME")
        if parse_enum(Format, self.format, "format") is Format.GPTQ and not self.quant.sym:
            raise ConfigError("format=gptq with an asymmetric grid: GPTQ v1 stores zero - 1, so a zero point of 0 "
                              "cannot be stored; use --sym, or --format compressed-tensors for --asym")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"out={self.out!r}: expected an output directory path")
        object.__setattr__(self, "format", parse_enum(Format, self.format, "format"))
        object.__setattr__(self, "modeling", parse_enum(Modeling, self.modeling, "modeling"))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "JobConfig":
        """Build from flat options named like the CLI flags (`group_size`, `samples`, ...).
        Unknown keys are an error that lists the known ones."""
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; "
                              f"known options: {', '.join(sorted(OPTION_FIELDS))}")
        sections: dict[str, dict[str, Any]] = {"job": {}, "quant": {}, "calib": {}, "run": {}}
        for key, value in options.items():
            section, name = OPTION_FIELDS[key]
            sections[section][name] = _convert(key, value)
        if "out" not in sections["job"]:
            raise ConfigError("out: missing; give the output directory (--out DIR)")
        return cls(
            **sections["job"],
            quant=QuantConfig(**sections["quant"]),
            calib=CalibConfig(**sections["calib"]),
            run=RunConfig(**sections["run"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat options that rebuild this config (for reports and fingerprints)."""
        out: dict[str, Any] = {}
        for key, (section, name) in OPTION_FIELDS.items():
            holder: Any = self if section == "job" else getattr(self, section)
            value = getattr(holder, name)
            out[key] = value.value if isinstance(value, Enum) else (list(value) if isinstance(value, tuple) else value)
        return out


# option name (CLI long flag, YAML key) -> (section, dataclass field)
OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "out": ("job", "out"),
    "model": ("job", "model"),
    "revision": ("job", "revision"),
    "format": ("job", "format"),
    "overwrite": ("job", "overwrite"),
    "dry_run": ("job", "dry_run"),
    "trust_remote_code": ("job", "trust_remote_code"),
    "modeling": ("job", "modeling"),
    "fail_after_blocks": ("job", "fail_after_blocks"),
    "tp_sizes": ("job", "tp_sizes"),
    "tp_policy": ("job", "tp_policy"),
    "push_to_hub": ("job", "push_to_hub"),
    "push_revision": ("job", "push_revision"),
    "private": ("job", "private"),
    "commit_message": ("job", "commit_message"),
    "method": ("quant", "method"),
    "bits": ("quant", "bits"),
    "group_size": ("quant", "group_size"),
    "sym": ("quant", "sym"),
    "damp": ("quant", "damp_frac"),
    "act_order": ("quant", "act_order"),
    "block_size": ("quant", "block_size"),
    "awq_grid": ("quant", "awq_grid"),
    "awq_clip_grid": ("quant", "awq_clip_grid"),
    "awq_max_shrink": ("quant", "awq_max_shrink"),
    "awq_search_samples": ("quant", "awq_search_samples"),
    "awq_loss": ("quant", "awq_loss"),
    "ignore": ("quant", "ignore"),
    "backend": ("quant", "backend"),
    "calib": ("calib", "source"),
    "samples": ("calib", "n_samples"),
    "seq_len": ("calib", "seq_len"),
    "seed": ("calib", "seed"),
    "text_column": ("calib", "text_column"),
    "actors": ("run", "actors"),
    "gpus_per_actor": ("run", "gpus_per_actor"),
    "cpus_per_actor": ("run", "cpus_per_actor"),
    "micro_batch_samples": ("run", "micro_batch_samples"),
    "actor_memory_gib": ("run", "actor_memory_gib"),
    "address": ("run", "address"),
    "propagation": ("run", "propagation"),
    "span_mode": ("run", "span_mode"),
    "runtime": ("run", "runtime"),
}

_BOOL_OPTIONS = {"overwrite", "dry_run", "trust_remote_code", "sym", "act_order", "private"}
_FLOAT_OPTIONS = {"damp", "awq_max_shrink", "gpus_per_actor", "actor_memory_gib"}


def _convert(key: str, value: Any) -> Any:
    """Normalise YAML/CLI spellings: 'channel' group size, comma lists, ints given where floats are fine."""
    if key == "group_size" and isinstance(value, str):
        if value.strip().lower() in ("channel", "per-channel", "none"):
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"group_size={value!r}: expected an integer or 'channel'") from None
    if key == "tp_sizes" and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return tuple(int(p) for p in str(value).split(",") if p.strip())
        except ValueError:
            raise ConfigError(f"tp_sizes={value!r}: expected a comma list of integers, e.g. 1,2,4,8") from None
    if key == "tp_sizes" and isinstance(value, list):
        return tuple(value)
    if key == "ignore" and isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if key == "ignore" and isinstance(value, (list, tuple)):
        return tuple(str(p) for p in value)
    if key in _BOOL_OPTIONS and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if key in _FLOAT_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in _FLOAT_OPTIONS and value is not None and not isinstance(value, float):
        raise ConfigError(f"{key}={value!r}: expected a number")
    return value



def default_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The command line's defaults that depend on other options: `act_order` (on for GPTQ), `sym` (on:
    transformers cannot load asymmetric pack-quantized checkpoints yet, llm-compressor#1618), `out`
    (out/<model>-<method>-w<bits>), `backend` (cuda when the actors have GPUs), and, for the bundled
    tiny model, 32 samples of 512 tokens (its bundled text is small)."""
    filled = dict(options)
    if not filled.get("model"):
        # The bundled tiny model and text: a calibration set sized for a demo that takes seconds on a laptop.
        filled.setdefault("samples", 32)
        filled.setdefault("seq_len", 512)
    method = str(filled.get("method", Method.GPTQ.value))
    filled.setdefault("sym", True)
    # GPU actors use our CUDA kernels unless told otherwise; CPU actors can only run the references.
    gpus = filled.get("gpus_per_actor") or 0
    filled.setdefault("backend", Backend.CUDA.value if float(gpus) > 0 else Backend.REFERENCE.value)
    # GPTQ: activation order with static groups is llm-compressor's default too; it costs nothing at
    # inference and matters on layers whose inputs carry massive outlier channels.
    filled.setdefault("act_order", method == Method.GPTQ.value)
    if "out" not in filled:
        model = str(filled.get("model") or "tiny-llama").rstrip("/").split("/")[-1]
        filled["out"] = f"out/{model}-{method}-w{filled.get('bits', 4)}"
    return filled
