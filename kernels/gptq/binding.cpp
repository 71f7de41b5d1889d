// Torch binding of the GPTQ block solve: checks device, dtype, layout and sizes, then launches on the
// current stream. Errors name the sizes involved.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" cudaError_t wq_gptq_block_solve(const float* t, int ldt, const float* w, int ldw, const float* m_unit,
                                           int ldm, const float* m_diag, const float* scale, const uint8_t* zero,
                                           int ldg, const int* group, int rows, int n_cols, int block_width,
                                           int maxq, uint8_t* codes, float* delta, float* loss,
                                           cudaStream_t stream);

namespace {

void check_matrix(const torch::Tensor& x, const char* name, torch::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == cols, name, " must be (", rows, ", ", cols,
              "), got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, name, " must have contiguous rows (stride(1) == 1), got stride ", x.stride(1));
}

}  // namespace

// t, w: (rows, n) float32 targets and original weights of a block of columns (rows may be strided);
// m_unit: (n, n) float32 block of Mu (rows may be strided; copied if column-major); m_diag: (n,) float32;
// scale: (rows, G) float32 and zero: (rows, G) uint8, every group's grid; group: (n,) int32, each
// column's group. n <= 128. Returns (codes (rows, n) uint8, delta (rows, n) float32, loss (rows,) float32).
std::vector<torch::Tensor> gptq_solve_block(torch::Tensor t, torch::Tensor w, torch::Tensor m_unit,
                                            torch::Tensor m_diag, torch::Tensor scale, torch::Tensor zero,
                                            torch::Tensor group, int64_t bits) {
  TORCH_CHECK(t.dim() == 2, "t must be 2-d, got ", t.dim(), "-d");
  const int64_t rows = t.size(0), n = t.size(1);
  TORCH_CHECK(n >= 1 && n <= 128, "block width n=", n, " must be 1..128 (the kernel holds a block in registers)");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  check_matrix(t, "t", torch::kFloat32, rows, n);
  check_matrix(w, "w", torch::kFloat32, rows, n);
  // A B x B block: copied when its rows are not contiguous (a column-major factor), never worth refusing.
  auto m_unit_c = m_unit.dim() == 2 && m_unit.stride(1) != 1 ? m_unit.contiguous() : m_unit;
  check_matrix(m_unit_c, "m_unit", torch::kFloat32, n, n);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows, "scale must be (", rows, ", groups), got ", scale.sizes());
  const int64_t n_groups = scale.size(1);
  auto scale_c = scale.contiguous();
  auto zero_c = zero.contiguous();
  check_matrix(scale_c, "scale", torch::kFloat32, rows, n_groups);
  check_matrix(zero_c, "zero", torch::kUInt8, rows, n_groups);
  auto m_diag_c = m_diag.contiguous();
  auto group_c = group.contiguous();
  TORCH_CHECK(m_diag_c.is_cuda() && m_diag_c.scalar_type() == torch::kFloat32 && m_diag_c.dim() == 1 &&
                  m_diag_c.size(0) == n,
              "m_diag must be a CUDA float32 (", n, ",) tensor, got ", m_diag.scalar_type(), " ", m_diag.sizes());
  TORCH_CHECK(group_c.is_cuda() && group_c.scalar_type() == torch::kInt32 && group_c.dim() == 1 && group_c.size(0) == n,
              "group must be a CUDA int32 (", n, ",) tensor, got ", group.scalar_type(), " ", group.sizes());
  for (const auto* x : {&w, &m_unit_c, &m_diag_c, &scale_c, &zero_c, &group_c}) {
    TORCH_CHECK(x->device() == t.device(), "t, w, m_unit, m_diag, scale, zero and group must be on one device");
  }
  // Group indices are trusted to lie in [0, G): quantize_gptq derives them from the column positions.
  const int width = n <= 32 ? 32 : n <= 64 ? 64 : 128;
  auto codes = torch::empty({rows, n}, t.options().dtype(torch::kUInt8));
  auto delta = torch::empty({rows, n}, t.options());
  auto loss = torch::empty({rows}, t.options());
  const c10::cuda::CUDAGuard guard(t.device());
  cudaError_t status = wq_gptq_block_solve(
      t.data_ptr<float>(), (int)t.stride(0), w.data_ptr<float>(), (int)w.stride(0), m_unit_c.data_ptr<float>(),
      (int)m_unit_c.stride(0), m_diag_c.data_ptr<float>(), scale_c.data_ptr<float>(), zero_c.data_ptr<uint8_t>(),
      (int)n_groups, group_c.data_ptr<int>(), (int)rows, (int)n, width, (1 << bits) - 1, codes.data_ptr<uint8_t>(),
      delta.data_ptr<float>(), loss.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "gptq block solve (rows=", rows, ", n=", n, ", width=", width,
              ") failed: ", cudaGetErrorString(status));
  return {codes, delta, loss};
}

void register_gptq(pybind11::module& m) {
  m.def("gptq_solve_block", &gptq_solve_block, "GPTQ solve of one block of columns (see kernels/gptq/gptq.cu)");
}
