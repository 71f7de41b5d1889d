// The quantization grid, shared by every kernel family. Each function mirrors one line of
// wq_ops/quant/rtn.py in the same float32 operation order, so kernels and the PyTorch reference
// produce bit-identical codes: IEEE division (no --use_fast_math), rintf (round half to even, like
// torch.round), and no fused multiply-adds where the reference rounds twice.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace wq {

// Storage dtypes a scale can be rounded to (what the artifact stores).
enum ScaleDtype : int { kScaleF32 = 0, kScaleBF16 = 1, kScaleF16 = 2 };

// Round to the nearest storable value, never below the dtype's smallest normal (rtn._round_scale).
__device__ __forceinline__ float round_scale(float s, int dtype) {
  if (dtype == kScaleBF16) {
    s = fmaxf(s, 1.17549435e-38f);                    // bf16 shares float32's exponent range
    return __bfloat162float(__float2bfloat16_rn(s));
  }
  if (dtype == kScaleF16) {
    s = fmaxf(s, 6.103515625e-05f);                   // smallest normal half
    return __half2float(__float2half_rn(s));
  }
  return fmaxf(s, 1.17549435e-38f);
}

// Grid of one group from its min and max (rtn.compute_grid). clip in (0, 1]: AWQ's range shrink.
__device__ __forceinline__ void grid_from_range(float wmin, float wmax, float clip, int maxq, bool sym,
                                                int scale_dtype, float* scale, float* zero) {
  wmin = fminf(wmin, 0.0f);
  wmax = fmaxf(wmax, 0.0f);
  if (clip < 1.0f) {
    float limit = __fmul_rn(fmaxf(-wmin, wmax), clip);
    wmin = fmaxf(wmin, -limit);
    wmax = fminf(wmax, limit);
  }
  if (sym) {
    float amax = fmaxf(-wmin, wmax);
    float s = amax > 0.0f ? __fdiv_rn(__fmul_rn(2.0f, amax), (float)maxq) : 1.0f;
    *scale = round_scale(s, scale_dtype);
    *zero = (float)((maxq + 1) / 2);
  } else {
    float span = __fsub_rn(wmax, wmin);
    float s = span > 0.0f ? __fdiv_rn(span, (float)maxq) : 1.0f;
    s = round_scale(s, scale_dtype);
    *scale = s;
    *zero = fminf(fmaxf(rintf(__fdiv_rn(-wmin, s)), 0.0f), (float)maxq);
  }
}

// Code of one weight (rtn.quantize_codes): clamp(round(w / s) + z, 0, maxq).
__device__ __forceinline__ float quantize_code(float w, float s, float z, int maxq) {
  return fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, s)), z), 0.0f), (float)maxq);
}

// Dequantized value of a code (result.dequantize): (q - z) * s.
__device__ __forceinline__ float dequantize_code(float q, float s, float z) {
  return __fmul_rn(__fsub_rn(q, z), s);
}

}  // namespace wq
