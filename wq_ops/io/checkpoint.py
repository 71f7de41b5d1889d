"""Read a Hugging Face safetensors checkpoint, local or on the Hub, one block's tensors at a time.

The driver opens a `Checkpoint` (config, index, tokenizer files: small) and checks every shard's header
before any work; actors call `read_tensors` with the shard files and names of their own blocks only.
Hub checkpoints are pinned to one commit, and each shard is downloaded only where it is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from wq_ops.errors import CheckpointError
from wq_ops.io.fp8_source import SCALE_SUFFIX, dequantize_fp8_blocks
from wq_ops.io.fused_experts import FusedExperts, read_fused

__all__ = ["Checkpoint", "open_checkpoint", "read_tensors", "shard_header", "read_config", "network_error",
           "shard_header_sha256", "source_identity", "TOKENIZER_FILES", "LICENSE_FILES", "CARD_NAME"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files a tokenizer may need, copied into the artifact when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# The source's license terms, copied into the artifact as they are (a derivative carries its base's terms), and
# its model card, read for its license metadata.
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "NOTICE", "USE_POLICY.md")
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint. For the Hub, `revision` is the commit sha every actor reads, and
    `local_dir` the snapshot folder that holds what the driver downloaded (config, index, tokenizer)."""

    local_dir: Path
    weight_map: Mapping[str, str]                # tensor name -> shard file name
    repo_id: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    endpoint: str | None = None                  # the Hub the driver resolved against; actors use the same
    shards: tuple[str, ...] = field(default=())
    # An FP8 block-scaled source (DeepSeek-V3): its block size; the dtype FP8 and MXFP4 weights are read in.
    fp8_block: tuple[int, int] | None = None
    dequantized_dtype: str = "bfloat16"
    # Routed experts stored fused (gpt-oss), read under their per-expert names.
    fused_experts: FusedExperts | None = None

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.local_dir)

    @property
    def source_root(self) -> Path:
        """The folder whose files are the source: the checkpoint directory, or for the Hub the repo's cache
        folder (`models--ORG--NAME`, whose `snapshots/` link into its `blobs/`)."""
        return self.local_dir if self.repo_id is None else self.local_dir.parent.parent

    def side_files(self) -> dict[str, Path]:
        """The tokenizer's, generation's and license files the artifact copies (name -> path), each checked: a symlink
        must resolve inside the checkpoint directory (for the Hub, into the repo's own `blobs/`), so that no
        other file's contents are copied into the artifact and published with it."""
        root = self.local_dir.resolve() if self.repo_id is None else (self.source_root / "blobs").resolve()
        found = {}
        for name in TOKENIZER_FILES + LICENSE_FILES:
            path = self.local_dir / name
            if not path.is_file():
                continue
            real = path.resolve()
            if not real.is_relative_to(root):
                raise CheckpointError(f"{path}: a symlink to {real}, outside the checkpoint "
                                      f"({root}); copy the file into the checkpoint instead")
            found[name] = path
        return found

    def shard_path(self, filename: str) -> Path:
        """The local path of one shard, downloading it (this shard only) for a Hub checkpoint."""
        if self.repo_id is None:
            return self.local_dir / filename
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.revision)
        if isinstance(cached, str):
            return Path(cached)
        # One line per shard fetched (Ray job logs show no bar; on a terminal huggingface_hub draws its own).
        start = time.perf_counter()
        log.info("downloading %s from %s@%s", filename, self.repo_id, (self.revision or "")[:12])
        path = Path(hf_hub_download(self.repo_id, filename, revision=self.revision, cache_dir=self.cache_dir,
                                    endpoint=self.endpoint))
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        log.info("downloaded %s: %.2f GiB in %.1f s (%.0f MiB/s)", filename, size / 2**30, seconds,
                 size / 2**20 / max(seconds, 1e-6))
        return path

    def files_for(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Group tensor names by the shard file that holds them (a routed expert's stored fused: the shards of
        its fused tensor)."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            found = self.fused_experts.source(name, self.weight_map) if self.fused_experts is not None else None
            if found is not None:
                for stored in found.stored_names():
                    by_shard[self.weight_map[stored]].append(name)
                continue
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name} is not in {self.source}'s index")
            by_shard[self.weight_map[name]].append(name)
        return dict(by_shard)


def shard_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header: every tensor's byte range lies inside the file and matches
    its dtype and shape. Returns name -> {"dtype", "shape", "data_offsets"} (the metadata entry dropped)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                              "not an object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if not _well_formed(entry):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {str(entry)[:120]}")
        start, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        want = numel * _DTYPE_BYTES.get(entry["dtype"], 0)
        if not 0 <= start <= end <= data_bytes or end - start != want:
            raise CheckpointError(
                f"{path}: tensor {name} ({entry['dtype']} {entry['shape']}) should span {want} bytes at "
                f"[{start}, {end}) of {data_bytes} data bytes: the shard is truncated or corrupt; re-download it"
            )
    return header


def source_identity(checkpoint: Checkpoint) -> bytes:
    """The bytes that name a checkpoint's files for a job's fingerprint: where it comes from (a Hub revision pins
    its files), for a local one each shard's size and header digest, and the index's tensor -> shard map."""
    parts = [checkpoint.source.encode()]
    if checkpoint.repo_id is None:
        for shard in checkpoint.shards:
            path = checkpoint.local_dir / shard
            parts.append(f"{shard}:{path.stat().st_size}:".encode() + bytes.fromhex(shard_header_sha256(path)))
    parts.append(json.dumps(sorted(checkpoint.weight_map.items())).encode())
    return b"".join(parts)


def shard_header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's header bytes (names, dtypes, shapes, offsets, metadata); the file's
    header is checked first (`shard_header`)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(int.from_bytes(f.read(8), "little"))).hexdigest()


def _well_formed(entry: object) -> bool:
    """A header entry: {"dtype": known name, "shape": [int >= 0, ...], "data_offsets": [int, int]}."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ints = (lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs))  # noqa: E731
    dtype = entry.get("dtype")
    return (isinstance(dtype, str) and dtype in _DTYPE_BYTES and ints(shape) and ints(offsets)
            and isinstance(offsets, list) and len(offsets) == 2)


def _looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith((".", "/")) and not Path(model).exists()


def open_checkpoint(model: str, *, revision: str | None = None, cache_dir: str | None = None,
                    verify: bool = True) -> Checkpoint:
    """Resolve `model` (a local directory, or a Hub repo id) and read its index. With `verify`, check that
    every shard exists and its header covers the tensors the index puts there (no tensor data is read)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _open_local(path, verify=verify)
    if path.exists():
        raise CheckpointError(f"--model {model}: a file; expected a checkpoint directory or a Hub repo id")
    if not _looks_like_repo_id(model):
        raise CheckpointError(f"--model {model}: no such directory, and not a Hub repo id (org/name)")
    return _open_hub(model, revision=revision, cache_dir=cache_dir)


def _weight_map_of(directory: Path, read_index: bool = True) -> tuple[dict[str, str], bool]:
    index = directory / INDEX_NAME
    if index.is_file():
        return _read_index(index), True
    single = directory / SINGLE_NAME
    if single.is_file():
        return {name: SINGLE_NAME for name in shard_header(single)}, False
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (it holds {', '.join(others[:3])}: convert to safetensors first)" if others else ""
    raise CheckpointError(f"{directory}: no {INDEX_NAME} and no {SINGLE_NAME}{hint}")


def read_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json: a JSON object, or a CheckpointError naming the file."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model settings, found a {type(config).__name__}")
    return config


def _read_index(index: Path) -> dict[str, str]:
    """An index's weight map, checked: tensor name -> shard file name, every shard a plain relative name
    inside the checkpoint (an absolute name or `..` would read files outside it)."""
    try:
        data = json.loads(index.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a safetensors index (expected an object with a non-empty "
                              f"\"weight_map\" object of tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, not a shard file name")
        parts = shard.replace("\\", "/").split("/")
        if shard.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or "\0" in shard:
            raise CheckpointError(f"{index}: shard name {shard!r} (of tensor {name}) points outside the "
                                  "checkpoint directory; shard names must be plain relative file names")
    return dict(weight_map)


def _open_local(directory: Path, *, verify: bool) -> Checkpoint:
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; expected a Hugging Face checkpoint directory")
    weight_map, _ = _weight_map_of(directory)
    shards = tuple(sorted(set(weight_map.values())))
    if verify:
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            by_shard[shard].append(name)
        for shard in shards:
            p = directory / shard
            if not p.is_file():
                example = sorted(by_shard[shard])[0]
                raise CheckpointError(f"{p}: missing; the index puts {len(by_shard[shard])} tensors there "
                                      f"(e.g. {example}); restore the file or re-download the checkpoint")
            header = shard_header(p)
            absent = sorted(set(by_shard[shard]) - set(header))
            if absent:
                raise CheckpointError(f"{p}: the index lists {absent[0]} (and {len(absent) - 1} more) here, "
                                      "but the shard does not hold it")
    return Checkpoint(local_dir=directory, weight_map=weight_map, shards=shards)


def network_error(error: BaseException) -> bool:
    """A failure to reach the Hub: an OSError, or an HTTP client's transport error (huggingface_hub's client
    library, whatever its module is called)."""
    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {"TransportError", "RequestError", "ConnectionError"})


def _open_hub(repo_id: str, *, revision: str | None, cache_dir: str | None) -> Checkpoint:
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT            # honours HF_ENDPOINT; pinned here so every actor uses the same Hub
    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=False)
    except RepositoryNotFoundError:
        raise CheckpointError(f"--model {repo_id}: no such Hub repo, or no access with this token") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"--model {repo_id}: no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"--model {repo_id}: the Hub answered {e}") from None
    except Exception as e:
        if not network_error(e):
            raise
        raise CheckpointError(f"--model {repo_id}: cannot reach the Hub at {endpoint} ({e}); check the network "
                              "(HF_ENDPOINT, proxies), or give a local checkpoint directory") from None
    sha = info.sha
    siblings = {s.rfilename for s in (info.siblings or [])}

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, name, revision=sha, cache_dir=cache_dir, endpoint=endpoint))
        except EntryNotFoundError:
            raise CheckpointError(f"{repo_id}@{sha}: no file {name}") from None
        except Exception as e:
            if not network_error(e):
                raise
            raise CheckpointError(f"{repo_id}@{sha}: cannot download {name} from {endpoint} ({e})") from None

    config = fetch("config.json")
    for name in TOKENIZER_FILES + LICENSE_FILES + (CARD_NAME,):
        if name in siblings:
            fetch(name)
    if INDEX_NAME in siblings:
        weight_map = _read_index(fetch(INDEX_NAME))
    elif SINGLE_NAME in siblings:
        weight_map = {n: SINGLE_NAME for n in shard_header(fetch(SINGLE_NAME))}
    else:
        raise CheckpointError(f"{repo_id}@{sha}: no {INDEX_NAME} and no {SINGLE_NAME}")
    missing = sorted(set(weight_map.values()) - siblings) if siblings else []
    if missing:
        raise CheckpointError(f"{repo_id}@{sha}: the index names {missing[0]}, which the repo does not hold")
    return Checkpoint(local_dir=config.parent, weight_map=dict(weight_map), repo_id=repo_id, revision=sha,
                      cache_dir=cache_dir, endpoint=endpoint, shards=tuple(sorted(set(weight_map.values()))))


def read_tensors(checkpoint: Checkpoint, names: Iterable[str], *,
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Load the named tensors (only those) from their shards onto `device`. From an FP8 block-scaled source, a
    float8 weight with a `_scale_inv` beside it comes back dequantized (`fp8_source`); a routed expert's tensor
    that the checkpoint stores fused comes from its fused tensor (`fused_experts`)."""
    names = list(names)
    if checkpoint.fused_experts is not None and any(n not in checkpoint.weight_map for n in names):
        fused = [n for n in names if n not in checkpoint.weight_map]
        out = read_fused(checkpoint.fused_experts, fused, checkpoint.weight_map, shard_path=checkpoint.shard_path,
                         dtype=getattr(torch, checkpoint.dequantized_dtype), device=device,
                         fp8_block=checkpoint.fp8_block)
        out.update(read_tensors(checkpoint, [n for n in names if n in checkpoint.weight_map], device=device))
        return {n: out[n] for n in names}
    if checkpoint.fp8_block is None:
        return _read(checkpoint, names, device)
    scales = [n + SCALE_SUFFIX for n in names if n + SCALE_SUFFIX in checkpoint.weight_map]
    raw = _read(checkpoint, names + scales, "cpu")
    dtype = getattr(torch, checkpoint.dequantized_dtype)
    out = {}
    for name in names:
        value = raw[name]
        if value.dtype == torch.float8_e4m3fn and name + SCALE_SUFFIX in raw:
            value = dequantize_fp8_blocks(value, raw[name + SCALE_SUFFIX], checkpoint.fp8_block, dtype)
        out[name] = value.to(device)
    return out


def _read(checkpoint: Checkpoint, names: Iterable[str], device: torch.device | str) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, Tensor] = {}
    for shard, shard_names in checkpoint.files_for(names).items():
        path = checkpoint.shard_path(shard)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in shard_names:
                    if name not in present:
                        raise CheckpointError(f"{path}: tensor {name} is not in this shard, though the index says so")
                    out[name] = f.get_tensor(name).to(device)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
    return out

