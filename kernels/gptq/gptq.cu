// GPTQ block solve (Frantar et al., 2022, Alg. 1, inner loop): for a block of B columns, quantize
// column i of every row on its static grid, then subtract its scaled error times row i of the block
// of Hinv (the upper Cholesky factor of H^-1) from the columns after it.
//
// Layout: one warp per weight row; the block's B columns spread over the 32 lanes, lane l owning
// columns l, l + 32, l + 64, ... in registers. Step i: the owner lane (i % 32) broadcasts w_i with
// a shuffle, every lane computes the same code and error, then updates its own columns > i. Rows
// never interact, so there is no synchronisation after the Hinv block is in shared memory.
// The arithmetic mirrors kernels/gptq/reference.py operation for operation (no FMA contraction),
// so codes match the reference bit for bit on the same device.
#include <cstdint>
#include <cuda_runtime.h>

#include "../include/wq_grid.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;

template <int B>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
gptq_block_solve_kernel(const float* __restrict__ w, int ldw, const float* __restrict__ hinv, int ldh,
                        const float* __restrict__ scale, const uint8_t* __restrict__ zero, int rows,
                        int n_cols, int maxq, uint8_t* __restrict__ codes, int ldc, float* __restrict__ err,
                        float* __restrict__ loss) {
  constexpr int kSlots = B / 32;                // columns per lane
  extern __shared__ float hs[];                 // the B x B block of Hinv (upper triangle used)
  for (int k = threadIdx.x; k < n_cols * n_cols; k += blockDim.x) {
    int r = k / n_cols, c = k % n_cols;
    hs[r * B + c] = hinv[(size_t)r * ldh + c];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;

  float wv[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    int j = lane + 32 * s;
    wv[s] = j < n_cols ? w[(size_t)row * ldw + j] : 0.0f;
  }
  float row_loss = 0.0f;
  const float* srow = scale + (size_t)row * n_cols;
  const uint8_t* zrow = zero + (size_t)row * n_cols;

#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    for (int t = 0; t < 32; ++t) {
      const int i = 32 * slot + t;
      if (i >= n_cols) break;                   // uniform across the warp
      const float wi = __shfl_sync(0xffffffffu, wv[slot], t);
      const float s = srow[i];                  // same address in every lane: one broadcast load
      const float z = (float)zrow[i];
      const float q = wq::quantize_code(wi, s, z, maxq);
      const float dq = wq::dequantize_code(q, s, z);
      const float d = hs[i * B + i];
      const float diff = __fsub_rn(wi, dq);
      const float e = __fdiv_rn(diff, d);
      if (lane == t) {
        codes[(size_t)row * ldc + i] = (uint8_t)q;
        err[(size_t)row * n_cols + i] = e;
      }
      // (w - q)^2 / d^2 / 2, in the reference's order.
      row_loss = __fadd_rn(row_loss, __fdiv_rn(__fdiv_rn(__fmul_rn(diff, diff), __fmul_rn(d, d)), 2.0f));
#pragma unroll
      for (int s2 = 0; s2 < kSlots; ++s2) {
        const int j = lane + 32 * s2;
        if (s2 >= slot && j > i && j < n_cols) {
          wv[s2] = __fsub_rn(wv[s2], __fmul_rn(e, hs[i * B + j]));   // two roundings, as torch does
        }
      }
    }
  }
  if (lane == 0) loss[row] = __fadd_rn(loss[row], row_loss);
}

template <int B>
cudaError_t launch(const float* w, int ldw, const float* hinv, int ldh, const float* scale, const uint8_t* zero,
                   int rows, int n_cols, int maxq, uint8_t* codes, int ldc, float* err, float* loss,
                   cudaStream_t stream) {
  const size_t smem = sizeof(float) * B * B;
  // Above 48 KB of dynamic shared memory a kernel must opt in (B = 128 needs 64 KB).
  cudaError_t status = cudaFuncSetAttribute(gptq_block_solve_kernel<B>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (status != cudaSuccess) return status;
  const int grid = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gptq_block_solve_kernel<B><<<grid, kWarpsPerBlock * 32, smem, stream>>>(
      w, ldw, hinv, ldh, scale, zero, rows, n_cols, maxq, codes, ldc, err, loss);
  return cudaGetLastError();
}

}  // namespace

// Returns cudaErrorInvalidValue for a block width it was not built for (32, 64 or 128).
extern "C" cudaError_t wq_gptq_block_solve(const float* w, int ldw, const float* hinv, int ldh,
                                           const float* scale, const uint8_t* zero, int rows, int n_cols,
                                           int block_width, int maxq, uint8_t* codes, int ldc, float* err,
                                           float* loss, cudaStream_t stream) {
  switch (block_width) {
    case 32: return launch<32>(w, ldw, hinv, ldh, scale, zero, rows, n_cols, maxq, codes, ldc, err, loss, stream);
    case 64: return launch<64>(w, ldw, hinv, ldh, scale, zero, rows, n_cols, maxq, codes, ldc, err, loss, stream);
    case 128: return launch<128>(w, ldw, hinv, ldh, scale, zero, rows, n_cols, maxq, codes, ldc, err, loss, stream);
    default: return cudaErrorInvalidValue;
  }
}
