// Every code and constant the kernels share with Python: equal to kdops/_codes.py (checked by
// tests/test_codes.py, which parses this file: keep one `name = value,` or
// `constexpr double name = value;` per line).
#pragma once

namespace kdops {

// Element dtype of a pointer (kdops._codes.DTYPE_CODES).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

// Soft-target divergences (the index in kdops._codes.DIVERGENCES), then the kd family's DeiT
// hard target (kdops._codes.KD_DIVERGENCES: cross-entropy against the teacher's argmax).
enum Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kHard = 6,
};

// Affinity kinds (the index in kdops._codes.AFFINITY_KINDS).
enum AffinityKind : int {
  kDot = 0,
  kCosine = 1,
  kEuclidean = 2,
  kSquaredEuclidean = 3,
};

// Relation losses (kdops._codes.SP, RKD_DISTANCE, RKD_ANGLE).
enum RelationLoss : int {
  kSP = 0,
  kRKDDistance = 1,
  kRKDAngle = 2,
};

// Relation-based epsilons (kdops._codes): norms below kNormEps are clamped, squared norms /
// distances below kNormEps2 count as 0, squared distances are clamped to kDistEps2 before the
// square root.
constexpr double kNormEps = 1e-12;
constexpr double kNormEps2 = 1e-24;
constexpr double kDistEps2 = 1e-12;
// A pair's squared distance d2 (of centred features) is recomputed from the difference x_i - x_j
// where d2 < kClosePairRatio * (|x_i|^2 + |x_j|^2): the Gram form cancels there.
constexpr double kClosePairRatio = 0.0009765625;  // 2^-10

}  // namespace kdops
