// A model's final-logit transform, applied by the kernels to the logits they read, before the
// temperature (the math of kdops/ops/_chunked.py LogitTransform and
// kdops/backends/triton/logit_transform.py):
//   z' = scale * z                        (softcap 0: none; Cohere, Granite, Falcon-H1)
//   z' = c * tanh(scale * z / c)          (softcap c > 0: Gemma 2/3 final-logit softcapping)
//   dz'/dz = scale * (1 - (z'/c)^2)       (from the transformed value; scale without a softcap)
// scale > 0 (checked in Python): a -inf logit stays -inf under a scale and becomes -c under a
// softcap (tanh(-inf) = -1, slope 0), as torch.tanh in the reference.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace kdops {

template <typename acc_t>
struct LogitTransform {
  acc_t scale = acc_t(1);
  acc_t softcap = acc_t(0);  // 0: no softcap

  KD_HD bool identity() const { return scale == acc_t(1) && softcap == acc_t(0); }

  KD_HD acc_t apply(acc_t z) const {
    const acc_t y = z * scale;
    return softcap > acc_t(0) ? softcap * std::tanh(y / softcap) : y;
  }

  // dz'/dz at the transformed logit z_transformed = apply(z).
  KD_HD acc_t slope(acc_t z_transformed) const {
    if (softcap > acc_t(0)) {
      const acc_t x = z_transformed / softcap;
      return scale * (acc_t(1) - x * x);
    }
    return scale;
  }
};

}  // namespace kdops
