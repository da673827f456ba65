// kd_forward: the Python signature of the fused KD kernels (common/kd.h), on both modules (the
// convention: bindings/common.h).
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "common/codes.h"
#include "common/kd.h"

namespace kdops {
namespace bindings {

// kd_forward(student_ptr, ..., ignore_index, [stream,] n_teachers=1, teacher_k_stride=0,
// teacher_log_weights_ptr=0, student_scale=1, student_softcap=0, teacher_scale=1,
// teacher_softcap=0, grad_divisor_ptr=0) -> None.
template <typename... Stream>
void def_kd(py::module_& m, void (*kd_forward)(const KDParams&, Stream...)) {
  static const std::string doc = docstring<Stream...>(
      "Row losses [n_rows] (float, double for float64) and, if grad_ptr != 0, their gradients\n"
      "w.r.t. the student logits, written to the buffers at the given addresses. Pointer\n"
      "arguments are data addresses (0: none); strides are row strides in elements; K > 1\n"
      "teachers: teacher k's rows start at teacher_ptr + k * teacher_k_stride elements. Logit\n"
      "transforms z' = scale * z, or softcap c > 0: c * tanh(scale * z / c) (0: none); the\n"
      "gradient is divided by the 0-dim grad_divisor (loss type) when grad_divisor_ptr != 0.");
  m.def(
      "kd_forward",
      [kd_forward](uintptr_t student, uintptr_t teacher, uintptr_t labels, uintptr_t loss, uintptr_t grad,
                   int64_t n_rows, int64_t vocab, int64_t student_stride, int64_t teacher_stride,
                   int64_t grad_stride, int dtype, int divergence, double temperature, double beta,
                   double hard_weight, double soft_weight, int64_t ignore_index, Stream... stream,
                   int64_t n_teachers, int64_t teacher_k_stride, uintptr_t teacher_log_weights,
                   double student_scale, double student_softcap, double teacher_scale, double teacher_softcap,
                   uintptr_t grad_divisor) {
        const char* fn = "kd_forward";
        check(dtype >= kFloat32 && dtype <= kFloat64, fn, "unknown dtype code " + std::to_string(dtype));
        check(divergence >= kForwardKL && divergence <= kHard, fn,
              "unknown divergence code " + std::to_string(divergence));
        check(n_rows >= 0 && vocab >= 0, fn, "negative shape");
        check(temperature > 0, fn, "temperature must be > 0");
        check(n_rows == 0 || (student && teacher && loss), fn, "null logits or loss pointer");
        check(!grad || grad_stride >= vocab, fn, "grad rows overlap");
        check(n_teachers >= 1, fn, "n_teachers must be >= 1");
        check(n_teachers == 1 || n_rows == 0 || teacher_log_weights, fn, "null teacher_log_weights pointer");
        check(std::isfinite(student_scale) && student_scale > 0, fn, "student_scale must be finite and > 0");
        check(std::isfinite(teacher_scale) && teacher_scale > 0, fn, "teacher_scale must be finite and > 0");
        check(std::isfinite(student_softcap) && student_softcap >= 0, fn,
              "student_softcap must be finite and > 0 (0: none)");
        check(std::isfinite(teacher_softcap) && teacher_softcap >= 0, fn,
              "teacher_softcap must be finite and > 0 (0: none)");
        KDParams p{cptr(student), cptr(teacher), reinterpret_cast<const int64_t*>(labels), mptr(loss), mptr(grad),
                   n_rows, vocab, student_stride, teacher_stride, grad_stride,
                   dtype, divergence, temperature, beta, hard_weight, soft_weight, ignore_index};
        p.n_teachers = n_teachers;
        p.teacher_k_stride = teacher_k_stride;
        p.teacher_log_weights = cptr(teacher_log_weights);
        p.student_scale = student_scale;
        p.student_softcap = student_softcap;
        p.teacher_scale = teacher_scale;
        p.teacher_softcap = teacher_softcap;
        p.grad_divisor = cptr(grad_divisor);
        py::gil_scoped_release no_gil;
        kd_forward(p, stream...);
      },
      doc.c_str(), py::arg("student_ptr"), py::arg("teacher_ptr"), py::arg("labels_ptr"), py::arg("loss_ptr"),
      py::arg("grad_ptr"), py::arg("n_rows"), py::arg("vocab"), py::arg("student_stride"),
      py::arg("teacher_stride"), py::arg("grad_stride"), py::arg("dtype"), py::arg("divergence"),
      py::arg("temperature"), py::arg("beta"), py::arg("hard_weight"), py::arg("soft_weight"),
      py::arg("ignore_index"), stream_arg<Stream>()..., py::arg("n_teachers") = 1,
      py::arg("teacher_k_stride") = 0, py::arg("teacher_log_weights_ptr") = 0, py::arg("student_scale") = 1.0,
      py::arg("student_softcap") = 0.0, py::arg("teacher_scale") = 1.0, py::arg("teacher_softcap") = 0.0,
      py::arg("grad_divisor_ptr") = 0);
}

}  // namespace bindings
}  // namespace kdops
