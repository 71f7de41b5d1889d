"""Before a job resumes: the blocks an earlier run staged are reused only while their source weights are the
bytes they were computed from. Each staged block's record holds the digest of its source tensors as they were
read; here they are read and hashed again. The first block whose source changed is dropped with every later
one (their inputs passed through it), so they are computed afresh. Entry point: `drop_stale_blocks`."""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

from wq_ops.cluster.protocol import ShardRecord
from wq_ops.io.artifact import ArtifactLayout
from wq_ops.io.checkpoint import Checkpoint, read_tensors
from wq_ops.io.digest import combine_entries, tensor_entry
from wq_ops.model.architecture import ModelLayout

__all__ = ["drop_stale_blocks"]

log = logging.getLogger(__name__)


def _recorded_sha256(artifact: ArtifactLayout, block: int) -> str | None:
    """The source digest a staged block's record holds; None where no block is staged, "" where its record is
    unreadable or holds none (treated as changed)."""
    path = artifact.staged_block_record(block)
    if not path.is_file():
        return None
    try:
        return ShardRecord.from_json(json.loads(path.read_text())).source_sha256
    except (ValueError, TypeError, KeyError, OSError):
        return ""


def _source_sha256(checkpoint: Checkpoint, layout: ModelLayout, block: int) -> str:
    """A block's source digest, as the loader computes it, reading one tensor at a time, or one expert's at a
    time (a fused source's expert is dequantized once for its gate and up): the driver holds one expert, never
    a block."""
    prefix = f"{layout.block_prefix}.{block}."
    groups: dict[str, list[str]] = {}
    for name in (prefix + n for n in layout.block(block).params):
        expert = _EXPERT.match(name)
        groups.setdefault(expert[0] if expert else name, []).append(name)
    entries = {}
    for names in groups.values():
        entries.update({n: tensor_entry(n, t) for n, t in read_tensors(checkpoint, names).items()})
    return combine_entries(entries)


_EXPERT = re.compile(r".*\.experts\.\d+\.")


def drop_stale_blocks(artifact: ArtifactLayout, layout: ModelLayout, checkpoint: Checkpoint) -> list[int]:
    """Remove the staged blocks from the first one whose source tensors differ from what it was computed from
    (or whose record is unusable) to the end; returns the removed block numbers. A Hub checkpoint is pinned
    to one commit, whose files are addressed by their content: its staged blocks are kept as they are."""
    if not artifact.staging.is_dir() or checkpoint.repo_id is not None:
        return []
    recorded = [_recorded_sha256(artifact, b) for b in range(artifact.n_blocks)]
    staged = [b for b, sha in enumerate(recorded) if sha]
    with ThreadPoolExecutor(2, thread_name_prefix="wq-resume-check") as pool:
        now = dict(zip(staged, pool.map(lambda b: _source_sha256(checkpoint, layout, b), staged)))
    # A block not staged is computed anyway; one staged from other bytes changes every later block's inputs.
    first = next((b for b, sha in enumerate(recorded) if sha is not None and now.get(b) != sha), None)
    if first is None:
        return []
    dropped = [b for b in range(first, artifact.n_blocks)
               if artifact.staged_block(b).exists() or artifact.staged_block_record(b).exists()]
    for b in dropped:
        artifact.staged_block_record(b).unlink(missing_ok=True)      # the record first: a block is staged with it
        artifact.staged_block(b).unlink(missing_ok=True)
    log.warning("resume: block %d's source tensors changed since it was staged; recomputing blocks %d to %d",
                first, first, artifact.n_blocks - 1)
    return dropped
