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

#include <cmath>
#include <cstdint>

namespace recis {
namespace hashtable {

enum class OptimType : int32_t {
  kSGD = 0,
  kAdagrad = 1,
  kRowWiseAdagrad = 2,
  kAdam = 3,
};

enum class WeightDecayMode : int32_t {
  kNone = 0,
  kL2 = 1,
  kDecoupled = 2,
};

// Optimizer-state floats per row for a given embedding dim.
inline int64_t optimizer_state_dim(OptimType t, int64_t dim) {
  switch (t) {
    case OptimType::kSGD:
      return 0;
    case OptimType::kAdagrad:
      return dim;
    case OptimType::kRowWiseAdagrad:
      return 1;
    case OptimType::kAdam:
      return 2 * dim;
  }
  return -1;
}

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

// Applies one update to a row of `dim` floats (kDim > 0 fixes dim at compile
// time so the loops unroll and vectorise fully). `g` may be overwritten (it is
// the caller's scratch). adam_step_size: p.adam_step_size(), hoisted out of the
// per-row loop. The `omp simd` hints let the compiler vectorise the row-wise
// reduction too (they are ignored without OpenMP; results stay correct).
// `state` is the row's optimizer state (w + dim in a float32 row).
template <int kDim = 0>
inline void update_row(float* __restrict w, float* __restrict state, float* __restrict g, int64_t dim_arg,
                       const OptimParams& p, float adam_step_size) {
  const int64_t dim = kDim > 0 ? kDim : dim_arg;
  if (p.wd_mode == WeightDecayMode::kL2 && p.weight_decay != 0.0f) {
    const float wd = p.weight_decay;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) g[d] += wd * w[d];
  } else if (p.wd_mode == WeightDecayMode::kDecoupled && p.weight_decay != 0.0f) {
    const float keep = 1.0f - p.lr * p.weight_decay;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) w[d] *= keep;
  }
  const float lr = p.lr, eps = p.eps;
  switch (p.type) {
    case OptimType::kSGD: {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) w[d] -= lr * g[d];
      break;
    }
    case OptimType::kAdagrad: {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float s = state[d] + g[d] * g[d];
        state[d] = s;
        w[d] -= lr * g[d] / (std::sqrt(s) + eps);
      }
      break;
    }
    case OptimType::kRowWiseAdagrad: {
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < dim; ++d) sq += g[d] * g[d];
      const float m = state[0] + sq / static_cast<float>(dim);
      state[0] = m;
      const float mult = lr / (std::sqrt(m) + eps);
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) w[d] -= mult * g[d];
      break;
    }
    case OptimType::kAdam: {
      float* __restrict m = state;
      float* __restrict v = state + dim;
      const float c1 = 1.0f - p.beta1, c2 = 1.0f - p.beta2;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float md = m[d] + (g[d] - m[d]) * c1;
        const float vd = v[d] + (g[d] * g[d] - v[d]) * c2;
        m[d] = md;
        v[d] = vd;
        w[d] -= adam_step_size * md / (std::sqrt(vd) + eps);
      }
      break;
    }
  }
}

}  // namespace hashtable
}  // namespace recis
