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
  X(kAdam, 3, "adam")

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
  float lr = 0.01f;
  float eps = 1e-8f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float weight_decay = 0.0f;
  WeightDecayMode wd_mode = WeightDecayMode::kNone;
  int64_t step = 1;  // Adam: 1 on the first update

  // Adam's bias-corrected step size, lr * sqrt(1 - b2^t) / (1 - b1^t),
  // computed in double as torch.optim.SparseAdam does.
  float adam_step_size() const {
    const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
    return static_cast<float>(static_cast<double>(lr) * std::sqrt(bc2) / bc1);
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
// An optimizer with kRowState keeps one state float per row: the caller sums
// g^2 over the row, calls row_state(state[0], sum) for its new value (stored
// once) and row_factor(new value) for the factor every element() receives as
// `row`. The CPU kernels (csrc/ops) and the CUDA kernels (csrc/cuda) share
// these functions. Adding an optimizer: an entry in RECIS_OPTIMIZERS, a struct
// here, its case in dispatch_optimizer, and its declaration in
// recis_torchrec/optim/registry.py.
struct SgdUpdate {
  static constexpr bool kRowState = false;
  static int64_t state_dim(int64_t) { return 0; }
  RECIS_HD static void element(float& w, float*, float g, int64_t, int64_t, const OptimParams& p, float, float) {
    w -= p.lr * g;
  }
};

struct AdagradUpdate {  // torch.optim.Adagrad
  static constexpr bool kRowState = false;
  static int64_t state_dim(int64_t dim) { return dim; }
  RECIS_HD static void element(float& w, float* state, float g, int64_t d, int64_t, const OptimParams& p, float,
                               float) {
    const float s = state[d] + g * g;
    state[d] = s;
    w -= p.lr * g / (sqrtf(s) + p.eps);
  }
};

struct RowWiseAdagradUpdate {  // FBGEMM's EXACT_ROWWISE_ADAGRAD
  static constexpr bool kRowState = true;
  static int64_t state_dim(int64_t) { return 1; }
  RECIS_HD static float row_state(float m, float sum_sq, int64_t dim) { return m + sum_sq / static_cast<float>(dim); }
  RECIS_HD static float row_factor(float m, const OptimParams& p) { return p.lr / (sqrtf(m) + p.eps); }
  RECIS_HD static void element(float& w, float*, float g, int64_t, int64_t, const OptimParams&, float, float row) {
    w -= row * g;
  }
};

struct AdamUpdate {  // the lazy Adam of torch.optim.SparseAdam (only rows with a gradient move)
  static constexpr bool kRowState = false;
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

// fn(Update{}) for the optimizer of type t; returns false for an unknown type.
template <typename Fn>
inline bool dispatch_optimizer(OptimType t, Fn&& fn) {
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
    state[0] = O::row_state(state[0], sq, dim);
    row = O::row_factor(state[0], p);
  }
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) O::element(w[d], state, g[d], d, dim, p, step_size, row);
}

template <int kDim = 0>
inline void update_row(float* __restrict w, float* __restrict state, float* __restrict g, int64_t dim_arg,
                       const OptimParams& p, float step_size) {
  dispatch_optimizer(p.type, [&](auto opt) { update_row_with<decltype(opt), kDim>(w, state, g, dim_arg, p, step_size); });
}

}  // namespace hashtable
}  // namespace recis
