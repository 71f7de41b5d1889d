"""Let transformers load gpt-oss with per-expert linears, as wq's artifacts store its experts
(`mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`, each with a bias: docs/gpt_oss.md says why).

transformers 5.25 has no conversion mapping for gpt-oss: it loads only the fused tensors its module holds, and
leaves per-expert names unused, the experts uninitialised, without an error. `register_gpt_oss_experts` adds,
once per process, the mapping that builds the fused tensors from the per-expert ones (after compressed-tensors
has dequantized them): gate and up stacked over experts, interleaved (gate the even columns) and stored
(in, out), as `GptOssExperts` holds them. Source patterns name per-expert tensors only, so a fused checkpoint
(the release, or transformers' own save) loads as before.
"""

from __future__ import annotations

import threading

__all__ = ["register_gpt_oss_experts"]

_LOCK = threading.Lock()
_DONE = False


def register_gpt_oss_experts() -> None:
    """Register the per-expert gpt-oss mapping with transformers (kept beside any mapping it already has)."""
    global _DONE
    with _LOCK:
        if _DONE:
            return
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
        from transformers.core_model_loading import (
            Concatenate,
            Interleave,
            MergeModulelist,
            Transpose,
            WeightConverter,
        )

        experts = "mlp.experts"
        ours = [
            # (experts, inter, hidden) twice -> (experts, 2 inter, hidden) halves -> interleaved -> (in, out)
            WeightConverter([f"{experts}.*.gate_proj.weight", f"{experts}.*.up_proj.weight"],
                            f"{experts}.gate_up_proj",
                            [MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True),
                             Transpose(1, 2)]),
            WeightConverter([f"{experts}.*.gate_proj.bias", f"{experts}.*.up_proj.bias"],
                            f"{experts}.gate_up_proj_bias",
                            [MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True)]),
            WeightConverter(f"{experts}.*.down_proj.weight", f"{experts}.down_proj",
                            [MergeModulelist(dim=0), Transpose(1, 2)]),
            WeightConverter(f"{experts}.*.down_proj.bias", f"{experts}.down_proj_bias", [MergeModulelist(dim=0)]),
        ]
        existing = list(get_checkpoint_conversion_mapping("gpt_oss") or [])
        register_checkpoint_conversion_mapping("gpt_oss", existing + ours, overwrite=True)
        _DONE = True
