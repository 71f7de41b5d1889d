"""The one option table: every option of a quantize job, defined once, with its type, default, help and
whether it changes the artifact. It generates the command line (`add_arguments`), the YAML keys and the
Python entry's keys (`JobConfig.from_dict`), the defaults of both (`fill_defaults`, and the dataclasses'
field defaults: `default_of`), and the staging fingerprint (`Option.fingerprint`).

An option's name is its YAML key and, with '-' for '_', its flag. A default is a value, or depends on the
other options (`Dependent`: e.g. the CUDA backend where the actors have GPUs).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from enum import Enum
from typing import Any, Mapping

from wq_ops.config.enums import (
    AwqLoss,
    Backend,
    Format,
    Method,
    Modeling,
    MoeCalibration,
    Propagation,
    Runtime,
    Scheme,
    SpanMode,
    TextJoin,
    TpPolicy,
)
from wq_ops.config.option_spec import Dependent, Kind, Option
from wq_ops.config.schemes import SCHEMES, SMOOTHQUANT_ALPHA, NumberType, SchemeSpec
from wq_ops.errors import ConfigError

__all__ = ["Kind", "Dependent", "Option", "OPTIONS", "option", "default_of", "fill_defaults", "convert",
           "add_arguments", "method_misfits"]


def _bundled(options: Mapping[str, Any]) -> bool:
    return not options.get("model")


def _default_out(options: Mapping[str, Any]) -> str:
    model = str(options.get("model") or "tiny-llama").rstrip("/").split("/")[-1]
    if options.get("scheme") is not None and _scheme(options).group_size_fixed:     # W8A8, FP8*, NVFP4*
        scheme = options["scheme"]
        return f"out/{model}-{(scheme.value if isinstance(scheme, Enum) else str(scheme)).lower()}"
    method = options.get("method", Method.GPTQ)
    method = method.value if isinstance(method, Enum) else str(method)
    return f"out/{model}-{method}-w{options.get('bits', _scheme(options).bits)}"


def _scheme(options: Mapping[str, Any]) -> SchemeSpec:
    """The preset given with --scheme (W4A16 without one, or for an unknown name: the config refuses that one,
    naming the known ones)."""
    try:
        scheme = Scheme(options.get("scheme")) if options.get("scheme") is not None else Scheme.W4A16
    except ValueError:
        scheme = Scheme.W4A16
    return SCHEMES.get(scheme, SCHEMES[Scheme.W4A16])


def _default_format(options: Mapping[str, Any]) -> Format:
    return Format.BITSANDBYTES if _scheme(options).weights is NumberType.TABLE else Format.COMPRESSED_TENSORS


def _default_method(options: Mapping[str, Any]) -> Method:
    scheme = _scheme(options)
    if options.get("model_free") and scheme.method is not Method.RTN:     # no calibration: GPTQ and AWQ cannot run
        return Method.HQQ
    return scheme.method


def _default_smoothquant(options: Mapping[str, Any]) -> float | None:
    scheme, method = _scheme(options), options.get("method")
    awq = (method.value if isinstance(method, Enum) else method) == Method.AWQ.value
    # SmoothQuant's factors come from calibration activations, which a model-free job has none of.
    return SMOOTHQUANT_ALPHA if scheme.activations is not None and scheme.weights is NumberType.INT and not awq \
        and not options.get("model_free") else None


def _default_backend(options: Mapping[str, Any]) -> Backend:
    # GPU actors use our CUDA kernels unless told otherwise; CPU actors can only run the references.
    return Backend.CUDA if float(options.get("gpus_per_actor") or 0) > 0 else Backend.REFERENCE


J, Q, G, A, M, C, R, E = "job", "quant", "quant.gptq", "quant.awq", "quant.moe", "calib", "run", "evaluation"
OPTIONS: tuple[Option, ...] = (
    # --- the job ---------------------------------------------------------------------------------------
    Option("model", f"{J}.model", Kind.STR, None, "local checkpoint directory or Hub repo id (none: the bundled "
           "tiny model)", True),
    Option("revision", f"{J}.revision", Kind.STR, None, "Hub branch, tag or commit", True),
    Option("out", f"{J}.out", Kind.STR, Dependent(_default_out, "out/<model>-<method>-w<bits>; out/<model>-<scheme> "
                                                  "for W8A8, FP8* and NVFP4*"),
           "output directory", False),
    Option("format", f"{J}.format", Kind.CHOICE, Dependent(_default_format, "compressed-tensors; bitsandbytes for "
           "--scheme BNB_NF4 and BNB_FP4"), "artifact format", True, choices=Format),
    Option("overwrite", f"{J}.overwrite", Kind.BOOL, False, "replace a complete artifact in --out", False),
    Option("dry_run", f"{J}.dry_run", Kind.BOOL, False, "print the plan and its memory, then exit", False),
    # Before the quantization options: it changes the defaults of --smoothquant (off: no activations to smooth).
    Option("model_free", f"{J}.model_free", Kind.BOOL, False, "day-0 path: quantize the checkpoint's linear "
           "weights shard by shard from the safetensors alone, with no model class and no calibration (any "
           "architecture; --method rtn or hqq, or --scheme FP8_DYNAMIC, FP8_BLOCK, W8A8); each shard is a Ray task, "
           "--actors of them at once on a local Ray, every node's CPUs on a cluster", True),
    Option("trust_remote_code", f"{J}.trust_remote_code", Kind.BOOL, False, "run the checkpoint's own modeling "
           "code", True),
    # The classes that ran enter the fingerprint, not the option that chose them (prepare.py).
    Option("modeling", f"{J}.modeling", Kind.CHOICE, Modeling.AUTO, "whose modules compute the blocks: wq's native "
           "Llama/Qwen2/Qwen3 (the same bits, without transformers' import at start-up) or transformers' classes; "
           "auto: native where the config reads natively", False, choices=Modeling),
    Option("fail_after_blocks", f"{J}.fail_after_blocks", Kind.INT, None, "testing hook: crash an actor after this "
           "many finished blocks", False, cli=False),
    # Only the padding they cause enters the fingerprint (prepare.py).
    Option("tp_sizes", f"{J}.tp_sizes", Kind.INT_LIST, None, "vLLM tensor-parallel sizes the artifact must load "
           "with, e.g. 1,2,4,8: refuse before any work if one cannot (none: report 1,2,4,8)", False),
    Option("tp_policy", f"{J}.tp_policy", Kind.CHOICE, TpPolicy.REFUSE, "a --tp-sizes size vLLM cannot load: refuse "
           "before work, or zero-pad intermediate_size so it loads (outputs unchanged)", False, choices=TpPolicy),
    Option("push_to_hub", f"{J}.push_to_hub", Kind.STR, None, "publish the artifact to this Hub repo (ORG/NAME); "
           "token from HF_TOKEN or the huggingface_hub login, checked before any work", False),
    Option("push_revision", f"{J}.push_revision", Kind.STR, None, "branch to push to (none: main)", False),
    Option("private", f"{J}.private", Kind.BOOL, False, "create the Hub repo private", False),
    Option("commit_message", f"{J}.commit_message", Kind.STR, None, "Hub commit message", False),
    # --- quantization ----------------------------------------------------------------------------------
    # The scheme goes before the options whose defaults it sets (fill_defaults runs in table order).
    Option("scheme", f"{Q}.scheme", Kind.CHOICE, None, "preset named as llm-compressor's: W4A16 (4-bit, groups of "
           "128, symmetric), W4A16_ASYM (with zero points), W8A16 (8-bit, groups of 128), W8A8 (INT8 weights per "
           "channel, INT8 activations per token at run time), FP8_DYNAMIC (FP8 weights per channel, FP8 activations "
           "per token), FP8 (FP8 weights per tensor, static activation scales from calibration), FP8_BLOCK (FP8 "
           "weights per 128x128 block, activations per group of 128), NVFP4 (FP4 weights and activations, FP8 "
           "scales per 16 and a global scale), NVFP4A16 (the same weights), BNB_NF4 and BNB_FP4 (bitsandbytes 4-bit, "
           "--model-free only); it sets --method, --bits, --sym and --group-size, which still override where the "
           "scheme allows", True, choices=Scheme),
    Option("method", f"{Q}.method", Kind.CHOICE, Dependent(_default_method, "gptq; rtn for the FP8 and NVFP4 "
           "schemes; with --model-free hqq for integer weights"), "algorithm", True, choices=Method),
    Option("bits", f"{Q}.bits", Kind.INT, Dependent(lambda o: _scheme(o).bits, "4; 8 for --scheme W8A16, W8A8, "
           "FP8*"), "2, 3, 4 or 8", True),
    Option("group_size", f"{Q}.group_size", Kind.GROUP_SIZE, Dependent(lambda o: _scheme(o).group_size, "128; "
           "channel for --scheme W8A8, FP8* and NVFP4* (whose layouts fix their scales)"),
           "columns per scale: a multiple of 32, or 'channel'", True),
    # Symmetric by default: transformers cannot load asymmetric pack-quantized checkpoints yet (llm-compressor#1618).
    Option("sym", f"{Q}.sym", Kind.BOOL, Dependent(lambda o: _scheme(o).sym, "symmetric; asymmetric for "
           "--scheme W4A16_ASYM"), "symmetric grid; --asym stores zero points (vLLM loads them; "
           "transformers cannot yet, llm-compressor#1618)", True, negative="--asym"),
    # SmoothQuant's alpha (0.5 balances activation and weight maxima); on by default where activations are INT8.
    Option("smoothquant", f"{Q}.smoothquant", Kind.FRACTION_OR_OFF, Dependent(_default_smoothquant,
           f"{SMOOTHQUANT_ALPHA} for --scheme W8A8 with gptq or rtn, else off"), "SmoothQuant: move activation "
           "outliers into the weights before quantizing (each input channel divided by max|x|^ALPHA / "
           "max|w|^(1-ALPHA), folded into the norm before it); ALPHA in [0, 1], or 'off'", True),
    Option("ignore", f"{Q}.ignore", Kind.PATTERNS, (), "module-name pattern to leave unquantized (repeatable, or "
           "comma-separated)", True),
    Option("backend", f"{Q}.backend", Kind.CHOICE, Dependent(_default_backend, "cuda with --gpus-per-actor > 0, "
           "else reference"), "kernel backend", True, choices=Backend),
    Option("damp", f"{G}.damp_frac", Kind.FLOAT, 0.01, "GPTQ damping, a fraction of mean diag(H)", True,
           method=Method.GPTQ),
    # llm-compressor's default too: it costs nothing at inference and matters on layers whose inputs carry
    # massive outlier channels.
    Option("act_order", f"{G}.act_order", Kind.BOOL, True, "GPTQ: columns in activation order, static groups",
           True, negative="--no-act-order", method=Method.GPTQ),
    Option("block_size", f"{G}.block_size", Kind.INT, 128, "GPTQ columns per lazy-update block", True,
           method=Method.GPTQ),
    # Off with --model-free: without a Hessian the search can only weigh every weight alike, and that plain
    # squared-error clip scored worse than min-max on SmolLM2 (wq_ops/quant/hqq.py's table; quality.md).
    Option("rtn_clip_search", f"{Q}.rtn_clip_search", Kind.BOOL, Dependent(lambda o: not o.get("model_free"),
           "on; off with --model-free"), "RTN: search each group's clipping range for the least output error under "
           "the diagonal of its input Hessian (41 ranges from min-max down to 0.8 x it; with --model-free, the "
           "least squared weight error); --no-rtn-clip-search takes min-max", True, negative="--no-rtn-clip-search",
           method=Method.RTN),
    Option("awq_grid", f"{A}.grid", Kind.INT, 20, "AWQ scale-search grid points", True, method=Method.AWQ),
    Option("awq_clip_grid", f"{A}.clip_grid", Kind.INT, 20, "AWQ clip-search steps", True, method=Method.AWQ),
    Option("awq_max_shrink", f"{A}.max_shrink", Kind.FLOAT, 0.5, "AWQ clips a group's range to at least "
           "(1 - this) of max|w|", True, method=Method.AWQ),
    Option("awq_search_samples", f"{A}.search_samples", Kind.INT, 32, "AWQ samples replayed per candidate with "
           "--awq-loss module", True, method=Method.AWQ),
    Option("awq_loss", f"{A}.loss", Kind.CHOICE, AwqLoss.LAYER, "what AWQ's scale search measures: the group's own "
           "linear outputs on every token, from the Hessian (layer), or the attention's or MLP's output on "
           "replayed samples (module)", True, choices=AwqLoss, method=Method.AWQ),
    Option("moe_calibration", f"{M}.calibration", Kind.CHOICE, MoeCalibration.ROUTED, "mixture-of-experts models: "
           "each expert's statistics from the tokens routed to it (routed), or from every calibration token (all: "
           "every expert fed, at the experts' compute times experts/top-k)", True, choices=MoeCalibration),
    # An expert's Hessian from a handful of tokens is a poor one (rank <= tokens): below this, RTN.
    Option("moe_min_tokens", f"{M}.min_tokens", Kind.INT, 256, "mixture-of-experts models: an expert whose "
           "statistics come from fewer tokens is quantized with RTN (counted in the report as starved)", True),
    # --- calibration: the tokens themselves enter the fingerprint -------------------------------------------
    Option("calib", f"{C}.source", Kind.STR, None, "text file, folder of text files, parquet, jsonl, a datasets "
           "folder, or a Hub dataset hf://ORG/NAME[:CONFIG][@SPLIT]; required but for the bundled model (wq:bundled: "
           "the text bundled with wq)", False),
    Option("samples", f"{C}.n_samples", Kind.INT, Dependent(lambda o: 32 if _bundled(o) else 128,
           "128; 32 for the bundled model"), "calibration samples", False),
    Option("seq_len", f"{C}.seq_len", Kind.INT, Dependent(lambda o: 512 if _bundled(o) else 2048,
           "2048; 512 for the bundled model"), "tokens per sample", False),
    Option("seed", f"{C}.seed", Kind.INT, 0, "calibration sampling seed", False),
    Option("text_column", f"{C}.text_column", Kind.STR, "text", "column or field holding the text", False),
    Option("chat_template", f"{C}.chat_template", Kind.BOOL, False, "calibration rows are chats: read the "
           "'messages' column (lists of {role, content}) and apply the model's chat template to each", False),
    Option("calib_allow_repeats", f"{C}.allow_repeats", Kind.BOOL, False, "accept calibration text too short for "
           "the windows, so that most of their tokens repeat others (reported)", False),
    # --- perplexity after quantizing: the report's, not the artifact's ------------------------------------
    Option("eval", f"{E}.text", Kind.STR, None, "text file to score the artifact's perplexity on once it is "
           "quantized, block-pipelined on the actors (e.g. WikiText-2's wiki.test.raw); the report and card show it",
           False),
    Option("eval_baseline", f"{E}.baseline", Kind.BOOL, False, "with --eval, also score the source model on the "
           "same windows", False),
    Option("eval_seq_len", f"{E}.seq_len", Kind.INT, 2048, "--eval: tokens per window (non-overlapping)", False),
    Option("eval_max_windows", f"{E}.max_windows", Kind.INT, None, "--eval: score only the first windows (none: "
           "every whole window of the text)", False),
    Option("eval_join", f"{E}.join", Kind.CHOICE, TextJoin.WIKITEXT, "--eval: wikitext joins the file's lines "
           "with a blank line (the papers' convention), raw takes it as is", False, choices=TextJoin),
    # --- where it runs: results do not depend on it --------------------------------------------------------
    Option("actors", f"{R}.actors", Kind.INT, 1, "block actors, one per GPU", False),
    Option("gpus_per_actor", f"{R}.gpus_per_actor", Kind.FLOAT, 0.0, "GPUs per actor; 0 runs on CPU", False),
    Option("cpus_per_actor", f"{R}.cpus_per_actor", Kind.INT, 1, "CPUs and torch threads per actor", False),
    Option("micro_batch_samples", f"{R}.micro_batch_samples", Kind.INT, 8, "calibration samples per forward", False),
    Option("actor_memory_gib", f"{R}.actor_memory_gib", Kind.FLOAT, None, "memory per actor (none: measured)",
           False),
    Option("expert_actors", f"{R}.expert_actors", Kind.INT, 0, "mixture-of-experts models: actors besides --actors "
           "(same resources each) that quantize the routed experts, each a range of every routed block's experts, "
           "which then never load on the block's own actor (0: the block's actor quantizes them); Ray only; the "
           "artifact is the same either way", False),
    Option("max_actor_restarts", f"{R}.max_actor_restarts", Kind.INT, 3, "actors lost (a preempted node, an OOM "
           "kill) are replaced this many times per job; the new ones resume from the staged blocks", False),
    Option("address", f"{R}.address", Kind.STR, None, "Ray cluster address (none: $RAY_ADDRESS, else a local Ray, "
           "or none for one actor: see --runtime)", False),
    Option("propagation", f"{R}.propagation", Kind.CHOICE, Propagation.QUANTIZED, "block inputs from the quantized "
           "model (GPTQ's scheme) or the float one", True, choices=Propagation),
    Option("span_mode", f"{R}.span_mode", Kind.CHOICE, SpanMode.AUTO, "float propagation: stream micro-batches "
           "through each actor's resident span, actor to actor, or move one block at a time (least memory); auto: "
           "stream when there are several actors and the span fits", False, choices=SpanMode),
    Option("runtime", f"{R}.runtime", Kind.CHOICE, Runtime.AUTO, "where the actors run: ray, or local (one actor in "
           "this process, no Ray start-up); auto: local for one actor without --address, else ray", False,
           choices=Runtime),
)
_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown option {name!r}") from None


def default_of(name: str) -> Any:
    """An option's static default (the dataclass field's); a dependent option has none."""
    default = option(name).default
    if isinstance(default, Dependent):
        raise ValueError(f"{name}: its default depends on other options")
    return default


def fill_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` (by option name) with every dependent default filled in from what was given; static defaults
    come with the dataclasses. Unknown names are an error that lists the known ones."""
    unknown = sorted(set(given) - set(_BY_NAME))
    if unknown:
        hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, _BY_NAME, n=1))
                 else u for u in unknown]
        raise ConfigError(f"unknown option(s) {', '.join(hints)}; known options: {', '.join(sorted(_BY_NAME))}")
    filled = dict(given)
    for o in OPTIONS:
        if o.name not in filled and isinstance(o.default, Dependent):
            filled[o.name] = o.default.fn(filled)
    return filled


def method_misfits(given: Mapping[str, Any], method: Method) -> list[str]:
    """The options given that apply to another method than `method` (each would be ignored: an error)."""
    return [f"{o.name}={given[o.name]!r}: only {o.method.value} uses it" for o in OPTIONS
            if o.method is not None and o.method is not method and o.name in given]


def convert(name: str, value: Any) -> Any:
    """A YAML or command-line value as the option's type; a ConfigError naming the option if it is not one.
    None stays None (an option left unset)."""
    o = option(name)
    if value is None:
        return None
    if o.kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true or false")
        return value
    if o.kind is Kind.INT:
        return _integer(name, value)
    if o.kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}={value!r}: expected a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}={value!r}: expected a finite number")
        return number
    if o.kind is Kind.FRACTION_OR_OFF:
        if isinstance(value, str) and value.strip().lower() in ("off", "none"):
            return None
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected a number in [0, 1] or 'off'")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected a number in [0, 1] or 'off'") from None
        if not 0.0 <= number <= 1.0:
            raise ConfigError(f"{name}={value!r}: expected a number in [0, 1] or 'off'")
        return number
    if o.kind is Kind.GROUP_SIZE:
        if isinstance(value, str) and value.strip().lower() in ("channel", "per-channel", "none"):
            return None
        if isinstance(value, str) and value.strip() == "-1":
            raise ConfigError(f"{name}={value!r}: write 'channel' for one group per row")
        try:
            return _integer(name, value)
        except ConfigError:
            raise ConfigError(f"{name}={value!r}: expected an integer or 'channel'") from None
    if o.kind is Kind.INT_LIST:
        items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, int) else value)
        try:
            return tuple(_integer(name, v.strip() if isinstance(v, str) else v) for v in items
                         if not (isinstance(v, str) and not v.strip()))
        except (ConfigError, TypeError):
            raise ConfigError(f"{name}={value!r}: expected a comma list of integers, e.g. 1,2,4,8") from None
    if o.kind is Kind.PATTERNS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{name}={value!r}: expected a pattern or a list of patterns (strings)")
        return tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) and not (o.kind is Kind.CHOICE and isinstance(value, Enum)):
        raise ConfigError(f"{name}={value!r}: expected a string")
    return value                      # STR and CHOICE: the dataclasses check their values


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}={value!r}: expected an integer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option (two for a bool with a negative flag), each stating its default from the table.
    Nothing is set for a flag not given (argparse.SUPPRESS), so the table's defaults apply after YAML."""
    for o in OPTIONS:
        if not o.cli:
            continue
        shown = f" (default: {o.shown_default()})"
        if o.kind is Kind.BOOL:
            parser.add_argument(o.flag, dest=o.name, action="store_true", default=argparse.SUPPRESS,
                                help=o.help + shown)
            if o.negative:
                parser.add_argument(o.negative, dest=o.name, action="store_false", default=argparse.SUPPRESS,
                                    help=f"the opposite of {o.flag}")
            continue
        choices = [m.value for m in o.choices] if o.choices is not None else None
        action = "append" if o.kind is Kind.PATTERNS else "store"
        kind = {Kind.INT: int, Kind.FLOAT: float}.get(o.kind, str)   # argparse names a bad number itself
        parser.add_argument(o.flag, dest=o.name, choices=choices, action=action, type=kind,
                            default=argparse.SUPPRESS, help=o.help + shown)
