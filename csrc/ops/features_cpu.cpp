// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of the fused feature ops. Each call transforms a whole group of
// features of a KJT-layout input (values (N,), lengths (F*B,) int64, optional
// weights (N,) float32, feature k owning bags k*B .. (k+1)*B) and returns the
// selected features, in the order given, in the same layout. Work is split
// over values (element-wise ops) or bags (structural ops), never per feature.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../features/feature_checks.h"
#include "../features/feature_kernels.h"
#include "checks.h"

namespace recis {
namespace {

using features::bucket_of;
using features::hash_id;
using features::hash_pair;
using features::umod;

// A KJT-layout input, checked, with each feature's first value.
struct Jagged {
  const int64_t* values;
  const int64_t* lengths;
  const float* weights;  // may be nullptr when empty: test `weighted`
  bool weighted = false;
  int64_t num_features, batch;
  std::vector<int64_t> begin;  // (F + 1,) value offset of each feature
  at::Tensor values_t, lengths_t, weights_t;

  Jagged(const at::Tensor& v, const at::Tensor& l, const c10::optional<at::Tensor>& w, int64_t F, const char* op)
      : num_features(F) {
    TORCH_CHECK(v.device().is_cpu(), op, ": values must be a CPU tensor, got ", v.device());
    batch = features::check_jagged(v, l, w, F, op);
    values_t = v.contiguous();
    lengths_t = l.contiguous();
    values = values_t.data_ptr<int64_t>();
    lengths = lengths_t.data_ptr<int64_t>();
    begin = features::feature_begin(lengths, F, batch, v.numel(), op);
    weights = nullptr;
    if (w.has_value()) {
      weights_t = w->contiguous();
      weights = weights_t.data_ptr<float>();
      weighted = true;
    }
  }

  void check_feature(int64_t f, const char* op, const char* what) const {
    features::check_feature(f, num_features, op, what);
  }
};

using features::check_same_size;

// Selected features' lengths (G*B,) and, if weighted, weights, gathered in order.
std::tuple<at::Tensor, c10::optional<at::Tensor>, std::vector<int64_t>> gather_layout(
    const Jagged& in, at::IntArrayRef feats, int64_t repeat) {
  const int64_t G = static_cast<int64_t>(feats.size()), B = in.batch;
  at::Tensor lengths = at::empty({G * repeat * B}, at::kLong);
  int64_t* lo = lengths.data_ptr<int64_t>();
  std::vector<int64_t> out_begin(G * repeat + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t f = feats[g];
    for (int64_t r = 0; r < repeat; ++r) {
      std::copy(in.lengths + f * B, in.lengths + (f + 1) * B, lo + (g * repeat + r) * B);
      out_begin[g * repeat + r + 1] = out_begin[g * repeat + r] + (in.begin[f + 1] - in.begin[f]);
    }
  }
  c10::optional<at::Tensor> weights;
  if (in.weighted) {
    at::Tensor w = at::empty({out_begin.back()}, at::kFloat);
    float* wo = w.data_ptr<float>();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t f = feats[g];
      for (int64_t r = 0; r < repeat; ++r) {
        std::copy(in.weights + in.begin[f], in.weights + in.begin[f + 1], wo + out_begin[g * repeat + r]);
      }
    }
    weights = w;
  }
  return {lengths, weights, out_begin};
}

// Runs fn(segment g, input index i, output index o) over every value of the
// segments, in parallel over values (segments of any size share the work).
template <typename Fn>
void for_each_value(const std::vector<int64_t>& out_begin, const std::vector<int64_t>& in_begin, Fn fn) {
  const int64_t total = out_begin.back();
  at::parallel_for(0, total, 8192, [&](int64_t lo, int64_t hi) {
    int64_t g = std::upper_bound(out_begin.begin(), out_begin.end(), lo) - out_begin.begin() - 1;
    for (int64_t o = lo; o < hi; ++o) {
      while (o >= out_begin[g + 1]) ++g;
      fn(g, in_begin[g] + (o - out_begin[g]), o);
    }
  });
}

using Result = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>;

// A per-id op over the listed features: output segment s (hash s % repeat of
// feature feats[s / repeat]) holds fn(s, id) for each id of that feature, with
// the feature's lengths and weights.
template <typename Fn>
Result map_ids(const Jagged& in, at::IntArrayRef feats, int64_t repeat, Fn fn) {
  auto [out_lengths, out_weights, out_begin] = gather_layout(in, feats, repeat);
  std::vector<int64_t> in_begin(feats.size() * repeat);
  for (size_t s = 0; s < in_begin.size(); ++s) in_begin[s] = in.begin[feats[s / repeat]];
  at::Tensor out = at::empty({out_begin.back()}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t* v = in.values;
  for_each_value(out_begin, in_begin,
                 [&](int64_t s, int64_t i, int64_t k) { o[k] = fn(s, static_cast<uint64_t>(v[i])); });
  return {out, out_lengths, out_weights};
}

Result feature_hash_cpu(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                        int64_t num_features, at::IntArrayRef feats, at::IntArrayRef salts,
                        at::IntArrayRef moduli) {
  const char* op = "recis::feature_hash";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(salts.size(), feats.size(), op, "salts");
  check_same_size(moduli.size(), feats.size(), op, "moduli");
  for (auto f : feats) in.check_feature(f, op, "feature");
  for (auto m : moduli) TORCH_CHECK(m >= 0, op, ": moduli must be >= 0 (0: none), got ", m);
  return map_ids(in, feats, 1, [&](int64_t g, uint64_t id) {
    return umod(hash_id(id, static_cast<uint64_t>(salts[g])), static_cast<uint64_t>(moduli[g]));
  });
}

Result feature_mod_cpu(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                       int64_t num_features, at::IntArrayRef feats, at::IntArrayRef moduli) {
  const char* op = "recis::feature_mod";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(moduli.size(), feats.size(), op, "moduli");
  for (auto f : feats) in.check_feature(f, op, "feature");
  for (auto m : moduli) TORCH_CHECK(m > 0, op, ": moduli must be > 0, got ", m);
  return map_ids(in, feats, 1, [&](int64_t g, uint64_t id) { return umod(id, static_cast<uint64_t>(moduli[g])); });
}

Result feature_multi_hash_cpu(const at::Tensor& values, const at::Tensor& lengths,
                              const c10::optional<at::Tensor>& weights, int64_t num_features, at::IntArrayRef feats,
                              at::IntArrayRef salts, at::IntArrayRef moduli, int64_t num_hashes) {
  const char* op = "recis::feature_multi_hash";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(salts.size(), feats.size(), op, "salts");
  check_same_size(moduli.size(), feats.size(), op, "moduli");
  TORCH_CHECK(num_hashes >= 1, op, ": num_hashes must be >= 1, got ", num_hashes);
  for (auto f : feats) in.check_feature(f, op, "feature");
  for (auto m : moduli) TORCH_CHECK(m >= 0, op, ": moduli must be >= 0 (0: none), got ", m);
  return map_ids(in, feats, num_hashes, [&](int64_t s, uint64_t id) {
    const int64_t g = s / num_hashes, r = s % num_hashes;
    const uint64_t seed = static_cast<uint64_t>(salts[g]) + static_cast<uint64_t>(r) * features::kSeedStep;
    return umod(hash_id(id, seed), static_cast<uint64_t>(moduli[g]));
  });
}

// The values and (if weighted) weights of a structural op's output of n ids.
struct Output {
  at::Tensor values;
  c10::optional<at::Tensor> weights;
  int64_t* v;
  float* w = nullptr;  // nullptr when unweighted

  Output(int64_t n, bool weighted) : values(at::empty({n}, at::kLong)), v(values.data_ptr<int64_t>()) {
    if (weighted) {
      weights = at::empty({n}, at::kFloat);
      w = weights->data_ptr<float>();
    }
  }
};

// Exclusive prefix sum of `lengths` (n,) into offsets (n + 1,).
std::vector<int64_t> offsets_of(const int64_t* lengths, int64_t n) {
  std::vector<int64_t> off(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) off[i + 1] = off[i] + lengths[i];
  return off;
}

Result feature_truncate_cpu(const at::Tensor& values, const at::Tensor& lengths,
                            const c10::optional<at::Tensor>& weights, int64_t num_features, at::IntArrayRef feats,
                            at::IntArrayRef max_lengths, at::IntArrayRef from_end) {
  const char* op = "recis::feature_truncate";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(max_lengths.size(), feats.size(), op, "max_lengths");
  check_same_size(from_end.size(), feats.size(), op, "from_end");
  for (auto f : feats) in.check_feature(f, op, "feature");
  for (auto n : max_lengths) TORCH_CHECK(n > 0, op, ": max_lengths must be > 0, got ", n);
  const int64_t G = static_cast<int64_t>(feats.size()), B = in.batch;
  const std::vector<int64_t> in_off = offsets_of(in.lengths, num_features * B);
  at::Tensor out_lengths = at::empty({G * B}, at::kLong);
  int64_t* lo = out_lengths.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t b = 0; b < B; ++b) lo[g * B + b] = std::min(in.lengths[feats[g] * B + b], max_lengths[g]);
  }
  const std::vector<int64_t> out_off = offsets_of(lo, G * B);
  Output out(out_off.back(), in.weighted);
  at::parallel_for(0, G * B, 1024, [&](int64_t lo_bag, int64_t hi_bag) {
    for (int64_t j = lo_bag; j < hi_bag; ++j) {
      const int64_t g = j / B, b = j % B, src_bag = feats[g] * B + b;
      const int64_t keep = lo[j];
      const int64_t start = from_end[g] ? in_off[src_bag + 1] - keep : in_off[src_bag];
      std::copy(in.values + start, in.values + start + keep, out.v + out_off[j]);
      if (out.w != nullptr) std::copy(in.weights + start, in.weights + start + keep, out.w + out_off[j]);
    }
  });
  return {out.values, out_lengths, out.weights};
}

Result feature_cross_cpu(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                         int64_t num_features, at::IntArrayRef left, at::IntArrayRef right, at::IntArrayRef salts,
                         at::IntArrayRef moduli) {
  const char* op = "recis::feature_cross";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(right.size(), left.size(), op, "right");
  check_same_size(salts.size(), left.size(), op, "salts");
  check_same_size(moduli.size(), left.size(), op, "moduli");
  for (auto f : left) in.check_feature(f, op, "left feature");
  for (auto f : right) in.check_feature(f, op, "right feature");
  for (auto m : moduli) TORCH_CHECK(m >= 0, op, ": moduli must be >= 0 (0: none), got ", m);
  const int64_t P = static_cast<int64_t>(left.size()), B = in.batch;
  const std::vector<int64_t> in_off = offsets_of(in.lengths, num_features * B);
  at::Tensor out_lengths = at::empty({P * B}, at::kLong);
  int64_t* lo = out_lengths.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t b = 0; b < B; ++b) lo[p * B + b] = in.lengths[left[p] * B + b] * in.lengths[right[p] * B + b];
  }
  const std::vector<int64_t> out_off = offsets_of(lo, P * B);
  Output out(out_off.back(), in.weighted);
  const int64_t* v = in.values;
  at::parallel_for(0, P * B, 512, [&](int64_t lo_bag, int64_t hi_bag) {
    for (int64_t j = lo_bag; j < hi_bag; ++j) {
      const int64_t p = j / B, b = j % B;
      const int64_t a0 = in_off[left[p] * B + b], a1 = in_off[left[p] * B + b + 1];
      const int64_t b0 = in_off[right[p] * B + b], b1 = in_off[right[p] * B + b + 1];
      const uint64_t seed = static_cast<uint64_t>(salts[p]), m = static_cast<uint64_t>(moduli[p]);
      int64_t k = out_off[j];
      for (int64_t x = a0; x < a1; ++x) {
        for (int64_t y = b0; y < b1; ++y, ++k) {
          out.v[k] = umod(hash_pair(static_cast<uint64_t>(v[x]), static_cast<uint64_t>(v[y]), seed), m);
          if (out.w != nullptr) out.w[k] = in.weights[x] * in.weights[y];
        }
      }
    }
  });
  return {out.values, out_lengths, out.weights};
}

std::tuple<at::Tensor, at::Tensor> feature_bucketize_cpu(const at::Tensor& dense, at::IntArrayRef columns,
                                                         const at::Tensor& boundaries,
                                                         at::IntArrayRef boundary_offsets) {
  const char* op = "recis::feature_bucketize";
  TORCH_CHECK(dense.device().is_cpu(), op, ": dense must be a CPU tensor, got ", dense.device());
  check_cpu_1d(boundaries, op, "boundaries", at::kFloat);
  const at::Tensor bnd = boundaries.contiguous();
  const float* bp = bnd.data_ptr<float>();
  features::check_bucketize(dense, columns, boundaries, bp, boundary_offsets, op);
  const int64_t G = static_cast<int64_t>(columns.size()), B = dense.size(0), D = dense.size(1);
  const at::Tensor x = dense.contiguous();
  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::empty({G * B}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, G * B, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t g = j / B, b = j % B;
      const int64_t s = boundary_offsets[g];
      o[j] = bucket_of(xp[b * D + columns[g]], bp + s, boundary_offsets[g + 1] - s);
    }
  });
  return {out, at::ones({G * B}, at::kLong)};
}

Result feature_concat_cpu(at::TensorList values, at::TensorList lengths, at::TensorList weights, int64_t batch,
                          at::IntArrayRef buffers, at::IntArrayRef feats) {
  const char* op = "recis::feature_concat";
  const int64_t nb = static_cast<int64_t>(values.size());
  const bool weighted = !weights.empty();
  std::vector<at::Tensor> vc(nb), lc(nb), wc(weighted ? nb : 0);
  std::vector<const int64_t*> host_lengths(nb);
  for (int64_t i = 0; i < nb; ++i) {
    check_cpu_1d(values[i], op, "values", at::kLong);
    check_cpu_1d(lengths[i], op, "lengths", at::kLong);
    vc[i] = values[i].contiguous();
    lc[i] = lengths[i].contiguous();
    host_lengths[i] = lc[i].data_ptr<int64_t>();
    if (weighted && i < static_cast<int64_t>(weights.size())) wc[i] = weights[i].contiguous();
  }
  const std::vector<std::vector<int64_t>> begin =
      features::check_concat(values, lengths, weights, batch, buffers, feats, host_lengths, op);
  const int64_t K = static_cast<int64_t>(feats.size());
  std::vector<int64_t> out_begin(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = buffers[k], f = feats[k];
    out_begin[k + 1] = out_begin[k] + (batch == 0 ? 0 : begin[i][f + 1] - begin[i][f]);
  }
  at::Tensor out_v = at::empty({out_begin[K]}, at::kLong);
  at::Tensor out_l = at::empty({K * batch}, at::kLong);
  c10::optional<at::Tensor> out_w;
  if (weighted) out_w = at::empty({out_begin[K]}, at::kFloat);
  int64_t* ov = out_v.data_ptr<int64_t>();
  int64_t* ol = out_l.data_ptr<int64_t>();
  float* ow = weighted ? out_w->data_ptr<float>() : nullptr;
  at::parallel_for(0, K, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      if (batch == 0) continue;
      const int64_t i = buffers[k], f = feats[k];
      const int64_t s = begin[i][f], n = begin[i][f + 1] - s;
      std::copy(vc[i].data_ptr<int64_t>() + s, vc[i].data_ptr<int64_t>() + s + n, ov + out_begin[k]);
      std::copy(lc[i].data_ptr<int64_t>() + f * batch, lc[i].data_ptr<int64_t>() + (f + 1) * batch, ol + k * batch);
      if (weighted) std::copy(wc[i].data_ptr<float>() + s, wc[i].data_ptr<float>() + s + n, ow + out_begin[k]);
    }
  });
  return {out_v, out_l, out_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("feature_concat", &feature_concat_cpu);
  m.impl("feature_hash", &feature_hash_cpu);
  m.impl("feature_mod", &feature_mod_cpu);
  m.impl("feature_multi_hash", &feature_multi_hash_cpu);
  m.impl("feature_truncate", &feature_truncate_cpu);
  m.impl("feature_cross", &feature_cross_cpu);
  m.impl("feature_bucketize", &feature_bucketize_cpu);
}

}  // namespace recis
