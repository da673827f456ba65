// kdops._C: the OpenMP CPU kernels (no libtorch: tensors arrive as data pointers).
#include "bindings.h"
#include "common/affinity_bindings.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdops CPU kernels";
  kdops::def_kd_forward(
      m, &kdops::kd_forward_cpu,
      "Row losses [n_rows] (float, double for float64) and, if grad_ptr != 0, their gradients\n"
      "w.r.t. the student logits, written to the buffers at the given addresses. Pointer\n"
      "arguments are data addresses (0: none); strides are row strides in elements.");
  kdops::def_sparse_kd_forward(
      m, &kdops::sparse_kd_forward_cpu,
      "Sparse (top-k teacher) KD: row losses and, if grad_ptr != 0, their gradients w.r.t. the\n"
      "student logits (see csrc/common/sparse_kd.h).");
  kdops::def_affinity_ops(m, &kdops::affinity_forward_cpu, &kdops::affinity_backward_cpu,
                          &kdops::relation_forward_cpu, &kdops::relation_backward_cpu);
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
