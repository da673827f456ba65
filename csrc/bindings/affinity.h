// affinity_forward / affinity_backward / relation_forward / relation_backward: the Python
// signatures of the relation-based kernels (common/affinity.h), on both modules (the convention:
// bindings/common.h).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "common/affinity.h"
#include "common/codes.h"

namespace kdops {
namespace bindings {

inline void check_features(const char* fn, int64_t batch, int64_t dim, int dtype) {
  check(dtype >= kFloat32 && dtype <= kFloat64, fn, "unknown dtype code " + std::to_string(dtype));
  check(batch >= 0 && dim >= 1, fn, "bad shape");
}

// The checked params of an affinity of x [B, D] (row stride x_stride) of kind `kind`.
inline AffinityParams affinity_params(const char* fn, uintptr_t x, int64_t batch, int64_t dim, int64_t x_stride,
                                      int dtype, int kind) {
  check_features(fn, batch, dim, dtype);
  check(kind >= kDot && kind <= kSquaredEuclidean, fn, "unknown kind " + std::to_string(kind));
  AffinityParams p{};
  p.x = cptr(x);
  p.batch = batch;
  p.dim = dim;
  p.x_stride = x_stride;
  p.dtype = dtype;
  p.kind = kind;
  return p;
}

// Registers the four functions on m.
template <typename... Stream>
void def_affinity(py::module_& m, void (*affinity_fwd)(const AffinityParams&, Stream...),
                  void (*affinity_bwd)(const AffinityParams&, Stream...),
                  void (*relation_fwd)(const RelationParams&, Stream...),
                  void (*relation_bwd)(const RelationParams&, Stream...)) {
  m.def(
      "affinity_forward",
      [=](uintptr_t x, uintptr_t out, int64_t batch, int64_t dim, int64_t x_stride, int64_t out_stride, int dtype,
          int kind, Stream... stream) {
        AffinityParams p = affinity_params("affinity_forward", x, batch, dim, x_stride, dtype, kind);
        p.out = mptr(out);
        p.out_stride = out_stride;
        py::gil_scoped_release no_gil;
        affinity_fwd(p, stream...);
      },
      "A [B, B] (float; double for float64) of the rows of x [B, D] into out.", py::arg("x_ptr"),
      py::arg("out_ptr"), py::arg("batch"), py::arg("dim"), py::arg("x_stride"), py::arg("out_stride"),
      py::arg("dtype"), py::arg("kind"), stream_arg<Stream>()...);
  m.def(
      "affinity_backward",
      [=](uintptr_t grad, int64_t grad_stride0, int64_t grad_stride1, uintptr_t x, uintptr_t affinity,
          int64_t affinity_stride, uintptr_t dx, int64_t batch, int64_t dim, int64_t x_stride, int dtype, int kind,
          Stream... stream) {
        AffinityParams p = affinity_params("affinity_backward", x, batch, dim, x_stride, dtype, kind);
        p.out_stride = affinity_stride;
        p.grad = cptr(grad);
        p.grad_stride0 = grad_stride0;
        p.grad_stride1 = grad_stride1;
        p.affinity = cptr(affinity);
        p.dx = mptr(dx);
        py::gil_scoped_release no_gil;
        affinity_bwd(p, stream...);
      },
      "dL/dx [B, D] (x dtype, contiguous) from grad = dL/dA (accumulation dtype, any strides) and A.",
      py::arg("grad_ptr"), py::arg("grad_stride0"), py::arg("grad_stride1"), py::arg("x_ptr"),
      py::arg("affinity_ptr"), py::arg("affinity_stride"), py::arg("dx_ptr"), py::arg("batch"), py::arg("dim"),
      py::arg("x_stride"), py::arg("dtype"), py::arg("kind"), stream_arg<Stream>()...);
  const auto relation = [=](uintptr_t student, uintptr_t teacher, int64_t batch, int64_t student_dim,
                            int64_t teacher_dim, int64_t student_stride, int64_t teacher_stride, int dtype, int loss,
                            double beta) {
    check_features("relation", batch, student_dim, dtype);
    check(teacher_dim >= 1, "relation", "bad teacher shape");
    check(loss >= kSP && loss <= kRKDAngle, "relation", "unknown loss code " + std::to_string(loss));
    check(batch >= (loss == kSP ? 1 : loss == kRKDDistance ? 2 : 3), "relation", "batch too small");
    check(beta >= 0, "relation", "beta must be >= 0");
    RelationParams p{};
    p.student = cptr(student);
    p.teacher = cptr(teacher);
    p.batch = batch;
    p.student_dim = student_dim;
    p.teacher_dim = teacher_dim;
    p.student_stride = student_stride;
    p.teacher_stride = teacher_stride;
    p.dtype = dtype;
    p.loss = loss;
    p.beta = beta;
    return p;
  };
  m.def(
      "relation_forward",
      [=](uintptr_t student, uintptr_t teacher, uintptr_t loss_out, uintptr_t stats, int64_t batch,
          int64_t student_dim, int64_t teacher_dim, int64_t student_stride, int64_t teacher_stride, int dtype,
          int loss, double beta, Stream... stream) {
        RelationParams p = relation(student, teacher, batch, student_dim, teacher_dim, student_stride,
                                    teacher_stride, dtype, loss, beta);
        p.loss_out = mptr(loss_out);
        p.stats = mptr(stats);
        py::gil_scoped_release no_gil;
        relation_fwd(p, stream...);
      },
      "The 0-d loss (accumulation dtype) of SP / RKD-D / RKD-A and the stats for the backward.",
      py::arg("student_ptr"), py::arg("teacher_ptr"), py::arg("loss_ptr"), py::arg("stats_ptr"), py::arg("batch"),
      py::arg("student_dim"), py::arg("teacher_dim"), py::arg("student_stride"), py::arg("teacher_stride"),
      py::arg("dtype"), py::arg("loss"), py::arg("beta"), stream_arg<Stream>()...);
  m.def(
      "relation_backward",
      [=](uintptr_t grad, uintptr_t student, uintptr_t teacher, uintptr_t stats, uintptr_t dx, int64_t batch,
          int64_t student_dim, int64_t teacher_dim, int64_t student_stride, int64_t teacher_stride, int dtype,
          int loss, double beta, Stream... stream) {
        RelationParams p = relation(student, teacher, batch, student_dim, teacher_dim, student_stride,
                                    teacher_stride, dtype, loss, beta);
        p.grad = cptr(grad);
        p.stats = mptr(stats);
        p.dx = mptr(dx);
        py::gil_scoped_release no_gil;
        relation_bwd(p, stream...);
      },
      "dL/dstudent [B, Ds] (student dtype, contiguous) from the 0-d grad and the forward's stats.",
      py::arg("grad_ptr"), py::arg("student_ptr"), py::arg("teacher_ptr"), py::arg("stats_ptr"), py::arg("dx_ptr"),
      py::arg("batch"), py::arg("student_dim"), py::arg("teacher_dim"), py::arg("student_stride"),
      py::arg("teacher_stride"), py::arg("dtype"), py::arg("loss"), py::arg("beta"), stream_arg<Stream>()...);
}

}  // namespace bindings
}  // namespace kdops
