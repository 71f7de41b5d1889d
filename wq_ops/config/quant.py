"""What a quantize job does to each linear layer: `QuantConfig` (method, grid, scheme, SmoothQuant) and the
method's own tunables (`GPTQParams`, `AWQParams`, `MoeParams`), frozen and validated on construction; their
defaults come from the option table (`options`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from wq_ops.config.enums import (
    AwqLoss,
    Backend,
    Method,
    MoeCalibration,
    Scheme,
    parse_enum,
    positive_int,
)
from wq_ops.config.options import default_of
from wq_ops.config.schemes import SCHEMES, ActivationQuant, NumberType, SchemeSpec, WeightLayout
from wq_ops.errors import ConfigError

__all__ = ["GPTQParams", "AWQParams", "MoeParams", "QuantConfig", "spec_name"]


@dataclass(frozen=True)
class GPTQParams:
    """GPTQ's tunables (used only when the method is GPTQ)."""

    damp_frac: float = default_of("damp")        # fraction of mean(diag(H)) added before Cholesky
    act_order: bool = default_of("act_order")    # columns in order of decreasing diag(H), groups kept static
    block_size: int = default_of("block_size")   # columns solved together before the lazy trailing update

    def __post_init__(self) -> None:
        if isinstance(self.damp_frac, bool) or not isinstance(self.damp_frac, (int, float)) \
                or not (0.0 < self.damp_frac <= 1.0):
            raise ConfigError(f"damp_frac={self.damp_frac!r}: expected a fraction in (0, 1]; the usual value is 0.01")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order={self.act_order!r}: expected true or false")
        positive_int(self.block_size, "block_size")


@dataclass(frozen=True)
class AWQParams:
    """AWQ's tunables (used only when the method is AWQ)."""

    grid: int = default_of("awq_grid")                   # points on the alpha grid of the scale search
    clip_grid: int = default_of("awq_clip_grid")         # steps of the clipping search
    max_shrink: float = default_of("awq_max_shrink")     # clip the range down to at most (1 - this) of max|w|
    search_samples: int = default_of("awq_search_samples")   # with loss=module: samples replayed per candidate
    # The group's own linear outputs (the paper's Eq. 4, from the Hessian, every token), or the module's output
    # on replayed samples (AutoAWQ's and llm-compressor's). Layer by default: on SmolLM2 its perplexity was
    # lower in 3 of 4 runs (benchmarks/quality.md).
    loss: AwqLoss = default_of("awq_loss")

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", parse_enum(AwqLoss, self.loss, "awq_loss"))
        if positive_int(self.grid, "awq_grid") < 2:
            raise ConfigError(f"awq_grid={self.grid}: expected at least 2 points")
        positive_int(self.clip_grid, "awq_clip_grid")
        positive_int(self.search_samples, "awq_search_samples")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not (0.0 <= self.max_shrink < 1.0):
            raise ConfigError(f"awq_max_shrink={self.max_shrink!r}: expected a fraction in [0, 1)")


@dataclass(frozen=True)
class MoeParams:
    """How mixture-of-experts blocks are calibrated (unused by dense models)."""

    calibration: MoeCalibration = default_of("moe_calibration")   # which tokens an expert's statistics see
    min_tokens: int = default_of("moe_min_tokens")       # fewer: the expert is starved and quantized with RTN

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", parse_enum(MoeCalibration, self.calibration, "moe_calibration"))
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ConfigError(f"moe_min_tokens={self.min_tokens!r}: expected a non-negative integer")


@dataclass(frozen=True)
class QuantConfig:
    """What to do to each linear layer of each decoder block."""

    # The job's defaults of method, bits, group_size and sym depend on --scheme (options); these are W4A16's.
    method: Method = Method.GPTQ
    bits: int = 4
    group_size: int | None = 128             # None: one group spans the whole input dim
    sym: bool = True                         # symmetric grid (zero point fixed at 2**(bits-1)); False stores zeros
    ignore: tuple[str, ...] = default_of("ignore")       # module-name patterns (fnmatch) left unquantized
    scheme: Scheme | None = default_of("scheme")   # the preset: weights' type and layout, activations (SCHEMES)
    rtn_clip_search: bool = True      # RTN: each group's clip range searched, not min-max (options: off model-free)
    smoothquant: float | None = None         # SmoothQuant's alpha; the job's default depends on --scheme (options)
    backend: Backend = Backend.REFERENCE     # the job's default depends on its GPUs (options: backend)
    gptq: GPTQParams = field(default_factory=GPTQParams)
    awq: AWQParams = field(default_factory=AWQParams)
    moe: MoeParams = field(default_factory=MoeParams)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_enum(Method, self.method, "method"))
        if self.scheme is not None:
            object.__setattr__(self, "scheme", parse_enum(Scheme, self.scheme, "scheme"))
        object.__setattr__(self, "backend", parse_enum(Backend, self.backend, "backend"))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"ignore={pattern!r}: not a regular expression ({e})") from None
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"bits={self.bits!r}: expected one of 2, 3, 4, 8")
        if not isinstance(self.sym, bool):
            raise ConfigError(f"sym={self.sym!r}: expected true or false")
        if not isinstance(self.rtn_clip_search, bool):
            raise ConfigError(f"rtn_clip_search={self.rtn_clip_search!r}: expected true or false")
        if self.group_size == -1:
            raise ConfigError("group_size=-1: write 'channel' (--group-size channel) for one group per row")
        if self.group_size is not None:
            positive_int(self.group_size, "group_size")
            if self.group_size % 32:
                raise ConfigError(
                    f"group_size={self.group_size}: must be a multiple of 32 (engines' kernels read whole "
                    "32-value words per group), or 'channel' for one group per row"
                )
        self._check_scheme()
        self._check_smoothquant()
        if self.backend is Backend.CUDA and self.method is Method.AWQ and self.group_size is not None \
                and self.group_size > 256:
            raise ConfigError(f"group_size={self.group_size}: the CUDA AWQ search handles groups of 32 to 256 "
                              "columns; use --backend reference for wider groups")

    def _check_scheme(self) -> None:
        """The options a preset fixes (an activation or float scheme: bits, symmetry, one scale per channel,
        tensor or block; float weights: rounded to nearest) are errors that name the scheme if changed."""
        spec = self.spec
        if spec is None or not spec.group_size_fixed:
            return
        name = f"scheme={spec_name(self)}"
        if self.bits != spec.bits:
            raise ConfigError(f"{name}: bits={self.bits}: the scheme's weights are {spec.bits}-bit; drop --bits")
        if not self.sym:
            raise ConfigError(f"{name}: its weights are symmetric (engines read no zero point); drop --asym")
        if self.group_size is not None:
            where = {WeightLayout.GROUP: "output channel", WeightLayout.TENSOR: "tensor",
                     WeightLayout.BLOCK: "128x128 block", WeightLayout.TENSOR_GROUP: "16 columns (times a global "
                     "one)", WeightLayout.FLAT_BLOCK: "64 values (bitsandbytes' blocks)"}[spec.layout]
            raise ConfigError(f"{name}: group_size={self.group_size}: the scheme stores one scale per {where}; "
                              "drop --group-size (or give 'channel')")
        if spec.weights is not NumberType.INT and self.method is not Method.RTN:
            raise ConfigError(f"{name}: method={self.method.value} solves for an integer grid; FP8, NVFP4 and "
                              "bitsandbytes weights are rounded to nearest: --method rtn (the scheme's default)")

    def _check_smoothquant(self) -> None:
        alpha = self.smoothquant
        if alpha is None:
            return
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"smoothquant={alpha!r}: expected a number in [0, 1] (alpha), or off")
        name = f"smoothquant={alpha}"
        if self.activations is None:
            raise ConfigError(f"{name}: smoothing eases quantizing activations; scheme={spec_name(self)} leaves "
                              "them in 16 bits (use --scheme W8A8)")
        if self.weight_type is NumberType.FLOAT:
            raise ConfigError(f"{name}: scheme={spec_name(self)} quantizes to FP8, whose float grid keeps outliers; "
                              "smoothing is for INT8 activations (--scheme W8A8)")
        if self.method is Method.AWQ:
            raise ConfigError(f"{name}: method=awq folds its own searched input scales; smoothing runs with gptq or "
                              "rtn")

    @property
    def spec(self) -> SchemeSpec | None:
        """The preset's meaning, None without --scheme (the integer weight-only grid the options describe)."""
        return None if self.scheme is None else SCHEMES[self.scheme]

    @property
    def weight_type(self) -> NumberType:
        return NumberType.INT if self.spec is None else self.spec.weights

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout.GROUP if self.spec is None else self.spec.layout

    @property
    def activations(self) -> ActivationQuant | None:
        """How engines quantize each linear's input (None: weight-only)."""
        return None if self.spec is None else self.spec.activations

    @property
    def act_order(self) -> bool:
        """Whether columns were solved in activation order (GPTQ's option; never for another method)."""
        return self.method is Method.GPTQ and self.gptq.act_order

    @property
    def kept_search_samples(self) -> int:
        """Calibration samples a block keeps for AWQ's replayed scale search (0 where nothing is replayed)."""
        return self.awq.search_samples if self.method is Method.AWQ and self.awq.loss is AwqLoss.MODULE else 0


def spec_name(quant: QuantConfig) -> str:
    return quant.scheme.value if quant.scheme is not None else "none"
