// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Randomised check of IdMap against std::unordered_map: batched and single
// finds, inserts with shard growth, and erases that shift keys back across
// full buckets (and across a shard's wrap-around). Built by
// tests/ops/test_id_map_cpp.py with and without AVX2, so both bucket
// compares run. Exit code 0 and "ok" on success.
#include <cstdint>
#include <cstdio>
#include <random>
#include <unordered_map>
#include <vector>

#include "id_map.h"

using recis::hashtable::IdMap;
using recis::hashtable::mix64;

#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      std::fprintf(stderr, __VA_ARGS__); \
      std::fprintf(stderr, "\n");        \
      return 1;                          \
    }                                    \
  } while (0)

// capacity_hint sizes the shards up front (to a bucket count that is no
// power of two); bulk reserves a batch's room with reserve_total, as the
// table's inserts do, instead of key by key.
static int run(int shard_bits, int64_t pool, int rounds, uint64_t seed, int64_t capacity_hint = 0,
               bool bulk = false) {
  IdMap map(capacity_hint, shard_bits);
  std::unordered_map<int64_t, int64_t> ref;
  std::mt19937_64 rng(seed);
  // Keys from a small pool (so erased keys come back), spread over the whole
  // int64 range including its ends.
  std::vector<int64_t> keys(static_cast<size_t>(pool));
  for (auto& k : keys) k = static_cast<int64_t>(rng());
  keys[0] = INT64_MIN;
  keys[1] = INT64_MAX;
  keys[2] = 0;
  keys[3] = -1;
  int64_t next_row = 0;
  for (int r = 0; r < rounds; ++r) {
    const int op = static_cast<int>(rng() % 3);
    const int64_t count = static_cast<int64_t>(rng() % (pool / 2 + 1));
    if (op == 0) {  // insert a batch
      if (bulk) map.reserve_total(count);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t key = keys[rng() % pool];
        const uint64_t h = mix64(static_cast<uint64_t>(key));
        if (bulk) {
          CHECK(map.size() + 1 <= static_cast<int64_t>(IdMap::kMaxLoad * static_cast<double>(map.num_slots())) + 1,
                "reserve_total(%lld) left no room", (long long)count);
        }
        map.reserve_in_shard(map.shard_of(h), 1);
        bool inserted = false;
        int64_t* row = map.find_or_insert_reserved(key, h, next_row, &inserted);
        const bool fresh = ref.find(key) == ref.end();
        CHECK(inserted == fresh, "insert of %lld: inserted=%d, reference says new=%d", (long long)key, inserted, fresh);
        if (fresh) ref[key] = next_row++;
        CHECK(*row == ref[key], "insert of %lld returned row %lld, reference %lld", (long long)key, (long long)*row,
              (long long)ref[key]);
      }
    } else if (op == 1) {  // erase a batch
      for (int64_t i = 0; i < count; ++i) {
        const int64_t key = keys[rng() % pool];
        const auto it = ref.find(key);
        const int64_t want = it == ref.end() ? -1 : it->second;
        const int64_t got = map.erase(key, mix64(static_cast<uint64_t>(key)));
        CHECK(got == want, "erase of %lld returned %lld, reference %lld", (long long)key, (long long)got,
              (long long)want);
        if (it != ref.end()) ref.erase(it);
      }
    }
    // After every step: every pool key, batched and one by one.
    std::vector<int64_t> rows(keys.size());
    const int64_t missing = map.find_batch(keys.data(), pool, rows.data());
    int64_t want_missing = 0;
    for (int64_t i = 0; i < pool; ++i) {
      const auto it = ref.find(keys[i]);
      const int64_t want = it == ref.end() ? -1 : it->second;
      want_missing += want < 0;
      CHECK(rows[i] == want, "round %d: find_batch(%lld) = %lld, reference %lld", r, (long long)keys[i],
            (long long)rows[i], (long long)want);
      CHECK(map.find(keys[i], mix64(static_cast<uint64_t>(keys[i]))) == want, "round %d: find(%lld) differs", r,
            (long long)keys[i]);
    }
    CHECK(missing == want_missing, "find_batch counted %lld missing, reference %lld", (long long)missing,
          (long long)want_missing);
    CHECK(map.size() == static_cast<int64_t>(ref.size()), "size %lld, reference %zu", (long long)map.size(),
          ref.size());
  }
  return 0;
}

int main() {
  // One shard of few buckets: long runs of full buckets and wrap-around.
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    if (run(0, 40, 60, seed) != 0) return 1;
  }
  // Many shards, growth by rehash.
  if (run(6, 20000, 30, 99) != 0) return 1;
  // Shards sized from a hint, then grown past it; batches reserved at once.
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    if (run(0, 300, 40, seed, 37) != 0) return 1;
    if (run(3, 5000, 20, seed, 1000, true) != 0) return 1;
  }
  // A map sized from a hint holds that many keys at a load near kHintLoad, with
  // no growth on the way.
  {
    const int64_t n = 1000000;
    IdMap map(n, 6);
    const int64_t slots = map.num_slots();
    std::mt19937_64 rng(7);
    map.reserve_total(n);
    CHECK(map.num_slots() == slots, "reserve_total(%lld) grew a map sized for it: %lld -> %lld slots", (long long)n,
          (long long)slots, (long long)map.num_slots());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t key = static_cast<int64_t>(rng());
      const uint64_t h = mix64(static_cast<uint64_t>(key));
      bool inserted = false;
      map.find_or_insert_reserved(key, h, i, &inserted);
    }
    const double load = static_cast<double>(map.size()) / static_cast<double>(map.num_slots());
    CHECK(load > 0.45 && load <= IdMap::kHintLoad, "1e6 keys in a map sized for them: load %.3f", load);
  }
  std::printf("ok\n");
  return 0;
}
