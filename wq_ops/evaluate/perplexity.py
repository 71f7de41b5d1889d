"""Perplexity over non-overlapping windows, the way GPTQ and AWQ papers report WikiText-2.

Join: "wikitext" joins the file's lines (each with its newline) with a blank line, the HF-rows
convention (`"\\n\\n".join(rows)`) applied to a file that holds one row per line; "raw" takes the file
as is. Windows: the token stream cut into floor(n / seq_len) windows of seq_len tokens (the tail is
dropped); PPL = exp(mean over windows of the mean next-token NLL over the seq_len - 1 predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wq_ops.errors import ConfigError

__all__ = ["Join", "PerplexityResult", "join_text", "perplexity"]


class Join(str, Enum):
    WIKITEXT = "wikitext"
    RAW = "raw"


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_windows: int
    n_tokens: int           # tokens scored, windows x seq_len
    seq_len: int
    mean_nll: float


def join_text(text: str, join: Join) -> str:
    return "\n\n".join(text.splitlines(keepends=True)) if join is Join.WIKITEXT else text


@torch.no_grad()
def perplexity(model: Any, ids: Tensor, *, seq_len: int, max_windows: int | None = None,
               device: torch.device | str = "cpu") -> PerplexityResult:
    """model: a causal LM returning `.logits`; ids: (n_tokens,) int64. max_windows: score only the
    first windows (None: all). seq_len must leave a prediction in each window and fit the model's positions."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len={seq_len!r}: a window needs at least 2 tokens (one prediction)")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and seq_len > positions:
        raise ConfigError(f"seq_len={seq_len}: longer than the model's max_position_embeddings={positions}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows={max_windows}: expected at least 1 (or none: every window)")
    n_windows = int(ids.numel()) // seq_len
    if n_windows == 0:
        raise ConfigError(f"the text has {int(ids.numel())} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    nlls = []
    for w in range(n_windows):
        window = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0).to(device)       # (1, T)
        logits = model(window).logits[0, :-1].float()                              # (T - 1, vocab)
        nlls.append(float(F.cross_entropy(logits, window[0, 1:])))
    mean_nll = sum(nlls) / len(nlls)
    return PerplexityResult(ppl=math.exp(mean_nll), n_windows=n_windows, n_tokens=n_windows * seq_len,
                            seq_len=seq_len, mean_nll=mean_nll)
