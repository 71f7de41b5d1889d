"""A routed MLP's experts stored fused, read under the per-expert names wq's layout and artifact use
(`...mlp.experts.{e}.gate_proj.weight` (intermediate, hidden), `.up_proj`, `.down_proj`, with `.bias` where the
experts have one).

Two fused layouts, told apart by the architecture (their shapes alone are ambiguous where hidden = 2 x
intermediate):
- gpt-oss (`GptOssExperts`): `experts.gate_up_proj` (experts, hidden, 2 x intermediate), stored (in, out), gate
  and up **interleaved** along the last dim (gate the even columns); `gate_up_proj_bias` (experts, 2 x
  intermediate) likewise; `down_proj` (experts, intermediate, hidden); `down_proj_bias`. Its release stores
  the weights in MXFP4 (`X_blocks`/`X_scales`), which `dequantize_mxfp4` returns (out, in).
- transformers 5's fused Qwen3-MoE and DeepSeek-V3 (`save_original_format=False`): `experts.gate_up_proj`
  (experts, 2 x intermediate, hidden), gate the first half, `down_proj` (experts, hidden, intermediate).

Entry points: `FusedExperts.of` (does a checkpoint store these names fused), `read_fused`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from wq_ops.errors import CheckpointError
from wq_ops.io.fp8_source import SCALE_SUFFIX, dequantize_fp8_blocks
from wq_ops.io.mxfp4_source import MXFP4_SUFFIXES, dequantize_mxfp4

__all__ = ["FusedExperts", "read_fused", "FUSED_LAYOUTS"]

_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<which>gate_proj|up_proj|down_proj)"
                         r"\.(?P<leaf>weight|bias)$")
_BLOCKS, _SCALES = MXFP4_SUFFIXES

# architecture -> (gate and up interleaved, weights stored (in, out))
FUSED_LAYOUTS = {"GptOssForCausalLM": (True, True), "Qwen3MoeForCausalLM": (False, False),
                 "DeepseekV3ForCausalLM": (False, False)}


@dataclass(frozen=True)
class FusedSlice:
    """Where one per-expert tensor lives: the fused tensor `stored` (an MXFP4 pair by its stem), the expert,
    which part of its fused rows ("gate", "up" or "all": down's), and whether FP8 block scales
    (`stored_scale_inv`, transformers 5's fused FP8 experts) come with it."""

    stored: str
    expert: int
    part: str
    mxfp4: bool
    fp8_scales: bool = False

    def stored_names(self) -> tuple[str, ...]:
        """The checkpoint's tensors it is read from: the fused tensor (with its FP8 scales), or its MXFP4 pair."""
        if self.mxfp4:
            return self.stored + _BLOCKS, self.stored + _SCALES
        return (self.stored, self.stored + SCALE_SUFFIX) if self.fp8_scales else (self.stored,)


@dataclass(frozen=True)
class FusedExperts:
    """How a checkpoint stores its routed experts fused (`FUSED_LAYOUTS`)."""

    interleaved: bool
    transposed: bool
    mxfp4: bool = False       # the weights stored in MXFP4 (gpt-oss's release)

    @classmethod
    def of(cls, architecture: str, names: Iterable[str], weight_map: Mapping[str, str]) -> "FusedExperts | None":
        """The fused layout, where the checkpoint (its index `weight_map`) stores every one of the per-expert
        `names` that it lacks fused; None where it lacks none. A name found neither way is left for the
        caller's check of missing tensors."""
        lacking = [n for n in names if n not in weight_map and _PER_EXPERT.match(n)]
        if not lacking or architecture not in FUSED_LAYOUTS:
            return None
        fused = cls(*FUSED_LAYOUTS[architecture])
        found = [f for f in (fused.source(n, weight_map) for n in lacking) if f is not None]
        return cls(fused.interleaved, fused.transposed, mxfp4=any(f.mxfp4 for f in found)) if found else None

    def describe(self) -> str:
        """For the report: how the source stores its experts."""
        return ("fused, gate and up interleaved" if self.interleaved else "fused") + (", MXFP4" if self.mxfp4 else "")

    def source(self, name: str, weight_map: Mapping[str, str]) -> FusedSlice | None:
        """Where the checkpoint holds per-expert tensor `name` fused; None if it does not."""
        m = _PER_EXPERT.match(name)
        if m is None or name in weight_map:
            return None
        down = m["which"] == "down_proj"
        stored = m["experts"] + (".down_proj" if down else ".gate_up_proj") + ("_bias" if m["leaf"] == "bias" else "")
        part = "all" if down else m["which"].removesuffix("_proj")
        if stored in weight_map:
            return FusedSlice(stored, int(m["e"]), part, mxfp4=False, fp8_scales=stored + SCALE_SUFFIX in weight_map)
        if m["leaf"] == "weight" and stored + _BLOCKS in weight_map and stored + _SCALES in weight_map:
            return FusedSlice(stored, int(m["e"]), part, mxfp4=True)
        return None

    def split(self, fused: Tensor, part: str, *, is_weight: bool, out_in: bool) -> Tensor:
        """One expert's `part` of its fused tensor (a weight (rows, cols) or a bias (rows,)), as `nn.Linear`
        holds it: (out, in) for a weight. out_in: the weight is already (out, in) (MXFP4, dequantized)."""
        if is_weight and self.transposed and not out_in:
            fused = fused.transpose(0, 1)
        if part == "all":
            return fused.contiguous()
        rows = fused.shape[0] // 2
        if self.interleaved:
            return fused[(0 if part == "gate" else 1)::2].contiguous()
        return (fused[:rows] if part == "gate" else fused[rows:]).contiguous()


def read_fused(fused: FusedExperts, names: list[str], weight_map: Mapping[str, str], *,
               shard_path: Callable[[str], Path], dtype: torch.dtype, device: torch.device | str,
               fp8_block: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """The per-expert tensors `names` (each one `fused.source` finds) from their fused tensors, each fused tensor
    read once and only the experts asked for (its rows lo..hi of the experts' dim: an expert actor reads its
    range, not the block's experts). MXFP4 weights, and FP8 ones with their block scales (`fp8_block`, from
    config.json), come back dequantized to `dtype`; a float8 tensor any other way is refused."""
    from safetensors import SafetensorError, safe_open

    where = {n: fused.source(n, weight_map) for n in names}
    by_stored: dict[tuple[str, bool], list[str]] = {}
    for name, found in where.items():
        if found is None:
            raise CheckpointError(f"tensor {name} is neither in the index nor in a fused experts tensor")
        by_stored.setdefault((found.stored, found.mxfp4), []).append(name)

    def rows(stored: str, lo: int, hi: int) -> Tensor:
        path = shard_path(weight_map[stored])
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_slice(stored)[lo:hi]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read {stored} ({e})") from None

    out: dict[str, Tensor] = {}
    for (stored, mxfp4), group in by_stored.items():
        experts = [where[n].expert for n in group]      # type: ignore[union-attr]
        lo, hi = min(experts), max(experts) + 1
        if mxfp4:
            values = dequantize_mxfp4(rows(stored + _BLOCKS, lo, hi), rows(stored + _SCALES, lo, hi), dtype)
        else:
            values = rows(stored, lo, hi)
        if values.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if fp8_block is None or stored + SCALE_SUFFIX not in weight_map:
                raise CheckpointError(f"{stored}: stored in {values.dtype} without "
                                      + ("config.json's FP8 weight_block_size" if fp8_block is None else
                                         f"its {stored + SCALE_SUFFIX}") + "; wq reads FP8 with block scales only")
            values = dequantize_fp8_blocks(values, rows(stored + SCALE_SUFFIX, lo, hi), fp8_block, dtype)
        if values.shape[0] != hi - lo:
            raise CheckpointError(f"{stored}: {values.shape[0]} experts stored, expert {hi - 1} asked for")
        for name in group:
            found = where[name]
            assert found is not None
            out[name] = fused.split(values[found.expert - lo], found.part, is_weight=name.endswith(".weight"),
                                    out_in=mxfp4).to(device)
    return out
