// GPTQ block solve, in the form without an inverse (wq_ops/quant/gptq.py): for a block of B columns,
// quantize column i of every row at its target t_i on its static grid, then add its delta (w_i - q_i,
// from the original weight) times row i of the block of Mu (M diag(M)^-1, H = M M^T) to the targets of
// the columns after it.
//
// Layout: one warp per weight row; the block's B columns spread over the 32 lanes, lane l owning
// columns l, l + 32, l + 64, ... in registers: the target, the original weight, and the column's scale
// and zero, all loaded once, so the sequential column loop touches no global memory. Step i: the owner
// lane (i % 32) broadcasts them with shuffles, every lane computes the same code and delta, then updates
// its own targets > i. Rows never interact, so there is no synchronisation after the Mu block is in
// shared memory; many warps per CTA share that 64 KB block, for occupancy.
// The arithmetic of codes and deltas mirrors kernels/gptq/reference.py operation for operation (no FMA
// contraction), so they match the reference bit for bit on the same device.
//
// Outputs: codes (into a column block of the layer's codes, row stride ldc); the row losses, written or
// added to; and the deltas either as float32 or as the bf16 operand of the tensor-core lazy update,
// [hi | hi | lo] with hi = bf16(d), lo = bf16(d - hi) (wq_ops/quant/gptq.py, add_split_update_). Writing
// them here saves the layer loop five small kernels per block of columns (the copy of codes, the loss
// sum, the split and its concatenation), which kept the GPU idle between launches.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../include/wq_grid.cuh"
#include "../include/wq_gptq_batch.cuh"

namespace {

constexpr int kWarpsPerBlock = 16;

template <int B>
// At least two CTAs per SM (64 registers a thread): 32 of its 64 warp slots busy even at B = 128.
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 2)
gptq_block_solve_kernel(const float* __restrict__ t, int ldt, const float* __restrict__ w, int ldw,
                        const float* __restrict__ m_unit, int ldm, const float* __restrict__ m_diag,
                        const float* __restrict__ scale, const uint8_t* __restrict__ zero, int ldg,
                        const int* __restrict__ group, int rows, int n_cols, int maxq,
                        uint8_t* __restrict__ codes, int ldc, float* __restrict__ delta,
                        __nv_bfloat16* __restrict__ parts, int ldp, float* __restrict__ loss, bool add_loss,
                        BatchStrides bs) {
  constexpr int kSlots = B / 32;                // columns per lane
  // Problem blockIdx.y of a batch (one layer's block of columns each; the same arithmetic as one at a time).
  const long long b = blockIdx.y;
  t += b * bs.t;
  w += b * bs.w;
  m_unit += b * bs.m_unit;
  m_diag += b * bs.m_diag;
  scale += b * bs.grid;
  zero += b * bs.grid;
  group += b * bs.group;
  codes += b * bs.codes;
  if (delta != nullptr) delta += b * (long long)rows * n_cols;
  if (parts != nullptr) parts += b * bs.parts;
  loss += b * bs.loss;
  extern __shared__ float ms[];                 // the B x B block of Mu (upper triangle used), then M's diagonal
  float* md = ms + B * B;
  for (int k = threadIdx.x; k < n_cols * n_cols; k += blockDim.x) {
    int r = k / n_cols, c = k % n_cols;
    ms[r * B + c] = m_unit[(size_t)r * ldm + c];
  }
  for (int k = threadIdx.x; k < n_cols; k += blockDim.x) md[k] = m_diag[k];
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;

  // Per owned column: target, original weight, scale, zero; then code, delta and target minus dequantized.
  float tv[kSlots], wv[kSlots], sv[kSlots], zv[kSlots], qv[kSlots], dv[kSlots], ev[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + 32 * s;
    tv[s] = wv[s] = 0.0f;
    sv[s] = 1.0f;
    zv[s] = qv[s] = dv[s] = ev[s] = 0.0f;
    if (j < n_cols) {
      tv[s] = t[(size_t)row * ldt + j];
      wv[s] = w[(size_t)row * ldw + j];
      const int g = group[j];
      sv[s] = scale[(size_t)row * ldg + g];
      zv[s] = (float)zero[(size_t)row * ldg + g];
    }
  }

#pragma unroll
  for (int slot = 0; slot < kSlots; ++slot) {
    for (int c = 0; c < 32; ++c) {
      const int i = 32 * slot + c;
      if (i >= n_cols) break;                   // uniform across the warp
      const float ti = __shfl_sync(0xffffffffu, tv[slot], c);
      const float wi = __shfl_sync(0xffffffffu, wv[slot], c);
      const float s = __shfl_sync(0xffffffffu, sv[slot], c);
      const float z = __shfl_sync(0xffffffffu, zv[slot], c);
      const float q = wq::quantize_code(ti, s, z, maxq);
      const float dq = wq::dequantize_code(q, s, z);
      const float d = __fsub_rn(wi, dq);
      if (lane == c) {
        qv[slot] = q;
        dv[slot] = d;
        ev[slot] = __fsub_rn(ti, dq);
      }
#pragma unroll
      for (int s2 = 0; s2 < kSlots; ++s2) {
        const int j = lane + 32 * s2;
        if (s2 >= slot && j > i && j < n_cols) {
          tv[s2] = __fadd_rn(tv[s2], __fmul_rn(d, ms[i * B + j]));   // two roundings, as torch does
        }
      }
    }
  }
  // The proxy loss (t - q)^2 * m^2 / 2 of the owned columns (0 past n_cols), summed over the warp: off the
  // sequential loop, so it is float32-close to the reference's sum rather than bit-equal.
  float row_loss = 0.0f;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int j = lane + 32 * s;
    if (j < n_cols) {
      codes[(size_t)row * ldc + j] = (uint8_t)qv[s];
      if (delta != nullptr) delta[(size_t)row * n_cols + j] = dv[s];
      if (parts != nullptr) {                   // rounded as torch's float32 -> bfloat16 conversion rounds
        const __nv_bfloat16 hi = __float2bfloat16_rn(dv[s]);
        const __nv_bfloat16 lo = __float2bfloat16_rn(__fsub_rn(dv[s], __bfloat162float(hi)));
        __nv_bfloat16* p = parts + (size_t)row * ldp;
        p[j] = hi;
        p[n_cols + j] = hi;
        p[2 * n_cols + j] = lo;
      }
      const float m = md[j];
      row_loss += ev[s] * ev[s] * m * m * 0.5f;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) row_loss += __shfl_xor_sync(0xffffffffu, row_loss, offset);
  if (lane == 0) loss[row] = add_loss ? loss[row] + row_loss : row_loss;
}

template <int B>
cudaError_t launch(const float* t, int ldt, const float* w, int ldw, const float* m_unit, int ldm,
                   const float* m_diag, const float* scale, const uint8_t* zero, int ldg, const int* group,
                   int rows, int n_cols, int maxq, uint8_t* codes, int ldc, float* delta, __nv_bfloat16* parts,
                   int ldp, float* loss, bool add_loss, int batch, const BatchStrides& bs, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (B * B + B);
  // Above 48 KB of dynamic shared memory a kernel must opt in (B = 128 needs 64.5 KB).
  cudaError_t status = cudaFuncSetAttribute(gptq_block_solve_kernel<B>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (status != cudaSuccess) return status;
  const dim3 grid((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, batch);
  gptq_block_solve_kernel<B><<<grid, kWarpsPerBlock * 32, smem, stream>>>(
      t, ldt, w, ldw, m_unit, ldm, m_diag, scale, zero, ldg, group, rows, n_cols, maxq, codes, ldc, delta, parts, ldp,
      loss, add_loss, bs);
  return cudaGetLastError();
}

}  // namespace

// Returns cudaErrorInvalidValue for a block width it was not built for (32, 64 or 128), or a batch outside
// 1..65535. delta and parts may each be null (not written); with add_loss the row losses are added to loss
// instead of stored. `batch` problems of the same sizes, problem b's tensors at b times bs's strides (in
// elements; delta, when written, (batch, rows, n_cols) contiguous).
extern "C" cudaError_t wq_gptq_block_solve(const float* t, int ldt, const float* w, int ldw, const float* m_unit,
                                           int ldm, const float* m_diag, const float* scale, const uint8_t* zero,
                                           int ldg, const int* group, int rows, int n_cols, int block_width,
                                           int maxq, uint8_t* codes, int ldc, float* delta, void* parts, int ldp,
                                           float* loss, bool add_loss, int batch, const BatchStrides* strides,
                                           cudaStream_t stream) {
  if (batch < 1 || batch > 65535) return cudaErrorInvalidValue;
  const BatchStrides bs = strides != nullptr ? *strides : BatchStrides{};
  __nv_bfloat16* p = static_cast<__nv_bfloat16*>(parts);
  switch (block_width) {
    case 32: return launch<32>(t, ldt, w, ldw, m_unit, ldm, m_diag, scale, zero, ldg, group, rows, n_cols, maxq,
                               codes, ldc, delta, p, ldp, loss, add_loss, batch, bs, stream);
    case 64: return launch<64>(t, ldt, w, ldw, m_unit, ldm, m_diag, scale, zero, ldg, group, rows, n_cols, maxq,
                               codes, ldc, delta, p, ldp, loss, add_loss, batch, bs, stream);
    case 128: return launch<128>(t, ldt, w, ldw, m_unit, ldm, m_diag, scale, zero, ldg, group, rows, n_cols, maxq,
                                 codes, ldc, delta, p, ldp, loss, add_loss, batch, bs, stream);
    default: return cudaErrorInvalidValue;
  }
}
