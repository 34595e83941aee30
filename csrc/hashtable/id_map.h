// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// IdMap: int64 id -> int64 row, open addressing over 64-byte buckets of four
// slots (bucketised linear probing). Torch-free.
//
// * A bucket is one cache line: four keys, then their four rows. A find reads
//   the key's home bucket, compares all four keys at once (AVX2 where the
//   build has it, a branch-free mask otherwise) and only moves on to the next
//   bucket when the home bucket is full and misses, so nearly every find costs
//   one cache line (a probe over single 16-byte slots can run into a second,
//   unprefetched line). find_batch prefetches the buckets a fixed
//   distance ahead, so that about that many cache misses are in flight.
// * Any int64 is a valid key (negatives, 0, INT64_MIN, INT64_MAX): emptiness
//   is marked in the row field (row < 0), so no key value is reserved.
// * Invariant: every bucket from a key's home bucket up to (not including)
//   the bucket holding it is full. A find therefore stops at the first bucket
//   with an empty slot, and erase moves keys back to keep the invariant (no
//   tombstones).
// * The map is split into 2^shard_bits shards chosen by the top bits of
//   mix64(key). Shards grow (rehash) independently, so inserts run in
//   parallel across shards without locks.
//   Lookups are lock-free as long as no insert runs at the same time; the
//   owning HashTable guarantees that.
// * A shard holds any number of buckets, not a power of two: a key's home
//   bucket is the high half of (the hash's remaining bits) x buckets (a
//   multiply, where a mask would force sizes to powers of two). A map
//   given a capacity hint sizes its shards so that that many keys (plus the
//   spread of a shard's share) sit at kHintLoad, wherever the hint falls
//   between two powers of two (with those, the load at the hint ranged over
//   0.35-0.7: 23-46 B a key). Sizing to kMaxLoad instead held 1M ids in
//   23.6 B each (against 33.6), but a four-slot bucket overflows more often
//   at that load and finds slowed: 1e6 keys at 0.9 of a 1e6 hint (a 0.61
//   load) found 89-108 M keys/s against 135-162 M at 0.43. Growth doubles
//   (kGrowth): growing by 1.5x kept the load higher but cost a rehash more
//   often, each mostly first touches of the new shard's pages
//   (find_or_insert of half-new batches into a 1M-key map: 13-14 M keys/s
//   against 19 with doubling).
// * Rehashing copies the keys and row numbers of one shard, never embedding
//   rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "hash.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace recis {
namespace hashtable {

constexpr int kBucketSlots = 4;

struct alignas(64) Bucket {
  int64_t key[kBucketSlots];
  int64_t row[kBucketSlots];  // < 0: empty
};
static_assert(sizeof(Bucket) == 64, "a bucket is one cache line");

// bucket_match: bit j set where slot j holds `key` (empty slots included, the
// caller masks them); bucket_empty: bit j set where slot j is empty.
#if defined(__AVX2__)
inline unsigned bucket_match(const Bucket& b, int64_t key) {
  const __m256i keys = _mm256_load_si256(reinterpret_cast<const __m256i*>(b.key));
  const __m256i eq = _mm256_cmpeq_epi64(keys, _mm256_set1_epi64x(key));
  return static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(eq)));
}
inline unsigned bucket_empty(const Bucket& b) {
  const __m256i rows = _mm256_load_si256(reinterpret_cast<const __m256i*>(b.row));
  return static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(rows)));  // sign bits
}
#else
inline unsigned bucket_match(const Bucket& b, int64_t key) {
  unsigned m = 0;
  for (int j = 0; j < kBucketSlots; ++j) m |= static_cast<unsigned>(b.key[j] == key) << j;
  return m;
}
inline unsigned bucket_empty(const Bucket& b) {
  unsigned m = 0;
  for (int j = 0; j < kBucketSlots; ++j) m |= static_cast<unsigned>(static_cast<uint64_t>(b.row[j]) >> 63) << j;
  return m;
}
#endif

class IdMap {
 public:
  static constexpr double kMaxLoad = 0.7;
  static constexpr int64_t kGrowth = 2;
  // The load a map sized from a capacity hint has at that many keys.
  static constexpr double kHintLoad = 0.5;
  static constexpr int64_t kMinShardBuckets = 4;
  // How many keys ahead find_batch and inserts prefetch buckets (measured
  // at 9M keys: 32 and 48 best; 24 and 64 up to ~10% slower in some runs,
  // equal in others), and the ring that holds find_batch's buckets in flight.
  static constexpr int kPrefetchDistance = 32;
  static constexpr int kFindRing = 64;

  // capacity_hint: expected number of keys; sizes the shards so that this
  // many keys fit without a rehash.
  explicit IdMap(int64_t capacity_hint = 0, int shard_bits = 6)
      : shard_bits_(shard_bits), shards_(static_cast<size_t>(1) << shard_bits) {
    if (shard_bits < 0 || shard_bits > 16) throw std::invalid_argument("IdMap: shard_bits must be in [0, 16]");
    const int64_t per_shard = capacity_hint / num_shards();
    for (auto& s : shards_) {
      s.reset(per_shard > 0 ? buckets_for(per_shard + spread(per_shard), kHintLoad) : kMinShardBuckets);
    }
  }

  int num_shards() const { return static_cast<int>(shards_.size()); }

  int shard_of(uint64_t h) const {
    return shard_bits_ == 0 ? 0 : static_cast<int>(h >> (64 - shard_bits_));
  }

  // The hash's bits below the shard bits, at the top: what picks the bucket.
  uint64_t in_shard(uint64_t h) const { return h << shard_bits_; }

  // Returns the row of `key` (h = mix64(key)), or -1.
  int64_t find(int64_t key, uint64_t h) const {
    const Shard& s = shards_[shard_of(h)];
    const Probe p = s.probe(key, in_shard(h));
    return p.found ? s.buckets[p.bucket].row[p.slot] : -1;
  }

  // rows[i] = row of keys[i], or -1. Returns the number absent. A software
  // pipeline: key i + kPrefetchDistance is hashed and its home bucket
  // prefetched (into L2: on the AMD EPYC we measure, prefetching into L2
  // rather than L1 gave 1.2-1.4x the finds/s at 9M keys) while key i is
  // probed.
  int64_t find_batch(const int64_t* keys, int64_t n, int64_t* rows) const {
    static_assert(kPrefetchDistance < kFindRing, "the ring holds the keys in flight");
    const Bucket* ahead[kFindRing];
    const auto stage = [&](int64_t i) {
      const uint64_t h = mix64(static_cast<uint64_t>(keys[i]));
      const Shard& s = shards_[shard_of(h)];
      const Bucket* b = &s.buckets[s.home(in_shard(h))];
      __builtin_prefetch(b, 0, 2);
      ahead[i & (kFindRing - 1)] = b;
    };
    for (int64_t i = 0; i < std::min<int64_t>(kPrefetchDistance, n); ++i) stage(i);
    int64_t missing = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchDistance < n) stage(i + kPrefetchDistance);
      const Bucket& b = *ahead[i & (kFindRing - 1)];
      const int64_t key = keys[i];
      const unsigned empty = bucket_empty(b);
      const unsigned hit = bucket_match(b, key) & ~empty;
      int64_t r;
      if (hit != 0) {
        r = b.row[__builtin_ctz(hit)];
      } else if (empty != 0) {
        r = -1;
      } else {
        r = find(key, mix64(static_cast<uint64_t>(key)));  // the home bucket is full: probe on
      }
      rows[i] = r;
      missing += r < 0;
    }
    return missing;
  }

  // Prefetches the home bucket of a key about to be inserted.
  void prefetch_for_insert(uint64_t h) const {
    const Shard& s = shards_[shard_of(h)];
    __builtin_prefetch(&s.buckets[s.home(in_shard(h))], 1, 2);
  }

  // Makes room in `shard` for `extra` more keys without exceeding kMaxLoad:
  // to exactly that many when it is more than kGrowth times the shard, else
  // kGrowth times (so that key-by-key inserts do not rehash on every insert).
  // Not thread-safe for the same shard.
  void reserve_in_shard(int shard, int64_t extra) {
    Shard& s = shards_[shard];
    const int64_t want = s.size + extra;
    if (static_cast<double>(want) <= kMaxLoad * static_cast<double>(s.num_slots())) return;
    Shard bigger;
    // Exactly kGrowth x the buckets: a key's new home is then 2 x its old
    // one (or 1 more), so the pass below, in bucket order, writes the new
    // shard nearly in order too.
    bigger.reset(std::max(buckets_for(want), static_cast<int64_t>(s.n) * kGrowth));
    for (uint64_t i = 0; i < s.n; ++i) {
      const Bucket& b = s.buckets[i];
      for (int j = 0; j < kBucketSlots; ++j) {
        if (b.row[j] >= 0) bigger.place(b.key[j], in_shard(mix64(static_cast<uint64_t>(b.key[j]))), b.row[j]);
      }
    }
    bigger.size = s.size;
    s = std::move(bigger);
  }

  // Makes room for about `extra` more keys spread over all shards (each gets
  // its share plus headroom for the spread), so a bulk insert does not rehash
  // shards over and over.
  void reserve_total(int64_t extra) {
    const int64_t share = extra / num_shards();
    for (int s = 0; s < num_shards(); ++s) reserve_in_shard(s, share + spread(share));
  }

  // Returns the row field of `key`'s slot, inserting (key, row) if it is
  // absent; sets *inserted accordingly. The shard must have room
  // (reserve_in_shard). Safe to call in parallel for keys of different
  // shards. The pointer stays valid until the shard is next resized or a key
  // of it is erased.
  int64_t* find_or_insert_reserved(int64_t key, uint64_t h, int64_t row, bool* inserted) {
    Shard& s = shards_[shard_of(h)];
    const Probe p = s.probe(key, in_shard(h));
    Bucket& b = s.buckets[p.bucket];
    *inserted = !p.found;
    if (!p.found) {
      b.key[p.slot] = key;
      b.row[p.slot] = row;
      ++s.size;
    }
    return &b.row[p.slot];
  }

  // Removes `key` (h = mix64(key)); returns its row or -1. Keeps the probing
  // invariant without tombstones: each key after the hole whose home bucket
  // lies at or before the hole's bucket moves into the hole, leaving a new
  // hole, until a bucket that was not full. Single-threaded for the key's
  // shard.
  int64_t erase(int64_t key, uint64_t h) {
    Shard& s = shards_[shard_of(h)];
    const Probe p = s.probe(key, in_shard(h));
    if (!p.found) return -1;
    uint64_t hb = p.bucket;
    int hs = p.slot;
    const int64_t row = s.buckets[hb].row[hs];
    uint64_t j = hb;
    for (;;) {
      j = s.next(j);
      Bucket& b = s.buckets[j];
      const unsigned empty = bucket_empty(b);
      int moved = -1;
      for (int k = 0; k < kBucketSlots && moved < 0; ++k) {
        if (empty & (1u << k)) continue;
        const uint64_t home = s.home(in_shard(mix64(static_cast<uint64_t>(b.key[k]))));
        // The key at bucket j needs every bucket of [home, j) full: it moves
        // if the hole's bucket lies in that range.
        if (s.distance(home, hb) < s.distance(home, j)) moved = k;
      }
      if (moved >= 0) {
        s.buckets[hb].key[hs] = b.key[moved];
        s.buckets[hb].row[hs] = b.row[moved];
        hb = j;
        hs = moved;
      } else if (empty != 0) {
        break;
      }
    }
    s.buckets[hb].key[hs] = 0;
    s.buckets[hb].row[hs] = -1;
    --s.size;
    return row;
  }

  int64_t size() const {
    int64_t n = 0;
    for (const auto& s : shards_) n += s.size;
    return n;
  }

  int64_t num_slots() const {
    int64_t n = 0;
    for (const auto& s : shards_) n += s.num_slots();
    return n;
  }

  int64_t memory_bytes() const { return num_slots() / kBucketSlots * static_cast<int64_t>(sizeof(Bucket)); }

 private:
  struct FreeBuckets {
    void operator()(Bucket* p) const { std::free(p); }
  };

  // A shard of 2 MiB or more fills its last huge page: the page is resident
  // whole anyway, and a tail in 4 KiB pages would cost the finds that land
  // there a TLB miss each (measured: 8-12% fewer finds/s at 1e7 keys).
  static int64_t whole_huge_pages(int64_t n) {
    constexpr int64_t kPageBuckets = (int64_t{2} << 20) / static_cast<int64_t>(sizeof(Bucket));
    return n >= kPageBuckets ? (n + kPageBuckets - 1) / kPageBuckets * kPageBuckets : n;
  }

  // Buckets are read at random, one cache line per key, so once a shard
  // outgrows the TLB's reach every find would also walk the page tables:
  // shards of 2 MiB or more are 2 MiB-aligned and offered to transparent huge
  // pages (as the embedding blocks are).
  static Bucket* allocate_buckets(int64_t n) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t bytes = static_cast<size_t>(n) * sizeof(Bucket);
    const size_t align = bytes >= kHuge ? kHuge : alignof(Bucket);
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes < align ? align : bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHuge) madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);
#endif
    return static_cast<Bucket*>(p);
  }

  // Where a probe for a key ended: its slot if found, else the first empty
  // slot of the first bucket with one (where it would be inserted).
  struct Probe {
    uint64_t bucket;
    int slot;
    bool found;
  };

  struct Shard {
    std::unique_ptr<Bucket[], FreeBuckets> buckets;
    uint64_t n = 0;  // buckets
    int64_t size = 0;

    // The home bucket of a key whose hash bits below the shard bits are hs
    // (IdMap::in_shard): floor(hs / 2^64 x n), uniform over [0, n) for any n.
    uint64_t home(uint64_t hs) const {
      return static_cast<uint64_t>((static_cast<unsigned __int128>(hs) * n) >> 64);
    }
    uint64_t next(uint64_t i) const { return i + 1 == n ? 0 : i + 1; }
    // Buckets from a forward to b, wrapping around.
    uint64_t distance(uint64_t a, uint64_t b) const { return b >= a ? b - a : b + n - a; }

    // The one probe loop of find, insert and erase. The shard must have an
    // empty slot (it always does: load <= kMaxLoad).
    Probe probe(int64_t key, uint64_t hs) const {
      uint64_t i = home(hs);
      for (;;) {
        const Bucket& b = buckets[i];
        const unsigned empty = bucket_empty(b);
        const unsigned hit = bucket_match(b, key) & ~empty;
        if (hit != 0) return Probe{i, __builtin_ctz(hit), true};
        if (empty != 0) return Probe{i, __builtin_ctz(empty), false};
        i = next(i);
      }
    }

    int64_t num_slots() const { return static_cast<int64_t>(n) * kBucketSlots; }

    void reset(int64_t n_buckets) {
      n_buckets = whole_huge_pages(n_buckets);
      buckets.reset(allocate_buckets(n_buckets));
      for (int64_t i = 0; i < n_buckets; ++i) {
        for (int j = 0; j < kBucketSlots; ++j) {
          buckets[i].key[j] = 0;
          buckets[i].row[j] = -1;
        }
      }
      n = static_cast<uint64_t>(n_buckets);
      size = 0;
    }
    // Inserts a key known to be absent into a shard with room.
    void place(int64_t key, uint64_t hs, int64_t row) {
      uint64_t i = home(hs);
      for (;;) {
        const unsigned empty = bucket_empty(buckets[i]);
        if (empty != 0) {
          const int j = __builtin_ctz(empty);
          buckets[i].key[j] = key;
          buckets[i].row[j] = row;
          return;
        }
        i = next(i);
      }
    }
  };

  // Fewest buckets holding n keys at `load`.
  static int64_t buckets_for(int64_t n, double load = kMaxLoad) {
    const auto need = static_cast<int64_t>(std::ceil(static_cast<double>(n) / (load * kBucketSlots)));
    return std::max(kMinShardBuckets, need);
  }

  // Headroom over a shard's share of n keys spread at random over the
  // shards: 4 standard deviations of that share (binomial, so about its
  // square root), plus a little for small shares.
  static int64_t spread(int64_t share) {
    return 4 * static_cast<int64_t>(std::sqrt(static_cast<double>(share))) + 16;
  }

  int shard_bits_;
  std::vector<Shard> shards_;
};

}  // namespace hashtable
}  // namespace recis
