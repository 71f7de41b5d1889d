"""Let transformers load gpt-oss with per-expert linears, as wq's artifacts store its experts
(`mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`, each with a bias: docs/gpt_oss.md says why).

transformers 5.25 has no conversion mapping for gpt-oss: it loads only the fused tensors its module holds, and
leaves per-expert names unused, the experts uninitialised, without an error. `per_expert_gpt_oss()` adds, for
as long as it is active, the mapping that builds the fused tensors from the per-expert ones (after
compressed-tensors has dequantized them): gate and up stacked over experts, interleaved (gate the even columns)
and stored (in, out), as `GptOssExperts` holds them. Its source patterns name per-expert tensors only, so a fused
checkpoint (the release, or transformers' own save) loads as before. It is not left registered: transformers
also reverses a registered mapping when it saves, which would then write every gpt-oss model of the process
per expert, a layout vLLM and plain transformers do not read.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["per_expert_gpt_oss"]

# One loader at a time changes transformers' registry (a process-wide table), and puts back what it found.
_LOCK = threading.RLock()


@contextmanager
def per_expert_gpt_oss() -> Iterator[None]:
    """While active, transformers loads gpt-oss from per-expert tensors (beside any gpt-oss mapping it has)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    with _LOCK:
        before = get_checkpoint_conversion_mapping("gpt_oss")
        register_checkpoint_conversion_mapping("gpt_oss", list(before or []) + _converters(), overwrite=True)
        try:
            yield
        finally:
            # transformers has no way to unregister: an empty list is what its lookup treats as no conversion.
            register_checkpoint_conversion_mapping("gpt_oss", list(before or []), overwrite=True)


def _converters() -> list[Any]:
    from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose, WeightConverter

    experts = "mlp.experts"
    return [
        # (experts, inter, hidden) twice -> (experts, 2 inter, hidden) halves -> interleaved -> (in, out)
        WeightConverter([f"{experts}.*.gate_proj.weight", f"{experts}.*.up_proj.weight"], f"{experts}.gate_up_proj",
                        [MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True),
                         Transpose(1, 2)]),
        WeightConverter([f"{experts}.*.gate_proj.bias", f"{experts}.*.up_proj.bias"], f"{experts}.gate_up_proj_bias",
                        [MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True)]),
        WeightConverter(f"{experts}.*.down_proj.weight", f"{experts}.down_proj", [MergeModulelist(dim=0),
                                                                                  Transpose(1, 2)]),
        WeightConverter(f"{experts}.*.down_proj.bias", f"{experts}.down_proj_bias", [MergeModulelist(dim=0)]),
    ]
