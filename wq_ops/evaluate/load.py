"""Loading a checkpoint or an artifact with transformers for evaluation: the one place wq decides how.

transformers 5.25 kernelizes every model it loads when Hugging Face's `kernels` package is importable
(`use_kernels` defaults to on): on a GPU it swaps layers such as RMSNorm for kernels downloaded from the
Hub at load time. An evaluation must measure the weights, not whichever Hub kernel a machine could reach,
and must run offline, so it loads with `use_kernels=False`: transformers' own PyTorch modules, on any host.
A user's plain `AutoModelForCausalLM.from_pretrained(artifact)` loads our artifacts too (tests/cluster).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_causal_lm", "load_tokenizer"]


def load_causal_lm(model: str | Path, *, device: str = "cpu", dtype: Any = "auto") -> Any:
    """The causal LM at `model` (a directory or a Hub repo id) on `device`, in eval mode, with transformers'
    own modules (no Hub kernels). dtype: "auto" (the checkpoint's) or a torch dtype; float32 on a CPU without
    bfloat16 instructions runs several times faster than bfloat16, and holds bfloat16 weights exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(str(model), use_kernels=False,    # .to is typed oddly
                                                       dtype=dtype)
    return loaded.to(torch.device(device)).eval()


def load_tokenizer(model: str | Path) -> Any:
    """The tokenizer saved beside the model (artifacts carry their source's tokenizer files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))
