// kdops._C_cuda: the CUDA kernels (no libtorch: tensors arrive as device pointers). The same
// functions as kdops._C (cpu/module.cpp), each with a trailing `stream` argument: the entry
// points take (params, uintptr_t stream) (bindings/common.h).
#include <pybind11/pybind11.h>

#include "bindings/affinity.h"
#include "bindings/attention_relation.h"
#include "bindings/kd.h"
#include "bindings/sparse_kd.h"

PYBIND11_MODULE(_C_cuda, m) {
  using namespace kdops;
  m.doc() = "kdops CUDA kernels";
  bindings::def_kd(m, &kd_forward_cuda);
  bindings::def_sparse_kd(m, &sparse_kd_forward_cuda);
  bindings::def_affinity(m, &affinity_forward_cuda, &affinity_backward_cuda, &relation_forward_cuda,
                         &relation_backward_cuda);
  bindings::def_attention_relation(m, &attention_relation_forward_cuda, &attention_relation_backward_cuda);
}
