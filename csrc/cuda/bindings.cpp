// kdops._C_cuda: the CUDA kernels (no libtorch: tensors arrive as device pointers).
#include "bindings.h"
#include "common/affinity_bindings.h"

namespace {

void launch(const kdops::KDParams& p, uintptr_t stream) {
  kdops::kd_forward_cuda(p, reinterpret_cast<void*>(stream));
}

void launch_sparse(const kdops::SparseKDParams& p, uintptr_t stream) {
  kdops::sparse_kd_forward_cuda(p, reinterpret_cast<void*>(stream));
}

template <typename P, void (*F)(const P&, void*)>
void on_stream(const P& p, uintptr_t stream) {
  F(p, reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kdops CUDA kernels";
  kdops::def_kd_forward(
      m, &launch,
      "As kdops._C.kd_forward, on device pointers, launched asynchronously on the CUDA stream\n"
      "`stream` (a cudaStream_t as an integer; 0: the default stream) of the current device.",
      pybind11::arg("stream"));
  kdops::def_sparse_kd_forward(
      m, &launch_sparse,
      "As kdops._C.sparse_kd_forward, on device pointers, launched asynchronously on `stream`.",
      pybind11::arg("stream"));
  kdops::def_affinity_ops(
      m, &on_stream<kdops::AffinityParams, kdops::affinity_forward_cuda>,
      &on_stream<kdops::AffinityParams, kdops::affinity_backward_cuda>,
      &on_stream<kdops::RelationParams, kdops::relation_forward_cuda>,
      &on_stream<kdops::RelationParams, kdops::relation_backward_cuda>, pybind11::arg("stream"));
}
