// attention_relation_forward / attention_relation_backward: the Python signatures of the
// attention-relation kernels (common/attention_relation.h), on both modules (the convention:
// bindings/common.h).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "common/attention_relation.h"
#include "common/codes.h"

namespace kdops {
namespace bindings {

using Strides = std::array<int64_t, 3>;  // b, h, l strides of a [B, H, L, d] input, in elements

inline AttentionRelationParams attention_relation_params(
    const char* fn, uintptr_t sa, uintptr_t sb, uintptr_t ta, uintptr_t tb, uintptr_t counted, int64_t batch,
    int64_t heads, int64_t length, int64_t student_dim, int64_t teacher_dim, const Strides& sa_stride,
    const Strides& sb_stride, const Strides& ta_stride, const Strides& tb_stride, bool causal, int dtype,
    int divergence, double temperature, double beta) {
  check(dtype >= kFloat32 && dtype <= kFloat64, fn, "unknown dtype code " + std::to_string(dtype));
  check(divergence >= kForwardKL && divergence <= kTVD, fn, "unknown divergence code " + std::to_string(divergence));
  check(batch >= 0 && heads >= 0 && length >= 0 && student_dim >= 1 && teacher_dim >= 1, fn, "bad shape");
  check(temperature > 0, fn, "temperature must be > 0");
  check(batch * heads * length == 0 || (sa && sb && ta && tb), fn, "null input pointer");
  AttentionRelationParams p{};
  p.student_a = cptr(sa);
  p.student_b = cptr(sb);
  p.teacher_a = cptr(ta);
  p.teacher_b = cptr(tb);
  p.batch = batch;
  p.heads = heads;
  p.length = length;
  p.student_dim = student_dim;
  p.teacher_dim = teacher_dim;
  for (int k = 0; k < 3; ++k) {
    p.sa_stride[k] = sa_stride[k];
    p.sb_stride[k] = sb_stride[k];
    p.ta_stride[k] = ta_stride[k];
    p.tb_stride[k] = tb_stride[k];
  }
  p.counted = static_cast<const uint8_t*>(cptr(counted));
  p.causal = causal;
  p.dtype = dtype;
  p.divergence = divergence;
  p.temperature = temperature;
  p.beta = beta;
  return p;
}

// Registers the two functions on m.
template <typename... Stream>
void def_attention_relation(py::module_& m, void (*forward)(const AttentionRelationParams&, Stream...),
                            void (*backward)(const AttentionRelationParams&, Stream...)) {
  static const std::string forward_doc = docstring<Stream...>(
      "Row losses [B, H, L] and row statistics [3, B, H, L] (float; double for float64)\n"
      "of [B, H, L, d] inputs (strides: b, h, l in elements; unit stride on d).");
  static const std::string backward_doc = docstring<Stream...>(
      "dL/d student_a and dL/d student_b [B, H, L, ds] (student dtype, contiguous) from the\n"
      "contiguous [B, H, L] gradient of the row losses and the forward's statistics.");
  m.def(
      "attention_relation_forward",
      [=](uintptr_t sa, uintptr_t sb, uintptr_t ta, uintptr_t tb, uintptr_t counted, uintptr_t rows,
          uintptr_t stats, int64_t batch, int64_t heads, int64_t length, int64_t student_dim, int64_t teacher_dim,
          Strides sa_stride, Strides sb_stride, Strides ta_stride, Strides tb_stride, bool causal, int dtype,
          int divergence, double temperature, double beta, Stream... stream) {
        AttentionRelationParams p = attention_relation_params(
            "attention_relation_forward", sa, sb, ta, tb, counted, batch, heads, length, student_dim, teacher_dim,
            sa_stride, sb_stride, ta_stride, tb_stride, causal, dtype, divergence, temperature, beta);
        check(batch * heads * length == 0 || (rows && stats), "attention_relation_forward", "null output pointer");
        p.rows = mptr(rows);
        p.stats = mptr(stats);
        py::gil_scoped_release no_gil;
        forward(p, stream...);
      },
      forward_doc.c_str(),
      py::arg("student_a_ptr"), py::arg("student_b_ptr"), py::arg("teacher_a_ptr"), py::arg("teacher_b_ptr"),
      py::arg("counted_ptr"), py::arg("rows_ptr"), py::arg("stats_ptr"), py::arg("batch"), py::arg("heads"),
      py::arg("length"), py::arg("student_dim"), py::arg("teacher_dim"), py::arg("student_a_stride"),
      py::arg("student_b_stride"), py::arg("teacher_a_stride"), py::arg("teacher_b_stride"), py::arg("causal"),
      py::arg("dtype"), py::arg("divergence"), py::arg("temperature"), py::arg("beta"), stream_arg<Stream>()...);
  m.def(
      "attention_relation_backward",
      [=](uintptr_t grad_rows, uintptr_t sa, uintptr_t sb, uintptr_t ta, uintptr_t tb, uintptr_t counted,
          uintptr_t stats, uintptr_t da, uintptr_t db, int64_t batch, int64_t heads, int64_t length,
          int64_t student_dim, int64_t teacher_dim, Strides sa_stride, Strides sb_stride, Strides ta_stride,
          Strides tb_stride, bool causal, int dtype, int divergence, double temperature, double beta,
          Stream... stream) {
        AttentionRelationParams p = attention_relation_params(
            "attention_relation_backward", sa, sb, ta, tb, counted, batch, heads, length, student_dim, teacher_dim,
            sa_stride, sb_stride, ta_stride, tb_stride, causal, dtype, divergence, temperature, beta);
        check(batch * heads * length == 0 || (grad_rows && stats && da && db), "attention_relation_backward",
              "null pointer");
        p.grad_rows = cptr(grad_rows);
        p.stats = mptr(stats);
        p.da = mptr(da);
        p.db = mptr(db);
        py::gil_scoped_release no_gil;
        backward(p, stream...);
      },
      backward_doc.c_str(),
      py::arg("grad_rows_ptr"), py::arg("student_a_ptr"), py::arg("student_b_ptr"), py::arg("teacher_a_ptr"),
      py::arg("teacher_b_ptr"), py::arg("counted_ptr"), py::arg("stats_ptr"), py::arg("da_ptr"), py::arg("db_ptr"),
      py::arg("batch"), py::arg("heads"), py::arg("length"), py::arg("student_dim"), py::arg("teacher_dim"),
      py::arg("student_a_stride"), py::arg("student_b_stride"), py::arg("teacher_a_stride"),
      py::arg("teacher_b_stride"), py::arg("causal"), py::arg("dtype"), py::arg("divergence"), py::arg("temperature"),
      py::arg("beta"), stream_arg<Stream>()...);
}

}  // namespace bindings
}  // namespace kdops
