// What the two native modules (kdops._C and kdops._C_cuda) share: kd_forward's Python signature,
// its argument checks, and the launch with the GIL released.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/divergence.h"
#include "common/kd.h"
#include "common/sparse_kd.h"

namespace kdops {

namespace py = pybind11;

inline void check(bool ok, const std::string& what) {
  if (!ok) throw py::value_error("kdops.kd_forward: " + what);
}

// Registers kd_forward(student_ptr, ..., ignore_index, *extra, n_teachers=1, teacher_k_stride=0,
// teacher_log_weights_ptr=0) -> None on module m, running
// launch(params, *extra) without the GIL; extra_args names the trailing launch arguments.
template <typename... Extra, typename... ExtraArgs>
void def_kd_forward(py::module_& m, void (*launch)(const KDParams&, Extra...), const char* doc,
                    ExtraArgs... extra_args) {
  m.def(
      "kd_forward",
      [launch](uintptr_t student, uintptr_t teacher, uintptr_t labels, uintptr_t loss,
               uintptr_t grad, int64_t n_rows, int64_t vocab, int64_t student_stride,
               int64_t teacher_stride, int64_t grad_stride, int dtype, int divergence,
               double temperature, double beta, double hard_weight, double soft_weight,
               int64_t ignore_index, Extra... extra, int64_t n_teachers, int64_t teacher_k_stride,
               uintptr_t teacher_log_weights) {
        check(dtype >= kFloat32 && dtype <= kFloat64,
              "unknown dtype code " + std::to_string(dtype));
        check(divergence >= kForwardKL && divergence <= kTVD,
              "unknown divergence code " + std::to_string(divergence));
        check(n_rows >= 0 && vocab >= 0, "negative shape");
        check(temperature > 0, "temperature must be > 0");
        check(n_rows == 0 || (student && teacher && loss), "null logits or loss pointer");
        check(!grad || grad_stride >= vocab, "grad rows overlap");
        check(n_teachers >= 1, "n_teachers must be >= 1");
        check(n_teachers == 1 || n_rows == 0 || teacher_log_weights, "null teacher_log_weights pointer");
        KDParams p{reinterpret_cast<const void*>(student),
                   reinterpret_cast<const void*>(teacher),
                   reinterpret_cast<const int64_t*>(labels),
                   reinterpret_cast<void*>(loss),
                   reinterpret_cast<void*>(grad),
                   n_rows, vocab, student_stride, teacher_stride, grad_stride,
                   dtype, divergence, temperature, beta, hard_weight, soft_weight,
                   ignore_index};
        p.n_teachers = n_teachers;
        p.teacher_k_stride = teacher_k_stride;
        p.teacher_log_weights = reinterpret_cast<const void*>(teacher_log_weights);
        py::gil_scoped_release no_gil;
        launch(p, extra...);
      },
      doc, py::arg("student_ptr"), py::arg("teacher_ptr"), py::arg("labels_ptr"),
      py::arg("loss_ptr"), py::arg("grad_ptr"), py::arg("n_rows"), py::arg("vocab"),
      py::arg("student_stride"), py::arg("teacher_stride"), py::arg("grad_stride"),
      py::arg("dtype"), py::arg("divergence"), py::arg("temperature"), py::arg("beta"),
      py::arg("hard_weight"), py::arg("soft_weight"), py::arg("ignore_index"), extra_args...,
      py::arg("n_teachers") = 1, py::arg("teacher_k_stride") = 0,
      py::arg("teacher_log_weights_ptr") = 0);
}

// Registers sparse_kd_forward(student_ptr, ..., bucket, *extra) -> None on module m, running
// launch(params, *extra) without the GIL (see common/sparse_kd.h).
template <typename... Extra, typename... ExtraArgs>
void def_sparse_kd_forward(py::module_& m, void (*launch)(const SparseKDParams&, Extra...),
                           const char* doc, ExtraArgs... extra_args) {
  m.def(
      "sparse_kd_forward",
      [launch](uintptr_t student, uintptr_t topk_logprobs, uintptr_t topk_indices,
               uintptr_t labels, uintptr_t loss, uintptr_t grad, int64_t n_rows, int64_t vocab,
               int64_t k, int64_t student_stride, int64_t grad_stride, int dtype, int divergence,
               double temperature, double beta, double hard_weight, double soft_weight,
               int64_t ignore_index, bool bucket, Extra... extra) {
        check(dtype >= kFloat32 && dtype <= kFloat64, "unknown dtype code " + std::to_string(dtype));
        check(divergence >= kForwardKL && divergence <= kTVD,
              "unknown divergence code " + std::to_string(divergence));
        check(n_rows >= 0 && vocab >= 1 && k >= 1 && k <= vocab, "bad shape");
        check(temperature > 0, "temperature must be > 0");
        check(n_rows == 0 || (student && topk_logprobs && topk_indices && loss), "null pointer");
        check(!grad || grad_stride >= vocab, "grad rows overlap");
        const SparseKDParams p{reinterpret_cast<const void*>(student),
                               reinterpret_cast<const void*>(topk_logprobs),
                               reinterpret_cast<const int32_t*>(topk_indices),
                               reinterpret_cast<const int64_t*>(labels),
                               reinterpret_cast<void*>(loss),
                               reinterpret_cast<void*>(grad),
                               n_rows, vocab, k, student_stride, grad_stride, dtype, divergence,
                               temperature, beta, hard_weight, soft_weight, ignore_index, bucket};
        py::gil_scoped_release no_gil;
        launch(p, extra...);
      },
      doc, py::arg("student_ptr"), py::arg("topk_logprobs_ptr"), py::arg("topk_indices_ptr"),
      py::arg("labels_ptr"), py::arg("loss_ptr"), py::arg("grad_ptr"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("k"), py::arg("student_stride"), py::arg("grad_stride"),
      py::arg("dtype"), py::arg("divergence"), py::arg("temperature"), py::arg("beta"),
      py::arg("hard_weight"), py::arg("soft_weight"), py::arg("ignore_index"), py::arg("bucket"),
      extra_args...);
}

}  // namespace kdops
