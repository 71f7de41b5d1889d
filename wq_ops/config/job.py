"""A quantize job's configuration: frozen dataclasses, validated on construction, their defaults taken from the
option table (`options`); what a job does to each linear, `QuantConfig`, is `quant`'s. `JobConfig.from_dict`
builds one from flat options named like the command line's flags, with the command line's defaults; `to_dict`
gives them back. Nothing below `jobs/` reads the environment or the command line: every function gets its
config as an argument."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from wq_ops.config.enums import (
    Backend,
    Format,
    Method,
    Modeling,
    Propagation,
    Runtime,
    SpanMode,
    TextJoin,
    TpPolicy,
    parse_enum,
    positive_int,
)
from wq_ops.config.options import OPTIONS, convert, default_of, fill_defaults, method_misfits
from wq_ops.config.quant import AWQParams, GPTQParams, MoeParams, QuantConfig, spec_name
from wq_ops.config.schemes import NumberType, WeightLayout
from wq_ops.errors import ConfigError

__all__ = ["GPTQParams", "AWQParams", "MoeParams", "QuantConfig", "CalibConfig", "EvalConfig", "RunConfig",
           "JobConfig"]     # the first four from `quant`, re-exported: a job's config is built here


# The text bundled with wq, named: the default for the bundled tiny model, a deliberate choice for any other.
BUNDLED_CALIB = "wq:bundled"


def missing_calibration(model: str) -> str:
    """Why a real model needs --calib, and what to give."""
    return (f"calib: none given for {model}; the text bundled with wq (12k tokens of public-domain speeches) "
            "is the default for its bundled tiny model only. Give --calib with text like the model's use: a .txt, "
            ".jsonl or .parquet file or folder, e.g. WikiText-2's train split or a C4 shard for a base model, chat "
            "transcripts for a chat model (RTN reads it only for the report's errors); or --calib "
            f"{BUNDLED_CALIB} to use the bundled text anyway")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: where it comes from and how much of it."""

    source: str | None = default_of("calib")     # file or directory; None or BUNDLED_CALIB: the text bundled with wq
    n_samples: int = 128                         # the job's default depends on the model (options: samples)
    seq_len: int = 2048
    seed: int = default_of("seed")
    text_column: str = default_of("text_column")   # column read from parquet files and datasets directories
    allow_repeats: bool = default_of("calib_allow_repeats")   # windows mostly over the same text: accepted
    chat_template: bool = default_of("chat_template")   # rows are chats ('messages'): the model's template applied

    def __post_init__(self) -> None:
        positive_int(self.n_samples, "samples")
        positive_int(self.seq_len, "seq_len")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: expected a non-negative integer")


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity after quantizing (none by default): which text, in which windows, and whether the source is
    scored too. It changes the report, never the artifact."""

    text: str | None = default_of("eval")          # text file; None: no evaluation
    baseline: bool = default_of("eval_baseline")   # also score the source model
    seq_len: int = default_of("eval_seq_len")
    max_windows: int | None = default_of("eval_max_windows")   # None: every whole window of the text
    join: TextJoin = default_of("eval_join")

    def __post_init__(self) -> None:
        object.__setattr__(self, "join", parse_enum(TextJoin, self.join, "eval_join"))
        if self.text is not None and (not isinstance(self.text, str) or not self.text):
            raise ConfigError(f"eval={self.text!r}: expected the path of a text file")
        if not isinstance(self.baseline, bool):
            raise ConfigError(f"eval_baseline={self.baseline!r}: expected true or false")
        if self.baseline and self.text is None:
            raise ConfigError("eval_baseline: nothing to compare with; give the text to score with --eval FILE")
        if positive_int(self.seq_len, "eval_seq_len") < 2:
            raise ConfigError(f"eval_seq_len={self.seq_len}: a window needs at least 2 tokens (one prediction)")
        if self.max_windows is not None:
            positive_int(self.max_windows, "eval_max_windows")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the job runs: Ray cluster, actors, resources."""

    actors: int = default_of("actors")
    gpus_per_actor: float = default_of("gpus_per_actor")      # 0: actors run on CPU
    cpus_per_actor: int = default_of("cpus_per_actor")        # also the actor's torch thread count
    micro_batch_samples: int = default_of("micro_batch_samples")   # calibration samples per forward call
    actor_memory_gib: float | None = default_of("actor_memory_gib")   # None: measured from the actor's device
    expert_actors: int = default_of("expert_actors")         # actors quantizing routed experts; 0: the block's own
    address: str | None = default_of("address")               # Ray cluster address; None: local (see runtime)
    max_actor_restarts: int = default_of("max_actor_restarts")   # lost actors replaced, per job
    propagation: Propagation = default_of("propagation")
    span_mode: SpanMode = default_of("span_mode")
    runtime: Runtime = default_of("runtime")

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
        if isinstance(self.expert_actors, bool) or not isinstance(self.expert_actors, int) or self.expert_actors < 0:
            raise ConfigError(f"expert_actors={self.expert_actors!r}: expected an integer >= 0 (0: none)")
        if self.expert_actors and self.propagation is not Propagation.QUANTIZED:
            raise ConfigError("expert_actors with propagation=float: expert actors quantize a block's experts while "
                              "its actor waits, which quantized propagation does; leave out --expert-actors or "
                              "--propagation float")
        if self.expert_actors and self.runtime is Runtime.LOCAL:
            raise ConfigError("expert_actors with runtime=local: expert actors are Ray actors; use --runtime ray "
                              "(or auto)")
        if isinstance(self.max_actor_restarts, bool) or not isinstance(self.max_actor_restarts, int) \
                or self.max_actor_restarts < 0:
            raise ConfigError(f"max_actor_restarts={self.max_actor_restarts!r}: expected an integer >= 0")
        if isinstance(self.gpus_per_actor, bool) or not isinstance(self.gpus_per_actor, (int, float)) \
                or self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor={self.gpus_per_actor!r}: expected a number >= 0 (0 runs on CPU)")
        if self.actor_memory_gib is not None and not (self.actor_memory_gib > 0):
            raise ConfigError(f"actor_memory_gib={self.actor_memory_gib!r}: expected a positive number of GiB")

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @property
    def all_actors(self) -> int:
        """Block actors and expert actors: the Ray actors the job starts."""
        return self.actors + self.expert_actors


@dataclass(frozen=True)
class JobConfig:
    """One quantization job: input checkpoint, output directory, and the three sections above."""

    out: str
    model: str | None = default_of("model")     # local directory or Hub repo id; None: wq's bundled tiny model
    revision: str | None = default_of("revision")   # Hub revision (branch, tag or commit); None: the default branch
    format: Format = Format.COMPRESSED_TENSORS   # the job's default depends on --scheme (options: format)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    run: RunConfig = field(default_factory=RunConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    overwrite: bool = default_of("overwrite")
    dry_run: bool = default_of("dry_run")
    model_free: bool = default_of("model_free")   # shard by shard, no model class, no calibration
    trust_remote_code: bool = default_of("trust_remote_code")
    modeling: Modeling = default_of("modeling")
    fail_after_blocks: int | None = default_of("fail_after_blocks")   # testing hook: crash an actor after this many
    tp_sizes: tuple[int, ...] | None = default_of("tp_sizes")   # vLLM TP sizes that must load; None: report 1,2,4,8
    tp_policy: TpPolicy = default_of("tp_policy")   # a tp size in tp_sizes that cannot load: refuse, or pad the MLP
    push_to_hub: str | None = default_of("push_to_hub")         # Hub repo id (org/name) to publish the artifact to
    push_revision: str | None = default_of("push_revision")     # branch of that repo; None: its default branch
    private: bool = default_of("private")            # create the repo private (when it does not exist yet)
    commit_message: str | None = default_of("commit_message")

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", parse_enum(Format, self.format, "format"))
        table = self.quant.weight_type is NumberType.TABLE
        if table != (self.format is Format.BITSANDBYTES):
            raise ConfigError(f"format={self.format.value} with scheme={spec_name(self.quant)}: bitsandbytes' layout "
                              "holds its own schemes only; use --scheme BNB_NF4 or BNB_FP4 with --format bitsandbytes")
        if table and not self.model_free:
            raise ConfigError(f"scheme={spec_name(self.quant)}: bitsandbytes' rounding needs no calibration; quantize "
                              "with --model-free")
        if self.model_free:
            self._check_model_free()
        elif self.model is not None and self.calib.source is None:
            raise ConfigError(missing_calibration(str(self.model)))
        by_stage = self.quant.method is Method.AWQ and self.quant.weight_type is not NumberType.FLOAT
        if self.run.expert_actors and (self.model_free or by_stage):
            raise ConfigError(f"expert_actors with {'model_free' if self.model_free else 'method=awq'}: expert actors "
                              "quantize routed experts a group at a time in the calibrated job (GPTQ, RTN, HQQ, FP8, "
                              "NVFP4); leave out --expert-actors")
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
        if self.format is Format.GPTQ and not self.quant.sym:
            given = f" (scheme={self.quant.scheme.value})" if self.quant.scheme is not None else ""
            raise ConfigError(f"format=gptq with an asymmetric grid{given}: GPTQ v1 stores zero - 1, so a zero point "
                              "of 0 cannot be stored; use --sym, or --format compressed-tensors for --asym")
        spec = self.quant.spec
        if self.format not in (Format.COMPRESSED_TENSORS, Format.BITSANDBYTES) and spec is not None \
                and spec.group_size_fixed:
            raise ConfigError(f"format={self.format.value} stores integer weight-only schemes; scheme="
                              f"{spec_name(self.quant)} is written as compressed-tensors: --format compressed-tensors")
        if self.format is Format.AWQ and (self.quant.bits != 4 or self.quant.group_size is None):
            raise ConfigError(f"format=awq: AutoAWQ's GEMM layout holds 4-bit codes in groups; bits={self.quant.bits}"
                              f", group_size={self.quant.group_size or 'channel'}: use --bits 4 and a group size, or "
                              "--format compressed-tensors")
        if self.tp_policy is TpPolicy.PAD and self.quant.weight_type is NumberType.FLOAT:
            raise ConfigError(f"tp_policy=pad pads integer codes; scheme={spec_name(self.quant)} stores float weights: "
                              "use --tp-policy refuse, or leave out the --tp-sizes it cannot load")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"out={self.out!r}: expected an output directory path")
        object.__setattr__(self, "modeling", parse_enum(Modeling, self.modeling, "modeling"))

    def _check_model_free(self) -> None:
        """What a job without calibration or a model class can do: weights rounded by rules alone."""
        quant = self.quant
        refusals = []
        if self.model is None:
            refusals.append("--model: give the checkpoint (the bundled model is quantized with calibration)")
        if self.calib.source is not None:
            refusals.append("--calib: it uses no calibration data; leave it out")
        if quant.method not in (Method.RTN, Method.HQQ):
            refusals.append(f"--method {quant.method.value}: needs calibration; use rtn or hqq")
        if quant.weight_type is NumberType.FLOAT and quant.method is not Method.RTN:
            refusals.append(f"--method {quant.method.value}: float weights are rounded to nearest (rtn)")
        if quant.layout is WeightLayout.TENSOR_GROUP or (quant.activations is not None
                                                         and not quant.activations.dynamic):
            refusals.append(f"--scheme {spec_name(quant)}: needs calibration (static activation scales, or a global "
                            "scale shared by the layers an engine fuses); use FP8_DYNAMIC, FP8_BLOCK, W8A8 or an "
                            "integer weight-only scheme")
        if quant.smoothquant is not None:
            refusals.append("--smoothquant: its factors come from calibration activations; use --smoothquant off")
        if self.format not in (Format.COMPRESSED_TENSORS, Format.BITSANDBYTES):
            refusals.append(f"--format {self.format.value}: model-free artifacts are compressed-tensors or "
                            "bitsandbytes")
        if self.evaluation.text is not None:
            refusals.append("--eval: needs the model class; score the artifact with python -m jobs.eval")
        if self.tp_sizes is not None:
            refusals.append("--tp-sizes: the checks need the model's layout; leave it out")
        if refusals:
            raise ConfigError("--model-free: " + "; ".join(refusals))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "JobConfig":
        """Build from flat options named like the command line's flags (`group_size`, `samples`, ...), with the
        command line's defaults (the option table's). Unknown keys are an error that lists the known ones; an
        option of another method than the job's is an error too (it would be ignored)."""
        # A null (YAML `ignore:` with nothing after it) leaves an option unset where None is not one of its values.
        by_name = {o.name: o for o in OPTIONS}
        given = {k: convert(k, v) if k in by_name else v for k, v in options.items()
                 if not (v is None and k in by_name and not by_name[k].takes_none)}
        given = fill_defaults(given)
        method = parse_enum(Method, given["method"], "method")
        misfits = method_misfits(options, method)
        if misfits:
            raise ConfigError(f"method={method.value}: {'; '.join(misfits)}; remove it, or choose that method")
        if given.get("out") is None:
            raise ConfigError("out: missing; give the output directory (--out DIR)")
        sections: dict[str, dict[str, Any]] = {"job": {}, "quant": {}, "quant.gptq": {}, "quant.awq": {},
                                               "quant.moe": {}, "calib": {}, "run": {}, "evaluation": {}}
        for o in OPTIONS:
            if o.name in given:
                section, name = o.target.rsplit(".", 1)
                sections[section][name] = given[o.name]
        quant = QuantConfig(**sections["quant"], gptq=GPTQParams(**sections["quant.gptq"]),
                            awq=AWQParams(**sections["quant.awq"]), moe=MoeParams(**sections["quant.moe"]))
        return cls(**sections["job"], quant=quant, calib=CalibConfig(**sections["calib"]),
                   run=RunConfig(**sections["run"]), evaluation=EvalConfig(**sections["evaluation"]))

    def to_dict(self) -> dict[str, Any]:
        """The flat options that rebuild this config (for reports, fingerprints and `from_dict`): every
        option but those of another method than the job's."""
        out: dict[str, Any] = {}
        for o in OPTIONS:
            if o.method is not None and o.method is not self.quant.method:
                continue
            holder: Any = self
            *path, name = o.target.split(".")          # "job.out", "quant.bits", "quant.gptq.damp_frac"
            for part in path:
                holder = holder if part == "job" else getattr(holder, part)
            value = getattr(holder, name)
            if isinstance(value, Enum):
                value = value.value
            out[o.name] = list(value) if isinstance(value, tuple) else value
        return out

    def fingerprint_options(self) -> dict[str, Any]:
        """The options whose values change the artifact (the staging fingerprint's; `Option.fingerprint`)."""
        keep = {o.name for o in OPTIONS if o.fingerprint}
        return {k: v for k, v in self.to_dict().items() if k in keep}

