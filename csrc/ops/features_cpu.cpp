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

// A modulus (0: none), by a mask when it is a power of two: a 64-bit division
// costs tens of cycles, more than the hash before it.
struct Modulus {
  uint64_t m = 0, mask = 0;
  bool pow2 = false;

  Modulus() = default;
  explicit Modulus(uint64_t mod) : m(mod), mask(mod - 1), pow2(mod != 0 && (mod & (mod - 1)) == 0) {}
  uint64_t operator()(uint64_t v) const { return m == 0 ? v : pow2 ? (v & mask) : v % m; }
};

std::vector<Modulus> moduli_of(at::IntArrayRef moduli) {
  std::vector<Modulus> out;
  out.reserve(moduli.size());
  for (auto m : moduli) out.emplace_back(static_cast<uint64_t>(m));
  return out;
}

// The per-id steps over n ids, in place: one tight loop per step, specialised
// by the modulus's kind so that the compiler can vectorise it.
template <typename Fn>
void map_in_place(int64_t* x, int64_t n, Fn fn) {
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<int64_t>(fn(static_cast<uint64_t>(x[i])));
}

template <bool kHash>
void step_in_place(int64_t* x, int64_t n, uint64_t seed, const Modulus& mod) {
  auto pre = [seed](uint64_t v) { return kHash ? hash_id(v, seed) : v; };
  if (mod.m == 0) {
    map_in_place(x, n, pre);
  } else if (mod.pow2) {
    const uint64_t mask = mod.mask;
    map_in_place(x, n, [&](uint64_t v) { return pre(v) & mask; });
  } else {
    const uint64_t m = mod.m;
    map_in_place(x, n, [&](uint64_t v) { return pre(v) % m; });
  }
}

// Column x[0], x[stride], ... of n floats bucketized into out (bucket_of's
// buckets). Up to 64 boundaries, one pass per boundary over the whole column,
// which vectorises across samples, where bucket_of counts one sample at a time.
void bucketize_column(const float* x, int64_t stride, int64_t n, const float* bounds, int64_t nbounds,
                      int64_t* out) {
  if (nbounds > 64) {
    for (int64_t b = 0; b < n; ++b) out[b] = bucket_of(x[b * stride], bounds, nbounds);
    return;
  }
  constexpr int64_t kTile = 1024;
  float col[kTile];
  int32_t count[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t m = std::min(kTile, n - t0);
    for (int64_t b = 0; b < m; ++b) col[b] = x[(t0 + b) * stride];
    std::fill(count, count + m, 0);
    for (int64_t i = 0; i < nbounds; ++i) {
      const float edge = bounds[i];
      for (int64_t b = 0; b < m; ++b) count[b] += edge <= col[b];
    }
    for (int64_t b = 0; b < m; ++b) out[t0 + b] = col[b] != col[b] ? nbounds + 1 : count[b];
  }
}

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
  const std::vector<Modulus> mods = moduli_of(moduli);
  return map_ids(in, feats, 1,
                 [&](int64_t g, uint64_t id) { return mods[g](hash_id(id, static_cast<uint64_t>(salts[g]))); });
}

Result feature_mod_cpu(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                       int64_t num_features, at::IntArrayRef feats, at::IntArrayRef moduli) {
  const char* op = "recis::feature_mod";
  Jagged in(values, lengths, weights, num_features, op);
  check_same_size(moduli.size(), feats.size(), op, "moduli");
  for (auto f : feats) in.check_feature(f, op, "feature");
  for (auto m : moduli) TORCH_CHECK(m > 0, op, ": moduli must be > 0, got ", m);
  const std::vector<Modulus> mods = moduli_of(moduli);
  return map_ids(in, feats, 1, [&](int64_t g, uint64_t id) { return mods[g](id); });
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
  const std::vector<Modulus> mods = moduli_of(moduli);
  std::vector<uint64_t> seeds(feats.size() * num_hashes);
  for (size_t s = 0; s < seeds.size(); ++s) {
    seeds[s] = static_cast<uint64_t>(salts[s / num_hashes]) + static_cast<uint64_t>(s % num_hashes) * features::kSeedStep;
  }
  return map_ids(in, feats, num_hashes,
                 [&](int64_t s, uint64_t id) { return mods[s / num_hashes](hash_id(id, seeds[s])); });
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
    int64_t g = lo_bag / B, b = lo_bag % B;  // one division per chunk, not per bag
    for (int64_t j = lo_bag; j < hi_bag; ++j) {
      const int64_t src_bag = feats[g] * B + b;
      const int64_t keep = lo[j];
      const int64_t start = from_end[g] ? in_off[src_bag + 1] - keep : in_off[src_bag];
      std::copy(in.values + start, in.values + start + keep, out.v + out_off[j]);
      if (out.w != nullptr) std::copy(in.weights + start, in.weights + start + keep, out.w + out_off[j]);
      if (++b == B) {
        b = 0;
        ++g;
      }
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
  const std::vector<Modulus> mods = moduli_of(moduli);
  at::parallel_for(0, P * B, 512, [&](int64_t lo_bag, int64_t hi_bag) {
    int64_t p = lo_bag / B, b = lo_bag % B;  // one division per chunk, not per bag
    for (int64_t j = lo_bag; j < hi_bag; ++j) {
      const int64_t a0 = in_off[left[p] * B + b], a1 = in_off[left[p] * B + b + 1];
      const int64_t b0 = in_off[right[p] * B + b], b1 = in_off[right[p] * B + b + 1];
      const uint64_t seed = static_cast<uint64_t>(salts[p]);
      const Modulus& m = mods[p];
      int64_t k = out_off[j];
      for (int64_t x = a0; x < a1; ++x) {
        for (int64_t y = b0; y < b1; ++y, ++k) {
          out.v[k] = static_cast<int64_t>(m(hash_pair(static_cast<uint64_t>(v[x]), static_cast<uint64_t>(v[y]), seed)));
          if (out.w != nullptr) out.w[k] = in.weights[x] * in.weights[y];
        }
      }
      if (++b == B) {
        b = 0;
        ++p;
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
  at::parallel_for(0, G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t s = boundary_offsets[g];
      bucketize_column(xp + columns[g], D, B, bp + s, boundary_offsets[g + 1] - s, o + g * B);
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

// ---------------------------------------------------------------------------
// recis::feature_program: a whole FeatureEngine plan in one call. Every output
// feature is computed from the input in one pass and written once, into the
// output's final place: no intermediate buffer per op and no concatenation.
// So a chain (truncate then mod, cross then hash then mod) costs one pass,
// as a single op does. See schema.cpp for the program's encoding.

enum : int64_t { kSourceKjt = 0, kSourceCross = 1, kSourceDense = 2 };
enum : int64_t { kStepHash = 0, kStepMod = 1 };

struct Step {
  bool hash;
  uint64_t seed;
  Modulus mod;
};

struct ProgramOutput {
  int64_t source, a, b, c;  // kjt: key a | cross: keys a x b, salt c | dense: column a, boundaries [b, c)
  Modulus cross_mod;
  std::vector<std::pair<int64_t, bool>> truncates;  // (max_length, keep the last)
  int64_t keep = INT64_MAX;  // the smallest max_length: a bag of n keeps min(n, keep) ids, whatever the sides
  std::vector<Step> steps;

  // The part of a bag of n ids that the truncations keep: [start, end).
  void window(int64_t n, int64_t& start, int64_t& end) const {
    start = 0;
    end = n;
    if (truncates.size() == 1) {  // the common case, without the loop
      if (n > keep) {
        start = truncates[0].second ? n - keep : 0;
        end = start + keep;
      }
      return;
    }
    for (const auto& [max_length, last] : truncates) {
      if (end - start > max_length) {
        if (last) {
          start = end - max_length;
        } else {
          end = start + max_length;
        }
      }
    }
  }
};

std::vector<ProgramOutput> parse_program(at::IntArrayRef program, int64_t num_features, int64_t dense_columns,
                                         const float* bp, int64_t num_boundaries, const char* op) {
  size_t pos = 0;
  int64_t k = -1;
  auto next = [&](const char* what) {
    TORCH_CHECK(pos < program.size(), op, ": the program ends early, in output ", k, " (", what, ")");
    return program[pos++];
  };
  const int64_t K = next("the output count");
  TORCH_CHECK(K >= 0, op, ": the program's output count must be >= 0, got ", K);
  std::vector<ProgramOutput> outs(K);
  for (k = 0; k < K; ++k) {
    ProgramOutput& o = outs[k];
    o.source = next("source");
    o.a = next("source argument");
    o.b = next("source argument");
    o.c = next("source argument");
    const int64_t d = next("source argument");
    if (o.source == kSourceKjt || o.source == kSourceCross) {
      features::check_feature(o.a, num_features, op, "input feature");
      if (o.source == kSourceCross) {
        features::check_feature(o.b, num_features, op, "input feature");
        TORCH_CHECK(d >= 0, op, ": output ", k, ": a cross's modulus must be >= 0 (0: none), got ", d);
        o.cross_mod = Modulus(static_cast<uint64_t>(d));
      }
    } else {
      TORCH_CHECK(o.source == kSourceDense, op, ": output ", k, " has an unknown source kind ", o.source);
      TORCH_CHECK(dense_columns >= 0, op, ": output ", k, " bucketizes a dense column, but no dense input was given");
      TORCH_CHECK(o.a >= 0 && o.a < dense_columns, op, ": output ", k, ": dense column ", o.a,
                  " is out of range for ", dense_columns, " columns");
      TORCH_CHECK(0 <= o.b && o.b <= o.c && o.c <= num_boundaries, op, ": output ", k, ": boundaries [", o.b, ", ",
                  o.c, ") are out of range for ", num_boundaries, " boundaries");
      features::check_boundary_run(bp, o.b, o.c, o.a, op);
    }
    const int64_t nt = next("truncation count");
    TORCH_CHECK(nt >= 0, op, ": output ", k, ": a negative truncation count");
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t keep = next("max_length"), last = next("side");
      TORCH_CHECK(keep > 0, op, ": output ", k, ": max_length must be > 0, got ", keep);
      TORCH_CHECK(last == 0 || last == 1, op, ": output ", k, ": a truncation's side must be 0 or 1, got ", last);
      o.truncates.emplace_back(keep, last == 1);
      o.keep = std::min(o.keep, keep);
    }
    const int64_t ns = next("step count");
    TORCH_CHECK(ns >= 0, op, ": output ", k, ": a negative step count");
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t kind = next("step"), seed = next("seed"), mod = next("modulus");
      TORCH_CHECK(kind == kStepHash || kind == kStepMod, op, ": output ", k, " has an unknown step kind ", kind);
      TORCH_CHECK(kind == kStepHash ? mod >= 0 : mod > 0, op, ": output ", k, ": modulus ", mod,
                  kind == kStepHash ? " must be >= 0 (0: none)" : " must be > 0");
      o.steps.push_back({kind == kStepHash, static_cast<uint64_t>(seed), Modulus(static_cast<uint64_t>(mod))});
    }
  }
  TORCH_CHECK(pos == program.size(), op, ": the program has ", program.size() - pos, " entries after its ", K,
              " outputs");
  return outs;
}

Result feature_program_cpu(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                           int64_t num_features, const c10::optional<at::Tensor>& dense, const at::Tensor& boundaries,
                           at::IntArrayRef program) {
  const char* op = "recis::feature_program";
  Jagged in(values, lengths, weights, num_features, op);
  const int64_t B = in.batch;
  check_cpu_1d(boundaries, op, "boundaries", at::kFloat);
  const at::Tensor bnd = boundaries.contiguous();
  const float* bp = bnd.data_ptr<float>();
  at::Tensor x;
  int64_t D = -1;
  if (dense.has_value()) {
    TORCH_CHECK(dense->device().is_cpu(), op, ": dense must be a CPU tensor, got ", dense->device());
    features::check_dense(*dense, op);
    TORCH_CHECK(dense->size(0) == B, op, ": dense has ", dense->size(0), " rows but the batch size is ", B);
    x = dense->contiguous();
    D = x.size(1);
  }
  const std::vector<ProgramOutput> outs = parse_program(program, num_features, D, bp, bnd.numel(), op);
  const int64_t K = static_cast<int64_t>(outs.size());
  const float* xp = D >= 0 ? x.data_ptr<float>() : nullptr;
  const int64_t* L = in.lengths;

  // Pass 1: every output bag's length; each output feature's total.
  at::Tensor out_lengths = at::empty({K * B}, at::kLong);
  int64_t* ol = out_lengths.data_ptr<int64_t>();
  std::vector<int64_t> out_begin(K + 1, 0);
  // uncut[k]: output k copies its input feature whole (no truncation, or one that cut no bag of this
  // batch), so pass 2 copies one contiguous run instead of walking bags.
  std::vector<char> uncut(K, 0);
  at::parallel_for(0, K, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const ProgramOutput& o = outs[k];
      int64_t* len = ol + k * B;
      int64_t total = 0;
      if (o.source == kSourceKjt && o.truncates.empty()) {
        std::copy(L + o.a * B, L + (o.a + 1) * B, len);
        total = in.begin[o.a + 1] - in.begin[o.a];
        uncut[k] = 1;
      } else {
        // Branch-free: these loops vectorise.
        const int64_t keep = o.keep;
        if (o.source == kSourceKjt) {
          const int64_t* la = L + o.a * B;
          for (int64_t b = 0; b < B; ++b) len[b] = std::min(la[b], keep);
        } else if (o.source == kSourceCross) {
          const int64_t *la = L + o.a * B, *lb = L + o.b * B;
          for (int64_t b = 0; b < B; ++b) len[b] = std::min(la[b] * lb[b], keep);
        } else {
          std::fill(len, len + B, 1);
        }
        for (int64_t b = 0; b < B; ++b) total += len[b];
        if (o.source == kSourceKjt && total == in.begin[o.a + 1] - in.begin[o.a]) uncut[k] = 1;
      }
      out_begin[k + 1] = total;
    }
  });
  for (int64_t k = 0; k < K; ++k) out_begin[k + 1] += out_begin[k];

  // Pass 2: each output feature's ids (and weights) from its source, written
  // in place, then its per-id steps over them, one pass per step.
  Output out(out_begin[K], in.weighted);
  const int64_t* v = in.values;
  const float* w = in.weights;
  at::parallel_for(0, K, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const ProgramOutput& o = outs[k];
      const int64_t first = out_begin[k];
      int64_t dst = first;
      if (uncut[k]) {
        const int64_t src = in.begin[o.a], n = in.begin[o.a + 1] - src;
        std::copy(v + src, v + src + n, out.v + dst);
        if (out.w != nullptr) std::copy(w + src, w + src + n, out.w + dst);
      } else if (o.source == kSourceKjt) {
        int64_t src = in.begin[o.a];
        const int64_t *len = L + o.a * B, *kept = ol + k * B;
        // One short truncation (the common case): each bag copies exactly `keep` ids from its
        // window's start, the ones past what it keeps overwritten by the next bag. Bags of
        // varying length then cost no mispredicted branch. Not past the feature's end (another
        // thread writes the next feature) nor past the input's.
        const bool fixed = o.truncates.size() == 1 && o.keep <= 8, last = o.truncates[0].second;
        const int64_t feature_end = out_begin[k + 1], num_values = in.values_t.numel();
        for (int64_t b = 0; b < B; ++b) {
          int64_t start, end;
          if (fixed) {
            start = last ? len[b] - kept[b] : 0;
            end = start + kept[b];
          } else {
            o.window(len[b], start, end);
          }
          const int64_t from = src + start;
          if (fixed && dst + o.keep <= feature_end && from + o.keep <= num_values) {
            for (int64_t i = 0; i < o.keep; ++i) out.v[dst + i] = v[from + i];
            if (out.w != nullptr) {
              for (int64_t i = 0; i < o.keep; ++i) out.w[dst + i] = w[from + i];
            }
          } else {  // a loop: std::copy would call memmove for a few ids
            for (int64_t i = 0; i < end - start; ++i) out.v[dst + i] = v[from + i];
            if (out.w != nullptr) {
              for (int64_t i = 0; i < end - start; ++i) out.w[dst + i] = w[from + i];
            }
          }
          dst += end - start;
          src += len[b];
        }
      } else if (o.source == kSourceCross) {
        int64_t ia = in.begin[o.a], ib = in.begin[o.b];
        const uint64_t seed = static_cast<uint64_t>(o.c);
        const int64_t* la = L + o.a * B;
        const int64_t* lb = L + o.b * B;
        const int64_t out_end = out_begin[k + 1];
        // Bags of at most one id on both sides (Criteo's categorical features): no
        // pair loop and no branch on emptiness. Every bag's pair is hashed and
        // written at dst, which advances only by na * nb, so an empty bag's value is
        // overwritten by the next; a write at out_end (trailing empty bags) goes to
        // a sink, and the reads clamp into the input.
        const bool single = o.truncates.empty() && out.w == nullptr && B > 0 && in.values_t.numel() > 0 &&
                            *std::max_element(la, la + B) <= 1 && *std::max_element(lb, lb + B) <= 1;
        if (single) {
          const int64_t last = in.values_t.numel() - 1;
          int64_t sink = 0;
          for (int64_t b = 0; b < B; ++b) {
            const int64_t na = la[b], nb = lb[b];
            const uint64_t x = static_cast<uint64_t>(v[std::min(ia, last)]);
            const uint64_t y = static_cast<uint64_t>(v[std::min(ib, last)]);
            int64_t* to = dst < out_end ? out.v + dst : &sink;
            *to = static_cast<int64_t>(o.cross_mod(hash_pair(x, y, seed)));
            dst += na * nb;
            ia += na;
            ib += nb;
          }
        } else {
          for (int64_t b = 0; b < B; ++b) {
            const int64_t na = la[b], nb = lb[b];
            int64_t start = 0, end = na * nb;
            if (!o.truncates.empty()) o.window(na * nb, start, end);
            // Pair p is (left p / nb, right p % nb), left outer; walked without a division per pair.
            int64_t px = 0, py = 0;
            if (start > 0) {
              px = start / nb;
              py = start % nb;
            }
            for (int64_t p = start; p < end; ++p, ++dst) {
              const int64_t xa = ia + px, yb = ib + py;
              out.v[dst] = static_cast<int64_t>(
                  o.cross_mod(hash_pair(static_cast<uint64_t>(v[xa]), static_cast<uint64_t>(v[yb]), seed)));
              if (out.w != nullptr) out.w[dst] = w[xa] * w[yb];
              if (++py == nb) {
                py = 0;
                ++px;
              }
            }
            ia += na;
            ib += nb;
          }
        }
      } else {
        const float* bounds = bp + o.b;
        const int64_t nbounds = o.c - o.b;
        bucketize_column(xp + o.a, D, B, bounds, nbounds, out.v + dst);
        if (out.w != nullptr) std::fill(out.w + dst, out.w + dst + B, 1.0f);
      }
      const int64_t n = out_begin[k + 1] - first;
      for (const Step& step : o.steps) {
        if (step.hash) {
          step_in_place<true>(out.v + first, n, step.seed, step.mod);
        } else {
          step_in_place<false>(out.v + first, n, 0, step.mod);
        }
      }
    }
  });
  return {out.values, out_lengths, out.weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("feature_program", &feature_program_cpu);
  m.impl("feature_concat", &feature_concat_cpu);
  m.impl("feature_hash", &feature_hash_cpu);
  m.impl("feature_mod", &feature_mod_cpu);
  m.impl("feature_multi_hash", &feature_multi_hash_cpu);
  m.impl("feature_truncate", &feature_truncate_cpu);
  m.impl("feature_cross", &feature_cross_cpu);
  m.impl("feature_bucketize", &feature_bucketize_cpu);
}

}  // namespace recis
