// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The per-value arithmetic of the feature ops, torch-free and usable from
// host and device code: the id hash (XXH64 of the id's 8 little-endian
// bytes), the cross hash (XXH64 of the two ids' 16 bytes), unsigned modulo
// and bucketizing. Both hashes equal xxh64() over those bytes (tested), so a
// string's hash, an id's hash and a cross's hash are one family.
#pragma once

#include <cstdint>

#include "../hashtable/xxh64_core.h"

namespace recis {
namespace features {

using xxh64::avalanche;
using xxh64::lane;
using xxh64::kP5;

// The step between the seeds of multi_hash's hashes (2**64 / golden ratio).
constexpr uint64_t kSeedStep = 0x9E3779B97F4A7C15ULL;

// XXH64(seed) of the 8 little-endian bytes of `id`.
RECIS_HD uint64_t hash_id(uint64_t id, uint64_t seed) { return avalanche(lane(seed + kP5 + 8, id)); }

// XXH64(seed) of the 16 bytes `a` then `b`, little-endian.
RECIS_HD uint64_t hash_pair(uint64_t a, uint64_t b, uint64_t seed) {
  return avalanche(lane(lane(seed + kP5 + 16, a), b));
}

// `v`'s bits read as unsigned, modulo `m` (m == 0: unchanged).
RECIS_HD int64_t umod(uint64_t v, uint64_t m) { return static_cast<int64_t>(m ? v % m : v); }

// The bucket of `x` among `n` non-decreasing boundaries: the number of
// boundaries <= x (torch.bucketize(..., right=True)), in [0, n]. NaN goes to
// its own bucket, n + 1.
RECIS_HD int64_t bucket_of(float x, const float* boundaries, int64_t n) {
  if (x != x) return n + 1;
  if (n <= 64) {  // a branch-free count: vectorises, and beats a binary search this small
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += boundaries[i] <= x;
    return count;
  }
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (boundaries[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace features
}  // namespace recis
