// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// A custom eviction policy from C++ (csrc/hashtable/eviction.h): a table whose
// cap evicts the rows seen most recently first (the reverse of LRU), driven
// through HashTable::find_or_insert with a serial loop, against the expected
// survivors; and the built-in LRU on the same stream for contrast.
#include <cstdio>
#include <vector>

#include "hash_table.h"

using namespace recis::hashtable;

namespace {

struct Serial {
  template <typename Fn>
  void operator()(int64_t b, int64_t e, int64_t, Fn&& fn) const {
    if (b < e) fn(b, e);
  }
  int threads() const { return 1; }
};

RowScore most_recent_first(const RowMeta& m) { return {-static_cast<int64_t>(m.last_seen), 0}; }

bool holds(const HashTable& t, int64_t key) {
  int64_t row = -1;
  t.find(&key, 1, &row, Serial{});
  return row >= 0;
}

int run(EvictionPolicy policy, ScoreFn score, const std::vector<int64_t>& expect_present,
        const std::vector<int64_t>& expect_absent) {
  HashTableConfig cfg;
  cfg.dim = 4;
  cfg.block_rows = 8;
  cfg.max_capacity = 4;
  cfg.policy = policy;
  cfg.custom_score = score;
  HashTable t(cfg);
  // Ids 1..4 fill the cap at clocks 0..3; then id 5 at clock 4 needs room for one row
  // (the cap also frees 2% slack, which rounds to none at 4 rows).
  for (int64_t clock = 0; clock < 5; ++clock) {
    const int64_t key = clock + 1;
    int64_t row = -1;
    t.find_or_insert(&key, 1, &row, Serial{}, clock);
  }
  for (int64_t k : expect_present) {
    if (!holds(t, k)) {
      std::printf("policy %d: id %lld should have a row\n", static_cast<int>(policy), static_cast<long long>(k));
      return 1;
    }
  }
  for (int64_t k : expect_absent) {
    if (holds(t, k)) {
      std::printf("policy %d: id %lld should be evicted\n", static_cast<int>(policy), static_cast<long long>(k));
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main() {
  // LRU evicts id 1 (seen at clock 0); the custom policy evicts id 4 (seen at clock 3).
  if (run(EvictionPolicy::kLRU, nullptr, {2, 3, 4, 5}, {1})) return 1;
  if (run(EvictionPolicy::kCustom, &most_recent_first, {1, 2, 3, 5}, {4})) return 1;
  std::printf("ok\n");
  return 0;
}
