// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The argument checks of the fused feature ops, shared by the CPU and the CUDA
// entry points so that both reject the same inputs with the same messages.
// They read host memory: the CUDA ops copy the lengths (and the bucketize
// boundaries) to the host once per call, which their output sizes need anyway.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace recis {
namespace features {

inline void check_tensor_1d(const at::Tensor& t, const c10::Device& device, const char* op, const char* name,
                            at::ScalarType dtype) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (as the values are), got ", t.device());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// A KJT-layout input: values (N,) and lengths (F*B,) int64 on one device,
// optional weights (N,) float32. Returns the batch size B.
inline int64_t check_jagged(const at::Tensor& v, const at::Tensor& l, const c10::optional<at::Tensor>& w, int64_t F,
                            const char* op) {
  check_tensor_1d(v, v.device(), op, "values", at::kLong);
  check_tensor_1d(l, v.device(), op, "lengths", at::kLong);
  TORCH_CHECK(F > 0, op, ": num_features must be > 0, got ", F);
  TORCH_CHECK(l.numel() % F == 0, op, ": lengths has ", l.numel(), " entries, not a multiple of num_features ", F);
  if (w.has_value()) {
    check_tensor_1d(*w, v.device(), op, "weights", at::kFloat);
    TORCH_CHECK(w->numel() == v.numel(), op, ": weights has ", w->numel(), " entries but values has ", v.numel());
  }
  return l.numel() / F;
}

// Each feature's first value offset, (F + 1,), from the lengths (host memory,
// F*B of them), checked: none negative, summing to the `num_values` values.
inline std::vector<int64_t> feature_begin(const int64_t* lengths, int64_t F, int64_t batch, int64_t num_values,
                                          const char* op) {
  std::vector<int64_t> begin(F + 1, 0);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t* l = lengths + f * batch;
    int64_t sum = 0, any_negative = 0;
    for (int64_t b = 0; b < batch; ++b) {  // no branch inside: this loop vectorises
      sum += l[b];
      any_negative |= l[b] >> 63;
    }
    if (any_negative != 0) {
      for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK(l[b] >= 0, op, ": negative length ", l[b], " in feature ", f, ", bag ", b);
      }
    }
    begin[f + 1] = begin[f] + sum;
  }
  TORCH_CHECK(begin[F] == num_values, op, ": lengths sum to ", begin[F], " but there are ", num_values, " values");
  return begin;
}

inline void check_feature(int64_t f, int64_t num_features, const char* op, const char* what) {
  TORCH_CHECK(f >= 0 && f < num_features, op, ": ", what, " index ", f, " is out of range for ", num_features,
              " features");
}

inline void check_features(at::IntArrayRef feats, int64_t num_features, const char* op, const char* what) {
  for (auto f : feats) check_feature(f, num_features, op, what);
}

inline void check_same_size(size_t n, size_t want, const char* op, const char* name) {
  TORCH_CHECK(n == want, op, ": ", name, " has ", n, " entries but there are ", want, " features to transform");
}

// Moduli of hash / cross (0: no modulus) or of mod (must be > 0).
inline void check_moduli(at::IntArrayRef moduli, bool zero_means_none, const char* op) {
  for (auto m : moduli) {
    if (zero_means_none) {
      TORCH_CHECK(m >= 0, op, ": moduli must be >= 0 (0: none), got ", m);
    } else {
      TORCH_CHECK(m > 0, op, ": moduli must be > 0, got ", m);
    }
  }
}

inline void check_max_lengths(at::IntArrayRef max_lengths, const char* op) {
  for (auto n : max_lengths) TORCH_CHECK(n > 0, op, ": max_lengths must be > 0, got ", n);
}

inline void check_num_hashes(int64_t num_hashes, const char* op) {
  TORCH_CHECK(num_hashes >= 1, op, ": num_hashes must be >= 1, got ", num_hashes);
}

// A dense input: a (B, D) float32 tensor.
inline void check_dense(const at::Tensor& dense, const char* op) {
  TORCH_CHECK(dense.dim() == 2 && dense.scalar_type() == at::kFloat, op,
              ": dense must be a (B, D) float32 tensor, got ", dense.scalar_type(), " ", dense.sizes());
}

// One column's boundaries, bp[begin:end]: sorted (non-decreasing) and NaN-free.
inline void check_boundary_run(const float* bp, int64_t begin, int64_t end, int64_t column, const char* op) {
  for (int64_t i = begin + 1; i < end; ++i) {
    TORCH_CHECK(bp[i - 1] <= bp[i], op, ": the boundaries of column ", column, " must be sorted (non-decreasing)");
  }
  for (int64_t i = begin; i < end; ++i) {
    TORCH_CHECK(bp[i] == bp[i], op, ": the boundaries of column ", column, " hold NaN");
  }
}

// Bucketize: dense (B, D) float32, boundaries (host copy `bp` of `num_boundaries`
// floats), one sorted, NaN-free run of boundaries per column.
inline void check_bucketize(const at::Tensor& dense, at::IntArrayRef columns, const at::Tensor& boundaries,
                            const float* bp, at::IntArrayRef boundary_offsets, const char* op) {
  check_dense(dense, op);
  TORCH_CHECK(boundaries.device().is_cpu() || boundaries.device() == dense.device(), op,
              ": boundaries must be on the CPU or on dense's device, got ", boundaries.device());
  TORCH_CHECK(boundaries.dim() == 1 && boundaries.scalar_type() == at::kFloat, op,
              ": boundaries must be a 1-D float32 tensor, got ", boundaries.scalar_type(), " ", boundaries.sizes());
  const int64_t G = static_cast<int64_t>(columns.size()), D = dense.size(1);
  TORCH_CHECK(static_cast<int64_t>(boundary_offsets.size()) == G + 1, op, ": boundary_offsets has ",
              boundary_offsets.size(), " entries; expected one more than the ", G, " columns");
  TORCH_CHECK(G == 0 || (boundary_offsets[0] == 0 && boundary_offsets[G] == boundaries.numel()), op,
              ": boundary_offsets must run from 0 to the ", boundaries.numel(), " boundaries");
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(columns[g] >= 0 && columns[g] < D, op, ": column ", columns[g], " is out of range for ", D,
                " dense columns");
    TORCH_CHECK(boundary_offsets[g] <= boundary_offsets[g + 1], op, ": boundary_offsets decrease at ", g);
    check_boundary_run(bp, boundary_offsets[g], boundary_offsets[g + 1], columns[g], op);
  }
}

// Concat: the per-buffer checks; `host_lengths[i]` points at buffer i's lengths
// on the host. Returns each buffer's per-feature value offsets.
inline std::vector<std::vector<int64_t>> check_concat(at::TensorList values, at::TensorList lengths,
                                                      at::TensorList weights, int64_t batch, at::IntArrayRef buffers,
                                                      at::IntArrayRef feats,
                                                      const std::vector<const int64_t*>& host_lengths, const char* op) {
  const int64_t nb = static_cast<int64_t>(values.size());
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == nb, op, ": ", nb, " values but ", lengths.size(), " lengths");
  TORCH_CHECK(weights.empty() || static_cast<int64_t>(weights.size()) == nb, op, ": ", nb, " values but ",
              weights.size(), " weights");
  TORCH_CHECK(buffers.size() == feats.size(), op, ": buffers and features differ in length");
  TORCH_CHECK(batch >= 0, op, ": batch must be >= 0");
  std::vector<std::vector<int64_t>> begin(nb);
  for (int64_t i = 0; i < nb; ++i) {
    check_tensor_1d(values[i], values[0].device(), op, "values", at::kLong);
    check_tensor_1d(lengths[i], values[0].device(), op, "lengths", at::kLong);
    const int64_t n = lengths[i].numel();
    TORCH_CHECK(batch == 0 ? n == 0 : n % batch == 0, op, ": buffer ", i, " has ", n,
                " lengths, not a multiple of the batch size ", batch);
    const int64_t F = batch == 0 ? 0 : n / batch;
    const int64_t* l = host_lengths[i];
    begin[i].assign(F + 1, 0);
    for (int64_t f = 0; f < F; ++f) {
      int64_t sum = 0;
      for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK(l[f * batch + b] >= 0, op, ": buffer ", i, " has a negative length in feature ", f);
        sum += l[f * batch + b];
      }
      begin[i][f + 1] = begin[i][f] + sum;
    }
    TORCH_CHECK(begin[i][F] == values[i].numel(), op, ": buffer ", i, "'s lengths sum to ", begin[i][F],
                " but it has ", values[i].numel(), " values");
    if (!weights.empty()) {
      check_tensor_1d(weights[i], values[0].device(), op, "weights", at::kFloat);
      TORCH_CHECK(weights[i].numel() == values[i].numel(), op, ": buffer ", i, "'s weights and values differ in size");
    }
  }
  for (size_t k = 0; k < feats.size(); ++k) {
    const int64_t i = buffers[k], f = feats[k];
    TORCH_CHECK(i >= 0 && i < nb, op, ": buffer index ", i, " out of range");
    TORCH_CHECK(batch == 0 || (f >= 0 && f + 1 < static_cast<int64_t>(begin[i].size())), op, ": feature ", f,
                " out of range in buffer ", i);
  }
  return begin;
}

}  // namespace features
}  // namespace recis
