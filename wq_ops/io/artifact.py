"""Write the output artifact atomically: shards staged by the actors, renamed into place by the driver,
and `model.safetensors.index.json` written last, so the artifact is complete if and only if its index
exists. Every file goes to a temp name in the same directory first, then `os.replace`.

Replacing a complete artifact (--overwrite): the new one is built whole in a sibling directory
(`.NAME.wq-next`) and exchanged with the old one by one `renameat2(RENAME_EXCHANGE)` (Linux); readers of
--out see the old artifact or the new one, never a mix, and a failure before the exchange leaves the old one
as it was. Where the exchange is not available, two renames (old aside as `.NAME.wq-old`, new in place): a
crash between them leaves --out missing for an instant, and the next job restores the old one first.

Layout: shard 1 holds the tensors before the first block (embeddings), shard i + 2 block i, and the
last shard the tensors after the last block (final norm, lm_head). Names never depend on actor count.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from torch import Tensor

from wq_ops.errors import ArtifactError

__all__ = ["write_atomic", "save_tensors_atomic", "write_json_atomic", "ArtifactLayout", "ShardLayout",
           "check_output_dir", "finalize_artifact", "check_output_apart", "check_room", "restore_set_aside",
           "remove_leftovers", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
STAGING_DIR = ".wq-staging"

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ShardLayout:
    """Where a model-free job's files go: output shard i stands for the source's shard i (`source_shards`, in
    order), staged under the fingerprint with its record beside it (written after it: a shard is finished if
    and only if its record exists)."""

    out_dir: Path
    source_shards: tuple[str, ...]
    fingerprint: str

    @property
    def staging(self) -> Path:
        return self.out_dir / STAGING_DIR / self.fingerprint

    def shard_name(self, position: int) -> str:
        return f"model-{position + 1:05d}-of-{len(self.source_shards):05d}.safetensors"

    def staged_shard(self, position: int) -> Path:
        return self.staging / f"shard-{position:05d}.safetensors"

    def staged_record(self, position: int) -> Path:
        return self.staging / f"shard-{position:05d}.json"


class StagedLayout(Protocol):
    """What finalizing an artifact needs of a layout: the output directory and the job's staging folder."""

    @property
    def out_dir(self) -> Path: ...

    @property
    def staging(self) -> Path: ...


def _beside(out_dir: Path, role: str) -> Path:
    """The sibling directory a replacement uses: `.NAME.wq-next` (the new artifact being built) or
    `.NAME.wq-old` (the old one, set aside by the two-rename fallback); beside the real directory where --out
    is a symlink, which keeps pointing at it."""
    real = out_dir.resolve()
    return real.parent / f".{real.name}.wq-{role}"


def restore_set_aside(out_dir: Path) -> None:
    """An old artifact set aside by a replacement that a crash interrupted, while --out is missing, goes back
    (before the lease is taken: the lease lives in --out)."""
    old = _beside(out_dir, "old")
    if old.is_dir() and not out_dir.exists():
        try:
            os.rename(old, out_dir.resolve())
        except OSError:                  # another job restored it first
            return
        log.warning("%s: restored the previous artifact, set aside by a replacement that was interrupted", out_dir)


def remove_leftovers(out_dir: Path) -> None:
    """A half-built replacement (never visible as --out) and an old artifact set aside: removed, by the job
    that holds the output's lease."""
    for leftover in (_beside(out_dir, "next"), _beside(out_dir, "old")):
        if leftover.is_dir():
            shutil.rmtree(leftover)


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse before any work: a path that is a file, a complete artifact without `overwrite`, a place we
    cannot write, or a complete artifact we could not replace atomically. Creates nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--out {out_dir}: exists and is not a directory")
    complete = (out_dir / INDEX_NAME).exists() or _beside(out_dir, "old").is_dir()
    if complete and not overwrite:
        raise ArtifactError(f"--out {out_dir}: already holds a complete artifact ({INDEX_NAME}); "
                            "pass --overwrite to replace it, or choose another directory")
    existing = out_dir.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactError(f"--out {out_dir}: cannot create or write it ({existing} is not a writable directory)")
    if complete and out_dir.exists():
        real = out_dir.resolve()
        parent = real.parent
        if os.path.ismount(real) or os.stat(parent).st_dev != os.stat(real).st_dev \
                or not os.access(parent, os.W_OK | os.X_OK):
            raise ArtifactError(
                f"--out {out_dir}: replacing its artifact builds the new one beside it in {parent} and swaps the "
                "two, but that directory is a mount point or its parent is not writable on the same filesystem; "
                "write into a subdirectory of it (e.g. --out " + str(out_dir / "model") + ")")


def check_room(layout: StagedLayout, artifact_bytes: int) -> str:
    """Refuse, with the numbers, an artifact the output's filesystem has no room for; else a line saying what
    it needs. Staged shards already count (they move into place); an artifact being replaced stays whole
    until the new one is complete, so the new one needs room beside it."""
    staged = sum(p.stat().st_size for p in layout.staging.glob("*.safetensors")) if layout.staging.is_dir() else 0
    need = max(artifact_bytes - staged, 0)
    existing = layout.out_dir.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    beside = " beside the artifact it replaces (kept whole until the new one is complete)" \
        if (layout.out_dir / INDEX_NAME).exists() else ""
    line = (f"disk: the artifact needs about {need / 2**30:.2f} GiB more{beside}; {free / 2**30:.2f} GiB free "
            f"at {existing}")
    if free < need:
        raise ArtifactError(f"--out {layout.out_dir}: {line}; free space there or choose another directory")
    return line


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


def finalize_artifact(layout: StagedLayout, *, shards: Mapping[Path, str], weight_map: Mapping[str, str],
                      total_size: int, files: Mapping[str, bytes]) -> Path:
    """Move the staged shards (staged path -> final shard name) into place, write `files` (name -> bytes:
    config.json, tokenizer, model card, reports), drop shards of an older incomplete artifact, then write the
    index last. A complete artifact already there is replaced whole (module docstring). On a failure (a full
    disk) the shards go back to staging, so a rerun resumes with them. Returns the index path."""
    out = layout.out_dir.resolve()          # a symlinked --out: the directory it points at is replaced
    replacing = (out / INDEX_NAME).exists()
    where = _beside(out, "next") if replacing else out
    if replacing:
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir()
    try:
        _assemble(where, shards=shards, weight_map=weight_map, total_size=total_size, files=files)
        if replacing:
            for kept in out.iterdir():           # other jobs' staging, the output lease: they stay with --out
                if kept.name.startswith(".wq-"):
                    os.replace(kept, where / kept.name)
            _exchange(where, out)
    except BaseException as error:
        if replacing:
            for kept in where.glob(".wq-*"):     # back where they were; the old artifact is untouched
                os.replace(kept, out / kept.name)
        for staged, final in shards.items():     # the staged work is kept for a rerun
            if (where / final).is_file() and not staged.exists():
                os.replace(where / final, staged)
        if isinstance(error, OSError):
            outcome = "the artifact there is unchanged" if replacing else "no artifact was written"
            raise ArtifactError(f"--out {out}: could not write the artifact in {where} ({error}); {outcome}, and the "
                                "staged blocks are kept: rerun the job to finish it") from None
        raise
    if replacing:
        shutil.rmtree(where)                     # the old artifact, now under the sibling's name
    shutil.rmtree(layout.staging, ignore_errors=True)
    staging_root = out / STAGING_DIR
    if staging_root.is_dir() and not any(staging_root.iterdir()):
        staging_root.rmdir()
    return out / INDEX_NAME


def _assemble(where: Path, *, shards: Mapping[Path, str], weight_map: Mapping[str, str], total_size: int,
              files: Mapping[str, bytes]) -> None:
    """The artifact's files in `where`, its index last."""
    for name, data in files.items():
        _write_bytes_atomic(where / name, data)
    final_names = set()
    for staged, final in shards.items():
        if not staged.is_file():
            raise ArtifactError(f"staged shard {staged} is missing: the job did not finish writing it")
        os.replace(staged, where / final)
        final_names.add(final)
    missing = sorted(set(weight_map.values()) - final_names - {p.name for p in where.iterdir()})
    if missing:
        raise ArtifactError(f"{where}: the index would name {missing[0]}, which was not written")
    for old in where.glob("model-*-of-*.safetensors"):
        if old.name not in final_names:
            old.unlink()
    write_json_atomic(where / INDEX_NAME, {"metadata": {"total_size": total_size},
                                           "weight_map": dict(sorted(weight_map.items()))})


_RENAME_EXCHANGE = 2


def _exchange(new: Path, out: Path) -> None:
    """Swap two directories in one step (Linux renameat2); else set the old aside, move the new in, and leave
    the old under `new`'s name, as the exchange does."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(out), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise ArtifactError(f"--out {out}: could not swap in the new artifact from {new} "
                                f"({os.strerror(err)}); the old artifact is unchanged")
    old = _beside(out, "old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    os.rename(old, new)
