"""Write the output artifact atomically: shards staged by the actors, renamed into place by the driver,
and `model.safetensors.index.json` written last, so the artifact is complete if and only if its index
exists. Every file goes to a temp name in the same directory first, then `os.replace`.

Layout: shard 1 holds the tensors before the first block (embeddings), shard i + 2 block i, and the
last shard the tensors after the last block (final norm, lm_head). Names never depend on actor count.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

from wq_ops.errors import ArtifactError

__all__ = ["write_atomic", "save_tensors_atomic", "write_json_atomic", "ArtifactLayout", "check_output_dir",
           "finalize_artifact", "check_output_apart", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
STAGING_DIR = ".wq-staging"


def _default_file_mode() -> int:
    """0o666 less the process umask: what a plain open() would have given (some writers use 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # same dir => same filesystem
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)      # atomic: readers see the old file or the new one, never half
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    write_atomic(path, write)


def save_tensors_atomic(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file, written atomically. `format: pt` is what transformers expects to find."""
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))


def write_json_atomic(path: Path, obj: Any) -> None:
    _write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass(frozen=True)
class ArtifactLayout:
    """Where every file of one job goes. fingerprint: names the staging folder, so a rerun of the same job
    finds its finished blocks and a changed job never mixes with them."""

    out_dir: Path
    n_blocks: int
    fingerprint: str

    @property
    def n_shards(self) -> int:
        return self.n_blocks + 2

    @property
    def staging(self) -> Path:
        return self.out_dir / STAGING_DIR / self.fingerprint

    def shard_name(self, position: int) -> str:
        """position 0: before the blocks; 1..n_blocks: block position - 1; n_blocks + 1: after the blocks."""
        return f"model-{position + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def block_shard_name(self, block: int) -> str:
        return self.shard_name(block + 1)

    def staged_block(self, block: int) -> Path:
        return self.staging / f"block-{block:05d}.safetensors"

    def staged_block_record(self, block: int) -> Path:
        return self.staging / f"block-{block:05d}.json"

    def staged_outer(self, part: str) -> Path:
        return self.staging / f"{part}.safetensors"


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse before any work: a path that is a file, a complete artifact without `overwrite`, or a place
    we cannot write. Creates nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--out {out_dir}: exists and is not a directory")
    if (out_dir / INDEX_NAME).exists() and not overwrite:
        raise ArtifactError(f"--out {out_dir}: already holds a complete artifact ({INDEX_NAME}); "
                            "pass --overwrite to replace it, or choose another directory")
    existing = out_dir.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactError(f"--out {out_dir}: cannot create or write it ({existing} is not a writable directory)")


def check_output_apart(out_dir: Path, source: Path) -> None:
    """Refuse an output directory that is the checkpoint's, lies inside it, or contains it (symlinks
    resolved): writing there would overwrite or delete the source's own files."""
    out, src = out_dir.expanduser().resolve(), source.expanduser().resolve()
    if out == src:
        where = "is the checkpoint directory itself"
    elif out.is_relative_to(src):
        where = f"lies inside the checkpoint directory {src}"
    elif src.is_relative_to(out):
        where = f"contains the checkpoint directory {src}"
    else:
        return
    raise ArtifactError(f"--out {out_dir}: {where}; writing the artifact there would overwrite or delete the "
                        "source. Choose a directory outside the checkpoint")


def finalize_artifact(layout: ArtifactLayout, *, shards: Mapping[Path, str], weight_map: Mapping[str, str],
                      total_size: int, files: Mapping[str, bytes]) -> Path:
    """Move the staged shards (staged path -> final shard name) into place, write `files` (name -> bytes:
    config.json, tokenizer, model card, reports), drop shards of an older artifact, then write the index
    last. Returns the index path."""
    out = layout.out_dir
    index = out / INDEX_NAME
    index.unlink(missing_ok=True)          # from here until the end, the directory is not a complete artifact
    for name, data in files.items():
        _write_bytes_atomic(out / name, data)
    final_names = set()
    for staged, final in shards.items():
        if not staged.is_file():
            raise ArtifactError(f"staged shard {staged} is missing: the job did not finish writing it")
        os.replace(staged, out / final)
        final_names.add(final)
    missing = sorted(set(weight_map.values()) - final_names - {p.name for p in out.iterdir()})
    if missing:
        raise ArtifactError(f"{out}: the index would name {missing[0]}, which was not written")
    for old in out.glob("model-*-of-*.safetensors"):
        if old.name not in final_names:
            old.unlink()
    write_json_atomic(index, {"metadata": {"total_size": total_size},
                              "weight_map": dict(sorted(weight_map.items()))})
    shutil.rmtree(layout.staging, ignore_errors=True)
    staging_root = out / STAGING_DIR
    if staging_root.is_dir() and not any(staging_root.iterdir()):
        staging_root.rmdir()
    return index
