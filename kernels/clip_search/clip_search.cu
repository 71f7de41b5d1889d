// RTN's clipping search (wq_ops/kernels/clip_search/reference.py): for each group of a weight matrix, the
// clip factor among steps + 1 candidates (1, 1 - max_shrink / steps, ..., 1 - max_shrink) whose grid gives
// the least sum over the group of importance_j * (dequantized - w)^2. One thread block per (row, group):
// the group's min and max by a block reduction (exact in any order), then per candidate the grid of
// wq_grid.cuh (the reference's operations), each thread summing its columns' errors, and a block sum.
// The group's columns stay in L1 between candidates; the reference instead makes several full passes over
// the matrix per candidate (the 8B RTN job spent 10.9 s there against 1.0 s for min-max).
// The sums' order differs from torch's, so a candidate within float32 rounding of the best may win
// instead of it; min-max (candidate 0) is kept on ties, as in the reference.
#include <cstdint>
#include <cuda_runtime.h>

#include "../include/wq_grid.cuh"

namespace {

// Warp shuffles, then one value per warp through shared memory: blockDim.x is a multiple of 32, <= 1024.
template <typename Op>
__device__ float block_reduce(float v, float* shared, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();                       // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int i = 1; i < warps; ++i) v = op(v, shared[i]);
  return v;                              // every thread holds the block's result
}

struct Min { __device__ float operator()(float a, float b) const { return fminf(a, b); } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
// IEEE addition without contraction into a multiply-add (the reference rounds the product first).
struct Add { __device__ float operator()(float a, float b) const { return __fadd_rn(a, b); } };

// w: (rows, cols) float32; importance: (cols,) float32 or null (every column 1); best: (rows, n_groups).
__global__ void clip_search_kernel(const float* __restrict__ w, const float* __restrict__ importance, int cols,
                                   int group_size, int n_groups, int bits, int sym, int scale_dtype, int steps,
                                   double max_shrink, float* __restrict__ best) {
  __shared__ float shared[32];
  const long long row = blockIdx.x / n_groups;
  const int group = (int)(blockIdx.x % n_groups);
  const float* wg = w + row * cols + (long long)group * group_size;
  const float* ig = importance == nullptr ? nullptr : importance + (long long)group * group_size;
  float lo = INFINITY, hi = -INFINITY;
  for (int j = threadIdx.x; j < group_size; j += blockDim.x) {
    lo = fminf(lo, wg[j]);
    hi = fmaxf(hi, wg[j]);
  }
  lo = block_reduce(lo, shared, Min());
  hi = block_reduce(hi, shared, Max());
  const int maxq = (1 << bits) - 1;
  float best_error = INFINITY, best_factor = 1.0f;
  for (int k = 0; k <= steps; ++k) {
    // The reference's factor: 1.0 - max_shrink * k / steps in double (Python), then rounded to float32.
    const float factor = (float)(1.0 - max_shrink * k / steps);
    float s, z;
    wq::grid_from_range(lo, hi, factor, maxq, sym != 0, scale_dtype, &s, &z);
    float part = 0.0f;
    for (int j = threadIdx.x; j < group_size; j += blockDim.x) {
      const float x = wg[j];
      const float d = __fsub_rn(wq::dequantize_code(wq::quantize_code(x, s, z, maxq), s, z), x);
      const float e = __fmul_rn(d, d);
      part = __fadd_rn(part, ig == nullptr ? e : __fmul_rn(e, ig[j]));
    }
    const float error = block_reduce(part, shared, Add());
    if (error < best_error) {            // strictly less: the earlier (wider) candidate wins ties
      best_error = error;
      best_factor = factor;
    }
  }
  if (threadIdx.x == 0) best[row * n_groups + group] = best_factor;
}

}  // namespace

extern "C" cudaError_t wq_clip_search(const float* w, const float* importance, int rows, int cols, int group_size,
                                      int bits, int sym, int scale_dtype, int steps, double max_shrink, float* best,
                                      cudaStream_t stream) {
  const int n_groups = cols / group_size;
  const long long blocks = (long long)rows * n_groups;
  if (blocks == 0) return cudaSuccess;
  // One warp for groups of up to 256 columns (8 a thread, the reduction all shuffles); 256 threads for a
  // whole row (per-channel grids: thousands of columns).
  const int threads = group_size <= 256 ? 32 : 256;
  clip_search_kernel<<<(unsigned int)blocks, threads, 0, stream>>>(w, importance, cols, group_size, n_groups, bits,
                                                                   sym, scale_dtype, steps, max_shrink, best);
  return cudaGetLastError();
}
