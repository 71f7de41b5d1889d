// Torch bindings of pack, quantize-and-pack and unpack-and-dequantize (kernels/quant_pack/quant_pack.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

extern "C" cudaError_t wq_pack(const uint8_t* codes, int rows, int cols, int bits, int32_t* out, int row_words,
                               cudaStream_t stream);
extern "C" cudaError_t wq_quantize_pack(const void* w, int is_bf16, const float* scale, const uint8_t* zero, int rows,
                                        int cols, int group_size, int n_groups, int bits, int32_t* out, int row_words,
                                        cudaStream_t stream);
extern "C" cudaError_t wq_unpack_dequantize(const int32_t* packed, int row_words, const float* scale,
                                            const uint8_t* zero, int rows, int cols, int group_size, int n_groups,
                                            int bits, __nv_bfloat16* out, cudaStream_t stream);

namespace {

int64_t words_for(int64_t cols, int64_t bits) { return (cols * bits + 31) / 32; }

void check_bits(int64_t bits) { TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8"); }

void check_grid(const torch::Tensor& scale, const torch::Tensor& zero, int64_t rows, int64_t cols,
                int64_t group_size) {
  TORCH_CHECK(group_size > 0 && cols % group_size == 0, "cols=", cols, " is not a multiple of group_size=",
              group_size);
  const int64_t n_groups = cols / group_size;
  TORCH_CHECK(scale.is_cuda() && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() &&
                  scale.size(0) == rows && scale.size(1) == n_groups,
              "scale must be contiguous CUDA float32 (", rows, ", ", n_groups, "), got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(zero.is_cuda() && zero.scalar_type() == torch::kUInt8 && zero.is_contiguous() && zero.size(0) == rows &&
                  zero.size(1) == n_groups,
              "zero must be contiguous CUDA uint8 (", rows, ", ", n_groups, "), got ", zero.scalar_type(), " ",
              zero.sizes());
}

void check_status(cudaError_t status, const char* what, int64_t rows, int64_t cols, int64_t bits) {
  TORCH_CHECK(status == cudaSuccess, what, " (rows=", rows, ", cols=", cols, ", bits=", bits, ") failed: ",
              cudaGetErrorString(status));
}

}  // namespace

// codes: (rows, cols) uint8 CUDA, values < 2^bits. Returns (rows, ceil(cols*bits/32)) int32.
torch::Tensor pack_rows(torch::Tensor codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == torch::kUInt8 && codes.dim() == 2,
              "codes must be a 2-d CUDA uint8 tensor, got ", codes.scalar_type(), " ", codes.sizes());
  auto c = codes.contiguous();
  const int64_t rows = c.size(0), cols = c.size(1), words = words_for(cols, bits);
  auto out = torch::empty({rows, words}, c.options().dtype(torch::kInt32));
  const c10::cuda::CUDAGuard guard(c.device());
  check_status(wq_pack(c.data_ptr<uint8_t>(), (int)rows, (int)cols, (int)bits, out.data_ptr<int32_t>(), (int)words,
                       c10::cuda::getCurrentCUDAStream().stream()), "pack", rows, cols, bits);
  return out;
}

// w: (rows, cols) bfloat16 or float32 CUDA; scale float32, zero uint8: (rows, cols / group_size).
torch::Tensor quantize_pack(torch::Tensor w, torch::Tensor scale, torch::Tensor zero, int64_t bits, int64_t group_size) {
  check_bits(bits);
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 &&
                  (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32),
              "w must be a 2-d CUDA bfloat16 or float32 tensor, got ", w.scalar_type(), " ", w.sizes());
  auto wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1), words = words_for(cols, bits);
  check_grid(scale, zero, rows, cols, group_size);
  auto out = torch::empty({rows, words}, wc.options().dtype(torch::kInt32));
  const c10::cuda::CUDAGuard guard(wc.device());
  check_status(wq_quantize_pack(wc.data_ptr(), wc.scalar_type() == torch::kBFloat16, scale.data_ptr<float>(),
                                zero.data_ptr<uint8_t>(), (int)rows, (int)cols, (int)group_size,
                                (int)(cols / group_size), (int)bits, out.data_ptr<int32_t>(), (int)words,
                                c10::cuda::getCurrentCUDAStream().stream()),
               "quantize_pack", rows, cols, bits);
  return out;
}

// packed: (rows, ceil(cols*bits/32)) int32 CUDA. Returns (rows, cols) bfloat16.
torch::Tensor unpack_dequantize(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                                int64_t cols, int64_t group_size) {
  check_bits(bits);
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == torch::kInt32 && packed.dim() == 2,
              "packed must be a 2-d CUDA int32 tensor, got ", packed.scalar_type(), " ", packed.sizes());
  auto p = packed.contiguous();
  const int64_t rows = p.size(0), words = words_for(cols, bits);
  TORCH_CHECK(p.size(1) == words, "packed has ", p.size(1), " words per row; ", cols, " codes of ", bits,
              " bits need ", words);
  check_grid(scale, zero, rows, cols, group_size);
  auto out = torch::empty({rows, cols}, p.options().dtype(torch::kBFloat16));
  const c10::cuda::CUDAGuard guard(p.device());
  check_status(wq_unpack_dequantize(p.data_ptr<int32_t>(), (int)words, scale.data_ptr<float>(),
                                    zero.data_ptr<uint8_t>(), (int)rows, (int)cols, (int)group_size,
                                    (int)(cols / group_size), (int)bits,
                                    reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "unpack_dequantize", rows, cols, bits);
  return out;
}

void register_quant_pack(pybind11::module& m) {
  m.def("pack_rows", &pack_rows, "pack uint8 codes into int32 bit streams");
  m.def("quantize_pack", &quantize_pack, "round-to-nearest codes of w on a grid, packed");
  m.def("unpack_dequantize", &unpack_dequantize, "packed codes back to bfloat16 weights");
}
