// kdops._C_cuda: the CUDA kernels (no libtorch: tensors arrive as device pointers).
#include "bindings.h"

namespace {

void launch(const kdops::KDParams& p, uintptr_t stream) {
  kdops::kd_forward_cuda(p, reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kdops CUDA kernels";
  kdops::def_kd_forward(
      m, &launch,
      "As kdops._C.kd_forward, on device pointers, launched asynchronously on the CUDA stream\n"
      "`stream` (a cudaStream_t as an integer; 0: the default stream) of the current device.",
      pybind11::arg("stream"));
}
