"""AutoAWQ's GEMM checkpoint layout (`quant_method: awq`, `version: gemm`), which vLLM (`awq`, `awq_marlin`),
TGI, LMDeploy and TensorRT-LLM's converters read. 4-bit only, in groups.

Per quantized linear `L`, with in = in_features, out = out_features, G = in / group_size:
- `L.qweight` int32 (in, out / 8): the codes transposed (one row per input column), eight output columns to a
  word in AutoAWQ's interleaved order: bits [4i, 4i + 4) hold column 8k + AWQ_ORDER[i] of word k;
- `L.qzeros`  int32 (G, out / 8): the zero points, packed the same way (unsigned, no offset);
- `L.scales`  float16 (G, out).
Dequantization: W[o, j] = scales[j // group_size, o] * (code[j, o] - zero[j // group_size, o]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wq_ops.config import Backend, QuantConfig
from wq_ops.errors import ArtifactError
from wq_ops.formats.checks import Checks
from wq_ops.quant.result import QuantResult

__all__ = ["encode_linear", "decode_linear", "quantization_config", "side_files", "tensor_names", "SCALE_DTYPE",
           "AWQ_ORDER"]

# AutoAWQ's GEMM kernel reads its eight nibbles in this column order (a word's 4-bit fields 0..7).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Its readers (AutoAWQ, vLLM) hold scales in float16: the grid is chosen on float16 scales.
SCALE_DTYPE = torch.float16
_BITS = 4


def tensor_names(module: str, *, sym: bool) -> tuple[str, ...]:
    return (f"{module}.qweight", f"{module}.qzeros", f"{module}.scales")


def _pack(codes: Tensor) -> Tensor:
    """(rows, cols) codes in 0..15, cols a multiple of 8 -> (rows, cols / 8) int32 in AWQ_ORDER."""
    rows, cols = codes.shape
    grouped = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, _BITS, dtype=torch.int64, device=codes.device)
    words = (grouped << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack(words: Tensor) -> Tensor:
    """Inverse of `_pack`: (rows, cols / 8) int32 -> (rows, cols) uint8."""
    shifts = torch.arange(0, 32, _BITS, dtype=torch.int64, device=words.device)
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF                  # (rows, words, 8) in AWQ order
    natural = torch.empty_like(fields)
    natural[:, :, list(AWQ_ORDER)] = fields
    return natural.reshape(words.shape[0], -1).to(torch.uint8)


def encode_linear(module: str, result: QuantResult, *, sym: bool, scale_dtype: torch.dtype,
                  backend: Backend = Backend.REFERENCE, checks: Checks | None = None) -> dict[str, Tensor]:
    """The artifact tensors of one quantized linear (module: its full name). result.scale must be exact in
    float16. backend, checks: unused (packed on the reference path; conditions checked at once)."""
    out_features, in_features = result.shape
    if result.bits != _BITS or result.group_size is None:
        raise ArtifactError(f"{module}: AutoAWQ's GEMM layout holds 4-bit codes in groups, not {result.bits}-bit "
                            f"{'per channel' if result.group_size is None else 'codes'}")
    if out_features % 8:
        raise ArtifactError(f"{module}: out_features={out_features} is not a multiple of 8 (AWQ packs eight output "
                            "columns a word); use --format compressed-tensors")
    if scale_dtype != SCALE_DTYPE or not torch.equal(result.scale.to(SCALE_DTYPE).to(result.scale.dtype),
                                                     result.scale):
        raise ArtifactError(f"{module}: AWQ stores float16 scales; the grid must be rounded to float16 first")
    if sym and not bool((result.zero == 2 ** (_BITS - 1)).all()):
        raise ArtifactError(f"{module}: a symmetric scheme needs every zero point at {2 ** (_BITS - 1)}")
    return {
        f"{module}.qweight": _pack(result.codes.T.contiguous()),                # (in, out / 8)
        f"{module}.qzeros": _pack(result.zero.T.contiguous()),                  # (G, out / 8)
        f"{module}.scales": result.scale.to(SCALE_DTYPE).T.contiguous(),        # (G, out)
    }


def decode_linear(module: str, tensors: dict[str, Tensor], *, bits: int, group_size: int | None) -> QuantResult:
    """Inverse of `encode_linear` (replaying a staged block; format checks)."""
    codes = _unpack(tensors[f"{module}.qweight"]).T.contiguous()                  # (out, in)
    zero = _unpack(tensors[f"{module}.qzeros"]).T.contiguous()                    # (out, G)
    scale = tensors[f"{module}.scales"].to(torch.float32).T.contiguous()          # (out, G)
    return QuantResult(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size)


def quantization_config(quant: QuantConfig, *, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`, as AutoAWQ writes it (transformers' AwqConfig and vLLM's AWQConfig
    read these fields). ignore: full names of every Linear left unquantized (their `modules_to_not_convert`)."""
    return {"quant_method": "awq", "version": "gemm", "bits": quant.bits, "group_size": quant.group_size,
            "zero_point": True, "modules_to_not_convert": sorted(ignore)}


def side_files(quant: QuantConfig, *, ignore: list[str]) -> dict[str, dict[str, Any]]:
    """None: AutoAWQ's readers take everything from config.json's quantization_config."""
    return {}
