// AWQ searches without a weight copy per candidate.
//
// awq_fake_quant: for one candidate scale vector s, out = Q(W diag(s)) diag(s)^-1 in one pass: one
// warp per (row, group) finds the group's range of w * s (warp-shuffle min/max), derives the grid as
// rtn.compute_grid does, and writes each dequantized value divided by s. The caller keeps one output
// buffer for all candidates (awq.search_scales: what the scaled model applies to the unscaled input).
//
// awq_clip_error: for every row, group and clip ratio, the group's output-error share
// d^T H_gg d with d = Q_clip(w) - w (awq.search_clip), without materialising any clipped weights:
// one warp per (row, group) keeps the group's weights in registers, and for each ratio computes d,
// then (H_gg d) for its own columns by broadcasting d across the warp, then the dot product.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../include/wq_grid.cuh"

namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float load_as_float(const void* p, size_t i, int is_bf16) {
  return is_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Groups of any width: the warp strides over the group twice (range, then values).
__global__ void fake_quant_kernel(const void* __restrict__ w, int w_bf16, const float* __restrict__ s, int rows,
                                  int cols, int group_size, int bits, int sym, int scale_dtype,
                                  void* __restrict__ out, int out_bf16) {
  const int lane = threadIdx.x & 31;
  const int n_groups = cols / group_size;
  const long long task = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (task >= (long long)rows * n_groups) return;
  const int r = (int)(task / n_groups), g = (int)(task % n_groups);
  const size_t base = (size_t)r * cols + (size_t)g * group_size;
  const int c0 = g * group_size;
  float lo = 0.0f, hi = 0.0f;                   // the grid always spans 0 (rtn.compute_grid)
  for (int k = lane; k < group_size; k += 32) {
    const float x = __fmul_rn(load_as_float(w, base + k, w_bf16), s[c0 + k]);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const int maxq = (1 << bits) - 1;
  float scale, zero;
  wq::grid_from_range(lo, hi, 1.0f, maxq, sym != 0, scale_dtype, &scale, &zero);
  for (int k = lane; k < group_size; k += 32) {
    const float x = __fmul_rn(load_as_float(w, base + k, w_bf16), s[c0 + k]);
    const float dq = wq::dequantize_code(wq::quantize_code(x, scale, zero, maxq), scale, zero);
    const float y = __fdiv_rn(dq, s[c0 + k]);
    if (out_bf16) static_cast<__nv_bfloat16*>(out)[base + k] = __float2bfloat16_rn(y);
    else static_cast<float*>(out)[base + k] = y;
  }
}

// kPer = group_size / 32 values per lane (group sizes 32, 64, 128, 256).
template <int kPer>
__global__ void clip_error_kernel(const float* __restrict__ w, const float* __restrict__ h, int rows, int cols,
                                  int bits, int sym, int scale_dtype, const float* __restrict__ ratios, int n_ratios,
                                  float* __restrict__ out) {
  constexpr int kGroup = kPer * 32;
  const int lane = threadIdx.x & 31;
  const int n_groups = cols / kGroup;
  const long long task = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (task >= (long long)rows * n_groups) return;
  const int r = (int)(task / n_groups), g = (int)(task % n_groups);
  const int c0 = g * kGroup;
  float x[kPer];
  float lo = 0.0f, hi = 0.0f;
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    x[p] = w[(size_t)r * cols + c0 + lane + 32 * p];
    lo = fminf(lo, x[p]);
    hi = fmaxf(hi, x[p]);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const int maxq = (1 << bits) - 1;
  for (int k = 0; k < n_ratios; ++k) {
    float scale, zero;
    wq::grid_from_range(lo, hi, ratios[k], maxq, sym != 0, scale_dtype, &scale, &zero);
    float d[kPer];
#pragma unroll
    for (int p = 0; p < kPer; ++p)
      d[p] = __fsub_rn(wq::dequantize_code(wq::quantize_code(x[p], scale, zero, maxq), scale, zero), x[p]);
    // (H_gg d)_j for this lane's columns j. H is symmetric, so H[j][i] is read as H[i][j]: the 32 lanes
    // then read 32 consecutive floats of row i (one coalesced load), and H_gg stays in L1 across the
    // warps of a block, which work on neighbouring rows of the same group.
    float hd[kPer];
#pragma unroll
    for (int p = 0; p < kPer; ++p) hd[p] = 0.0f;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      for (int src = 0; src < 32; ++src) {
        const float di = __shfl_sync(0xffffffffu, d[q], src);
        const int i = c0 + src + 32 * q;
#pragma unroll
        for (int p = 0; p < kPer; ++p) hd[p] = fmaf(__ldg(&h[(size_t)i * cols + c0 + lane + 32 * p]), di, hd[p]);
      }
    }
    float part = 0.0f;
#pragma unroll
    for (int p = 0; p < kPer; ++p) part = fmaf(d[p], hd[p], part);
    part = warp_sum(part);
    if (lane == 0) out[((size_t)r * n_groups + g) * n_ratios + k] = part;
  }
}

unsigned int warps_grid(long long tasks) { return (unsigned int)((tasks + kWarps - 1) / kWarps); }

}  // namespace

extern "C" cudaError_t wq_awq_fake_quant(const void* w, int w_bf16, const float* s, int rows, int cols, int group_size,
                                         int bits, int sym, int scale_dtype, void* out, int out_bf16,
                                         cudaStream_t stream) {
  const long long tasks = (long long)rows * (cols / group_size);
  if (tasks == 0) return cudaSuccess;
  fake_quant_kernel<<<warps_grid(tasks), kWarps * 32, 0, stream>>>(w, w_bf16, s, rows, cols, group_size, bits, sym,
                                                                   scale_dtype, out, out_bf16);
  return cudaGetLastError();
}

// Returns cudaErrorInvalidValue for a group size other than 32, 64, 128 or 256.
extern "C" cudaError_t wq_awq_clip_error(const float* w, const float* h, int rows, int cols, int group_size, int bits,
                                         int sym, int scale_dtype, const float* ratios, int n_ratios, float* out,
                                         cudaStream_t stream) {
  const long long tasks = (long long)rows * (cols / group_size);
  if (tasks == 0) return cudaSuccess;
  const unsigned int grid = warps_grid(tasks);
  switch (group_size) {
    case 32: clip_error_kernel<1><<<grid, kWarps * 32, 0, stream>>>(w, h, rows, cols, bits, sym, scale_dtype, ratios, n_ratios, out); break;
    case 64: clip_error_kernel<2><<<grid, kWarps * 32, 0, stream>>>(w, h, rows, cols, bits, sym, scale_dtype, ratios, n_ratios, out); break;
    case 128: clip_error_kernel<4><<<grid, kWarps * 32, 0, stream>>>(w, h, rows, cols, bits, sym, scale_dtype, ratios, n_ratios, out); break;
    case 256: clip_error_kernel<8><<<grid, kWarps * 32, 0, stream>>>(w, h, rows, cols, bits, sym, scale_dtype, ratios, n_ratios, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
