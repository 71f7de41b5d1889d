"""Perplexity over non-overlapping windows, the way GPTQ and AWQ papers report WikiText-2.

Join: "wikitext" joins the file's lines (each with its newline) with a blank line, the HF-rows
convention (`"\\n\\n".join(rows)`) applied to a file that holds one row per line; "raw" takes the file
as is. Windows: the token stream cut into floor(n / seq_len) windows of seq_len tokens (the tail is
dropped); PPL = exp(mean over windows of the mean next-token NLL over the seq_len - 1 predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wq_ops.config.enums import TextJoin
from wq_ops.errors import ConfigError

__all__ = ["Join", "PerplexityResult", "join_text", "eval_windows", "window_nll", "perplexity_of", "perplexity"]

Join = TextJoin          # the option's enum (--join, --eval-join)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_windows: int
    n_tokens: int           # tokens scored, windows x seq_len
    seq_len: int
    mean_nll: float


def join_text(text: str, join: Join) -> str:
    return "\n\n".join(text.splitlines(keepends=True)) if join is Join.WIKITEXT else text


def eval_windows(ids: Tensor, *, seq_len: int, max_windows: int | None = None, max_positions: int | None = None,
                 seq_len_name: str = "seq_len") -> Tensor:
    """The token stream `ids` (n_tokens,) cut into (n_windows, seq_len) windows, the tail dropped; only the
    first max_windows (None: all). max_positions: the model's max_position_embeddings, which seq_len must not
    pass. Every refusal is a ConfigError naming the value (seq_len as the caller's option `seq_len_name`)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"{seq_len_name}={seq_len!r}: a window needs at least 2 tokens (one prediction)")
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ConfigError(f"{seq_len_name}={seq_len}: longer than the model's "
                          f"max_position_embeddings={max_positions}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows={max_windows}: expected at least 1 (or none: every window)")
    n_windows = int(ids.numel()) // seq_len
    if n_windows == 0:
        raise ConfigError(f"the text has {int(ids.numel())} tokens, fewer than one window of "
                          f"{seq_len_name}={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return ids[:n_windows * seq_len].reshape(n_windows, seq_len)


def window_nll(logits: Tensor, window: Tensor) -> float:
    """One window's mean next-token NLL: logits (T, vocab) in the model's dtype, scored in float32 against
    window (T,), over its T - 1 predictions."""
    return float(F.cross_entropy(logits[:-1].float(), window[1:].to(logits.device)))


def perplexity_of(nlls: Sequence[float], *, seq_len: int) -> PerplexityResult:
    """PPL = exp(mean over windows of each window's mean NLL), the windows' NLLs in order."""
    mean_nll = sum(nlls) / len(nlls)
    return PerplexityResult(ppl=math.exp(mean_nll), n_windows=len(nlls), n_tokens=len(nlls) * seq_len,
                            seq_len=seq_len, mean_nll=mean_nll)


@torch.no_grad()
def perplexity(model: Any, ids: Tensor, *, seq_len: int, max_windows: int | None = None,
               device: torch.device | str = "cpu") -> PerplexityResult:
    """model: a causal LM returning `.logits`; ids: (n_tokens,) int64. max_windows: score only the
    first windows (None: all). seq_len must leave a prediction in each window and fit the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    windows = eval_windows(ids, seq_len=seq_len, max_windows=max_windows,
                           max_positions=positions if isinstance(positions, int) else None)
    nlls = [window_nll(model(window.unsqueeze(0).to(device)).logits[0], window) for window in windows]
    return perplexity_of(nlls, seq_len=seq_len)
