// Torch binding of the GPTQ block solve: checks device, dtype, layout and sizes, then launches on the
// current stream. Errors name the sizes involved.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" cudaError_t wq_gptq_block_solve(const float* w, int ldw, const float* hinv, int ldh, const float* scale,
                                           const uint8_t* zero, int rows, int n_cols, int block_width, int maxq,
                                           uint8_t* codes, int ldc, float* err, float* loss, cudaStream_t stream);

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-d, got ", t.dim(), "-d");
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows (stride(1) == 1), got stride ", t.stride(1));
}

}  // namespace

// w: (rows, n) float32 block of columns (rows may be strided); hinv: (n, n) float32 block of the upper
// Cholesky factor of H^-1; scale: (rows, n) float32; zero: (rows, n) uint8. n <= 128.
// Returns (codes (rows, n) uint8, err (rows, n) float32, loss (rows,) float32).
std::vector<torch::Tensor> gptq_solve_block(torch::Tensor w, torch::Tensor hinv, torch::Tensor scale,
                                            torch::Tensor zero, int64_t bits) {
  check_rows(w, "w");
  check_rows(hinv, "hinv");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && hinv.scalar_type() == torch::kFloat32,
              "w and hinv must be float32, got ", w.scalar_type(), " and ", hinv.scalar_type());
  const int64_t rows = w.size(0), n = w.size(1);
  TORCH_CHECK(hinv.size(0) == n && hinv.size(1) == n, "hinv must be ", n, "x", n, " for a block of ", n,
              " columns, got ", hinv.size(0), "x", hinv.size(1));
  TORCH_CHECK(n >= 1 && n <= 128, "block width n=", n, " must be 1..128 (the kernel holds a block in registers)");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  auto scale_c = scale.contiguous();
  auto zero_c = zero.contiguous();
  TORCH_CHECK(scale_c.is_cuda() && scale_c.scalar_type() == torch::kFloat32 && scale_c.size(0) == rows &&
                  scale_c.size(1) == n,
              "scale must be a CUDA float32 (", rows, ", ", n, ") tensor, got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(zero_c.is_cuda() && zero_c.scalar_type() == torch::kUInt8 && zero_c.size(0) == rows &&
                  zero_c.size(1) == n,
              "zero must be a CUDA uint8 (", rows, ", ", n, ") tensor, got ", zero.scalar_type(), " ", zero.sizes());
  TORCH_CHECK(w.device() == hinv.device() && w.device() == scale_c.device() && w.device() == zero_c.device(),
              "w, hinv, scale and zero must be on one device");
  const int width = n <= 32 ? 32 : n <= 64 ? 64 : 128;
  auto codes = torch::empty({rows, n}, w.options().dtype(torch::kUInt8));
  auto err = torch::empty({rows, n}, w.options());
  auto loss = torch::zeros({rows}, w.options());
  const c10::cuda::CUDAGuard guard(w.device());
  cudaError_t status = wq_gptq_block_solve(
      w.data_ptr<float>(), (int)w.stride(0), hinv.data_ptr<float>(), (int)hinv.stride(0), scale_c.data_ptr<float>(),
      zero_c.data_ptr<uint8_t>(), (int)rows, (int)n, width, (1 << bits) - 1, codes.data_ptr<uint8_t>(), (int)n,
      err.data_ptr<float>(), loss.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "gptq block solve (rows=", rows, ", n=", n, ", width=", width,
              ") failed: ", cudaGetErrorString(status));
  return {codes, err, loss};
}

void register_gptq(pybind11::module& m) {
  m.def("gptq_solve_block", &gptq_solve_block, "GPTQ solve of one block of columns (see kernels/gptq/gptq.cu)");
}
