// sparse_kd_forward: the Python signature of the sparse (top-k teacher) KD kernels
// (common/sparse_kd.h), on both modules (the convention: bindings/common.h).
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "common/codes.h"
#include "common/sparse_kd.h"

namespace kdops {
namespace bindings {

// sparse_kd_forward(student_ptr, ..., bucket[, stream], student_scale=1, student_softcap=0,
// grad_divisor_ptr=0) -> None.
template <typename... Stream>
void def_sparse_kd(py::module_& m, void (*sparse_kd_forward)(const SparseKDParams&, Stream...)) {
  static const std::string doc = docstring<Stream...>(
      "Sparse (top-k teacher) KD: row losses and, if grad_ptr != 0, their gradients w.r.t. the\n"
      "student logits (see csrc/common/sparse_kd.h). The student's logit transform z' = scale * z,\n"
      "or softcap c > 0: c * tanh(scale * z / c) (0: none); the gradient is divided by the 0-dim\n"
      "grad_divisor (loss type) when grad_divisor_ptr != 0.");
  m.def(
      "sparse_kd_forward",
      [sparse_kd_forward](uintptr_t student, uintptr_t topk_logprobs, uintptr_t topk_indices, uintptr_t labels,
                          uintptr_t loss, uintptr_t grad, int64_t n_rows, int64_t vocab, int64_t k,
                          int64_t student_stride, int64_t grad_stride, int dtype, int divergence,
                          double temperature, double beta, double hard_weight, double soft_weight,
                          int64_t ignore_index, bool bucket, Stream... stream, double student_scale,
                          double student_softcap, uintptr_t grad_divisor) {
        const char* fn = "sparse_kd_forward";
        check(dtype >= kFloat32 && dtype <= kFloat64, fn, "unknown dtype code " + std::to_string(dtype));
        check(divergence >= kForwardKL && divergence <= kTVD, fn,
              "unknown divergence code " + std::to_string(divergence));
        check(n_rows >= 0 && vocab >= 1 && k >= 1 && k <= vocab, fn, "bad shape");
        check(temperature > 0, fn, "temperature must be > 0");
        check(n_rows == 0 || (student && topk_logprobs && topk_indices && loss), fn, "null pointer");
        check(!grad || grad_stride >= vocab, fn, "grad rows overlap");
        check(std::isfinite(student_scale) && student_scale > 0, fn, "student_scale must be finite and > 0");
        check(std::isfinite(student_softcap) && student_softcap >= 0, fn,
              "student_softcap must be finite and > 0 (0: none)");
        SparseKDParams p{cptr(student), cptr(topk_logprobs), reinterpret_cast<const int32_t*>(topk_indices),
                               reinterpret_cast<const int64_t*>(labels), mptr(loss), mptr(grad),
                               n_rows, vocab, k, student_stride, grad_stride, dtype, divergence,
                               temperature, beta, hard_weight, soft_weight, ignore_index, bucket};
        p.student_scale = student_scale;
        p.student_softcap = student_softcap;
        p.grad_divisor = cptr(grad_divisor);
        py::gil_scoped_release no_gil;
        sparse_kd_forward(p, stream...);
      },
      doc.c_str(), py::arg("student_ptr"), py::arg("topk_logprobs_ptr"), py::arg("topk_indices_ptr"),
      py::arg("labels_ptr"), py::arg("loss_ptr"), py::arg("grad_ptr"), py::arg("n_rows"), py::arg("vocab"),
      py::arg("k"), py::arg("student_stride"), py::arg("grad_stride"), py::arg("dtype"), py::arg("divergence"),
      py::arg("temperature"), py::arg("beta"), py::arg("hard_weight"), py::arg("soft_weight"),
      py::arg("ignore_index"), py::arg("bucket"), stream_arg<Stream>()..., py::arg("student_scale") = 1.0,
      py::arg("student_softcap") = 0.0, py::arg("grad_divisor_ptr") = 0);
}

}  // namespace bindings
}  // namespace kdops
