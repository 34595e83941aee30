// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// HashTable: IdMap + EmbeddingBlocks + deterministic initialiser. Torch-free.
//
// The parallel loops are injected: every method that runs in parallel takes a
// `ParFor` callable `par(begin, end, grain, fn)` where fn(b, e) handles the
// half-open range [b, e). The torch binding passes at::parallel_for; a plain
// serial loop works too.
//
// Concurrency contract: find() may run concurrently with other find() calls;
// find_or_insert(), import and export must run alone. The binding layer holds
// a reader/writer lock per table to enforce this.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "embedding_blocks.h"
#include "hash.h"
#include "id_map.h"
#include "initializer.h"

namespace recis {
namespace hashtable {

struct HashTableConfig {
  int64_t dim = 0;
  int64_t state_dim = 0;       // optimizer-state floats per row
  int64_t initial_capacity = 0;  // rows expected; a hint only
  int64_t block_rows = 8192;   // power of two
  InitSpec init;
};

class HashTable {
 public:
  static constexpr int64_t kGrain = 2048;
  static constexpr int64_t kPrefetchDistance = 16;
  // Marks a row as not yet numbered inside find_or_insert; real rows stay
  // far below it.
  static constexpr int64_t kPending = int64_t{1} << 62;

  explicit HashTable(const HashTableConfig& cfg)
      : cfg_(cfg),
        map_(cfg.initial_capacity),
        blocks_(cfg.dim, cfg.state_dim, cfg.block_rows) {
    if (cfg.initial_capacity > 0) blocks_.reserve(cfg.initial_capacity);
  }

  const HashTableConfig& config() const { return cfg_; }
  int64_t dim() const { return cfg_.dim; }
  int64_t state_dim() const { return cfg_.state_dim; }
  int64_t size() const { return blocks_.num_rows(); }
  int64_t capacity() const { return blocks_.capacity(); }
  int64_t memory_bytes() const { return map_.memory_bytes() + blocks_.memory_bytes(); }
  EmbeddingBlocks& blocks() { return blocks_; }
  const EmbeddingBlocks& blocks() const { return blocks_; }

  // Embedding floats of row r: (dim,), followed by state_dim state floats.
  float* row(int64_t r) { return blocks_.row(r); }
  const float* row(int64_t r) const { return blocks_.row(r); }

  // The initial embedding of `key` (what find_or_insert would write).
  void initial_row(int64_t key, float* dst) const { init_row(dst, key, cfg_.dim, cfg_.init); }

  // rows[i] = row of keys[i], or -1 where absent. Returns the number absent.
  template <typename ParFor>
  int64_t find(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par) const {
    std::atomic<int64_t> missing{0};
    par(int64_t{0}, n, kGrain, [&](int64_t b, int64_t e) {
      int64_t local = 0;
      for (int64_t i = b; i < e; ++i) {
        if (i + kPrefetchDistance < e) {
          map_.prefetch(mix64(static_cast<uint64_t>(keys[i + kPrefetchDistance])));
        }
        const int64_t r = map_.find(keys[i], mix64(static_cast<uint64_t>(keys[i])));
        rows[i] = r;
        local += r < 0;
      }
      missing.fetch_add(local, std::memory_order_relaxed);
    });
    return missing.load();
  }

  // rows[i] = row of keys[i]; absent keys get a new, initialised row.
  // Duplicates in `keys` map to one row. New rows are numbered in the order
  // of the keys' first occurrence, so the row layout is deterministic (the
  // same keys in the same order give the same rows, whatever the threads).
  // Returns the number of rows created.
  template <typename ParFor>
  int64_t find_or_insert(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par) {
    if (find(keys, n, rows, par) == 0) return 0;

    // Group the misses by IdMap shard (a stable counting sort) so that each
    // shard is filled by exactly one thread, without locks.
    const int num_shards = map_.num_shards();
    std::vector<int64_t> miss_pos;
    std::vector<int64_t> shard_begin(static_cast<size_t>(num_shards) + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0) {
        miss_pos.push_back(i);
        ++shard_begin[map_.shard_of(mix64(static_cast<uint64_t>(keys[i]))) + 1];
      }
    }
    const int64_t m = static_cast<int64_t>(miss_pos.size());
    for (int s = 0; s < num_shards; ++s) shard_begin[s + 1] += shard_begin[s];
    std::vector<int64_t> by_shard(static_cast<size_t>(m));  // miss indices
    {
      std::vector<int64_t> cursor(shard_begin.begin(), shard_begin.end() - 1);
      for (int64_t j = 0; j < m; ++j) {
        by_shard[cursor[map_.shard_of(mix64(static_cast<uint64_t>(keys[miss_pos[j]])))]++] = j;
      }
    }

    // 1. Parallel over shards: insert each new key with a pending row
    //    kPending + (position of its first occurrence); later duplicates
    //    find it and copy that pending value.
    std::vector<Slot*> slot_of(static_cast<size_t>(m), nullptr);
    par(int64_t{0}, static_cast<int64_t>(num_shards), 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const int64_t begin = shard_begin[s], end = shard_begin[s + 1];
        if (begin == end) continue;
        map_.reserve_in_shard(static_cast<int>(s), end - begin);
        for (int64_t k = begin; k < end; ++k) {
          const int64_t j = by_shard[k];
          const int64_t pos = miss_pos[j];
          const int64_t key = keys[pos];
          bool inserted = false;
          Slot* slot = map_.find_or_insert_reserved(key, mix64(static_cast<uint64_t>(key)), kPending + pos, &inserted);
          if (inserted) slot_of[j] = slot;
          rows[pos] = slot->row;
        }
      }
    });

    // 2. Serial, in key order: number the new rows.
    blocks_.reserve(m);  // upper bound: duplicates share a row
    std::vector<int64_t> created;
    for (int64_t j = 0; j < m; ++j) {
      if (slot_of[j] != nullptr) {
        const int64_t r = blocks_.allocate();
        slot_of[j]->row = r;
        rows[miss_pos[j]] = r;
        created.push_back(j);
      }
    }

    // 3. Parallel: resolve duplicates' pending rows, initialise new rows.
    par(int64_t{0}, m, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int64_t pos = miss_pos[j];
        if (rows[pos] >= kPending) rows[pos] = rows[rows[pos] - kPending];
      }
    });
    const int64_t num_created = static_cast<int64_t>(created.size());
    par(int64_t{0}, num_created, int64_t{256}, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const int64_t pos = miss_pos[created[c]];
        init_new_row(rows[pos], keys[pos]);
      }
    });
    return num_created;
  }

  // Copies every row out, in row order: ids (n,), emb (n, dim), state
  // (n, state_dim). Buffers must hold size() rows.
  template <typename ParFor>
  void export_rows(int64_t* ids, float* emb, float* state, ParFor&& par) const {
    const int64_t n = size(), dim = cfg_.dim, sdim = cfg_.state_dim;
    par(int64_t{0}, n, int64_t{1024}, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* src = blocks_.row(r);
        ids[r] = blocks_.row_id(r);
        std::memcpy(emb + r * dim, src, sizeof(float) * dim);
        if (sdim > 0 && state != nullptr) std::memcpy(state + r * sdim, src + dim, sizeof(float) * sdim);
      }
    });
  }

  // Writes rows for n distinct keys, inserting absent ones: emb (n, dim) and
  // state (n, state_dim). A nullptr keeps the current value (the initial
  // value for rows this call creates).
  template <typename ParFor>
  void import_rows(const int64_t* keys, int64_t n, const float* emb, const float* state, ParFor&& par) {
    std::vector<int64_t> rows(static_cast<size_t>(n));
    find_or_insert(keys, n, rows.data(), par);
    const int64_t dim = cfg_.dim, sdim = cfg_.state_dim;
    par(int64_t{0}, n, int64_t{1024}, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float* dst = blocks_.row(rows[i]);
        if (emb != nullptr) std::memcpy(dst, emb + i * dim, sizeof(float) * dim);
        if (sdim > 0 && state != nullptr) std::memcpy(dst + dim, state + i * sdim, sizeof(float) * sdim);
      }
    });
  }

 private:
  void init_new_row(int64_t r, int64_t key) {
    float* dst = blocks_.row(r);
    init_row(dst, key, cfg_.dim, cfg_.init);
    if (cfg_.state_dim > 0) std::memset(dst + cfg_.dim, 0, sizeof(float) * cfg_.state_dim);
    blocks_.row_id(r) = key;
  }

  HashTableConfig cfg_;
  IdMap map_;
  EmbeddingBlocks blocks_;
};

}  // namespace hashtable
}  // namespace recis
