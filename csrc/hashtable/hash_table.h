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
// find_or_insert(), eviction, import and export must run alone. The binding
// layer holds a reader/writer lock per table to enforce this.
//
// Table hygiene. The table's clock is its update count: training lookups at
// clock c mark rows last_seen = c, and the update that follows marks them
// last_update = c + 1. Admission gives an id a row only at its
// admit_threshold-th sighting (until then lookups return -1: the id reads its
// initial value and is not trained). Eviction frees rows unseen for ttl_steps
// updates, and, with max_capacity, the least recently (LRU) or least
// frequently (LFU) used rows when full. Rows seen at the current clock are
// never evicted: their update has not run yet. Freed rows are reused.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "embedding_blocks.h"
#include "eviction.h"
#include "hash.h"
#include "id_map.h"
#include "initializer.h"
#include "row_types.h"

namespace recis {
namespace hashtable {

struct HashTableConfig {
  int64_t dim = 0;
  int64_t state_dim = 0;       // optimizer-state floats per row
  int64_t initial_capacity = 0;  // rows expected; a hint only
  int64_t block_rows = 8192;   // power of two
  InitSpec init;
  int64_t admit_threshold = 0;  // sightings before an id gets a row; <= 1 admits at once
  // Ids counted toward admission at most (0: 2 * max_capacity under a cap, else 2**20): past it the
  // candidates seen least recently are forgotten (5% at a time), so the counter's memory is bounded.
  int64_t admit_capacity = 0;
  int64_t ttl_steps = 0;        // evict rows unseen for this many updates; 0: never
  int64_t max_capacity = 0;     // most live rows; 0: unbounded
  EvictionPolicy policy = EvictionPolicy::kNone;  // how to make room under max_capacity (eviction.h)
  ScoreFn custom_score = nullptr;                 // the score of EvictionPolicy::kCustom
  RowType row_type = RowType::kF32;  // how the embedding elements are stored (state is float32)
  bool track_access = false;  // mark rows seen without TTL or a cap (a cache in front of DiskRows)

  bool tracks_access() const { return track_access || ttl_steps > 0 || max_capacity > 0; }
};

struct TableCounters {
  int64_t admitted = 0;  // rows created
  int64_t evicted = 0;   // rows freed by TTL, the capacity cap or erase()
  int64_t rejected = 0;  // training lookups refused a row (admission, or a full cap)
};

class HashTable {
 public:
  static constexpr int64_t kGrain = 2048;
  // Marks a row as not yet numbered inside find_or_insert; real rows stay
  // far below it.
  static constexpr int64_t kPending = int64_t{1} << 62;
  // The eviction log's length without a capacity cap.

  explicit HashTable(const HashTableConfig& cfg)
      : cfg_(cfg),
        // Under a cap the IdMap is sized once for the cap plus 25% headroom,
        // with shards of at least ~4096 keys, so that shard occupancy, which
        // fluctuates as ids churn, stays within the headroom and never grows it.
        map_(cfg.max_capacity > 0 ? std::max(cfg.initial_capacity, cfg.max_capacity + cfg.max_capacity / 4)
                                  : cfg.initial_capacity,
             cfg.max_capacity > 0 ? capped_shard_bits(cfg.max_capacity) : 6),
        blocks_(cfg.dim, cfg.state_dim, cfg.block_rows, cfg.row_type) {
    if (cfg.initial_capacity > 0) blocks_.reserve(cfg.initial_capacity);
  }

  const HashTableConfig& config() const { return cfg_; }
  // Marks rows seen from the next lookup on (the table became a cache whose rows in use must stay).
  void track_access() { cfg_.track_access = true; }
  int64_t dim() const { return cfg_.dim; }
  int64_t state_dim() const { return cfg_.state_dim; }
  // Live rows (ids with a row).
  int64_t size() const { return blocks_.live_rows(); }
  // Row indices are below this (live or free).
  int64_t row_limit() const { return blocks_.row_limit(); }
  const TableCounters& counters() const { return counters_; }
  int64_t pending() const { return static_cast<int64_t>(pending_.size()); }
  int64_t capacity() const { return blocks_.capacity(); }
  // Bytes reserved: the IdMap's slots and every allocated row block (a fresh table reserves its
  // initial capacity), the pending and eviction logs.
  // The admission counter's bytes (its hash map: buckets and nodes), part of memory_bytes().
  int64_t pending_bytes() const {
    return static_cast<int64_t>(pending_.bucket_count() * sizeof(void*) + pending_.size() * 40);
  }
  int64_t memory_bytes() const {
    return map_.memory_bytes() + blocks_.memory_bytes() + pending_bytes() +
           static_cast<int64_t>((evicted_ids_.capacity() + evicted_steps_.capacity()) * sizeof(int64_t));
  }
  int64_t id_map_bytes() const { return map_.memory_bytes(); }
  // Bytes in use: the live rows, and the IdMap slots they fill.
  int64_t used_bytes() const {
    const int64_t slots = map_.num_slots();
    return blocks_.used_bytes() + (slots > 0 ? map_.memory_bytes() / slots * size() : 0);
  }
  EmbeddingBlocks& blocks() { return blocks_; }
  const EmbeddingBlocks& blocks() const { return blocks_; }

  RowType row_type() const { return cfg_.row_type; }
  // The embedding of float32 row r (row_type() == kF32): (dim,), followed by its state.
  const float* row(int64_t r) const { return blocks_.row(r); }
  // Row r's embedding elements (of row_type()) and its state_dim state floats.
  const uint8_t* row_bytes(int64_t r) const { return blocks_.row_bytes(r); }
  const float* state(int64_t r) const { return blocks_.state(r); }
  // The same, for writing (a snapshot in progress keeps the old values: see embedding_blocks.h).
  float* mutable_row(int64_t r) { return blocks_.mutable_row(r); }
  uint8_t* mutable_row_bytes(int64_t r) { return blocks_.mutable_row_bytes(r); }
  float* mutable_state(int64_t r) { return blocks_.mutable_state(r); }
  // Row r's embedding as float32 values, into dst (dim,).
  void read_row(int64_t r, float* dst) const { load_elements(blocks_.row_bytes(r), cfg_.row_type, dst, cfg_.dim); }

  // The initial embedding of `key` (what find_or_insert would write, as stored: rounded to the
  // row type), as float32 values.
  void initial_row(int64_t key, float* dst) const {
    init_row(dst, key, cfg_.dim, cfg_.init);
    if (cfg_.row_type != RowType::kF32) round_to_row_type(dst, cfg_.dim);
  }

  // v rounded to the row type and back, in place.
  void round_to_row_type(float* v, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) {
      v[i] = cfg_.row_type == RowType::kF16 ? half_to_float(float_to_half(v[i])) : bf16_to_float(float_to_bf16(v[i]));
    }
  }

  // rows[i] = row of keys[i], or -1 where absent. Returns the number absent.
  template <typename ParFor>
  int64_t find(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par) const {
    std::atomic<int64_t> missing{0};
    par(int64_t{0}, n, kGrain, [&](int64_t b, int64_t e) {
      missing.fetch_add(map_.find_batch(keys + b, e - b, rows + b), std::memory_order_relaxed);
    });
    return missing.load();
  }

  // rows[i] = row of keys[i]; absent keys get a new, initialised row (subject
  // to admission and the capacity cap; refused ids get -1). Duplicates in
  // `keys` map to one row. New rows are numbered in the order of the keys'
  // first occurrence (free rows first), so the row layout is deterministic.
  // `clock` is the table's update count; lookups mark rows with it.
  // Returns the number of rows created.
  template <typename ParFor>
  int64_t find_or_insert(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par, int64_t clock = 0) {
    tick(clock);
    int64_t created = 0;
    if (find(keys, n, rows, par) > 0) {
      // The rows this lookup found are in use at `clock` before any is created: making room under
      // the cap must not free one of them and hand its row to a new id of the same batch.
      if (cfg_.max_capacity > 0) mark_seen(rows, n, clock, par);
      created = insert_missing(keys, n, rows, par, clock);
    }
    if (cfg_.tracks_access()) touch(rows, n, clock, par);
    return created;
  }

  // Marks rows as seen at `clock` (last_seen only; touch() also counts the sighting).
  template <typename ParFor>
  void mark_seen(const int64_t* rows, int64_t n, int64_t clock, ParFor&& par) {
    const uint32_t c = clock32(clock);
    par(int64_t{0}, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (rows[i] >= 0) __atomic_store_n(&blocks_.mutable_meta(rows[i]).last_seen, c, __ATOMIC_RELAXED);
      }
    });
  }

  // Runs the TTL scan when a quarter of ttl_steps has passed since the last
  // one, so that no row outlives its TTL by more than a quarter of it.
  void tick(int64_t clock) {
    clock32(clock + 1);  // a clock row metadata cannot hold raises here, before any row changes
    if (log_restarted_) {
      // The first update after a restore: the evictions before it are not in the log.
      log_dropped_through_ = std::max(log_dropped_through_, clock);
      log_restarted_ = false;
    }
    if (cfg_.ttl_steps > 0 && clock - last_ttl_scan_ >= std::max<int64_t>(1, cfg_.ttl_steps / 4)) {
      evict_stale(clock);
    }
  }

  // Marks the rows of a training lookup as seen at `clock`.
  template <typename ParFor>
  void touch(const int64_t* rows, int64_t n, int64_t clock, ParFor&& par) {
    const uint32_t c = clock32(clock);
    par(int64_t{0}, n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = rows[i];
        if (r < 0) continue;
        RowMeta& m = blocks_.mutable_meta(r);
        __atomic_store_n(&m.last_seen, c, __ATOMIC_RELAXED);
        __atomic_fetch_add(&m.freq, 1u, __ATOMIC_RELAXED);
      }
    });
  }

  // Frees every live row unseen since clock - ttl_steps. Returns how many.
  int64_t evict_stale(int64_t clock) {
    last_ttl_scan_ = clock;
    if (cfg_.ttl_steps <= 0) return 0;
    std::vector<int64_t> stale;
    for (int64_t r = 0; r < row_limit(); ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (m.live && is_stale(m, clock, cfg_.ttl_steps)) stale.push_back(r);
    }
    for (int64_t r : stale) evict_row(r, clock);
    return static_cast<int64_t>(stale.size());
  }

  // Frees the rows of the given ids (absent ids are ignored). Returns how many.
  int64_t erase(const int64_t* keys, int64_t n, int64_t clock) {
    int64_t freed = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = map_.find(keys[i], mix64(static_cast<uint64_t>(keys[i])));
      if (r >= 0) {
        evict_row(r, clock);
        ++freed;
      }
    }
    return freed;
  }

  // Drops every row, the admission counters and the eviction log (a restore
  // starts from here). Row memory is kept for reuse.
  void clear() {
    map_ = IdMap(cfg_.max_capacity > 0 ? std::max(cfg_.initial_capacity, cfg_.max_capacity + cfg_.max_capacity / 4)
                                       : cfg_.initial_capacity,
                 cfg_.max_capacity > 0 ? capped_shard_bits(cfg_.max_capacity) : 6);
    for (int64_t r = row_limit() - 1; r >= 0; --r) {
      if (blocks_.meta(r).live) blocks_.release(r);
    }
    pending_.clear();
    evicted_ids_.clear();
    evicted_steps_.clear();
    log_dropped_through_ = -1;
    // A restore follows: the log cannot answer for the evictions before it (see tick()).
    log_restarted_ = true;
    last_ttl_scan_ = 0;
  }

  // Ids evicted after `since` (clock values), with the clock of each eviction.
  // Returns false if the log no longer reaches back to `since` (it keeps at
  // most max_capacity / 2 entries, or twice the rows the table has held
  // without a cap, dropping the oldest half when full, so that it cannot grow
  // without bound).
  bool evicted_since(int64_t since, std::vector<int64_t>* ids, std::vector<int64_t>* steps) const {
    if (log_restarted_ || since < log_dropped_through_) return false;
    for (size_t i = 0; i < evicted_ids_.size(); ++i) {
      if (evicted_steps_[i] > since) {
        ids->push_back(evicted_ids_[i]);
        steps->push_back(evicted_steps_[i]);
      }
    }
    return true;
  }

  // After a restore of the table as it was at update `clock`: the log answers for the
  // evictions after it, and refuses to answer for earlier ones.
  void restart_eviction_log(int64_t clock) {
    log_dropped_through_ = clock;
    log_restarted_ = false;
  }

  // The admission counters of ids that have no row yet.
  void export_pending(std::vector<int64_t>* ids, std::vector<int64_t>* counts) const {
    for (const auto& kv : pending_) {
      ids->push_back(kv.first);
      counts->push_back(kv.second.count);
    }
  }
  void import_pending(const int64_t* ids, const int64_t* counts, int64_t n) {
    bound_pending(n);
    for (int64_t i = 0; i < n; ++i) pending_[ids[i]] = Pending{counts[i], 0};
  }

 private:
  static int capped_shard_bits(int64_t cap) {
    int bits = 0;
    while (bits < 6 && (cap >> (bits + 1)) >= 4096) ++bits;
    return bits;
  }

  // Frees row r and its IdMap slot (no log entry: see evict_row and copy_coldest).
  void drop_row(int64_t r) {
    const int64_t key = blocks_.row_id(r);
    map_.erase(key, mix64(static_cast<uint64_t>(key)));
    blocks_.release(r);
  }

  void evict_row(int64_t r, int64_t clock) {
    const int64_t key = blocks_.row_id(r);
    drop_row(r);
    log_eviction(key, clock);
  }

 public:
  // Records `key` as evicted at `clock` in the eviction log (for delta exports) and the counters:
  // evict_row's record, also for rows evicted where the table does not hold them (a DiskRows store).
  void log_eviction(int64_t key, int64_t clock) {
    // The log holds max_capacity / 2 entries under a cap, else twice the rows the table has
    // held (16 bytes each: a small share of the rows' memory, and bounded as they are).
    const int64_t limit = cfg_.max_capacity > 0 ? std::max<int64_t>(64, cfg_.max_capacity / 2)
                                                : std::max<int64_t>(4096, 2 * row_limit());
    if (static_cast<int64_t>(evicted_ids_.size()) >= limit) {
      const size_t drop = evicted_ids_.size() / 2;
      log_dropped_through_ = std::max(log_dropped_through_, evicted_steps_[drop - 1]);
      evicted_ids_.erase(evicted_ids_.begin(), evicted_ids_.begin() + drop);
      evicted_steps_.erase(evicted_steps_.begin(), evicted_steps_.begin() + drop);
    }
    evicted_ids_.push_back(key);
    evicted_steps_.push_back(clock + 1);
    ++counters_.evicted;
  }

 private:
  // Frees up to `want` live rows not seen at `clock`: the lowest scores of the
  // cap's policy (eviction.h), ties broken by row index.
  void evict_for_capacity(int64_t want, int64_t clock) {
    const ScoreFn score = cfg_.policy == EvictionPolicy::kCustom ? cfg_.custom_score : policy_score(cfg_.policy);
    if (score == nullptr) return;
    for (int64_t r : coldest(want, clock, score, nullptr)) evict_row(r, clock);
  }

  // Up to `want` live rows with the lowest `score`, ties broken by row index,
  // never a row seen at `clock` or later (in use by the step that runs) nor
  // one marked in `kept` (if given); in nth_element's order.
  std::vector<int64_t> coldest(int64_t want, int64_t clock, ScoreFn score, const std::vector<uint8_t>* kept) const {
    std::vector<std::pair<RowScore, int64_t>> cand;  // (score, row)
    for (int64_t r = 0; r < row_limit(); ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (!m.live || m.last_seen >= clock || (kept != nullptr && (*kept)[r])) continue;
      cand.push_back({score(m), r});
    }
    want = std::min<int64_t>(want, static_cast<int64_t>(cand.size()));
    if (want <= 0) return {};
    auto less = [](const std::pair<RowScore, int64_t>& a, const std::pair<RowScore, int64_t>& b) {
      return a.first < b.first || (!(b.first < a.first) && a.second < b.second);
    };
    std::nth_element(cand.begin(), cand.begin() + (want - 1), cand.end(), less);
    std::vector<int64_t> rows(static_cast<size_t>(want));
    for (int64_t i = 0; i < want; ++i) rows[i] = cand[i].second;
    return rows;
  }

  // coldest(want, clock, &lru_score, &kept), sorted by row: the rows ordered
  // by (last_seen, row). Where the eligible rows' last_seen values span at
  // most a few times as many clocks as there are rows, it counts them per
  // clock instead of building and partially sorting a (score, row) pair per
  // row: two sequential passes over the metadata find the clock below which
  // every row goes and take the rows at that clock in row order.
  std::vector<int64_t> least_recently_seen(int64_t want, int64_t clock, const std::vector<uint8_t>& kept) const {
    const int64_t limit = row_limit();
    auto eligible = [&](const RowMeta& m, int64_t r) { return m.live && m.last_seen < clock && !kept[r]; };
    int64_t lo = clock, count = 0;
    for (int64_t r = 0; r < limit; ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (eligible(m, r)) {
        lo = std::min<int64_t>(lo, m.last_seen);
        ++count;
      }
    }
    want = std::min(want, count);
    if (want <= 0) return {};
    const int64_t span = clock - lo;
    if (span > 4 * limit + 1024) {
      std::vector<int64_t> picked = coldest(want, clock, &lru_score, &kept);
      std::sort(picked.begin(), picked.end());
      return picked;
    }
    std::vector<int64_t> per_clock(static_cast<size_t>(span), 0);
    for (int64_t r = 0; r < limit; ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (eligible(m, r)) ++per_clock[static_cast<size_t>(m.last_seen - lo)];
    }
    int64_t below = 0, t = 0;  // rows seen before clock lo + t; t: the clock that completes `want`
    while (below + per_clock[static_cast<size_t>(t)] < want) below += per_clock[static_cast<size_t>(t++)];
    const int64_t threshold = lo + t;
    int64_t at_threshold = want - below;  // the rows at the threshold clock to take, lowest rows first
    std::vector<int64_t> picked;
    picked.reserve(static_cast<size_t>(want));
    for (int64_t r = 0; r < limit; ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (!eligible(m, r) || m.last_seen > threshold) continue;
      if (m.last_seen < threshold) {
        picked.push_back(r);
      } else if (at_threshold > 0) {
        picked.push_back(r);
        --at_threshold;
      }
    }
    return picked;
  }

  // Inserts the ids that find() missed (rows[i] == -1), as admission and
  // the capacity cap allow. Returns the number of rows created.
  template <typename ParFor>
  int64_t insert_missing(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par, int64_t clock) {
    // Admission: count sightings of ids without a row; admit at the threshold.
    std::vector<uint8_t> admit;  // per position; empty = all misses admitted
    if (cfg_.admit_threshold > 1) {
      admit.assign(static_cast<size_t>(n), 0);
      std::vector<int64_t> reached;
      // Room is made for the ids not counted yet, and never by forgetting an id this batch counts
      // again (with admit_capacity = 1 an id seen twice in a row was forgotten each time, and never
      // admitted).
      std::unordered_set<int64_t> batch, fresh;
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i] >= 0) continue;
        batch.insert(keys[i]);
        if (pending_.find(keys[i]) == pending_.end()) fresh.insert(keys[i]);
      }
      bound_pending(static_cast<int64_t>(fresh.size()), &batch);
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i] >= 0) continue;
        Pending& c = pending_[keys[i]];
        c.last = clock;
        if (++c.count == cfg_.admit_threshold) reached.push_back(keys[i]);
      }
      for (int64_t k : reached) pending_.erase(k);
      std::sort(reached.begin(), reached.end());
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i] < 0 && std::binary_search(reached.begin(), reached.end(), keys[i])) admit[i] = 1;
      }
    }
    // The capacity cap: make room for the distinct new ids (2% slack, so that
    // the O(rows) selection runs rarely), or admit only as many as fit.
    if (cfg_.max_capacity > 0) {
      std::vector<int64_t> fresh;
      for (int64_t i = 0; i < n; ++i) {
        if (rows[i] < 0 && (admit.empty() || admit[i])) fresh.push_back(keys[i]);
      }
      std::sort(fresh.begin(), fresh.end());
      fresh.erase(std::unique(fresh.begin(), fresh.end()), fresh.end());
      const int64_t need = size() + static_cast<int64_t>(fresh.size()) - cfg_.max_capacity;
      if (need > 0) evict_for_capacity(need + cfg_.max_capacity / 50, clock);
      const int64_t room = cfg_.max_capacity - size();
      if (room < static_cast<int64_t>(fresh.size())) {
        // Every other row is in use this step: admit the first `room` new ids.
        std::unordered_set<int64_t> taken;
        if (admit.empty()) admit.assign(static_cast<size_t>(n), 1);
        for (int64_t i = 0; i < n; ++i) {
          if (rows[i] >= 0 || !admit[i]) continue;
          if (taken.count(keys[i])) continue;
          if (static_cast<int64_t>(taken.size()) < room) {
            taken.insert(keys[i]);
          } else {
            admit[i] = 0;
          }
        }
      }
    }
    int64_t refused = 0;
    if (!admit.empty()) {
      for (int64_t i = 0; i < n; ++i) refused += rows[i] < 0 && !admit[i];
    }
    counters_.rejected += refused;
    const int64_t created = insert_new(keys, n, rows, par, clock, admit);
    counters_.admitted += created;
    return created;
  }

  // Inserts the missed ids at positions where admit is empty or set.
  // fill = false leaves new rows' values unset (a caller about to write them).
  template <typename ParFor>
  int64_t insert_new(const int64_t* keys, int64_t n, int64_t* rows, ParFor&& par, int64_t clock,
                     const std::vector<uint8_t>& admit, bool fill = true,
                     std::vector<int64_t>* created_rows = nullptr) {
    // Group the misses by IdMap shard (a stable counting sort) so that each
    // shard is filled by exactly one thread, without locks. The sort copies
    // each miss's key into shard order (order_of[j]: where miss j went), so
    // the shard pass reads and writes its arrays sequentially and only the
    // buckets are random accesses (prefetched).
    const int num_shards = map_.num_shards();
    std::vector<int64_t> miss_pos;
    std::vector<int64_t> shard_begin(static_cast<size_t>(num_shards) + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0 && (admit.empty() || admit[i])) {
        miss_pos.push_back(i);
        ++shard_begin[map_.shard_of(mix64(static_cast<uint64_t>(keys[i]))) + 1];
      }
    }
    const int64_t m = static_cast<int64_t>(miss_pos.size());
    if (m == 0) return 0;
    // The tail of both paths: report the created rows, then give them their values.
    // created: the miss indices of the inserted keys, in miss order.
    const auto finish = [&](const std::vector<int64_t>& created) {
      const int64_t num_created = static_cast<int64_t>(created.size());
      if (created_rows != nullptr) {
        for (int64_t c : created) created_rows->push_back(rows[miss_pos[c]]);
      }
      par(int64_t{0}, num_created, int64_t{256}, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          const int64_t pos = miss_pos[created[c]];
          init_new_row(rows[pos], keys[pos], clock, fill);
        }
      });
      return num_created;
    };
    // One thread: the rows the new keys will get are known before any is
    // inserted (EmbeddingBlocks::nth_new_row: the freed rows, then row_limit()
    // on), so one pass in miss order inserts each key with its final row (one
    // random access per key, prefetched). The shard passes below need three
    // (insert a placeholder, number, write the row) to let threads fill shards
    // apart. (With two threads on a 2-core VM the one pass was still 5-10%
    // faster; it is kept to one thread so that the shard passes serve every
    // multi-threaded caller.)
    if (par.threads() == 1) {
      for (int s = 0; s < num_shards; ++s) {
        if (shard_begin[s + 1] > 0) map_.reserve_in_shard(s, shard_begin[s + 1]);
      }
      std::vector<int64_t> created;
      for (int64_t j = 0; j < m; ++j) {
        if (j + IdMap::kPrefetchDistance < m) {
          map_.prefetch_for_insert(mix64(static_cast<uint64_t>(keys[miss_pos[j + IdMap::kPrefetchDistance]])));
        }
        const int64_t key = keys[miss_pos[j]];
        const int64_t next = blocks_.nth_new_row(static_cast<int64_t>(created.size()));
        bool inserted = false;
        const int64_t* slot_row = map_.find_or_insert_reserved(key, mix64(static_cast<uint64_t>(key)), next, &inserted);
        if (inserted) created.push_back(j);
        rows[miss_pos[j]] = *slot_row;
      }
      const int64_t count = static_cast<int64_t>(created.size());
      blocks_.reserve(count);
      std::vector<int64_t> fresh_rows(static_cast<size_t>(count));
      blocks_.allocate_n(count, fresh_rows.data());
      for (int64_t c = 0; c < count; ++c) {
        if (fresh_rows[c] != rows[miss_pos[created[c]]]) {
          throw std::logic_error("HashTable::insert_new: the rows allocated differ from the rows inserted");
        }
      }
      return finish(created);
    }
    for (int s = 0; s < num_shards; ++s) shard_begin[s + 1] += shard_begin[s];
    // pending[k] starts as kPending + (miss index of sorted key k).
    std::vector<int64_t> sorted_key(static_cast<size_t>(m)), pending(static_cast<size_t>(m)),
        order_of(static_cast<size_t>(m));
    {
      std::vector<int64_t> cursor(shard_begin.begin(), shard_begin.end() - 1);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t key = keys[miss_pos[j]];
        const int64_t k = cursor[map_.shard_of(mix64(static_cast<uint64_t>(key)))]++;
        sorted_key[k] = key;
        pending[k] = kPending + j;
        order_of[j] = k;
      }
    }

    // 1. Parallel over shards: insert each new key with its pending row; a
    //    later duplicate finds it and takes that pending value, an inserted
    //    key keeps its slot.
    std::vector<int64_t*> slot_of(static_cast<size_t>(m), nullptr);
    std::vector<uint8_t> is_new(static_cast<size_t>(m), 0);  // by miss index: its key was inserted
    par(int64_t{0}, static_cast<int64_t>(num_shards), 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const int64_t begin = shard_begin[s], end = shard_begin[s + 1];
        if (begin == end) continue;
        map_.reserve_in_shard(static_cast<int>(s), end - begin);
        for (int64_t k = begin; k < end; ++k) {
          if (k + IdMap::kPrefetchDistance < end) {
            map_.prefetch_for_insert(mix64(static_cast<uint64_t>(sorted_key[k + IdMap::kPrefetchDistance])));
          }
          bool inserted = false;
          int64_t* slot_row = map_.find_or_insert_reserved(sorted_key[k], mix64(static_cast<uint64_t>(sorted_key[k])),
                                                           pending[k], &inserted);
          if (inserted) {
            slot_of[k] = slot_row;
            is_new[static_cast<size_t>(pending[k] - kPending)] = 1;
          }
          pending[k] = *slot_row;
        }
      }
    });

    // 2. Serial, in key order: number the new rows. Room for the distinct new keys only:
    //    reserving one row per miss would grow the blocks by a batch's length when it
    //    repeats a new id. The pass reads is_new in miss order and takes the rows from one
    //    allocate_n (one atomic add, not one per row); it touches nothing at random (it
    //    used to look up each miss's slot in shard order: a cache miss per new key).
    const int64_t count = static_cast<int64_t>(std::count(is_new.begin(), is_new.end(), uint8_t{1}));
    blocks_.reserve(count);
    std::vector<int64_t> fresh_rows(static_cast<size_t>(count)), new_row(static_cast<size_t>(m), -1);
    blocks_.allocate_n(count, fresh_rows.data());
    std::vector<int64_t> created;
    created.reserve(static_cast<size_t>(count));
    for (int64_t j = 0, c = 0; j < m; ++j) {
      if (is_new[j]) {
        const int64_t r = fresh_rows[c++];
        new_row[j] = r;
        rows[miss_pos[j]] = r;
        created.push_back(j);
      }
    }

    // 3. Parallel over shards: write the new rows into their slots (an inserted
    //    key's pending value is still kPending + its miss index). Then
    //    parallel: duplicates take the row of their first occurrence.
    par(int64_t{0}, static_cast<int64_t>(num_shards), 1, [&](int64_t sb, int64_t se) {
      const int64_t end = shard_begin[se];
      for (int64_t k = shard_begin[sb]; k < end; ++k) {
        if (k + IdMap::kPrefetchDistance < end && slot_of[k + IdMap::kPrefetchDistance] != nullptr) {
          __builtin_prefetch(slot_of[k + IdMap::kPrefetchDistance], 1, 2);
          __builtin_prefetch(&new_row[pending[k + IdMap::kPrefetchDistance] - kPending], 0, 2);
        }
        if (slot_of[k] != nullptr) *slot_of[k] = new_row[pending[k] - kPending];
      }
    });
    par(int64_t{0}, m, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        if (is_new[j]) continue;  // numbered in pass 2; only repeats look up their sorted position
        const int64_t v = pending[order_of[j]];
        rows[miss_pos[j]] = v >= kPending ? rows[miss_pos[v - kPending]] : v;
      }
    });
    return finish(created);
  }

 public:

  // Copies the live rows out, in row order, whose last_update is after
  // `since` (-1: all): ids (n,), emb (n, dim) elements of row_type(), state
  // (n, state_dim) or nullptr, meta (n, 3) = (last_seen, last_update, freq) or
  // nullptr. Returns n; the buffers must hold size() rows.
  template <typename ParFor>
  int64_t export_rows(int64_t* ids, void* emb, float* state, int64_t* meta, int64_t since, ParFor&& par) const {
    std::vector<int64_t> picked;
    picked.reserve(static_cast<size_t>(size()));
    for (int64_t r = 0; r < row_limit(); ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (m.live && m.last_update > since) picked.push_back(r);
    }
    copy_out(picked, ids, emb, state, meta, par);
    return static_cast<int64_t>(picked.size());
  }

  // Copies rows `picked` out: ids, emb (elements of row_type()), state (or
  // nullptr) and meta (or nullptr), laid out as export_rows lays them out.
  template <typename ParFor>
  void copy_out(const std::vector<int64_t>& picked, int64_t* ids, void* emb, float* state, int64_t* meta,
                ParFor&& par) const {
    const int64_t n = static_cast<int64_t>(picked.size()), sdim = cfg_.state_dim;
    const int64_t emb_bytes = cfg_.dim * element_bytes(cfg_.row_type);
    par(int64_t{0}, n, int64_t{1024}, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = picked[i];
        ids[i] = blocks_.row_id(r);
        std::memcpy(static_cast<uint8_t*>(emb) + i * emb_bytes, blocks_.row_bytes(r), emb_bytes);
        if (sdim > 0 && state != nullptr) std::memcpy(state + i * sdim, blocks_.state(r), sizeof(float) * sdim);
        if (meta != nullptr) {
          const RowMeta& m = blocks_.meta(r);
          meta[3 * i] = m.last_seen;
          meta[3 * i + 1] = m.last_update;
          meta[3 * i + 2] = static_cast<int64_t>(m.freq);
        }
      }
    });
  }

  // Copies up to `want` live rows out, least recently seen first (ties by
  // row index), never a row seen at `clock` or later (in use by the step
  // that runs) nor a row of the n_keep ids in `keep` (needed by the next
  // one): ids, stored embedding elements, state and metadata, laid out as
  // export_rows lays them out (the buffers hold `want` rows). The rows stay;
  // drop_unchanged() frees them once they are stored elsewhere (a DiskRows
  // store). Returns how many. Runs alongside find().
  template <typename ParFor>
  int64_t copy_coldest(int64_t want, int64_t clock, const int64_t* keep, int64_t n_keep, int64_t* ids, void* emb,
                       float* state, int64_t* meta, ParFor&& par) const {
    std::vector<uint8_t> kept(static_cast<size_t>(row_limit()), 0);
    for (int64_t i = 0; i < n_keep; ++i) {
      const int64_t r = map_.find(keep[i], mix64(static_cast<uint64_t>(keep[i])));
      if (r >= 0) kept[r] = 1;
    }
    std::vector<int64_t> picked = least_recently_seen(want, clock, kept);
    copy_out(picked, ids, emb, state, meta, par);
    return static_cast<int64_t>(picked.size());
  }

  // Frees the rows of `keys` whose metadata still equals `meta` (n x 3, as
  // copy_coldest gave it), without an entry in the eviction log: they are
  // not evicted, a DiskRows store holds them now. A row seen or written
  // since (its metadata moved) stays: dropped[i] = 0 for it (and for an id
  // without a row), 1 where freed. Returns how many were freed.
  int64_t drop_unchanged(const int64_t* keys, int64_t n, const int64_t* meta, uint8_t* dropped) {
    int64_t freed = 0;
    for (int64_t i = 0; i < n; ++i) {
      dropped[i] = 0;
      const int64_t r = map_.find(keys[i], mix64(static_cast<uint64_t>(keys[i])));
      if (r < 0) continue;
      const RowMeta& m = blocks_.meta(r);
      if (m.last_seen != meta[3 * i] || m.last_update != meta[3 * i + 1] || m.freq != meta[3 * i + 2]) continue;
      drop_row(r);
      dropped[i] = 1;
      ++freed;
    }
    return freed;
  }

  // Copies up to `max_rows` live rows with row index >= `start` and
  // last_update > `since` into the buffers (as export_rows lays them out).
  // Returns (rows copied, the row index to continue from); the second is
  // row_limit() when the table is done. Lets a saver stream a table through
  // fixed buffers.
  template <typename ParFor>
  std::pair<int64_t, int64_t> export_chunk(int64_t start, int64_t max_rows, int64_t since, int64_t* ids, void* emb,
                                           float* state, int64_t* meta, ParFor&& par) const {
    std::vector<int64_t> picked;
    picked.reserve(static_cast<size_t>(std::max<int64_t>(0, std::min(max_rows, row_limit() - start))));
    int64_t r = start;
    for (; r < row_limit() && static_cast<int64_t>(picked.size()) < max_rows; ++r) {
      const RowMeta& m = blocks_.meta(r);
      if (m.live && m.last_update > since) picked.push_back(r);
    }
    copy_out(picked, ids, emb, state, meta, par);
    return {static_cast<int64_t>(picked.size()), r};
  }

  // Writes rows for n distinct keys, inserting absent ones regardless of
  // admission and the cap (a restore): emb (n, dim) elements of row_type(), state (n, state_dim) and
  // meta (n, 3); a nullptr keeps the current value (the initial value for
  // rows this call creates). count_admitted = false: rows coming back from
  // a DiskRows store, which were counted when first admitted. Returns false, writing nothing, if a key repeats
  // (rows created for new keys then hold their initial values).
  template <typename ParFor>
  bool import_rows(const int64_t* keys, int64_t n, const void* emb, const float* state, const int64_t* meta,
                   ParFor&& par, bool count_admitted = true) {
    if (meta != nullptr) {  // checked before anything is written
      for (int64_t i = 0; i < n; ++i) {
        clock32(meta[3 * i], "last_seen");
        clock32(meta[3 * i + 1], "last_update");
        clock32(meta[3 * i + 2], "freq");
      }
    }
    std::vector<int64_t> rows(static_cast<size_t>(n));
    const int64_t missing = find(keys, n, rows.data(), par);
    // Rows whose every value this call writes need no initial value.
    const bool writes_all = emb != nullptr && (cfg_.state_dim == 0 || state != nullptr);
    std::vector<int64_t> created;
    if (missing > 0) {
      map_.reserve_total(missing);
      const int64_t made = insert_new(keys, n, rows.data(), par, 0, {}, !writes_all, &created);
      if (count_admitted) counters_.admitted += made;
      for (int64_t i = 0; i < n; ++i) pending_.erase(keys[i]);
    }
    // A repeated key shows as a repeated row: one pass over a row bitmap.
    std::vector<uint8_t> seen(static_cast<size_t>(row_limit()), 0);
    bool repeated = false;
    for (int64_t i = 0; i < n && !repeated; ++i) {
      repeated = seen[rows[i]]++ != 0;
    }
    if (repeated) {
      if (writes_all) {
        for (int64_t r : created) init_new_row(r, blocks_.row_id(r), 0, true);
      }
      return false;
    }
    const int64_t sdim = cfg_.state_dim, emb_bytes = cfg_.dim * element_bytes(cfg_.row_type);
    par(int64_t{0}, n, int64_t{1024}, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (emb != nullptr) {
          std::memcpy(blocks_.mutable_row_bytes(rows[i]), static_cast<const uint8_t*>(emb) + i * emb_bytes,
                      emb_bytes);
        }
        if (sdim > 0 && state != nullptr) {
          std::memcpy(blocks_.mutable_state(rows[i]), state + i * sdim, sizeof(float) * sdim);
        }
        if (meta != nullptr) {
          RowMeta& m = blocks_.mutable_meta(rows[i]);
          m.last_seen = static_cast<uint32_t>(meta[3 * i]);  // in range: checked above
          m.last_update = static_cast<uint32_t>(meta[3 * i + 1]);
          m.freq = static_cast<uint32_t>(meta[3 * i + 2]);
        }
      }
    });
    return true;
  }

  // Marks a row as written at `clock` (the optimizer's update count).
  void mark_updated(int64_t r, int64_t clock) { blocks_.mutable_meta(r).last_update = clock32(clock); }

  // A copy-on-write snapshot of the live rows (embedding_blocks.h): begin it
  // alone (it returns the number of live rows it holds), read it with
  // read_snapshot while training goes on, end it when done.
  int64_t begin_snapshot() {
    blocks_.begin_snapshot();
    return size();
  }
  void end_snapshot() { blocks_.end_snapshot(); }
  bool snapshot_active() const { return blocks_.snapshot_active(); }
  int64_t snapshot_next() const { return blocks_.snapshot_next(); }
  int64_t snapshot_limit() const { return blocks_.snapshot_limit(); }
  int64_t snapshot_copies() const { return blocks_.snapshot_copies(); }

  // Copies the rows of the snapshot that were live when it began, from row
  // snapshot_next() up to row `end`, into the buffers (laid out as
  // export_rows lays them out; they must hold end - snapshot_next() rows).
  // Returns the rows copied. May run alongside writers (not alongside begin,
  // end or another read of the snapshot).
  int64_t read_snapshot(int64_t end, int64_t* ids, void* emb, float* state, int64_t* meta) {
    const int64_t sdim = cfg_.state_dim, emb_bytes = cfg_.dim * element_bytes(cfg_.row_type);
    const int64_t state_offset = blocks_.state_offset();
    int64_t n = 0;
    blocks_.read_snapshot(blocks_.snapshot_next(), end, [&](int64_t, const uint8_t* row, int64_t id, const RowMeta& m) {
      if (!m.live) return;
      ids[n] = id;
      std::memcpy(static_cast<uint8_t*>(emb) + n * emb_bytes, row, static_cast<size_t>(emb_bytes));
      if (sdim > 0) std::memcpy(state + n * sdim, row + state_offset, sizeof(float) * sdim);
      meta[3 * n] = m.last_seen;
      meta[3 * n + 1] = m.last_update;
      meta[3 * n + 2] = static_cast<int64_t>(m.freq);
      ++n;
    });
    return n;
  }

 private:
  void init_new_row(int64_t r, int64_t key, int64_t clock, bool fill = true) {
    if (fill) {
      if (cfg_.row_type == RowType::kF32) {
        init_row(blocks_.mutable_row(r), key, cfg_.dim, cfg_.init);
      } else {
        thread_local std::vector<float> buf;
        buf.resize(static_cast<size_t>(cfg_.dim));
        init_row(buf.data(), key, cfg_.dim, cfg_.init);
        store_elements(blocks_.mutable_row_bytes(r), cfg_.row_type, buf.data(), cfg_.dim);
      }
      if (cfg_.state_dim > 0) std::memset(blocks_.mutable_state(r), 0, sizeof(float) * cfg_.state_dim);
    }
    blocks_.mutable_row_id(r) = key;
    RowMeta& m = blocks_.mutable_meta(r);
    m.last_seen = clock32(clock);
    m.last_update = clock32(clock + 1);
  }

  HashTableConfig cfg_;
  IdMap map_;
  EmbeddingBlocks blocks_;
  TableCounters counters_;
  // Admission: sightings of ids without a row, and the clock each was last seen at.
  struct Pending {
    int64_t count = 0;
    int64_t last = 0;
  };
  std::unordered_map<int64_t, Pending> pending_;
  int64_t pending_limit() const {
    if (cfg_.admit_capacity > 0) return cfg_.admit_capacity;
    return cfg_.max_capacity > 0 ? std::max<int64_t>(4096, 2 * cfg_.max_capacity) : int64_t{1} << 20;
  }
  // Makes room for `incoming` new candidates: forgets the least recently seen 5% (at least what is
  // needed) when the counter would pass its limit.
  // `keep`: ids not to forget (the batch being counted).
  void bound_pending(int64_t incoming, const std::unordered_set<int64_t>* keep = nullptr) {
    const int64_t limit = pending_limit();
    if (static_cast<int64_t>(pending_.size()) + incoming <= limit) return;
    std::vector<std::pair<int64_t, int64_t>> by_age;  // (last seen, id)
    by_age.reserve(pending_.size());
    for (const auto& kv : pending_) {
      if (keep == nullptr || keep->find(kv.first) == keep->end()) by_age.push_back({kv.second.last, kv.first});
    }
    const int64_t drop = std::min<int64_t>(
        static_cast<int64_t>(by_age.size()),
        std::max<int64_t>(static_cast<int64_t>(pending_.size()) + incoming - limit, std::max<int64_t>(1, limit / 20)));
    if (drop <= 0) return;
    std::nth_element(by_age.begin(), by_age.begin() + (drop - 1), by_age.end());
    for (int64_t i = 0; i < drop; ++i) pending_.erase(by_age[i].second);
  }
  std::vector<int64_t> evicted_ids_, evicted_steps_;  // the eviction log, for delta exports
  int64_t log_dropped_through_ = -1;  // the log has no evictions up to this clock
  bool log_restarted_ = false;        // cleared for a restore; no update since
  int64_t last_ttl_scan_ = 0;
};

}  // namespace hashtable
}  // namespace recis
