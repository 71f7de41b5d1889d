// The one Python extension that holds every kernel family; each family registers its functions.
#include <torch/extension.h>

void register_gptq(pybind11::module& m);
void register_quant_pack(pybind11::module& m);
void register_awq(pybind11::module& m);
void register_clip_search(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_gptq(m);
  register_quant_pack(m);
  register_awq(m);
  register_clip_search(m);
}
