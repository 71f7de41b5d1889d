"""Calibration tokens: read texts, tokenize them as one stream, and cut `n_samples` random windows of
`seq_len` tokens (GPTQ's sampling: uniform start positions, seeded, windows may overlap).

Sources: a text file; a directory of text files (*.txt, *.md, *.raw, sorted); parquet files (a text
column); JSON-lines files (a text field); a `datasets` directory written by `save_to_disk` (its Arrow
files); or, with no source, the public-domain text bundled in `wq_ops/bundled/text`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from wq_ops.errors import ConfigError

__all__ = ["load_texts", "tokenize_corpus", "sample_windows", "calibration_tokens", "BUNDLED_TEXT_DIR"]

BUNDLED_TEXT_DIR = Path(__file__).resolve().parents[1] / "bundled" / "text"
_TEXT_SUFFIXES = (".txt", ".md", ".raw", ".text")


def _read_parquet(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise ConfigError(f"{path}: no column {column!r} (columns: {table.column_names}); pass --text-column")
    return [t for t in table.column(column).to_pylist() if t]


def _read_arrow(path: Path, column: str) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()     # what `datasets` writes
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    if column not in table.column_names:
        raise ConfigError(f"{path}: no column {column!r} (columns: {table.column_names}); pass --text-column")
    return [t for t in table.column(column).to_pylist() if t]


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if column not in row:
                raise ConfigError(f"{path}:{n}: no field {column!r}; pass --text-column")
            texts.append(row[column])
    return texts


def _read_file(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, column)
    if suffix == ".arrow":
        return _read_arrow(path, column)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, column)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise ConfigError(f"--calib {path}: not UTF-8 text (and not .parquet, .arrow or .jsonl)") from None


def load_texts(source: str | None, *, text_column: str = "text") -> list[str]:
    """The calibration texts, in a deterministic order."""
    if source is None:
        return [p.read_text(encoding="utf-8") for p in sorted(BUNDLED_TEXT_DIR.glob("*.txt"))]
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"--calib {source}: no such file or directory")
    if path.is_file():
        texts = _read_file(path, text_column)
    elif (path / "dataset_info.json").exists() or (path / "state.json").exists() or any(path.glob("*.arrow")):
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise ConfigError(f"--calib {source}: a datasets folder without .arrow files (use save_to_disk)")
        texts = [t for f in files for t in _read_arrow(f, text_column)]
    elif any(path.glob("*.parquet")):
        texts = [t for f in sorted(path.glob("*.parquet")) for t in _read_parquet(f, text_column)]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"--calib {source}: no text files ({', '.join(_TEXT_SUFFIXES)}), parquet or arrow files")
        texts = [p.read_text(encoding="utf-8") for p in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"--calib {source}: holds no text")
    return texts


def tokenize_corpus(texts: list[str], tokenizer: Any) -> Tensor:
    """All texts joined by a blank line and tokenized once: (n_tokens,) int64."""
    # verbose=False: the corpus is meant to exceed the model's context; windows are cut afterwards.
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=True, verbose=False)["input_ids"][0]
    return ids.to(torch.int64)


def sample_windows(ids: Tensor, *, n_samples: int, seq_len: int, seed: int) -> Tensor:
    """(n_samples, seq_len) int64 windows of `ids` at uniform random starts drawn from `seed`."""
    n_tokens = int(ids.numel())
    if n_tokens < seq_len:
        raise ConfigError(f"calibration text has {n_tokens} tokens, fewer than seq_len={seq_len}; "
                          "give more text (--calib) or a shorter --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


TOKEN_COLUMN = "input_ids"


def _token_rows(source: str | None) -> list[list[int]] | None:
    """Pre-tokenized samples: the `input_ids` column of a parquet file (or of a folder's parquet files,
    sorted), one sample per row. None when the source is not pre-tokenized."""
    if source is None:
        return None
    path = Path(source)
    files = [path] if path.suffix == ".parquet" else sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        return None
    import pyarrow.parquet as pq

    if TOKEN_COLUMN not in pq.read_schema(files[0]).names:
        return None
    # ParquetFile reads the one file directly; read_table goes through pyarrow.dataset, whose import and
    # scan took 0.6 s of the job's start-up on the H100 machine (py-spy), against a few ms here.
    return [row for f in files for row in pq.ParquetFile(f).read(columns=[TOKEN_COLUMN]).column(0).to_pylist()]


def calibration_tokens(source: str | None, load_tokenizer: Callable[[], Any], *, n_samples: int, seq_len: int,
                       seed: int, text_column: str = "text") -> Tensor:
    """(n_samples, seq_len) int64. Text: windows at random starts (seed) of the corpus, tokenized by
    load_tokenizer() (called only for text: loading a tokenizer imports its whole library, a second of
    start-up). Pre-tokenized parquet (an `input_ids` column): its first n_samples rows, each cut to
    seq_len, as given, so that another tool fed the same rows calibrates on the same tokens."""
    rows = _token_rows(source)
    if rows is None:
        texts = load_texts(source, text_column=text_column)
        return sample_windows(tokenize_corpus(texts, load_tokenizer()), n_samples=n_samples, seq_len=seq_len, seed=seed)
    if len(rows) < n_samples:
        raise ConfigError(f"--calib {source}: {len(rows)} pre-tokenized rows, fewer than samples={n_samples}")
    short = [i for i, r in enumerate(rows[:n_samples]) if r is None or len(r) < seq_len]
    if short:
        raise ConfigError(f"--calib {source}: row {short[0]} has fewer than seq_len={seq_len} tokens "
                          f"({len(short)} such rows among the first {n_samples})")
    return torch.tensor([r[:seq_len] for r in rows[:n_samples]], dtype=torch.int64)
