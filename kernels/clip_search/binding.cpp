// Torch binding of RTN's clipping search (kernels/clip_search/clip_search.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" cudaError_t wq_clip_search(const float* w, const float* importance, int rows, int cols, int group_size,
                                      int bits, int sym, int scale_dtype, int steps, double max_shrink, float* best,
                                      cudaStream_t stream);

// w: (rows, cols) float32 CUDA; importance: (cols,) float32 CUDA, or an empty tensor for none.
// Returns (rows, cols / group_size) float32: each group's clip factor.
torch::Tensor clip_search(torch::Tensor w, torch::Tensor importance, int64_t bits, int64_t group_size, bool sym,
                          int64_t scale_dtype, int64_t steps, double max_shrink) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == torch::kFloat32 && w.dim() == 2,
              "w must be a 2-d CUDA float32 tensor, got ", w.scalar_type(), " ", w.sizes());
  auto wc = w.contiguous();
  const int64_t rows = wc.size(0), cols = wc.size(1);
  TORCH_CHECK(group_size > 0 && cols % group_size == 0, "cols=", cols, " is not a multiple of group_size=",
              group_size);
  TORCH_CHECK(steps >= 1, "steps=", steps, " must be at least 1");
  const bool weighted = importance.numel() > 0;
  if (weighted) {
    TORCH_CHECK(importance.is_cuda() && importance.scalar_type() == torch::kFloat32 && importance.dim() == 1 &&
                    importance.size(0) == cols,
                "importance must be a CUDA float32 (", cols, ",) tensor, got ", importance.scalar_type(), " ",
                importance.sizes());
  }
  auto ic = weighted ? importance.contiguous() : importance;
  auto best = torch::empty({rows, cols / group_size}, wc.options());
  const c10::cuda::CUDAGuard guard(wc.device());
  const cudaError_t status = wq_clip_search(wc.data_ptr<float>(), weighted ? ic.data_ptr<float>() : nullptr,
                                            (int)rows, (int)cols, (int)group_size, (int)bits, sym ? 1 : 0,
                                            (int)scale_dtype, (int)steps, max_shrink, best.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "clip_search (rows=", rows, ", cols=", cols, ", group_size=", group_size,
              ") failed: ", cudaGetErrorString(status));
  return best;
}

void register_clip_search(pybind11::module& m) {
  m.def("clip_search", &clip_search, "RTN's clip factor per group, searched on the GPU");
}
