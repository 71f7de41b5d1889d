// Torch binding of the GPTQ block solve: checks device, dtype, layout and sizes, then launches on the
// current stream. Errors name the sizes involved.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "../include/wq_gptq_batch.cuh"

extern "C" cudaError_t wq_gptq_block_solve(const float* t, int ldt, const float* w, int ldw, const float* m_unit,
                                           int ldm, const float* m_diag, const float* scale, const uint8_t* zero,
                                           int ldg, const int* group, int rows, int n_cols, int block_width,
                                           int maxq, uint8_t* codes, int ldc, float* delta, void* parts, int ldp,
                                           float* loss, bool add_loss, int batch, const BatchStrides* strides,
                                           cudaStream_t stream);

namespace {

void check_matrix(const torch::Tensor& x, const char* name, torch::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == cols, name, " must be (", rows, ", ", cols,
              "), got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, name, " must have contiguous rows (stride(1) == 1), got stride ", x.stride(1));
}

// The inputs of one block solve, checked and made launchable (small tensors copied where not contiguous).
struct SolveInputs {
  int64_t rows, n, n_groups;
  torch::Tensor m_unit, m_diag, scale, zero, group;
};

SolveInputs check_inputs(const torch::Tensor& t, const torch::Tensor& w, const torch::Tensor& m_unit,
                         const torch::Tensor& m_diag, const torch::Tensor& scale, const torch::Tensor& zero,
                         const torch::Tensor& group, int64_t bits) {
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
  const std::initializer_list<const torch::Tensor*> others = {&w, &m_unit_c, &m_diag_c, &scale_c, &zero_c, &group_c};
  for (const torch::Tensor* x : others) {
    TORCH_CHECK(x->device() == t.device(), "t, w, m_unit, m_diag, scale, zero and group must be on one device");
  }
  // Group indices are trusted to lie in [0, G): quantize_gptq derives them from the column positions.
  return {rows, n, n_groups, m_unit_c, m_diag_c, scale_c, zero_c, group_c};
}

void launch(const torch::Tensor& t, const torch::Tensor& w, const SolveInputs& in, int64_t bits, torch::Tensor& codes,
            float* delta, void* parts, int64_t ldp, torch::Tensor& loss, bool add_loss) {
  const int width = in.n <= 32 ? 32 : in.n <= 64 ? 64 : 128;
  const c10::cuda::CUDAGuard guard(t.device());
  cudaError_t status = wq_gptq_block_solve(
      t.data_ptr<float>(), (int)t.stride(0), w.data_ptr<float>(), (int)w.stride(0), in.m_unit.data_ptr<float>(),
      (int)in.m_unit.stride(0), in.m_diag.data_ptr<float>(), in.scale.data_ptr<float>(), in.zero.data_ptr<uint8_t>(),
      (int)in.n_groups, in.group.data_ptr<int>(), (int)in.rows, (int)in.n, width, (1 << bits) - 1,
      codes.data_ptr<uint8_t>(), (int)codes.stride(0), delta, parts, (int)ldp, loss.data_ptr<float>(), add_loss,
      1, nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "gptq block solve (rows=", in.rows, ", n=", in.n, ", width=", width,
              ") failed: ", cudaGetErrorString(status));
}

}  // namespace

// t, w: (rows, n) float32 targets and original weights of a block of columns (rows may be strided);
// m_unit: (n, n) float32 block of Mu (rows may be strided; copied if column-major); m_diag: (n,) float32;
// scale: (rows, G) float32 and zero: (rows, G) uint8, every group's grid; group: (n,) int32, each
// column's group. n <= 128. Returns (codes (rows, n) uint8, delta (rows, n) float32, loss (rows,) float32).
std::vector<torch::Tensor> gptq_solve_block(torch::Tensor t, torch::Tensor w, torch::Tensor m_unit,
                                            torch::Tensor m_diag, torch::Tensor scale, torch::Tensor zero,
                                            torch::Tensor group, int64_t bits) {
  const SolveInputs in = check_inputs(t, w, m_unit, m_diag, scale, zero, group, bits);
  auto codes = torch::empty({in.rows, in.n}, t.options().dtype(torch::kUInt8));
  auto delta = torch::empty({in.rows, in.n}, t.options());
  auto loss = torch::empty({in.rows}, t.options());
  launch(t, w, in, bits, codes, delta.data_ptr<float>(), nullptr, 0, loss, false);
  return {codes, delta, loss};
}

// The same solve, written where the layer loop wants it: codes into `codes` ((rows, n) uint8, rows may
// be strided: a column block of the layer's codes), the row losses added to `loss` ((rows,) float32),
// and, when `parts` is given ((rows, 3n) bfloat16, rows may be strided), the deltas as [hi | hi | lo].
void gptq_solve_block_into(torch::Tensor t, torch::Tensor w, torch::Tensor m_unit, torch::Tensor m_diag,
                           torch::Tensor scale, torch::Tensor zero, torch::Tensor group, int64_t bits,
                           torch::Tensor codes, torch::Tensor loss, c10::optional<torch::Tensor> parts) {
  const SolveInputs in = check_inputs(t, w, m_unit, m_diag, scale, zero, group, bits);
  check_matrix(codes, "codes", torch::kUInt8, in.rows, in.n);
  TORCH_CHECK(loss.is_cuda() && loss.scalar_type() == torch::kFloat32 && loss.dim() == 1 && loss.size(0) == in.rows &&
                  loss.is_contiguous(),
              "loss must be a contiguous CUDA float32 (", in.rows, ",) tensor, got ", loss.scalar_type(), " ",
              loss.sizes());
  TORCH_CHECK(codes.device() == t.device() && loss.device() == t.device(), "codes and loss must be on t's device");
  void* parts_ptr = nullptr;
  int64_t ldp = 0;
  if (parts.has_value()) {
    check_matrix(*parts, "parts", torch::kBFloat16, in.rows, 3 * in.n);
    TORCH_CHECK(parts->device() == t.device(), "parts must be on t's device");
    parts_ptr = parts->data_ptr();
    ldp = parts->stride(0);
  }
  launch(t, w, in, bits, codes, nullptr, parts_ptr, ldp, loss, true);
}

// A batch of block solves of one size, each of its own layer, in one launch: t, w (batch, rows, n) float32
// with contiguous rows; m_unit (batch, n, n) float32 with contiguous rows; m_diag (batch, n) float32 and group
// (batch, n) int32, each contiguous along n; scale (batch, rows, G) float32 and zero (batch, rows, G) uint8,
// each problem's contiguous; codes (batch, rows, n) uint8 with contiguous rows; loss (batch, rows) float32
// contiguous (added to); parts (batch, rows, 3n) bfloat16 with contiguous rows, or none. Problem b is what
// gptq_solve_block_into does with the b-th of each.
void gptq_solve_blocks_into(torch::Tensor t, torch::Tensor w, torch::Tensor m_unit, torch::Tensor m_diag,
                            torch::Tensor scale, torch::Tensor zero, torch::Tensor group, int64_t bits,
                            torch::Tensor codes, torch::Tensor loss, c10::optional<torch::Tensor> parts) {
  TORCH_CHECK(t.dim() == 3, "t must be 3-d (batch, rows, n), got ", t.dim(), "-d");
  const int64_t batch = t.size(0), rows = t.size(1), n = t.size(2);
  TORCH_CHECK(batch >= 1 && batch <= 65535, "batch=", batch, " must be 1..65535");
  TORCH_CHECK(n >= 1 && n <= 128, "block width n=", n, " must be 1..128 (the kernel holds a block in registers)");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits=", bits, " must be 1..8");
  auto check3 = [&](const torch::Tensor& x, const char* name, torch::ScalarType dtype, int64_t r, int64_t c) {
    TORCH_CHECK(x.is_cuda() && x.device() == t.device(), name, " must be on t's CUDA device");
    TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == batch && x.size(1) == r && x.size(2) == c, name, " must be (", batch,
                ", ", r, ", ", c, "), got ", x.sizes());
    TORCH_CHECK(x.stride(2) == 1, name, " must have contiguous rows, got stride ", x.stride(2));
  };
  auto check2 = [&](const torch::Tensor& x, const char* name, torch::ScalarType dtype) {
    TORCH_CHECK(x.is_cuda() && x.device() == t.device(), name, " must be on t's CUDA device");
    TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == batch && x.size(1) == n && x.stride(1) == 1, name, " must be (", batch,
                ", ", n, ") with stride(1) == 1, got ", x.sizes());
  };
  check3(t, "t", torch::kFloat32, rows, n);
  check3(w, "w", torch::kFloat32, rows, n);
  check3(m_unit, "m_unit", torch::kFloat32, n, n);
  check2(m_diag, "m_diag", torch::kFloat32);
  check2(group, "group", torch::kInt32);
  TORCH_CHECK(scale.dim() == 3, "scale must be (batch, rows, groups), got ", scale.sizes());
  const int64_t n_groups = scale.size(2);
  check3(scale, "scale", torch::kFloat32, rows, n_groups);
  check3(zero, "zero", torch::kUInt8, rows, n_groups);
  TORCH_CHECK(scale.stride(1) == n_groups && zero.stride(1) == n_groups, "scale and zero must be contiguous per problem");
  check3(codes, "codes", torch::kUInt8, rows, n);
  TORCH_CHECK(loss.is_cuda() && loss.device() == t.device() && loss.scalar_type() == torch::kFloat32 &&
                  loss.dim() == 2 && loss.size(0) == batch && loss.size(1) == rows && loss.stride(1) == 1,
              "loss must be a CUDA float32 (", batch, ", ", rows, ") tensor with stride(1) == 1, got ", loss.sizes());
  BatchStrides bs;
  bs.t = t.stride(0);
  bs.w = w.stride(0);
  bs.m_unit = m_unit.stride(0);
  bs.m_diag = m_diag.stride(0);
  bs.grid = scale.stride(0);
  TORCH_CHECK(zero.stride(0) == scale.stride(0), "scale and zero must have the same batch stride");
  bs.group = group.stride(0);
  bs.codes = codes.stride(0);
  bs.loss = loss.stride(0);
  void* parts_ptr = nullptr;
  int64_t ldp = 0;
  if (parts.has_value()) {
    check3(*parts, "parts", torch::kBFloat16, rows, 3 * n);
    parts_ptr = parts->data_ptr();
    ldp = parts->stride(1);
    bs.parts = parts->stride(0);
  }
  // Problems that wrote into one tensor would race (the losses are added to).
  TORCH_CHECK(batch == 1 || (bs.codes != 0 && bs.loss != 0 && (parts_ptr == nullptr || bs.parts != 0)),
              "codes, loss and parts need a tensor per problem (a batch stride of 0 shares one)");
  const int width = n <= 32 ? 32 : n <= 64 ? 64 : 128;
  const c10::cuda::CUDAGuard guard(t.device());
  cudaError_t status = wq_gptq_block_solve(
      t.data_ptr<float>(), (int)t.stride(1), w.data_ptr<float>(), (int)w.stride(1), m_unit.data_ptr<float>(),
      (int)m_unit.stride(1), m_diag.data_ptr<float>(), scale.data_ptr<float>(), zero.data_ptr<uint8_t>(),
      (int)n_groups, group.data_ptr<int>(), (int)rows, (int)n, width, (1 << bits) - 1, codes.data_ptr<uint8_t>(),
      (int)codes.stride(1), nullptr, parts_ptr, (int)ldp, loss.data_ptr<float>(), true, (int)batch, &bs,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "gptq batched block solve (batch=", batch, ", rows=", rows, ", n=", n,
              ") failed: ", cudaGetErrorString(status));
}

void register_gptq(pybind11::module& m) {
  m.def("gptq_solve_block", &gptq_solve_block, "GPTQ solve of one block of columns (see kernels/gptq/gptq.cu)");
  m.def("gptq_solve_block_into", &gptq_solve_block_into,
        "GPTQ solve of one block of columns, into the layer's codes, loss and update operand");
  m.def("gptq_solve_blocks_into", &gptq_solve_blocks_into,
        "GPTQ solves of a batch of blocks of columns of one size, one launch (see gptq_solve_block_into)");
}
