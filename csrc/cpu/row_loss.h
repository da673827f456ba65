// What the CPU row kernels of the kd and sparse kd losses share: the rows that need no pass over
// the logits (written whole: the loss and, with GRAD, every gradient element).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace kdops {

// Writes `value` as the row's loss and (GRAD) every element of its gradient g[0:V].
template <typename T, bool GRAD, typename acc_t>
void fill_row(acc_t& loss, T* g, int64_t V, acc_t value) {
  loss = value;
  if constexpr (GRAD) std::fill(g, g + V, from_acc<T>(value));
}

// Whether the row's label decides it alone, and then writes it: a label equal to ignore_index
// (labels given) is loss 0 and a zero gradient; with the hard-label term (HARD) a label outside
// [0, V) is a NaN row (that label is never read).
template <typename T, bool HARD, bool GRAD, typename acc_t>
bool label_decides_row(bool has_labels, int64_t label, int64_t ignore_index, int64_t V, acc_t& loss, T* g) {
  if (has_labels && label == ignore_index) {
    fill_row<T, GRAD>(loss, g, V, acc_t(0));
    return true;
  }
  if (HARD && (label < 0 || label >= V)) {
    fill_row<T, GRAD>(loss, g, V, acc_t(NAN));
    return true;
  }
  return false;
}

}  // namespace kdops
