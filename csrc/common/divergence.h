// The divergence math of kdops, written once for the CPU and CUDA kernels.
//
// A row's kernel works in three passes over the vocabulary (see kd_row_loss in the kernels):
//   1. online max and sums: lse_s = logsumexp(s / T), lse_t = logsumexp(t / T), lse_1 = logsumexp(s)
//   2. for each element, with ls = s/T - lse_s and lt = t/T - lse_t (log-probabilities),
//      term(ls, lt) gives d (its contribution to the divergence D) and q = p_s * dD/dp_s (up to a
//      per-row constant); accumulate D = sum d and S = sum q.  Skipped for forward KL, whose
//      S = -1 is known, so that D is accumulated in pass 3.
//   3. dD/d(s_i) = (q_i - p_s_i * S) / T  (the softmax Jacobian applied to dD/dp_s).
// The divergence codes are those of common/codes.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"
#include "common/macros.h"

namespace kdops {

// Divergences whose S in pass 2 is known in advance (pass 2 is skipped): forward KL (S = -1) and
// the kd family's hard target (q = -onehot(argmax p_t), S = -1).
KD_HD constexpr bool needs_sum_pass(int div) { return div != kForwardKL && div != kHard; }

template <typename acc_t>
struct Term {
  acc_t d;  // contribution to the divergence
  acc_t q;  // p_s * dD/dp_s, up to a per-row constant times p_s
};

// The per-element transcendentals of the terms, resolved in std so that float stays float on the
// host.  Kernels may pass their own (e.g. vectorizable) versions with the same interface.
struct StdMath {
  template <typename acc_t>
  KD_HD static acc_t exp(acc_t x) {
    using std::exp;
    return exp(x);
  }
  template <typename acc_t>
  KD_HD static acc_t log1p(acc_t x) {
    using std::log1p;
    return log1p(x);
  }
};

// log(exp(a) + exp(b)), exact for -inf arguments.
template <typename Math = StdMath, typename acc_t>
KD_HD acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t hi = a > b ? a : b;
  const acc_t lo = a > b ? b : a;
  if (hi == -INFINITY) return hi;
  return hi + Math::log1p(Math::exp(lo - hi));
}

// p * x for the probability p = exp(lp), masked on lp, not on the rounded p: 0 where p = 0
// (lp = -inf) whatever x; +inf where x = +inf (a log-ratio against a zero probability) and
// lp > -inf, also where exp(lp) underflows to 0.  (Two selects: gcc 12 vectorizes no && select.)
template <typename acc_t>
KD_HD acc_t times(acc_t lp, acc_t p, acc_t x) {
  const acc_t px = x == acc_t(INFINITY) ? acc_t(INFINITY) : p * x;
  return lp > acc_t(-INFINITY) ? px : acc_t(0);
}

// Per-row constants of a divergence's mixture: log(beta) and log(1 - beta).
template <typename acc_t>
struct MixWeights {
  acc_t log_b, log_1mb;
  KD_HD explicit MixWeights(acc_t beta)
      : log_b(beta > acc_t(0) ? std::log(beta) : acc_t(-INFINITY)),
        log_1mb(std::log(acc_t(1) - beta)) {}
};

// The per-element term of divergence DIV at student / teacher log-probabilities ls, lt.
template <int DIV, typename acc_t, typename Math = StdMath>
KD_HD Term<acc_t> divergence_term(acc_t ls, acc_t lt, acc_t beta, const MixWeights<acc_t>& w) {
  const acc_t ps = Math::exp(ls), pt = Math::exp(lt);
  Term<acc_t> r;
  if (DIV == kForwardKL) {
    r.d = times(lt, pt, lt - ls);
    r.q = -pt;
  } else if (DIV == kReverseKL) {
    r.d = times(ls, ps, ls - lt);
    r.q = r.d;
  } else if (DIV == kJSD) {  // M = b p_t + (1 - b) p_s
    const acc_t lm = log_add_exp<Math>(w.log_b + lt, w.log_1mb + ls);
    const acc_t qs = times(ls, ps, ls - lm);
    r.d = beta * times(lt, pt, lt - lm) + (acc_t(1) - beta) * qs;
    r.q = (acc_t(1) - beta) * qs;
  } else if (DIV == kSkewForwardKL) {  // M = b p_t + (1 - b) p_s
    const acc_t lm = log_add_exp<Math>(w.log_b + lt, w.log_1mb + ls);
    r.d = times(lt, pt, lt - lm);
    // q = -(1 - b) p_s p_t / M in log space, exact where p_s, p_t and M underflow (masked on
    // ls > -inf, not p_s > 0); at b = 0, ls - lm = 0 exactly: forward KL's q = -p_t
    r.q = ls > acc_t(-INFINITY) ? -(acc_t(1) - beta) * Math::exp(lt + (ls - lm)) : acc_t(0);
  } else if (DIV == kSkewReverseKL) {  // M = b p_s + (1 - b) p_t
    const acc_t lm = log_add_exp<Math>(w.log_b + ls, w.log_1mb + lt);
    r.d = times(ls, ps, ls - lm);
    // b p_s / M: in [0, 1] for b > 0; 0 at b = 0, also where M = p_t = 0 (0 * inf is NaN)
    r.q = times(ls, ps, ls - lm - (beta > acc_t(0) ? beta * Math::exp(ls - lm) : acc_t(0)));
  } else {  // kTVD
    const acc_t diff = ps - pt;
    r.d = acc_t(0.5) * (diff < acc_t(0) ? -diff : diff);
    r.q = diff > acc_t(0) ? acc_t(0.5) * ps : (diff < acc_t(0) ? acc_t(-0.5) * ps : acc_t(0));
  }
  return r;
}

}  // namespace kdops
