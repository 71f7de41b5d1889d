// Quantize-and-pack, pack, and unpack-and-dequantize for the int32 bit-stream layout of wq_ops/pack.py:
// each row is a little-endian stream of `bits`-wide codes, so 32 codes fill exactly `bits` words.
// One thread per 32-code chunk: it reads 32 values, builds its `bits` words in a 64-bit accumulator
// (a code may straddle two 32-bit words at 3 bits), and writes whole words; the last chunk of a row
// writes only the words the row has (ceil(cols * bits / 32)).
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../include/wq_grid.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_as_float(const void* p, size_t i, int is_bf16) {
  return is_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Write the chunk's 32 codes (held in `c`, values < 2^bits) as `bits` words, skipping words past the row.
__device__ __forceinline__ void store_chunk(const uint32_t c[32], int bits, int32_t* out_row, int first_word,
                                            int row_words) {
  uint64_t acc = 0;
  int filled = 0, word = first_word;
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    acc |= (uint64_t)c[k] << filled;
    filled += bits;
    if (filled >= 32) {
      if (word < row_words) out_row[word] = (int32_t)(uint32_t)(acc & 0xffffffffull);
      ++word;
      acc >>= 32;
      filled -= 32;
    }
  }
}

__global__ void pack_kernel(const uint8_t* __restrict__ codes, int rows, int cols, int bits,
                            int32_t* __restrict__ out, int row_words) {
  const int chunks = (cols + 31) / 32;
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)rows * chunks) return;
  const int r = (int)(t / chunks), chunk = (int)(t % chunks);
  uint32_t c[32];
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    const int j = chunk * 32 + k;
    c[k] = j < cols ? codes[(size_t)r * cols + j] : 0u;
  }
  store_chunk(c, bits, out + (size_t)r * row_words, chunk * bits, row_words);
}

// scale: (rows, n_groups) float32; zero: (rows, n_groups) uint8; group_size a multiple of 32, or cols.
__global__ void quantize_pack_kernel(const void* __restrict__ w, int is_bf16, const float* __restrict__ scale,
                                     const uint8_t* __restrict__ zero, int rows, int cols, int group_size,
                                     int n_groups, int bits, int32_t* __restrict__ out, int row_words) {
  const int chunks = (cols + 31) / 32;
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)rows * chunks) return;
  const int r = (int)(t / chunks), chunk = (int)(t % chunks);
  const int maxq = (1 << bits) - 1;
  uint32_t c[32];
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    const int j = chunk * 32 + k;
    if (j < cols) {
      const int g = j / group_size;
      const float s = scale[(size_t)r * n_groups + g];
      const float z = (float)zero[(size_t)r * n_groups + g];
      c[k] = (uint32_t)wq::quantize_code(load_as_float(w, (size_t)r * cols + j, is_bf16), s, z, maxq);
    } else {
      c[k] = 0u;
    }
  }
  store_chunk(c, bits, out + (size_t)r * row_words, chunk * bits, row_words);
}

__global__ void unpack_dequantize_kernel(const int32_t* __restrict__ packed, int row_words,
                                         const float* __restrict__ scale, const uint8_t* __restrict__ zero,
                                         int rows, int cols, int group_size, int n_groups, int bits,
                                         __nv_bfloat16* __restrict__ out) {
  const int chunks = (cols + 31) / 32;
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)rows * chunks) return;
  const int r = (int)(t / chunks), chunk = (int)(t % chunks);
  const int32_t* row = packed + (size_t)r * row_words;
  const uint64_t mask = (1ull << bits) - 1ull;
  int bit = chunk * 32 * bits;                  // position of this chunk's first code in the row's stream
#pragma unroll
  for (int k = 0; k < 32; ++k, bit += bits) {
    const int j = chunk * 32 + k;
    if (j >= cols) break;
    const int word = bit >> 5, offset = bit & 31;
    uint64_t v = (uint64_t)(uint32_t)row[word];
    if (offset + bits > 32) v |= (uint64_t)(uint32_t)row[word + 1] << 32;   // straddles two words
    const float q = (float)((v >> offset) & mask);
    const int g = j / group_size;
    const float s = scale[(size_t)r * n_groups + g];
    const float z = (float)zero[(size_t)r * n_groups + g];
    out[(size_t)r * cols + j] = __float2bfloat16_rn(wq::dequantize_code(q, s, z));
  }
}

unsigned int blocks_for(long long work) { return (unsigned int)((work + kThreads - 1) / kThreads); }

}  // namespace

extern "C" cudaError_t wq_pack(const uint8_t* codes, int rows, int cols, int bits, int32_t* out, int row_words,
                               cudaStream_t stream) {
  const long long work = (long long)rows * ((cols + 31) / 32);
  if (work == 0) return cudaSuccess;
  pack_kernel<<<blocks_for(work), kThreads, 0, stream>>>(codes, rows, cols, bits, out, row_words);
  return cudaGetLastError();
}

extern "C" cudaError_t wq_quantize_pack(const void* w, int is_bf16, const float* scale, const uint8_t* zero, int rows,
                                        int cols, int group_size, int n_groups, int bits, int32_t* out, int row_words,
                                        cudaStream_t stream) {
  const long long work = (long long)rows * ((cols + 31) / 32);
  if (work == 0) return cudaSuccess;
  quantize_pack_kernel<<<blocks_for(work), kThreads, 0, stream>>>(w, is_bf16, scale, zero, rows, cols, group_size,
                                                                  n_groups, bits, out, row_words);
  return cudaGetLastError();
}

extern "C" cudaError_t wq_unpack_dequantize(const int32_t* packed, int row_words, const float* scale,
                                            const uint8_t* zero, int rows, int cols, int group_size, int n_groups,
                                            int bits, __nv_bfloat16* out, cudaStream_t stream) {
  const long long work = (long long)rows * ((cols + 31) / 32);
  if (work == 0) return cudaSuccess;
  unpack_dequantize_kernel<<<blocks_for(work), kThreads, 0, stream>>>(packed, row_words, scale, zero, rows, cols,
                                                                      group_size, n_groups, bits, out);
  return cudaGetLastError();
}
