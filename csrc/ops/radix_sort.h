// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Stable LSD radix sort of (key, value) pairs by key, for keys in
// [0, max_key]. Torch-free. Used to group gradient contributions by row.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace recis {

// Sorts keys[0, n) ascending and permutes vals alongside; stable, so equal
// keys keep their input order. tmp_keys/tmp_vals are scratch of size n.
inline void radix_sort_pairs(int64_t* keys, int64_t* vals, int64_t n, uint64_t max_key,
                             std::vector<int64_t>& tmp_keys, std::vector<int64_t>& tmp_vals) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t{1} << kBits;
  if (n <= 1) return;
  tmp_keys.resize(static_cast<size_t>(n));
  tmp_vals.resize(static_cast<size_t>(n));
  int64_t* src_k = keys;
  int64_t* src_v = vals;
  int64_t* dst_k = tmp_keys.data();
  int64_t* dst_v = tmp_vals.data();
  std::vector<int64_t> count(kBuckets);
  for (int shift = 0; shift < 64 && (max_key >> shift) != 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(static_cast<uint64_t>(src_k[i]) >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (int64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(static_cast<uint64_t>(src_k[i]) >> shift) & (kBuckets - 1)]++;
      dst_k[pos] = src_k[i];
      dst_v[pos] = src_v[i];
    }
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  if (src_k != keys) {
    std::copy(src_k, src_k + n, keys);
    std::copy(src_v, src_v + n, vals);
  }
}

}  // namespace recis
