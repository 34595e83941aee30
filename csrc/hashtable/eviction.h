// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Eviction policies, as HierarchicalKV keeps them: a score per row, computed
// from the row's metadata. Under a capacity cap the rows with the lowest scores
// go first (ties broken by row index, so the choice is deterministic); TTL
// frees the rows whose recency score is older than the TTL. Adding a policy is
// a score function here and its entry in RECIS_EVICTION_POLICIES (Python reads
// the names from the op library); a C++ user can also hand a table any score
// function (HashTableConfig::custom_score). Torch-free.
#pragma once

#include <cstdint>

#include "embedding_blocks.h"  // RowMeta

namespace recis {
namespace hashtable {

// X(enum name, code, Python name).
#define RECIS_EVICTION_POLICIES(X) \
  X(kNone, 0, "none")              \
  X(kLRU, 1, "lru")                \
  X(kLFU, 2, "lfu")

enum class EvictionPolicy : int32_t {
#define RECIS_POLICY_ENUM(name, code, str) name = code,
  RECIS_EVICTION_POLICIES(RECIS_POLICY_ENUM)
#undef RECIS_POLICY_ENUM
  kCustom = 100,  // HashTableConfig::custom_score (C++ only)
};

// A row's eviction score: lower goes first; compared as (primary, secondary).
struct RowScore {
  int64_t primary = 0;
  int64_t secondary = 0;
  bool operator<(const RowScore& o) const {
    return primary < o.primary || (primary == o.primary && secondary < o.secondary);
  }
};

// RowMeta's clocks and counts are uint32_t: widen them to int64_t before any arithmetic that can go
// below zero (-m.last_seen would wrap).
using ScoreFn = RowScore (*)(const RowMeta&);

// The rows seen longest ago go first.
inline RowScore lru_score(const RowMeta& m) { return {int64_t{m.last_seen}, int64_t{m.last_seen}}; }
// The rows seen least often go first; among them, the ones seen longest ago.
inline RowScore lfu_score(const RowMeta& m) { return {int64_t{m.freq}, int64_t{m.last_seen}}; }

// The score function of a built-in policy (nullptr for kNone and kCustom).
inline ScoreFn policy_score(EvictionPolicy p) {
  switch (p) {
    case EvictionPolicy::kLRU:
      return &lru_score;
    case EvictionPolicy::kLFU:
      return &lfu_score;
    default:
      return nullptr;
  }
}

// TTL: a row unseen for more than ttl_steps updates at `clock` is stale (its
// recency score, last_seen, is below clock - ttl_steps).
inline bool is_stale(const RowMeta& m, int64_t clock, int64_t ttl_steps) {
  return lru_score(m).primary < clock - ttl_steps;
}

}  // namespace hashtable
}  // namespace recis
