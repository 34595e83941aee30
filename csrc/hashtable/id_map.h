// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// IdMap: int64 id -> int64 row, open addressing with linear probing. Torch-free.
//
// * Any int64 is a valid key (negatives, 0, INT64_MIN, INT64_MAX): emptiness
//   is marked in the row field (row < 0), so no key value is reserved.
// * The map is split into 2^shard_bits shards chosen by the top bits of
//   mix64(key). Shards grow (rehash) independently, so inserts run in parallel
//   across shards without locks. Lookups are lock-free as long as no insert
//   runs at the same time; the owning HashTable guarantees that.
// * Rehashing copies the 16-byte slots of one shard, never embedding rows.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "hash.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace recis {
namespace hashtable {

struct Slot {
  int64_t key;
  int64_t row;  // < 0: empty
};

class IdMap {
 public:
  static constexpr double kMaxLoad = 0.7;
  static constexpr int64_t kMinShardSlots = 16;

  // capacity_hint: expected number of keys; sizes the shards so that this
  // many keys fit without a rehash.
  explicit IdMap(int64_t capacity_hint = 0, int shard_bits = 6)
      : shard_bits_(shard_bits), shards_(static_cast<size_t>(1) << shard_bits) {
    if (shard_bits < 0 || shard_bits > 16) throw std::invalid_argument("IdMap: shard_bits must be in [0, 16]");
    const int64_t per_shard = capacity_hint / num_shards() + 1;
    for (auto& s : shards_) s.reset(slots_for(per_shard));
  }

  int num_shards() const { return static_cast<int>(shards_.size()); }

  int shard_of(uint64_t h) const {
    return shard_bits_ == 0 ? 0 : static_cast<int>(h >> (64 - shard_bits_));
  }

  // Returns the row of `key` (h = mix64(key)), or -1.
  int64_t find(int64_t key, uint64_t h) const {
    const Shard& s = shards_[shard_of(h)];
    uint64_t i = h & s.mask;
    for (;;) {
      const Slot& slot = s.slots[i];
      if (slot.row < 0) return -1;
      if (slot.key == key) return slot.row;
      i = (i + 1) & s.mask;
    }
  }

  void prefetch(uint64_t h) const {
    const Shard& s = shards_[shard_of(h)];
    __builtin_prefetch(&s.slots[h & s.mask]);
  }

  // Makes room in `shard` for `extra` more keys without exceeding kMaxLoad.
  // Not thread-safe for the same shard.
  void reserve_in_shard(int shard, int64_t extra) {
    Shard& s = shards_[shard];
    const int64_t want = s.size + extra;
    if (static_cast<double>(want) <= kMaxLoad * static_cast<double>(s.mask + 1)) return;
    Shard bigger;
    bigger.reset(slots_for(want));
    for (uint64_t i = 0; i <= s.mask; ++i) {
      const Slot& slot = s.slots[i];
      if (slot.row >= 0) bigger.place(slot.key, mix64(static_cast<uint64_t>(slot.key)), slot.row);
    }
    bigger.size = s.size;
    s = std::move(bigger);
  }

  // Makes room for about `extra` more keys spread over all shards (each gets
  // its share plus headroom for the spread), so a bulk insert does not rehash
  // shards over and over.
  void reserve_total(int64_t extra) {
    const int64_t share = extra / num_shards();
    const int64_t headroom = share / 8 + 16;
    for (int s = 0; s < num_shards(); ++s) reserve_in_shard(s, share + headroom);
  }

  // Returns the slot of `key`, inserting (key, row) if it is absent; sets
  // *inserted accordingly. The shard must have room (reserve_in_shard). Safe
  // to call in parallel for keys of different shards. The slot stays valid
  // until the shard is next resized.
  Slot* find_or_insert_reserved(int64_t key, uint64_t h, int64_t row, bool* inserted) {
    Shard& s = shards_[shard_of(h)];
    uint64_t i = h & s.mask;
    for (;;) {
      Slot& slot = s.slots[i];
      if (slot.row < 0) {
        slot.key = key;
        slot.row = row;
        ++s.size;
        *inserted = true;
        return &slot;
      }
      if (slot.key == key) {
        *inserted = false;
        return &slot;
      }
      i = (i + 1) & s.mask;
    }
  }

  // Removes `key` (h = mix64(key)); returns its row or -1. Backward-shift
  // deletion keeps every probe sequence intact without tombstones.
  // Single-threaded for the key's shard.
  int64_t erase(int64_t key, uint64_t h) {
    Shard& s = shards_[shard_of(h)];
    uint64_t i = h & s.mask;
    for (;;) {
      if (s.slots[i].row < 0) return -1;
      if (s.slots[i].key == key) break;
      i = (i + 1) & s.mask;
    }
    const int64_t row = s.slots[i].row;
    uint64_t hole = i;
    uint64_t j = i;
    for (;;) {
      j = (j + 1) & s.mask;
      const Slot& next = s.slots[j];
      if (next.row < 0) break;
      const uint64_t home = mix64(static_cast<uint64_t>(next.key)) & s.mask;
      // `next` may move into the hole unless its home lies cyclically in (hole, j].
      const bool home_in_between = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
      if (!home_in_between) {
        s.slots[hole] = next;
        hole = j;
      }
    }
    s.slots[hole] = Slot{0, -1};
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
    for (const auto& s : shards_) n += static_cast<int64_t>(s.mask + 1);
    return n;
  }

  int64_t memory_bytes() const { return num_slots() * static_cast<int64_t>(sizeof(Slot)); }

 private:
  struct FreeSlots {
    void operator()(Slot* p) const { std::free(p); }
  };

  // Slots are probed at random, one cache line per key, so once a shard
  // outgrows the TLB's reach every find would also walk the page tables:
  // shards of 2 MiB or more are 2 MiB-aligned and offered to transparent huge
  // pages (as the embedding blocks are).
  static Slot* allocate_slots(int64_t n_slots) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t bytes = static_cast<size_t>(n_slots) * sizeof(Slot);
    const size_t align = bytes >= kHuge ? kHuge : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes < align ? align : bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHuge) madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);
#endif
    return static_cast<Slot*>(p);
  }

  struct Shard {
    std::unique_ptr<Slot[], FreeSlots> slots;
    uint64_t mask = 0;
    int64_t size = 0;

    void reset(int64_t n_slots) {
      slots.reset(allocate_slots(n_slots));
      for (int64_t i = 0; i < n_slots; ++i) slots[i] = Slot{0, -1};
      mask = static_cast<uint64_t>(n_slots - 1);
      size = 0;
    }
    // Inserts a key known to be absent into a shard with room.
    void place(int64_t key, uint64_t h, int64_t row) {
      uint64_t i = h & mask;
      while (slots[i].row >= 0) i = (i + 1) & mask;
      slots[i] = Slot{key, row};
    }
  };

  // Smallest power of two holding n keys at kMaxLoad.
  static int64_t slots_for(int64_t n) {
    int64_t slots = kMinShardSlots;
    while (static_cast<double>(n) > kMaxLoad * static_cast<double>(slots)) slots <<= 1;
    return slots;
  }

  int shard_bits_;
  std::vector<Shard> shards_;
};

}  // namespace hashtable
}  // namespace recis
