// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Sparse optimizer row updates, applied in place to a table row. Torch-free.
//
// Each update reads one row's summed gradient g (dim,) and updates the
// embedding w (dim,) and the optimizer state that follows it in the row.
// Semantics (checked against the references in tests/):
//   kSGD              w -= lr * g                          (torch.optim.SGD)
//   kAdagrad          s += g^2; w -= lr * g / (sqrt(s) + eps)  (torch.optim.Adagrad)
//   kRowWiseAdagrad   m += mean(g^2); w -= lr / (sqrt(m) + eps) * g
//                     (FBGEMM EXACT_ROWWISE_ADAGRAD, one state float per row)
//   kAdam             lazy Adam of torch.optim.SparseAdam:
//                     m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//                     w -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)
//   kLarsSgd          FBGEMM's LARS_SGD: a = lr * eta * ||w|| / (||g|| + wd ||w||);
//                     mom = momentum * mom + a * (g + wd w); w -= mom
//   kLamb             FBGEMM's LAMB: m, v as Adam; r = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + wd w;
//                     w -= lr * (||w|| / ||r||) * r, the norms over the row (the old w)
// Weight decay (FBGEMM's WeightDecayMode): kL2 adds wd * w to g first;
// kDecoupled multiplies w by (1 - lr * wd) first (AdamW). Both only touch rows
// that receive a gradient, as every sparse optimizer does.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#include "hash.h"  // RECIS_HD

namespace recis {
namespace hashtable {

// Every optimizer, declared once: X(enum name, code, Python name). The enum,
// the codes Python reads (ops/constants.py) and the dispatch below come from it.
#define RECIS_OPTIMIZERS(X)                   \
  X(kSGD, 0, "sgd")                           \
  X(kAdagrad, 1, "adagrad")                   \
  X(kRowWiseAdagrad, 2, "rowwise_adagrad")    \
  X(kAdam, 3, "adam")                         \
  X(kLamb, 4, "lamb")                         \
  X(kLarsSgd, 5, "lars_sgd")                  \
  X(kPartialRowWiseAdam, 6, "partial_rowwise_adam") \
  X(kPartialRowWiseLamb, 7, "partial_rowwise_lamb")

// Every hyperparameter an update reads, declared once: X(OptimParams field, FBGEMM's
// fused_params name). The ops take them as one float[] in this order; Python reads the
// names from C.constants()["hyperparameters"] (recis_torchrec/optim/registry.py gives
// their defaults and checks).
#define RECIS_HYPERPARAMETERS(X) \
  X(lr, "learning_rate")         \
  X(eps, "eps")                  \
  X(beta1, "beta1")              \
  X(beta2, "beta2")              \
  X(weight_decay, "weight_decay") \
  X(eta, "eta")                  \
  X(momentum, "momentum")

#define RECIS_HYPERPARAMETER_COUNT(field, str) +1
constexpr int kNumHyperparameters = 0 RECIS_HYPERPARAMETERS(RECIS_HYPERPARAMETER_COUNT);
#undef RECIS_HYPERPARAMETER_COUNT

enum class OptimType : int32_t {
#define RECIS_OPTIM_ENUM(name, code, str) name = code,
  RECIS_OPTIMIZERS(RECIS_OPTIM_ENUM)
#undef RECIS_OPTIM_ENUM
};

enum class WeightDecayMode : int32_t {
  kNone = 0,
  kL2 = 1,
  kDecoupled = 2,
};

// Hyperparameters of one update (the typed struct every kernel takes).
struct OptimParams {
  OptimType type = OptimType::kSGD;
#define RECIS_HYPERPARAMETER_FIELD(field, str) float field = 0.0f;
  RECIS_HYPERPARAMETERS(RECIS_HYPERPARAMETER_FIELD)
#undef RECIS_HYPERPARAMETER_FIELD
  WeightDecayMode wd_mode = WeightDecayMode::kNone;
  int64_t step = 1;  // Adam, LAMB: 1 on the first update
  // Per-step values derived from the above once per update call (prepare()), not per row.
  float inv_bias1 = 1.0f;  // 1 / (1 - b1^t)
  float inv_bias2 = 1.0f;  // 1 / (1 - b2^t)

  // Adam's bias-corrected step size, lr * sqrt(1 - b2^t) / (1 - b1^t),
  // computed in double as torch.optim.SparseAdam does.
  float adam_step_size() const {
    const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
    return static_cast<float>(static_cast<double>(lr) * std::sqrt(bc2) / bc1);
  }

  // Sets the derived per-step values; every kernel's caller calls it once the fields are set.
  void prepare() {
    inv_bias1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step))));
    inv_bias2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step))));
  }
};

// Weight decay (FBGEMM's WeightDecayMode) on one element, before its update.
RECIS_HD inline void apply_weight_decay(float& w, float& g, const OptimParams& p) {
  if (p.wd_mode == WeightDecayMode::kL2 && p.weight_decay != 0.0f) {
    g += p.weight_decay * w;
  } else if (p.wd_mode == WeightDecayMode::kDecoupled && p.weight_decay != 0.0f) {
    w *= 1.0f - p.lr * p.weight_decay;
  }
}

// The optimizers. Each says how many state floats a row holds, and updates one
// element d of a row (w its embedding value, state the row's state, g its
// gradient); `step_size` is p.adam_step_size() (hoisted out of the row loops).
// Optional per-row passes (FBGEMM's split_precomputation / split_post_update),
// run by the one row loop below (CPU) and its warp twin (csrc/cuda):
// - kRowState: one state float per row, at state[row_slot(dim)]: the caller sums
//   g^2 over the row, calls row_state(that float, sum, dim, p) for its new value
//   (stored once) and row_factor(new value, p) for the factor every element()
//   receives as `row`.
// - kPreNorms: the caller sums w^2 and g^2 over the row first; every element()
//   receives pre_factor(sum w^2, sum g^2, p) as `row`.
// - kPostNorms: element() leaves w as it is and writes the row's step direction
//   r into g; the caller sums w^2 and r^2 over the row, and every element then
//   moves by w -= post_factor(sum w^2, sum r^2, p) * r.
// The CPU kernels (csrc/ops) and the CUDA kernels (csrc/cuda) share these
// functions. Adding an optimizer: an entry in RECIS_OPTIMIZERS, a struct here,
// its case in dispatch_optimizer, and its declaration in
// recis_torchrec/optim/registry.py (the README's "Contributing").
struct UpdateBase {
  static constexpr bool kRowState = false;
  static constexpr bool kPreNorms = false;
  static constexpr bool kPostNorms = false;
  static constexpr bool kBiasCorrection = false;  // reads p.step (which must then be >= 1)
  RECIS_HD static int64_t row_slot(int64_t) { return 0; }  // kRowState: where the row's float is
};

struct SgdUpdate : UpdateBase {
  static int64_t state_dim(int64_t) { return 0; }
  RECIS_HD static void element(float& w, float*, float g, int64_t, int64_t, const OptimParams& p, float, float) {
    w -= p.lr * g;
  }
};

struct AdagradUpdate : UpdateBase {  // torch.optim.Adagrad
  static int64_t state_dim(int64_t dim) { return dim; }
  RECIS_HD static void element(float& w, float* state, float g, int64_t d, int64_t, const OptimParams& p, float,
                               float) {
    const float s = state[d] + g * g;
    state[d] = s;
    w -= p.lr * g / (sqrtf(s) + p.eps);
  }
};

struct RowWiseAdagradUpdate : UpdateBase {  // FBGEMM's EXACT_ROWWISE_ADAGRAD
  static constexpr bool kRowState = true;
  static int64_t state_dim(int64_t) { return 1; }
  RECIS_HD static float row_state(float m, float sum_sq, int64_t dim, const OptimParams&) {
    return m + sum_sq / static_cast<float>(dim);
  }
  RECIS_HD static float row_factor(float m, const OptimParams& p) { return p.lr / (sqrtf(m) + p.eps); }
  RECIS_HD static void element(float& w, float*, float g, int64_t, int64_t, const OptimParams&, float, float row) {
    w -= row * g;
  }
};

struct AdamUpdate : UpdateBase {  // the lazy Adam of torch.optim.SparseAdam (only rows with a gradient move)
  static constexpr bool kBiasCorrection = true;
  static int64_t state_dim(int64_t dim) { return 2 * dim; }
  RECIS_HD static void element(float& w, float* state, float g, int64_t d, int64_t dim, const OptimParams& p,
                               float step_size, float) {
    float* m = state;
    float* v = state + dim;
    const float md = m[d] + (g - m[d]) * (1.0f - p.beta1);
    const float vd = v[d] + (g * g - v[d]) * (1.0f - p.beta2);
    m[d] = md;
    v[d] = vd;
    w -= step_size * md / (sqrtf(vd) + p.eps);
  }
};

// FBGEMM's LAMB (EmbOptimType.LAMB): Adam's moments, bias-corrected, plus weight decay
// (always applied, as FBGEMM does: weight_decay_mode is not read), scaled per row
// by the trust ratio ||w|| / ||r||. Where r is zero the row does not move (FBGEMM
// divides by zero there).
struct LambUpdate : UpdateBase {
  static constexpr bool kPostNorms = true;
  static constexpr bool kBiasCorrection = true;
  static int64_t state_dim(int64_t dim) { return 2 * dim; }
  RECIS_HD static void element(float& w, float* state, float& g, int64_t d, int64_t dim, const OptimParams& p, float,
                               float) {
    float* m = state;
    float* v = state + dim;
    const float md = p.beta1 * m[d] + (1.0f - p.beta1) * g;
    const float vd = p.beta2 * v[d] + (1.0f - p.beta2) * g * g;
    m[d] = md;
    v[d] = vd;
    g = (md * p.inv_bias1) / (sqrtf(vd * p.inv_bias2) + p.eps) + p.weight_decay * w;
  }
  RECIS_HD static float post_factor(float sum_w2, float sum_r2, const OptimParams& p) {
    return sum_r2 > 0.0f ? p.lr * sqrtf(sum_w2) / sqrtf(sum_r2) : 0.0f;
  }
};

// FBGEMM's LARS_SGD (EmbOptimType.LARS_SGD): a per-row learning rate from the norms of
// the row and of its gradient, momentum holding the step (lr folded in), weight decay
// always applied (weight_decay_mode is not read). Where ||g|| + wd ||w|| is zero the
// row's step is zero (FBGEMM divides by zero there).
struct LarsSgdUpdate : UpdateBase {
  static constexpr bool kPreNorms = true;
  static int64_t state_dim(int64_t dim) { return dim; }
  RECIS_HD static float pre_factor(float sum_w2, float sum_g2, const OptimParams& p) {
    const float w_norm = sqrtf(sum_w2);
    const float denom = sqrtf(sum_g2) + p.weight_decay * w_norm;
    return denom > 0.0f ? p.lr * p.eta * w_norm / denom : 0.0f;
  }
  RECIS_HD static void element(float& w, float* state, float g, int64_t d, int64_t, const OptimParams& p, float,
                               float row) {
    const float m = p.momentum * state[d] + row * (g + p.weight_decay * w);
    state[d] = m;
    w -= m;
  }
};

// FBGEMM's partial row-wise optimizers: the first moment per element (slot momentum1,
// dim floats), the second one float per row after it (momentum2: the moving mean of
// the row's g^2), both bias-corrected as FBGEMM does; weight decay always applied
// (weight_decay_mode is not read). `row` is 1 / (sqrt(v_hat) + eps).
struct PartialRowWiseBase : UpdateBase {
  static constexpr bool kRowState = true;
  static constexpr bool kBiasCorrection = true;
  static int64_t state_dim(int64_t dim) { return dim + 1; }
  RECIS_HD static int64_t row_slot(int64_t dim) { return dim; }
  RECIS_HD static float row_state(float v, float sum_sq, int64_t dim, const OptimParams& p) {
    return p.beta2 * v + (1.0f - p.beta2) * (sum_sq / static_cast<float>(dim));
  }
  RECIS_HD static float row_factor(float v, const OptimParams& p) { return 1.0f / (sqrtf(v * p.inv_bias2) + p.eps); }
  RECIS_HD static float first_moment(float* m, float g, int64_t d, const OptimParams& p) {
    const float md = p.beta1 * m[d] + (1.0f - p.beta1) * g;
    m[d] = md;
    return md * p.inv_bias1;
  }
};

// FBGEMM's PARTIAL_ROWWISE_ADAM: w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w).
struct PartialRowWiseAdamUpdate : PartialRowWiseBase {
  RECIS_HD static void element(float& w, float* state, float g, int64_t d, int64_t, const OptimParams& p, float,
                               float row) {
    w -= p.lr * (first_moment(state, g, d, p) * row + p.weight_decay * w);
  }
};

// FBGEMM's PARTIAL_ROWWISE_LAMB: r = m_hat / (sqrt(v_hat) + eps) + wd w, and LAMB's trust
// ratio: w -= lr ||w|| / ||r|| r (a zero r does not move its row).
struct PartialRowWiseLambUpdate : PartialRowWiseBase {
  static constexpr bool kPostNorms = true;
  RECIS_HD static void element(float& w, float* state, float& g, int64_t d, int64_t, const OptimParams& p, float,
                               float row) {
    g = first_moment(state, g, d, p) * row + p.weight_decay * w;
  }
  RECIS_HD static float post_factor(float sum_w2, float sum_r2, const OptimParams& p) {
    return LambUpdate::post_factor(sum_w2, sum_r2, p);
  }
};

// fn(Update{}) for the optimizer of type t; returns false for an unknown type
// (callers raise on false: an optimizer a device lacks is an error, never a no-op).
// (Called with host lambdas by the CPU kernels and device lambdas by the CUDA ones: nvcc is told
// not to check the call's execution space, which each instantiation fixes.)
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Fn>
RECIS_HD inline bool dispatch_optimizer(OptimType t, Fn&& fn) {
  switch (t) {
    case OptimType::kSGD:
      fn(SgdUpdate{});
      return true;
    case OptimType::kAdagrad:
      fn(AdagradUpdate{});
      return true;
    case OptimType::kRowWiseAdagrad:
      fn(RowWiseAdagradUpdate{});
      return true;
    case OptimType::kAdam:
      fn(AdamUpdate{});
      return true;
    case OptimType::kLamb:
      fn(LambUpdate{});
      return true;
    case OptimType::kLarsSgd:
      fn(LarsSgdUpdate{});
      return true;
    case OptimType::kPartialRowWiseAdam:
      fn(PartialRowWiseAdamUpdate{});
      return true;
    case OptimType::kPartialRowWiseLamb:
      fn(PartialRowWiseLambUpdate{});
      return true;
  }
  return false;
}

// Whether `code` is an optimizer's.
inline bool is_optimizer_code(int64_t code) {
#define RECIS_OPTIM_KNOWN(name, value, str) \
  if (code == value) return true;
  RECIS_OPTIMIZERS(RECIS_OPTIM_KNOWN)
#undef RECIS_OPTIM_KNOWN
  return false;
}

// Optimizer-state floats per row for a given embedding dim (-1: unknown optimizer).
inline int64_t optimizer_state_dim(OptimType t, int64_t dim) {
  int64_t n = -1;
  dispatch_optimizer(t, [&](auto opt) { n = decltype(opt)::state_dim(dim); });
  return n;
}

// One update of a row of `dim` floats on the CPU (kDim > 0 fixes dim at compile
// time so the loops unroll and vectorise fully). `g` may be overwritten (it is
// the caller's scratch); `state` is the row's optimizer state.
template <typename O, int kDim = 0>
inline void update_row_with(float* __restrict w, float* __restrict state, float* __restrict g, int64_t dim_arg,
                            const OptimParams& p, float step_size) {
  const int64_t dim = kDim > 0 ? kDim : dim_arg;
  if (p.wd_mode != WeightDecayMode::kNone && p.weight_decay != 0.0f) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) apply_weight_decay(w[d], g[d], p);
  }
  float row = 0.0f;
  if constexpr (O::kRowState) {
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t d = 0; d < dim; ++d) sq += g[d] * g[d];
    float& slot = state[O::row_slot(dim)];
    slot = O::row_state(slot, sq, dim, p);
    row = O::row_factor(slot, p);
  }
  if constexpr (O::kPreNorms) {
    float w2 = 0.0f;
    float g2 = 0.0f;
#pragma omp simd reduction(+ : w2, g2)
    for (int64_t d = 0; d < dim; ++d) {
      w2 += w[d] * w[d];
      g2 += g[d] * g[d];
    }
    row = O::pre_factor(w2, g2, p);
  }
  if constexpr (O::kPostNorms) {
    float w2 = 0.0f;
    float r2 = 0.0f;
    for (int64_t d = 0; d < dim; ++d) {
      w2 += w[d] * w[d];
      O::element(w[d], state, g[d], d, dim, p, step_size, row);
      r2 += g[d] * g[d];
    }
    const float f = O::post_factor(w2, r2, p);
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) w[d] -= f * g[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) O::element(w[d], state, g[d], d, dim, p, step_size, row);
  }
}

template <int kDim = 0>
inline void update_row(float* __restrict w, float* __restrict state, float* __restrict g, int64_t dim_arg,
                       const OptimParams& p, float step_size) {
  dispatch_optimizer(p.type, [&](auto opt) { update_row_with<decltype(opt), kDim>(w, state, g, dim_arg, p, step_size); });
}

}  // namespace hashtable
}  // namespace recis
