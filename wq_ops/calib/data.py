"""Calibration tokens: read texts, tokenize them as one stream, and cut `n_samples` random windows of
`seq_len` tokens (GPTQ's sampling: uniform start positions, seeded, windows may overlap).

Sources: a text file; a directory of text files (*.txt, *.md, *.raw, sorted); parquet files (a text
column); JSON-lines files (a text field); a `datasets` directory written by `save_to_disk` (its Arrow
files); or, with no source, the public-domain text bundled in `wq_ops/bundled/text`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from wq_ops.calib.hub_dataset import download_hub_dataset, parse_hub_dataset
from wq_ops.config import BUNDLED_CALIB
from wq_ops.errors import ConfigError

__all__ = ["is_bundled", "load_texts", "tokenize_corpus", "sample_windows", "calibration_tokens",
           "describe_calibration", "CalibrationSummary",
           "BUNDLED_TEXT_DIR"]

log = logging.getLogger(__name__)

BUNDLED_TEXT_DIR = Path(__file__).resolve().parents[1] / "bundled" / "text"
_TEXT_SUFFIXES = (".txt", ".md", ".raw", ".text")


# Formats one chat (a list of {"role", "content"} messages) as text: the model's chat template.
ChatFormat = Callable[[list[dict[str, Any]]], str]
CHAT_COLUMN = "messages"


def _chats(path: Path, column: str, values: list[Any], chat: ChatFormat) -> list[str]:
    """A column of chats, each formatted by `chat`; a value that is not a list of {role, content} is an error
    naming the file and row."""
    texts = []
    for n, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in value):
            raise ConfigError(f"--calib {path}: row {n} of column {column!r} is not a chat (a list of "
                              f"{{role, content}} messages): {str(value)[:60]}")
        texts.append(chat(value))
    return texts


def _strings(path: Path, column: str, values: list[Any], chat: ChatFormat | None = None) -> list[str]:
    """A column's values, each a string (or empty), or with `chat` each a chat formatted as text; anything
    else is an error naming the file."""
    if chat is not None:
        return _chats(path, column, values, chat)
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ConfigError(f"--calib {path}: column {column!r} holds {type(bad).__name__} values ({str(bad)[:40]}), "
                          "not text; pass --text-column, or pre-tokenized rows in an input_ids column")
    return [v for v in values if v]


def _read_parquet(path: Path, column: str, chat: ChatFormat | None = None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"--calib {path}: not a readable parquet file ({e})") from None
    if column not in table.column_names:
        raise ConfigError(f"{path}: no column {column!r} (columns: {table.column_names}); pass --text-column")
    return _strings(path, column, table.column(column).to_pylist(), chat)


def _read_arrow(path: Path, column: str, chat: ChatFormat | None = None) -> list[str]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()     # what `datasets` writes
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"--calib {path}: not a readable Arrow file ({e})") from None
    if column not in table.column_names:
        raise ConfigError(f"{path}: no column {column!r} (columns: {table.column_names}); pass --text-column")
    return _strings(path, column, table.column(column).to_pylist(), chat)


def _read_jsonl(path: Path, column: str, chat: ChatFormat | None = None) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--calib {path}: not UTF-8 JSON lines") from None
    texts = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ConfigError(f"--calib {path}:{n}: not a JSON line ({e})") from None
            if not isinstance(row, dict) or column not in row:
                raise ConfigError(f"--calib {path}:{n}: no field {column!r}; pass --text-column")
            if chat is not None:
                texts += _chats(Path(f"{path}:{n}"), column, [row[column]], chat)
                continue
            if not isinstance(row[column], str):
                raise ConfigError(f"--calib {path}:{n}: field {column!r} is a {type(row[column]).__name__}, not text")
            texts.append(row[column])
    return texts


def _read_file(path: Path, column: str, chat: ChatFormat | None = None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, column, chat)
    if suffix == ".arrow":
        return _read_arrow(path, column, chat)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, column, chat)
    if chat is not None:
        raise ConfigError(f"--calib {path}: chats (--chat-template) come from a '{CHAT_COLUMN}' column of parquet, "
                          "Arrow or JSON lines, not plain text")
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise ConfigError(f"--calib {path}: not UTF-8 text (and not .parquet, .arrow or .jsonl)") from None


def is_bundled(source: str | None) -> bool:
    """The text bundled with wq: the bundled tiny model's default (None), or asked for by name."""
    return source is None or source == BUNDLED_CALIB


def load_texts(source: str | None, *, text_column: str = "text", chat: ChatFormat | None = None) -> list[str]:
    """The calibration texts, in a deterministic order. chat: the rows are chats, in the CHAT_COLUMN column,
    each formatted as text by this function (the model's chat template)."""
    if chat is not None:
        text_column = CHAT_COLUMN
    if source is None or is_bundled(source):      # None narrows the type for mypy
        return [p.read_text(encoding="utf-8") for p in sorted(BUNDLED_TEXT_DIR.glob("*.txt"))]
    dataset = parse_hub_dataset(source)
    path = Path(source).expanduser()
    if dataset is not None:
        texts = [t for f in download_hub_dataset(dataset) for t in _read_file(f, text_column, chat)]
    elif not path.exists():
        raise ConfigError(f"--calib {source}: no such file or directory")
    elif path.is_file():
        texts = _read_file(path, text_column, chat)
    elif (path / "dataset_info.json").exists() or (path / "state.json").exists() or any(path.glob("*.arrow")):
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise ConfigError(f"--calib {source}: a datasets folder without .arrow files (use save_to_disk)")
        texts = [t for f in files for t in _read_arrow(f, text_column, chat)]
    elif any(path.glob("*.parquet")):
        texts = [t for f in sorted(path.glob("*.parquet")) for t in _read_parquet(f, text_column, chat)]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"--calib {source}: no text files ({', '.join(_TEXT_SUFFIXES)}), parquet or arrow files")
        texts = []
        for f in files:
            texts += _read_file(f, text_column, chat)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"--calib {source}: holds no text")
    _check_not_binary(source, texts)
    return texts


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]+")  # control characters but tab and line breaks
_CONTROL_SHARE = 0.05       # real text has next to none; a binary file or a block of NUL bytes is mostly that


def _check_not_binary(source: str, texts: list[str]) -> None:
    n = sum(len(t) for t in texts)
    control = sum(len(run) for t in texts for run in _CONTROL.findall(t))
    if control > _CONTROL_SHARE * n:
        raise ConfigError(f"--calib {source}: {control} of its {n} characters are control characters (NUL and "
                          "the like): not text. Give natural text, or pre-tokenized rows in parquet")


def tokenize_corpus(texts: list[str], tokenizer: Any) -> Tensor:
    """All texts joined by a blank line and tokenized once: (n_tokens,) int64."""
    # verbose=False: the corpus is meant to exceed the model's context; windows are cut afterwards.
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=True, verbose=False)["input_ids"][0]
    return ids.to(torch.int64)


MIN_DISTINCT = 0.5          # of the windows' token positions, at least this share distinct text


def sample_windows(ids: Tensor, *, n_samples: int, seq_len: int, seed: int, allow_repeats: bool = True,
                   repeats_expected: bool = False) -> Tensor:
    """(n_samples, seq_len) int64 windows of `ids` at uniform random starts drawn from `seed`. Windows may
    overlap (GPTQ's sampling); unless `allow_repeats`, a text so short that fewer than MIN_DISTINCT of the
    windows' positions are distinct text is refused (the statistics would weigh a few sentences many times);
    allowed, it is logged as a warning, unless `repeats_expected` (the bundled demo's small text)."""
    n_tokens = int(ids.numel())
    if n_tokens < seq_len:
        raise ConfigError(f"calibration text has {n_tokens} tokens, fewer than seq_len={seq_len}; "
                          "give more text (--calib) or a shorter --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=gen)
    distinct = distinct_positions(starts.tolist(), seq_len)
    share = distinct / (n_samples * seq_len)
    if share < MIN_DISTINCT and not repeats_expected:
        message = (f"calibration text has {n_tokens} tokens for {n_samples} windows of {seq_len}: only {distinct} "
                   f"of their {n_samples * seq_len} token positions ({share:.0%}) are distinct text")
        if not allow_repeats:
            raise ConfigError(f"{message}; give more text (--calib), fewer --samples or a shorter --seq-len, or "
                              "accept it with --calib-allow-repeats")
        log.warning("%s (--calib-allow-repeats)", message)
    log.info("calibration: %d windows of %d tokens at random starts in %d tokens of text; %d of their %d token "
             "positions (%.0f%%) distinct", n_samples, seq_len, n_tokens, distinct, n_samples * seq_len, 100 * share)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def distinct_positions(starts: list[int], seq_len: int) -> int:
    """How many token positions the windows [s, s + seq_len) cover together."""
    covered, end = 0, -1
    for s in sorted(starts):
        covered += min(seq_len, s + seq_len - max(s, end)) if s + seq_len > end else 0
        end = max(end, s + seq_len)
    return covered


TOKEN_COLUMN = "input_ids"


def _token_rows(source: str | None) -> list[list[int]] | None:
    """Pre-tokenized samples: the `input_ids` column of a parquet file (or of a folder's parquet files,
    sorted), one sample per row. None when the source is not pre-tokenized."""
    if source is None or is_bundled(source):      # None narrows the type for mypy
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
                       seed: int, text_column: str = "text", allow_repeats: bool = False,
                       repeats_expected: bool = False, chat_template: bool = False) -> Tensor:
    """(n_samples, seq_len) int64. Text: windows at random starts (seed) of the corpus, tokenized by
    load_tokenizer() (called only for text: loading a tokenizer imports its whole library, a second of
    start-up). Pre-tokenized parquet (an `input_ids` column): its first n_samples rows, each cut to
    seq_len, as given, so that another tool fed the same rows calibrates on the same tokens."""
    rows = _token_rows(source)
    if rows is None:
        tokenizer = load_tokenizer() if chat_template else None
        chat = _chat_format(tokenizer) if tokenizer is not None else None
        texts = load_texts(source, text_column=text_column, chat=chat)
        ids = tokenize_corpus(texts, tokenizer if tokenizer is not None else load_tokenizer())
        return sample_windows(ids, n_samples=n_samples, seq_len=seq_len, seed=seed, allow_repeats=allow_repeats,
                              repeats_expected=repeats_expected)
    if chat_template:
        raise ConfigError(f"--calib {source}: pre-tokenized rows (input_ids) take no --chat-template")
    if len(rows) < n_samples:
        raise ConfigError(f"--calib {source}: {len(rows)} pre-tokenized rows, fewer than samples={n_samples}")
    short = [i for i, r in enumerate(rows[:n_samples]) if r is None or len(r) < seq_len]
    if short:
        raise ConfigError(f"--calib {source}: row {short[0]} has fewer than seq_len={seq_len} tokens "
                          f"({len(short)} such rows among the first {n_samples})")
    return torch.tensor([r[:seq_len] for r in rows[:n_samples]], dtype=torch.int64)


def _chat_format(tokenizer: Any) -> ChatFormat:
    """The model's chat template as a function of one chat (a ConfigError where the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat-template: the model's tokenizer has no chat template (tokenizer_config.json's "
                          "chat_template, or chat_template.jinja); calibrate on plain text instead")

    def format_chat(messages: list[dict[str, Any]]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text if isinstance(text, str) else str(text)

    return format_chat


@dataclass(frozen=True)
class CalibrationSummary:
    """What the plan and the report say of the calibration set."""

    source: str
    samples: int
    seq_len: int
    distinct_windows: int

    def describe(self) -> str:
        return f"calibration: {self.source}: {self.samples} windows of {self.seq_len} tokens, " \
               f"{self.distinct_windows} distinct"


def describe_calibration(source: str | None, ids: Tensor) -> CalibrationSummary:
    """ids: (n_samples, seq_len) int64, the calibration windows."""
    name = "the text bundled with wq" if is_bundled(source) else str(source)
    return CalibrationSummary(source=name, samples=int(ids.shape[0]),
                              seq_len=int(ids.shape[1]), distinct_windows=int(torch.unique(ids, dim=0).shape[0]))
