// sparse_kd_forward: the Python signature of the sparse (top-k teacher) KD kernels
// (common/sparse_kd.h), on both modules (the convention: bindings/common.h).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "common/codes.h"
#include "common/sparse_kd.h"

namespace kdops {
namespace bindings {

// sparse_kd_forward(student_ptr, ..., bucket[, stream]) -> None.
template <typename... Stream>
void def_sparse_kd(py::module_& m, void (*sparse_kd_forward)(const SparseKDParams&, Stream...)) {
  static const std::string doc = docstring<Stream...>(
      "Sparse (top-k teacher) KD: row losses and, if grad_ptr != 0, their gradients w.r.t. the\n"
      "student logits (see csrc/common/sparse_kd.h).");
  m.def(
      "sparse_kd_forward",
      [sparse_kd_forward](uintptr_t student, uintptr_t topk_logprobs, uintptr_t topk_indices, uintptr_t labels,
                          uintptr_t loss, uintptr_t grad, int64_t n_rows, int64_t vocab, int64_t k,
                          int64_t student_stride, int64_t grad_stride, int dtype, int divergence,
                          double temperature, double beta, double hard_weight, double soft_weight,
                          int64_t ignore_index, bool bucket, Stream... stream) {
        const char* fn = "sparse_kd_forward";
        check(dtype >= kFloat32 && dtype <= kFloat64, fn, "unknown dtype code " + std::to_string(dtype));
        check(divergence >= kForwardKL && divergence <= kTVD, fn,
              "unknown divergence code " + std::to_string(divergence));
        check(n_rows >= 0 && vocab >= 1 && k >= 1 && k <= vocab, fn, "bad shape");
        check(temperature > 0, fn, "temperature must be > 0");
        check(n_rows == 0 || (student && topk_logprobs && topk_indices && loss), fn, "null pointer");
        check(!grad || grad_stride >= vocab, fn, "grad rows overlap");
        const SparseKDParams p{cptr(student), cptr(topk_logprobs), reinterpret_cast<const int32_t*>(topk_indices),
                               reinterpret_cast<const int64_t*>(labels), mptr(loss), mptr(grad),
                               n_rows, vocab, k, student_stride, grad_stride, dtype, divergence,
                               temperature, beta, hard_weight, soft_weight, ignore_index, bucket};
        py::gil_scoped_release no_gil;
        sparse_kd_forward(p, stream...);
      },
      doc.c_str(), py::arg("student_ptr"), py::arg("topk_logprobs_ptr"), py::arg("topk_indices_ptr"),
      py::arg("labels_ptr"), py::arg("loss_ptr"), py::arg("grad_ptr"), py::arg("n_rows"), py::arg("vocab"),
      py::arg("k"), py::arg("student_stride"), py::arg("grad_stride"), py::arg("dtype"), py::arg("divergence"),
      py::arg("temperature"), py::arg("beta"), py::arg("hard_weight"), py::arg("soft_weight"),
      py::arg("ignore_index"), py::arg("bucket"), stream_arg<Stream>()...);
}

}  // namespace bindings
}  // namespace kdops
