// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// EmbeddingBlocks: row storage that grows by appending fixed-size blocks.
// Torch-free.
//
// Row r lives in block r >> block_shift at byte offset (r & block_mask) * stride.
// Each row holds `dim` embedding elements (float32, float16 or bfloat16, see
// row_types.h) followed, at a 4-byte aligned offset, by `state_dim` float32
// optimizer-state values. A float32 row's stride is padded to 64 bytes, so
// every row starts on a cache line; a 16-bit row's to 16 bytes, which keeps
// the half-width rows' memory near half of the float32 rows' (rows then share
// cache lines). Growth appends a block and never moves or copies existing
// rows, so row pointers stay valid for the table's lifetime.
// Each row also records the id that owns it and its metadata (RowMeta). Rows
// freed by eviction go on a free list and are handed out again first.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "row_types.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace recis {
namespace hashtable {

// Per-row metadata, kept beside the row blocks.
struct RowMeta {
  int64_t last_seen = 0;    // update count (table clock) when a training lookup last saw the row
  int64_t last_update = 0;  // clock after the row was last written (created or trained)
  uint32_t freq = 0;        // training lookups of the row
  uint8_t live = 0;         // 1: holds an id; 0: free
};

class EmbeddingBlocks {
 public:
  EmbeddingBlocks(int64_t dim, int64_t state_dim, int64_t block_rows, RowType type = RowType::kF32)
      : dim_(dim),
        state_dim_(state_dim),
        type_(type),
        state_offset_(round_up(dim * element_bytes(type), 4)),
        stride_(round_up(state_offset_ + 4 * state_dim, type == RowType::kF32 ? 64 : 16)) {
    if (dim <= 0) throw std::invalid_argument("EmbeddingBlocks: dim must be > 0");
    if (state_dim < 0) throw std::invalid_argument("EmbeddingBlocks: state_dim must be >= 0");
    if (block_rows <= 0 || (block_rows & (block_rows - 1)) != 0) {
      throw std::invalid_argument("EmbeddingBlocks: block_rows must be a power of two");
    }
    block_shift_ = 0;
    while ((int64_t{1} << block_shift_) < block_rows) ++block_shift_;
    block_mask_ = block_rows - 1;
  }

  EmbeddingBlocks(const EmbeddingBlocks&) = delete;
  EmbeddingBlocks& operator=(const EmbeddingBlocks&) = delete;

  int64_t dim() const { return dim_; }
  int64_t state_dim() const { return state_dim_; }
  RowType type() const { return type_; }
  // Bytes from one row to the next.
  int64_t stride_bytes() const { return stride_; }
  int64_t block_rows() const { return block_mask_ + 1; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t capacity() const { return num_blocks() * block_rows(); }
  // Rows ever handed out (the high-water mark): valid row indices are below it.
  int64_t row_limit() const { return next_row_.load(std::memory_order_relaxed); }
  // Rows holding an id now.
  int64_t live_rows() const { return row_limit() - static_cast<int64_t>(free_.size()); }

  // The row's first byte: its embedding elements (of type()), then its state.
  uint8_t* row_bytes(int64_t r) { return blocks_[r >> block_shift_].data + (r & block_mask_) * stride_; }
  const uint8_t* row_bytes(int64_t r) const {
    return blocks_[r >> block_shift_].data + (r & block_mask_) * stride_;
  }
  // The embedding of a float32 row (type() == kF32 only), its state following it.
  float* row(int64_t r) { return reinterpret_cast<float*>(row_bytes(r)); }
  const float* row(int64_t r) const { return reinterpret_cast<const float*>(row_bytes(r)); }
  // The row's optimizer state (state_dim floats).
  float* state(int64_t r) { return reinterpret_cast<float*>(row_bytes(r) + state_offset_); }
  const float* state(int64_t r) const { return reinterpret_cast<const float*>(row_bytes(r) + state_offset_); }
  int64_t& row_id(int64_t r) { return blocks_[r >> block_shift_].ids[r & block_mask_]; }
  int64_t row_id(int64_t r) const { return blocks_[r >> block_shift_].ids[r & block_mask_]; }
  RowMeta& meta(int64_t r) { return blocks_[r >> block_shift_].meta[r & block_mask_]; }
  const RowMeta& meta(int64_t r) const { return blocks_[r >> block_shift_].meta[r & block_mask_]; }

  // Appends blocks until `extra` more rows can be handed out. Single-threaded.
  void reserve(int64_t extra) {
    extra -= static_cast<int64_t>(free_.size());
    while (row_limit() + extra > capacity()) {
      Block b;
      const size_t bytes = static_cast<size_t>(block_rows() * stride_);
      b.data = static_cast<uint8_t*>(allocate_rows(bytes));
      b.ids = new int64_t[static_cast<size_t>(block_rows())];
      b.meta = new RowMeta[static_cast<size_t>(block_rows())];
      blocks_.push_back(b);
    }
  }

  // Hands out a free row, or the next new one; marks it live. Single-threaded,
  // and the caller must have reserved room first.
  int64_t allocate() {
    int64_t r;
    if (!free_.empty()) {
      r = free_.back();
      free_.pop_back();
    } else {
      r = next_row_.fetch_add(1, std::memory_order_relaxed);
    }
    meta(r) = RowMeta{};
    meta(r).live = 1;
    return r;
  }

  // Returns a row to the free list. Single-threaded.
  void release(int64_t r) {
    meta(r).live = 0;
    free_.push_back(r);
  }

  int64_t memory_bytes() const {
    return num_blocks() * block_rows() * static_cast<int64_t>(stride_ + sizeof(int64_t) + sizeof(RowMeta)) +
           static_cast<int64_t>(free_.capacity() * sizeof(int64_t));
  }
  // Of memory_bytes(), the bytes of the live rows (their embedding, state, id and metadata).
  int64_t used_bytes() const {
    return live_rows() * static_cast<int64_t>(stride_ + sizeof(int64_t) + sizeof(RowMeta));
  }

  ~EmbeddingBlocks() {
    for (auto& b : blocks_) {
      std::free(b.data);
      delete[] b.ids;
      delete[] b.meta;
    }
  }

 private:
  struct Block {
    uint8_t* data = nullptr;
    int64_t* ids = nullptr;
    RowMeta* meta = nullptr;
  };

  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
  std::atomic<int64_t> next_row_{0};
  std::vector<int64_t> free_;
};

}  // namespace hashtable
}  // namespace recis
