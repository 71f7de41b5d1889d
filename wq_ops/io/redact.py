"""Hub tokens never recorded: a value that looks like one (`hf_` and 30-odd letters and digits) is masked
wherever wq writes a command line or an option (the model card, wq_report.json, the Hub commit message)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["redact", "redact_values"]

_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
MASK = "hf_***"


def redact(text: str) -> str:
    return _TOKEN.sub(MASK, text)


def redact_values(value: Any) -> Any:
    """A JSON-like value with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value
