"""Everything decided before any actor starts: the checkpoint resolved and its config read, the options
checked against the model (group size, tensor-parallel sizes, sequence length, output directory), the
calibration data tokenized, and the staging fingerprint. Every refusal that needs no cluster happens here.
Entry point: `prepare_job`."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from wq_ops.bundled.tiny_model import ensure_tiny_checkpoint
from wq_ops.calib.data import CalibrationSummary, calibration_tokens, describe_calibration, is_bundled
from wq_ops.cluster.layout_checks import check_options_fit_model
from wq_ops.cluster.plan import split_spans
from wq_ops.cluster.resume_check import drop_stale_blocks
from wq_ops.config import JobConfig, Modeling
from wq_ops.errors import CheckpointError, ConfigError
from wq_ops.evaluate.perplexity import eval_windows, join_text
from wq_ops.formats import format_module
from wq_ops.formats.tp_compat import CompatReport
from wq_ops.io.artifact import (
    ArtifactLayout,
    check_output_apart,
    check_output_dir,
    remove_leftovers,
    restore_set_aside,
)
from wq_ops.io.checkpoint import (
    Checkpoint,
    open_checkpoint,
    read_config,
    shard_header,
    source_identity,
)
from wq_ops.io.fp8_source import SCALE_SUFFIX, fp8_block_size
from wq_ops.io.fused_experts import FUSED_LAYOUTS, FusedExperts
from wq_ops.io.lease import OutputLease
from wq_ops.io.mxfp4_source import mxfp4_modules_to_not_convert
from wq_ops.model.architecture import (
    SUPPORTED_ARCHITECTURES,
    ModelLayout,
    describe_model,
    import_transformers,
    transformers_import_lock,
    unsupported_architecture,
)
from wq_ops.model.native_llama import NATIVE_ARCHITECTURES, NativeLlamaConfig, read_native_config

__all__ = ["PreparedJob", "prepare_job", "modeling_name"]

_TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    """Everything decided before any actor starts."""

    job: JobConfig
    checkpoint: Checkpoint
    hf_config: Any
    layout: ModelLayout
    token_ids: torch.Tensor
    artifact: ArtifactLayout
    source_config: dict[str, Any]
    compatibility: CompatReport
    not_written: tuple[str, ...] = ()      # source tensors the model does not read, left out (`_not_written`)
    carried: tuple[str, ...] = ()          # source tensors past the decoder blocks, copied unquantized
    lease: OutputLease | None = None       # held on --out until the job ends (None: a dry run)
    calibration: CalibrationSummary | None = None   # source, shape, distinct windows
    eval_ids: torch.Tensor | None = None   # --eval: the text's windows (n_windows, eval_seq_len); None: no eval


def _fingerprint(job: JobConfig, checkpoint: Checkpoint, token_ids: torch.Tensor, *, padded_size: int | None,
                 modeling: str, on_paper: bool = False) -> str:
    """Names the staging folder: same model revision, quantization settings and calibration tokens =>
    same fingerprint. Where the job runs (actors, address) does not enter: results do not depend on it."""
    h = hashlib.sha256()
    quant = job.fingerprint_options()                    # the options that change the artifact (the table's)
    quant["padded_intermediate_size"] = padded_size      # the only effect --tp-sizes/--tp-policy have on bytes
    quant["modeling"] = modeling                         # the classes that ran, not the option that chose them
    h.update(json.dumps(quant, sort_keys=True).encode())
    # The files (the tensors' bytes: each staged block's digest, `drop_stale_blocks`); a dry run from the
    # index alone stages nothing.
    h.update(b"index alone" if on_paper else source_identity(checkpoint))
    h.update(token_ids.numpy().tobytes())
    import wq_ops

    h.update(wq_ops.__version__.encode())
    return h.hexdigest()[:16]


def prepare_job(job: JobConfig, *, cache_dir: Path) -> PreparedJob:
    """Resolve the checkpoint, read its config, check the options against the model, tokenize the
    calibration data and check the output directory: every refusal that needs no cluster happens here."""
    format_module(job.format)
    if job.model:
        model = job.model
    else:
        with transformers_import_lock():     # its writer imports transformers, maybe beside the actor's import
            model = str(ensure_tiny_checkpoint(cache_dir / "models"))
    # A dry run may plan from config.json and the index alone: the shards' headers are then not checked.
    on_paper = job.dry_run and _index_without_shards(model)
    checkpoint = open_checkpoint(model, revision=job.revision, cache_dir=str(cache_dir / "hub") if job.model else None,
                                 verify=not on_paper)
    if on_paper:
        log.info("dry run from %s's config.json and index alone: none of its %d shards is there, so no shard "
                 "header was read", model, len(checkpoint.shards))
    check_output_apart(Path(job.out), checkpoint.source_root)
    checkpoint.side_files()              # refuse a side file linked from outside before any work
    source_config = read_config(checkpoint.local_dir / "config.json")
    try:
        # An MXFP4 release (gpt-oss) stores only its experts so, read dequantized wherever fused experts are.
        mxfp4 = mxfp4_modules_to_not_convert(source_config) is not None
        fp8_block = None if mxfp4 else fp8_block_size(source_config)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint.source}: {e}") from None
    architectures = source_config.get("architectures") or [f"<none; model_type={source_config.get('model_type')}>"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(architectures[0])
    hf_config = _model_config(job, checkpoint.local_dir, source_config)
    layout = describe_model(hf_config, trust_remote_code=job.trust_remote_code)
    block_names = [layout.block_tensor_name(i, n) for i in range(layout.n_blocks) for n in layout.block(i).params]
    fused = FusedExperts.of(layout.architecture, block_names, checkpoint.weight_map)
    if fused is not None:
        checkpoint = replace(checkpoint, fused_experts=fused, dequantized_dtype=str(layout.dtype).replace("torch.", ""))
        log.info("source: routed experts stored %s, read per expert", fused.describe())
    elif mxfp4:
        raise CheckpointError(f"{checkpoint.source}: quant_method mxfp4, but no fused experts in MXFP4 where "
                              f"{layout.architecture}'s experts are: wq reads gpt-oss's MXFP4 experts only")
    missing = [n for n in block_names if n not in checkpoint.weight_map
               and (fused is None or fused.source(n, checkpoint.weight_map) is None)]
    missing += [n for n in layout.outer_params if n not in checkpoint.weight_map]
    if missing:
        fused_elsewhere = any(n.endswith(".experts.gate_up_proj") for n in checkpoint.weight_map)
        hint = (f"; its experts are stored fused, which wq reads for {', '.join(FUSED_LAYOUTS)} only: save it with "
                "transformers' save_original_format=True (the default)") if fused_elsewhere else ""
        raise CheckpointError(f"{checkpoint.source}: the index lacks {len(missing)} tensor(s) the model needs, "
                              f"e.g. {missing[0]}{hint}")
    if fp8_block is None and not on_paper:
        _check_storage_dtype(checkpoint, layout)
    if fp8_block is not None:          # read dequantized, in the dtype the model computes in
        checkpoint = replace(checkpoint, fp8_block=fp8_block, dequantized_dtype=str(layout.dtype).replace("torch.", ""))
        log.info("source: FP8 with %dx%d block scales, read dequantized to %s", *fp8_block,
                 checkpoint.dequantized_dtype)
    carried, not_written = _unread_tensors(layout, checkpoint)
    if carried:
        log.info("carried into the artifact unquantized (read dequantized where the source is FP8): %d tensor(s) "
                 "of layers past num_hidden_layers (multi-token prediction, for speculative decoding): %s",
                 len(carried), _describe_names(carried))
    if not_written:
        log.warning("the source has %d tensor(s) the model does not read, which the artifact leaves out: %s",
                    len(not_written), _describe_names(not_written))
    split_spans(layout.n_blocks, job.run.actors)   # more actors than blocks: refused before any actor starts
    compatibility = check_options_fit_model(job, layout, hf_config)
    if job.calib.seq_len > int(getattr(hf_config, "max_position_embeddings", job.calib.seq_len)):
        raise ConfigError(f"seq_len={job.calib.seq_len}: longer than the model's max_position_embeddings="
                          f"{hf_config.max_position_embeddings}")
    check_output_dir(Path(job.out), overwrite=job.overwrite)
    if job.dry_run:                          # writes nothing
        return _prepare_output(job, checkpoint, layout, compatibility, hf_config, source_config, not_written,
                               carried, None, on_paper=on_paper)
    restore_set_aside(Path(job.out))
    lease = OutputLease.acquire(Path(job.out))   # one job at a time writes --out
    try:
        remove_leftovers(Path(job.out))
        check_output_dir(Path(job.out), overwrite=job.overwrite)
        return _prepare_output(job, checkpoint, layout, compatibility, hf_config, source_config, not_written,
                               carried, lease)
    except BaseException:
        lease.release()
        raise


def _index_without_shards(model: str) -> bool:
    """Whether `model` is a local checkpoint whose index names shards none of which is there: described by its
    config.json and index alone (a job planned for weights that are elsewhere)."""
    if not Path(model).expanduser().is_dir():
        return False
    try:
        checkpoint = open_checkpoint(model, verify=False)
    except CheckpointError:
        return False                     # opened again below, where the error is reported with its context
    return bool(checkpoint.shards) and not any((checkpoint.local_dir / s).exists() for s in checkpoint.shards)


def _prepare_output(job: JobConfig, checkpoint: Checkpoint, layout: ModelLayout, compatibility: CompatReport,
                    hf_config: Any, source_config: dict[str, Any], not_written: tuple[str, ...],
                    carried: tuple[str, ...], lease: OutputLease | None, *, on_paper: bool = False) -> PreparedJob:
    """The calibration tokens, the staging fingerprint and the staged blocks still valid, under the lease."""

    @functools.cache              # calibration text and --eval text share one
    def load_tokenizer() -> Any:
        no_tokenizer = (f"{checkpoint.source}: the checkpoint has no tokenizer (tokenizer.json, tokenizer.model "
                        "or vocab.json), so text calibration cannot be tokenized; give pre-tokenized calibration "
                        "instead: a parquet file with an input_ids column (--calib ids.parquet)")
        if not any((checkpoint.local_dir / n).is_file() for n in _TOKENIZER_VOCABULARIES):
            raise CheckpointError(no_tokenizer)
        with transformers_import_lock():     # from_pretrained imports the tokenizer's class lazily
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(checkpoint.local_dir, trust_remote_code=job.trust_remote_code)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{checkpoint.source}: transformers cannot load its tokenizer "
                                      f"({type(e).__name__}: {str(e)[:200]}); pre-tokenized calibration needs "
                                      "none: a parquet file with an input_ids column (--calib ids.parquet)") from None

    ids = calibration_tokens(job.calib.source, load_tokenizer, n_samples=job.calib.n_samples,
                             seq_len=job.calib.seq_len, seed=job.calib.seed, text_column=job.calib.text_column,
                             allow_repeats=job.calib.allow_repeats,
                             # the bundled demo: its small bundled text, overlapping windows by design
                             repeats_expected=not job.model and is_bundled(job.calib.source),
                             chat_template=job.calib.chat_template)
    if int(ids.max()) >= layout.vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(ids.max())} but the model's vocabulary has "
                          f"{layout.vocab_size}")
    eval_ids = _evaluation_windows(job, load_tokenizer, layout, hf_config)
    padded_size = None if compatibility.padding is None else compatibility.padding.padded_size
    artifact = ArtifactLayout(out_dir=Path(job.out), n_blocks=layout.n_blocks,
                              fingerprint=_fingerprint(job, checkpoint, ids, padded_size=padded_size,
                                                       modeling=modeling_name(hf_config), on_paper=on_paper))
    if lease is not None:
        drop_stale_blocks(artifact, layout, checkpoint)
    return PreparedJob(job=job, checkpoint=checkpoint, hf_config=hf_config, layout=layout, token_ids=ids,
                       artifact=artifact, source_config=source_config, compatibility=compatibility,
                       not_written=not_written, carried=carried, lease=lease,
                       calibration=describe_calibration(job.calib.source, ids), eval_ids=eval_ids)


def _evaluation_windows(job: JobConfig, tokenizer: Callable[[], Any], layout: ModelLayout,
                        hf_config: Any) -> torch.Tensor | None:
    """--eval's text, tokenized by the model's tokenizer as `jobs.eval` does and cut into its windows
    (n_windows, seq_len); None without --eval. Refused before any work: a file that cannot be read, too
    few tokens for a window, windows longer than the model's positions."""
    spec = job.evaluation
    if spec.text is None:
        return None
    try:
        text = Path(spec.text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"eval={spec.text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"eval={spec.text}: cannot read it ({e.strerror or type(e).__name__})") from None
    ids = tokenizer()(join_text(text, spec.join), return_tensors="pt", verbose=False)["input_ids"][0]
    positions = getattr(hf_config, "max_position_embeddings", None)
    try:
        windows = eval_windows(ids, seq_len=spec.seq_len, max_windows=spec.max_windows,
                               max_positions=positions if isinstance(positions, int) else None,
                               seq_len_name="eval_seq_len")
    except ConfigError as e:
        raise ConfigError(f"eval={spec.text}: {e}") from None
    if int(windows.max()) >= layout.vocab_size:
        raise ConfigError(f"eval={spec.text}: the tokenizer produced id {int(windows.max())} but the model's "
                          f"vocabulary has {layout.vocab_size}")
    return windows


_HEADER_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _check_storage_dtype(checkpoint: Checkpoint, layout: ModelLayout) -> None:
    """The weights the model computes with (the embedding and block 0's linear layers) must be stored in the
    dtype config.json states: a mismatch would surface only once the first block computes."""
    if checkpoint.repo_id is not None:   # a Hub shard is downloaded where an actor needs it, not here
        return
    names = [layout.embed_name] + [layout.block_tensor_name(0, s.name) + ".weight" for s in layout.block(0).linears]
    for shard, in_shard in checkpoint.files_for(n for n in names if n in checkpoint.weight_map).items():
        header = shard_header(checkpoint.shard_path(shard))
        for name in in_shard:
            stored = _HEADER_DTYPES.get(header[name]["dtype"])
            if stored is not None and stored != layout.dtype:
                raise CheckpointError(
                    f"{checkpoint.source}: config.json gives dtype {str(layout.dtype).replace('torch.', '')} but "
                    f"{name} is stored as {str(stored).replace('torch.', '')}; set config.json's dtype (or "
                    "torch_dtype) to the shards' dtype, or convert the shards")


def _unread_tensors(layout: ModelLayout, checkpoint: Checkpoint) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Source tensors no block and no outer module reads, less the FP8 scales of the weights that are read,
    as (carried, left out). Carried: those of layers numbered past the decoder blocks (DeepSeek-V3's
    multi-token-prediction layer `model.layers.61`, which transformers does not build and vLLM loads for
    speculative decoding), copied unquantized. Left out: the rest (a stale rotary buffer); the report names
    both."""
    read = {layout.block_tensor_name(i, n) for i in range(layout.n_blocks) for n in layout.block(i).params}
    if checkpoint.fused_experts is not None:       # the fused tensors the per-expert ones come from
        found = [checkpoint.fused_experts.source(n, checkpoint.weight_map) for n in read]
        read |= {stored for f in found if f is not None for stored in f.stored_names()}
    read |= set(layout.outer_params)
    past = re.compile(re.escape(layout.block_prefix) + r"\.(\d+)\.")
    carried: list[str] = []
    left_out: list[str] = []
    for name in sorted(checkpoint.weight_map):
        if name in read:
            continue
        weight = name.removesuffix(SCALE_SUFFIX)
        if checkpoint.fp8_block is not None and weight != name and (
                weight in read or (weight in checkpoint.weight_map and _past(past, weight, layout.n_blocks))):
            continue                       # an FP8 scale, consumed where its weight is read dequantized
        (carried if _past(past, name, layout.n_blocks) else left_out).append(name)
    return tuple(carried), tuple(left_out)


def _past(pattern: re.Pattern[str], name: str, n_blocks: int) -> bool:
    match = pattern.match(name)
    return match is not None and int(match[1]) >= n_blocks


def _describe_names(names: tuple[str, ...]) -> str:
    """A short account of many tensor names: how many under each `model.layers.N` or top-level prefix."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        prefix = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else parts[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{prefix} ({n})" for prefix, n in sorted(counts.items()))


def modeling_name(hf_config: Any) -> str:
    return "native" if isinstance(hf_config, NativeLlamaConfig) else "transformers"


def _model_config(job: JobConfig, local_dir: Path, source_config: dict[str, Any]) -> Any:
    """The config the job's model classes take: a NativeLlamaConfig where --modeling allows it and the
    native modules read the config, else transformers' (imported here)."""
    native, why = read_native_config(source_config)
    if job.modeling is Modeling.NATIVE and native is None:
        raise ConfigError(f"modeling=native: {why}; wq's native modules run {', '.join(NATIVE_ARCHITECTURES)} "
                          "only. Use --modeling auto or transformers")
    if native is not None and job.modeling is not Modeling.TRANSFORMERS:
        log.info("modeling: wq's native modules (%s)", native.architectures[0])
        return native
    log.info("modeling: transformers' classes (%s)", "--modeling transformers" if native is not None else why)
    import_transformers()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_dir, trust_remote_code=job.trust_remote_code)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{local_dir / 'config.json'}: transformers cannot read it ({e})") from None
