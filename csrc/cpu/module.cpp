// kdops._C: the OpenMP CPU kernels (no libtorch: tensors arrive as data pointers). One def_<family>
// line per family (bindings/<family>.h); the CUDA module, cuda/module.cpp, mirrors this file.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bindings/affinity.h"
#include "bindings/attention_relation.h"
#include "bindings/kd.h"
#include "bindings/sparse_kd.h"

PYBIND11_MODULE(_C, m) {
  using namespace kdops;
  m.doc() = "kdops CPU kernels";
  bindings::def_kd(m, &kd_forward_cpu);
  bindings::def_sparse_kd(m, &sparse_kd_forward_cpu);
  bindings::def_affinity(m, &affinity_forward_cpu, &affinity_backward_cpu, &relation_forward_cpu,
                         &relation_backward_cpu);
  bindings::def_attention_relation(m, &attention_relation_forward_cpu, &attention_relation_backward_cpu);
  m.def(
      "num_threads",
      [] {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      "The number of OpenMP threads the kernels use.");
}
