// Torch bindings of the AWQ search kernels (kernels/awq/awq.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" cudaError_t wq_awq_fake_quant(const void* w, int w_bf16, const float* s, int rows, int cols, int group_size,
                                         int bits, int sym, int scale_dtype, void* out, int out_bf16,
                                         cudaStream_t stream);
extern "C" cudaError_t wq_awq_clip_error(const float* w, const float* h, int rows, int cols, int group_size, int bits,
                                         int sym, int scale_dtype, const float* ratios, int n_ratios, float* out,
                                         cudaStream_t stream);

// w: (rows, cols) bfloat16 or float32 CUDA; s: (cols,) float32. scale_dtype: 0 float32, 1 bfloat16, 2 float16.
// Returns Q(w * s) / s as float32, or bfloat16 when out_bf16.
torch::Tensor awq_fake_quant(torch::Tensor w, torch::Tensor s, int64_t bits, int64_t group_size, bool sym,
                             int64_t scale_dtype, bool out_bf16) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 &&
                  (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kFloat32),
              "w must be a 2-d CUDA bfloat16 or float32 tensor, got ", w.scalar_type(), " ", w.sizes());
  auto wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1);
  TORCH_CHECK(group_size > 0 && cols % group_size == 0, "cols=", cols, " is not a multiple of group_size=",
              group_size);
  TORCH_CHECK(s.is_cuda() && s.scalar_type() == torch::kFloat32 && s.dim() == 1 && s.size(0) == cols,
              "s must be a CUDA float32 (", cols, ",) tensor, got ", s.scalar_type(), " ", s.sizes());
  TORCH_CHECK(scale_dtype >= 0 && scale_dtype <= 2, "scale_dtype=", scale_dtype, " must be 0, 1 or 2");
  auto sc = s.contiguous();
  auto out = torch::empty({rows, cols}, wc.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32));
  const c10::cuda::CUDAGuard guard(wc.device());
  cudaError_t status = wq_awq_fake_quant(wc.data_ptr(), wc.scalar_type() == torch::kBFloat16, sc.data_ptr<float>(),
                                         (int)rows, (int)cols, (int)group_size, (int)bits, sym, (int)scale_dtype,
                                         out.data_ptr(), out_bf16, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "awq fake quant (rows=", rows, ", cols=", cols, ", group_size=", group_size,
              ") failed: ", cudaGetErrorString(status));
  return out;
}

// w: (rows, cols) float32; h: (cols, cols) float32 symmetric; ratios: (n,) float32.
// Returns (rows, cols / group_size, n) float32.
torch::Tensor awq_clip_error(torch::Tensor w, torch::Tensor h, int64_t group_size, int64_t bits, bool sym,
                             int64_t scale_dtype, torch::Tensor ratios) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, "group_size=",
              group_size, ": the clip-error kernel handles 32, 64, 128 or 256 columns per group");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == torch::kFloat32 && w.dim() == 2,
              "w must be a 2-d CUDA float32 tensor, got ", w.scalar_type(), " ", w.sizes());
  auto wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1);
  TORCH_CHECK(cols % group_size == 0, "cols=", cols, " is not a multiple of group_size=", group_size);
  TORCH_CHECK(h.is_cuda() && h.scalar_type() == torch::kFloat32 && h.size(0) == cols && h.size(1) == cols,
              "h must be a CUDA float32 (", cols, ", ", cols, ") tensor, got ", h.scalar_type(), " ", h.sizes());
  TORCH_CHECK(ratios.is_cuda() && ratios.scalar_type() == torch::kFloat32 && ratios.dim() == 1,
              "ratios must be a 1-d CUDA float32 tensor");
  TORCH_CHECK(scale_dtype >= 0 && scale_dtype <= 2, "scale_dtype=", scale_dtype, " must be 0, 1 or 2");
  auto hc = h.contiguous();
  auto rc = ratios.contiguous();
  const int64_t n = rc.size(0);
  auto out = torch::empty({rows, cols / group_size, n}, wc.options());
  const c10::cuda::CUDAGuard guard(wc.device());
  cudaError_t status = wq_awq_clip_error(wc.data_ptr<float>(), hc.data_ptr<float>(), (int)rows, (int)cols,
                                         (int)group_size, (int)bits, sym, (int)scale_dtype, rc.data_ptr<float>(),
                                         (int)n, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "awq clip error (rows=", rows, ", cols=", cols, ", group_size=", group_size,
              ") failed: ", cudaGetErrorString(status));
  return out;
}

void register_awq(pybind11::module& m) {
  m.def("awq_fake_quant", &awq_fake_quant, "Q(w * s) / s in one pass");
  m.def("awq_clip_error", &awq_clip_error, "per-group clip errors for every clip ratio");
}
