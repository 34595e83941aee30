// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// EmbeddingBlocks: row storage that grows by appending fixed-size blocks.
// Torch-free.
//
// Row r lives in block r >> block_shift at byte offset (r & block_mask) * stride.
// Each row holds `dim` embedding elements (float32, float16 or bfloat16, see
// row_types.h) followed, at a 4-byte aligned offset, by `state_dim` float32
// optimizer-state values. Rows are packed at 4-byte alignment: a half-width
// row of odd dim wastes 2 bytes, no other row any. (Padding to a 64-byte line
// cost D=64 row-wise Adagrad rows, 260 bytes, 60 more each; padding to 16
// bytes cost them 12, 5% of the row. The kernels load rows unaligned, and a
// 4-byte aligned row touches as many cache lines on average as a 16-byte
// aligned one.) Growth appends a block and never moves or copies existing
// rows, so row pointers stay valid for the table's lifetime.
// Each row also records the id that owns it and its metadata (RowMeta). Rows
// freed by eviction go on a free list and are handed out again first.
//
// Copy-on-write snapshots. begin_snapshot() freezes the rows below
// row_limit() as they are: a background checkpoint writer then reads them,
// in row order, while training goes on. Every write to a row goes through a
// mutable_* accessor (there are no others), which first copies the row's old
// bytes, id and metadata aside if the snapshot has not read the row yet; the
// snapshot read takes the copy where there is one. A row is copied at most
// once per snapshot, and rows the reader has passed are not copied at all.
// The reader takes no lock: it claims each row with the same per-row atomic
// the writers use (a writer that wants a row the reader holds waits for that
// one row), and finds the rows through the block pointers captured when the
// snapshot began (growth may move the block list, never the blocks).
//
// Spare blocks. Fresh row memory costs its first touch: the kernel zeroes each
// page (and under a hypervisor the host backs it), measured at 0.9-1.6 GB/s on
// the 2-core VMs against 9 GB/s for pages a process touched before. Faulted in
// by an insert, that cost was most of a bulk insert's time. Once a table grows
// past its first reservation it therefore keeps a few blocks ready, allocated
// and touched by a background thread while the caller does other work; growth
// takes those first and faults in fresh blocks itself only when none are ready.
// The number kept follows the growth of recent reserve() calls (the largest
// recent one, halving per call after), capped at an eighth of the table's
// blocks and kMaxSpareBytes (so a table of fewer than 8 blocks keeps none). RECIS_SPARE_BLOCKS=0 in
// the environment turns them off for the tables created after it is set (1: on; anything else raises).
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <string>
#include <vector>

#include "row_types.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace recis {
namespace hashtable {

// Per-row metadata, kept beside the row blocks: 16 bytes. Clocks are update
// counts (optimizer steps), kept in 32 bits: a table raises rather than store
// one past kMaxClock (see clock32), 4 billion steps being beyond any run.
struct RowMeta {
  uint32_t last_seen = 0;    // update count (table clock) when a training lookup last saw the row
  uint32_t last_update = 0;  // clock after the row was last written (created or trained)
  uint32_t freq = 0;         // training lookups of the row
  uint8_t live = 0;          // 1: holds an id; 0: free
};
static_assert(sizeof(RowMeta) == 16, "RowMeta is 16 bytes a row");

constexpr int64_t kMaxClock = int64_t{UINT32_MAX} - 1;  // last_update = clock + 1 must fit too

// A clock (or a count) as RowMeta stores it; throws for one that 32 bits cannot hold.
inline uint32_t clock32(int64_t v, const char* what = "clock") {
  if (v < 0 || v > kMaxClock + 1) {
    throw std::invalid_argument(std::string("table row metadata: ") + what + " " + std::to_string(v) +
                            " is outside [0, 2^32 - 1]");
  }
  return static_cast<uint32_t>(v);
}

class EmbeddingBlocks {
 public:
  EmbeddingBlocks(int64_t dim, int64_t state_dim, int64_t block_rows, RowType type = RowType::kF32)
      : dim_(dim),
        state_dim_(state_dim),
        type_(type),
        state_offset_(round_up(dim * element_bytes(type), 4)),
        stride_(state_offset_ + 4 * state_dim) {
    if (dim <= 0) throw std::invalid_argument("EmbeddingBlocks: dim must be > 0");
    if (state_dim < 0) throw std::invalid_argument("EmbeddingBlocks: state_dim must be >= 0");
    if (block_rows <= 0 || (block_rows & (block_rows - 1)) != 0) {
      throw std::invalid_argument("EmbeddingBlocks: block_rows must be a power of two");
    }
    block_shift_ = 0;
    while ((int64_t{1} << block_shift_) < block_rows) ++block_shift_;
    block_mask_ = block_rows - 1;
    const char* env = std::getenv("RECIS_SPARE_BLOCKS");
    if (env != nullptr && std::strcmp(env, "0") != 0 && std::strcmp(env, "1") != 0) {
      throw std::invalid_argument(std::string("RECIS_SPARE_BLOCKS must be 0 (off) or 1 (on), got '") + env + "'");
    }
    spares_on_ = env == nullptr || std::strcmp(env, "1") == 0;
  }

  EmbeddingBlocks(const EmbeddingBlocks&) = delete;
  EmbeddingBlocks& operator=(const EmbeddingBlocks&) = delete;

  int64_t dim() const { return dim_; }
  int64_t state_dim() const { return state_dim_; }
  RowType type() const { return type_; }
  // Bytes from one row to the next.
  int64_t stride_bytes() const { return stride_; }
  // Bytes from a row's start to its state.
  int64_t state_offset() const { return state_offset_; }
  int64_t block_rows() const { return block_mask_ + 1; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t capacity() const { return num_blocks() * block_rows(); }
  // Rows ever handed out (the high-water mark): valid row indices are below it.
  int64_t row_limit() const { return next_row_.load(std::memory_order_relaxed); }
  // Rows holding an id now.
  int64_t live_rows() const { return row_limit() - static_cast<int64_t>(free_.size()); }

  // The row's first byte: its embedding elements (of type()), then its state.
  const uint8_t* row_bytes(int64_t r) const {
    return blocks_[r >> block_shift_].data + (r & block_mask_) * stride_;
  }
  // The embedding of a float32 row (type() == kF32 only), its state following it.
  const float* row(int64_t r) const { return reinterpret_cast<const float*>(row_bytes(r)); }
  // The row's optimizer state (state_dim floats).
  const float* state(int64_t r) const { return reinterpret_cast<const float*>(row_bytes(r) + state_offset_); }
  int64_t row_id(int64_t r) const { return blocks_[r >> block_shift_].ids[r & block_mask_]; }
  const RowMeta& meta(int64_t r) const { return blocks_[r >> block_shift_].meta[r & block_mask_]; }

  // The same, for writing: each first preserves the row for a snapshot in progress.
  uint8_t* mutable_row_bytes(int64_t r) {
    preserve(r);
    return blocks_[r >> block_shift_].data + (r & block_mask_) * stride_;
  }
  float* mutable_row(int64_t r) { return reinterpret_cast<float*>(mutable_row_bytes(r)); }
  float* mutable_state(int64_t r) { return reinterpret_cast<float*>(mutable_row_bytes(r) + state_offset_); }
  int64_t& mutable_row_id(int64_t r) {
    preserve(r);
    return blocks_[r >> block_shift_].ids[r & block_mask_];
  }
  RowMeta& mutable_meta(int64_t r) {
    preserve(r);
    return blocks_[r >> block_shift_].meta[r & block_mask_];
  }

  // Appends blocks until `extra` more rows can be handed out, spare ones first
  // (see the top of this file). Single-threaded.
  void reserve(int64_t extra) {
    extra -= static_cast<int64_t>(free_.size());
    if (row_limit() + extra <= capacity()) return;
    const bool growing = !blocks_.empty();  // not the table's first reservation
    const int64_t need = (row_limit() + extra - capacity() + block_mask_) >> block_shift_;
    if (growing && spares_on_) take_spares(need);
    while (row_limit() + extra > capacity()) blocks_.push_back(make_block(block_rows(), stride_, false));
    if (growing && spares_on_) refill_spares(need);
  }

  // Blocks reserved as spares: prepared, or being prepared, ahead of growth. It changes in
  // reserve() only, so it is stable while the caller holds the table (memory_bytes() and its
  // breakdown agree), though the worker may still be filling them.
  int64_t spare_blocks() const { return spare_blocks_; }

  // Rows are handed out free rows first (the last freed first), then new
  // ones from row_limit() on. nth_new_row(c): the row the (c+1)-th row
  // handed out from now will be.
  int64_t nth_new_row(int64_t c) const {
    const int64_t f = static_cast<int64_t>(free_.size());
    return c < f ? free_[static_cast<size_t>(f - 1 - c)] : row_limit() + (c - f);
  }

  // Hands out `count` rows into out[0, count), in that order, and marks them
  // live; one atomic add for the new ones. Single-threaded, and the caller
  // must have reserved room first.
  void allocate_n(int64_t count, int64_t* out) {
    int64_t i = 0;
    for (; i < count && !free_.empty(); ++i) {
      out[i] = free_.back();
      free_.pop_back();
    }
    const int64_t first = next_row_.fetch_add(count - i, std::memory_order_relaxed);
    for (int64_t c = 0; i < count; ++i, ++c) out[i] = first + c;
    for (i = 0; i < count; ++i) {
      RowMeta& m = mutable_meta(out[i]);
      m = RowMeta{};
      m.live = 1;
    }
  }

  // Returns a row to the free list. Single-threaded.
  void release(int64_t r) {
    mutable_meta(r).live = 0;
    free_.push_back(r);
  }

  int64_t memory_bytes() const {
    return (num_blocks() + spare_blocks()) * block_bytes() + static_cast<int64_t>(free_.capacity() * sizeof(int64_t)) +
           snapshot_bytes();
  }

  // ---- Copy-on-write snapshots (see the top of this file). ----
  // begin_snapshot and end_snapshot run alone (the caller holds the table
  // exclusively). read_snapshot may run alongside any number of writers, but
  // not alongside another read_snapshot.

  bool snapshot_active() const { return snap_active_; }
  // The rows the snapshot covers: [0, snapshot_limit()).
  int64_t snapshot_limit() const { return snap_limit_; }
  // Where the next snapshot read starts: rows below it have been read.
  int64_t snapshot_next() const { return snap_done_.load(std::memory_order_acquire); }
  // Rows copied aside so far.
  int64_t snapshot_copies() const { return snap_count_.load(std::memory_order_relaxed); }
  // Bytes the snapshot holds: its copies and its per-row index.
  int64_t snapshot_bytes() const {
    if (!snap_active_) return 0;
    const int64_t slabs = (snapshot_copies() + kSlabRecords - 1) / kSlabRecords;
    return slabs * kSlabRecords * record_bytes() + snap_limit_ * 4;
  }

  void begin_snapshot() {
    if (snap_active_) throw std::logic_error("a snapshot of this table is already in progress");
    const int64_t limit = row_limit();
    if (limit >= INT32_MAX) {
      throw std::length_error("a snapshot covers at most 2^31 - 2 rows; the table has " + std::to_string(limit));
    }
    // calloc: the index's pages are mapped zero on first touch, so a snapshot costs no
    // per-row work up front.
    snap_slot_ = static_cast<int32_t*>(std::calloc(static_cast<size_t>(std::max<int64_t>(limit, 1)), sizeof(int32_t)));
    if (snap_slot_ == nullptr) throw std::bad_alloc();
    snap_slabs_ = std::vector<std::atomic<uint8_t*>>(static_cast<size_t>((limit + kSlabRecords - 1) / kSlabRecords));
    for (auto& p : snap_slabs_) p.store(nullptr, std::memory_order_relaxed);
    snap_blocks_.assign(blocks_.begin(), blocks_.begin() + (limit + block_mask_) / (block_mask_ + 1));
    snap_limit_ = limit;
    snap_count_.store(0);
    snap_done_.store(0);
    snap_active_ = true;
  }

  void end_snapshot() {
    if (!snap_active_) return;
    snap_active_ = false;
    for (auto& p : snap_slabs_) std::free(p.load());
    snap_slabs_.clear();
    snap_blocks_.clear();
    std::free(snap_slot_);
    snap_slot_ = nullptr;
    snap_limit_ = 0;
    snap_count_.store(0);
    snap_done_.store(0);
  }

  // Calls fn(r, row bytes, id, meta) for each row in [begin, end) as it was
  // when the snapshot began (live or free: the caller looks at meta.live), and
  // marks the range read. Reads are sequential: begin must be snapshot_next().
  // A row is either taken from its copy or claimed (kReading) and read in
  // place; a writer that wants it meanwhile waits until it is marked kRead.
  template <typename Fn>
  void read_snapshot(int64_t begin, int64_t end, Fn&& fn) {
    if (!snap_active_) throw std::logic_error("no snapshot of this table is in progress");
    if (begin != snapshot_next() || end < begin || end > snap_limit_) {
      throw std::logic_error("a snapshot is read once, in row order: the next read starts at row " +
                             std::to_string(snapshot_next()) + " (of " + std::to_string(snap_limit_) + "), not " +
                             std::to_string(begin));
    }
    for (int64_t r = begin; r < end; ++r) {
      int32_t* slot = snap_slot_ + r;
      int32_t seen = 0;
      if (__atomic_compare_exchange_n(slot, &seen, kReading, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        const Block& b = snap_blocks_[static_cast<size_t>(r >> block_shift_)];
        const int64_t i = r & block_mask_;
        fn(r, static_cast<const uint8_t*>(b.data + i * stride_), b.ids[i], static_cast<const RowMeta&>(b.meta[i]));
        __atomic_store_n(slot, kRead, __ATOMIC_RELEASE);
        continue;
      }
      while (seen == kReading) seen = __atomic_load_n(slot, __ATOMIC_ACQUIRE);  // a writer is copying it
      const uint8_t* rec = record(seen - 1);
      int64_t id;
      RowMeta m;
      std::memcpy(&id, rec + stride_, sizeof(id));
      std::memcpy(&m, rec + stride_ + sizeof(int64_t), sizeof(m));
      fn(r, rec, id, m);
    }
    snap_done_.store(end, std::memory_order_release);
  }
  // memory_bytes() by what holds it, for the live rows (their embedding elements, their state, the
  // padding of each row to its stride, their ids and metadata), the spare blocks, and the rest (rows
  // allocated but not live, the free list, snapshot copies).
  struct Bytes {
    int64_t embedding = 0, state = 0, padding = 0, ids = 0, metadata = 0, spare = 0, slack = 0, snapshot = 0;
  };
  Bytes bytes() const {
    Bytes b;
    const int64_t live = live_rows(), emb = dim_ * element_bytes(type_);
    b.embedding = live * emb;
    b.state = live * 4 * state_dim_;
    b.padding = live * (stride_ - emb - 4 * state_dim_);
    b.ids = live * static_cast<int64_t>(sizeof(int64_t));
    b.metadata = live * static_cast<int64_t>(sizeof(RowMeta));
    b.snapshot = snapshot_bytes();
    b.spare = spare_blocks() * block_bytes();
    b.slack = memory_bytes() - b.embedding - b.state - b.padding - b.ids - b.metadata - b.spare - b.snapshot;
    return b;
  }

  // Of memory_bytes(), the bytes of the live rows (their embedding, state, id and metadata).
  int64_t used_bytes() const {
    return live_rows() * record_bytes();
  }

  ~EmbeddingBlocks() {
    end_snapshot();
    for (auto& b : blocks_) free_block(b);
    if (spares_pid_ == current_pid()) {  // in a forked child the pool may be mid-update: leave it
      std::lock_guard<std::mutex> g(spares_->mu);
      spares_->closed = true;  // a worker still preparing a block frees it itself
      for (auto& b : spares_->ready) free_block(b);
      spares_->ready.clear();
    }
  }

 private:
  struct Block {
    uint8_t* data = nullptr;
    int64_t* ids = nullptr;
    RowMeta* meta = nullptr;
  };

  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

  static Block make_block(int64_t rows, int64_t stride, bool touch) {
    Block b;
    const size_t bytes = static_cast<size_t>(rows * stride);
    b.data = static_cast<uint8_t*>(allocate_rows(bytes));
    b.ids = new int64_t[static_cast<size_t>(rows)];
    b.meta = new RowMeta[static_cast<size_t>(rows)];  // value-initialised: written here
    if (touch) {  // fault the pages in now; rewriting a byte keeps whatever it held
      constexpr size_t kPage = 4096;
      for (size_t i = 0; i < bytes; i += kPage) {
        volatile uint8_t* p = b.data + i;
        *p = *p;
      }
      auto* ids = reinterpret_cast<uint8_t*>(b.ids);
      for (size_t i = 0; i < static_cast<size_t>(rows) * sizeof(int64_t); i += kPage) {
        volatile uint8_t* p = ids + i;
        *p = *p;
      }
    }
    return b;
  }

  static void free_block(Block& b) {
    std::free(b.data);
    delete[] b.ids;
    delete[] b.meta;
    b = Block{};
  }

  // ---- Spare blocks (see the top of this file). ----
  static constexpr int64_t kMaxSpareBytes = int64_t{64} << 20;

  struct SparePool {
    std::mutex mu;
    std::vector<Block> ready;
    int64_t want = 0;       // blocks to keep ready
    bool filling = false;   // a worker is preparing blocks
    bool closed = false;    // the table is gone: the worker frees what it prepared
  };

  static int64_t current_pid() {
#if defined(__linux__)
    return static_cast<int64_t>(getpid());
#else
    return 0;
#endif
  }

  // A forked child inherits the pool without its worker, possibly mid-update (its lock
  // held, `filling` set for good): the child starts a pool of its own and leaves that one.
  void own_spares() {
    if (spares_pid_ == current_pid()) return;
    new std::shared_ptr<SparePool>(std::move(spares_));  // never freed: its state may be torn
    spares_ = std::make_shared<SparePool>();
    spares_pid_ = current_pid();
    spare_blocks_ = 0;
  }

  void take_spares(int64_t need) {
    own_spares();
    std::lock_guard<std::mutex> g(spares_->mu);
    auto& ready = spares_->ready;
    while (need-- > 0 && !ready.empty()) {
      blocks_.push_back(ready.back());
      ready.pop_back();
    }
    spare_blocks_ = static_cast<int64_t>(ready.size());
  }

  void refill_spares(int64_t grew_by) {
    // None for a table of fewer than 8 blocks, or blocks over kMaxSpareBytes.
    const int64_t cap = std::min(num_blocks() / 8, kMaxSpareBytes / block_bytes());
    if (cap <= 0) return;
    std::shared_ptr<SparePool> pool = spares_;
    {
      std::lock_guard<std::mutex> g(pool->mu);
      pool->want = std::min(cap, std::max(pool->want / 2, grew_by));  // one bulk insert is not a trend
      // A worker fills up to `want` and never past it; blocks beyond it stay until taken.
      spare_blocks_ = std::max(static_cast<int64_t>(pool->ready.size()), pool->want);
      if (pool->filling || static_cast<int64_t>(pool->ready.size()) >= pool->want) return;
      pool->filling = true;
    }
    try {
      std::thread([pool, rows = block_rows(), stride = stride_] { fill_spares(pool, rows, stride); }).detach();
    } catch (const std::system_error&) {  // no thread to be had: growth faults its own blocks in
      std::lock_guard<std::mutex> g(pool->mu);
      pool->filling = false;
      spare_blocks_ = static_cast<int64_t>(pool->ready.size());
    }
  }

  static void fill_spares(const std::shared_ptr<SparePool>& pool, int64_t rows, int64_t stride) {
    while (true) {
      {
        std::lock_guard<std::mutex> g(pool->mu);
        if (pool->closed || static_cast<int64_t>(pool->ready.size()) >= pool->want) {
          pool->filling = false;
          return;
        }
      }
      Block b;
      try {
        b = make_block(rows, stride, true);
      } catch (const std::bad_alloc&) {
        std::lock_guard<std::mutex> g(pool->mu);
        pool->filling = false;
        return;
      }
      std::lock_guard<std::mutex> g(pool->mu);
      if (pool->closed) {
        free_block(b);
        pool->filling = false;
        return;
      }
      pool->ready.push_back(b);
    }
  }

  // A copied row: its stride_ bytes, then its id, then its RowMeta (what a row holds in all).
  static constexpr int64_t kSlabRecords = 4096;
  int64_t record_bytes() const { return stride_ + static_cast<int64_t>(sizeof(int64_t) + sizeof(RowMeta)); }
  // A block's bytes: its rows with their ids and metadata.
  int64_t block_bytes() const { return block_rows() * record_bytes(); }
  uint8_t* record(int64_t k) const {
    return snap_slabs_[static_cast<size_t>(k / kSlabRecords)].load(std::memory_order_acquire) +
           (k % kSlabRecords) * record_bytes();
  }

  // snap_slot_[r]: 0 (untouched), kReading (being copied aside or read), kRead
  // (read in place: writes are free to go), or k + 1 (copy k, in snap_slabs_).
  static constexpr int32_t kReading = -1;
  static constexpr int32_t kRead = -2;

  // Copies row r aside before its first write, if the snapshot still needs it.
  void preserve(int64_t r) {
    if (__builtin_expect(!snap_active_, 1)) return;
    if (r >= snap_limit_ || r < snap_done_.load(std::memory_order_acquire)) return;
    int32_t* slot = snap_slot_ + r;
    int32_t seen = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (seen > 0 || seen == kRead) return;
    if (seen == 0 && __atomic_compare_exchange_n(slot, &seen, kReading, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      const int64_t k = snap_count_.fetch_add(1, std::memory_order_relaxed);
      std::atomic<uint8_t*>& slab = snap_slabs_[static_cast<size_t>(k / kSlabRecords)];
      if (slab.load(std::memory_order_acquire) == nullptr) {
        std::lock_guard<std::mutex> g(snap_mutex_);
        if (slab.load(std::memory_order_relaxed) == nullptr) {
          void* p = std::malloc(static_cast<size_t>(kSlabRecords * record_bytes()));
          if (p == nullptr) {
            __atomic_store_n(slot, 0, __ATOMIC_RELEASE);
            throw std::bad_alloc();
          }
          slab.store(static_cast<uint8_t*>(p), std::memory_order_release);
        }
      }
      uint8_t* rec = record(k);
      const Block& b = blocks_[r >> block_shift_];
      std::memcpy(rec, b.data + (r & block_mask_) * stride_, static_cast<size_t>(stride_));
      std::memcpy(rec + stride_, &b.ids[r & block_mask_], sizeof(int64_t));
      std::memcpy(rec + stride_ + sizeof(int64_t), &b.meta[r & block_mask_], sizeof(RowMeta));
      __atomic_store_n(slot, static_cast<int32_t>(k + 1), __ATOMIC_RELEASE);
      return;
    }
    // Another writer is copying the row, or the reader is reading it: wait for that row.
    while (__atomic_load_n(slot, __ATOMIC_ACQUIRE) == kReading) {
    }
  }

  // Row memory is touched at random, one row per id, so TLB misses dominate
  // lookups and updates once a table outgrows the TLB's reach. Blocks of 2 MiB
  // or more are therefore 2 MiB-aligned and offered to transparent huge pages.
  static void* allocate_rows(size_t bytes) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t align = bytes >= kHuge ? kHuge : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHuge) madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);
#endif
    return p;
  }

  int64_t dim_;
  int64_t state_dim_;
  RowType type_;
  int64_t state_offset_;  // bytes
  int64_t stride_;        // bytes
  int block_shift_ = 0;
  int64_t block_mask_ = 0;
  std::vector<Block> blocks_;
  bool spares_on_ = true;
  std::shared_ptr<SparePool> spares_ = std::make_shared<SparePool>();
  int64_t spares_pid_ = current_pid();
  int64_t spare_blocks_ = 0;  // see spare_blocks()
  std::atomic<int64_t> next_row_{0};
  std::vector<int64_t> free_;
  // The snapshot in progress (begin_snapshot): rows below snap_limit_, read up to snap_done_,
  // each row's state in snap_slot_ (see kReading), the blocks as they were at the start.
  bool snap_active_ = false;
  int64_t snap_limit_ = 0;
  std::atomic<int64_t> snap_done_{0};
  std::atomic<int64_t> snap_count_{0};
  int32_t* snap_slot_ = nullptr;
  std::vector<std::atomic<uint8_t*>> snap_slabs_;
  std::vector<Block> snap_blocks_;
  std::mutex snap_mutex_;
};

}  // namespace hashtable
}  // namespace recis
