// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The GPU hash table and the embedding kernels that use it. Torch-free (CUDA
// runtime and CUB only), so that it compiles, and is tested for compiling,
// with nvcc alone; csrc/cuda/gpu_table_ops.cpp exposes it as torch ops.
//
// Table layout (device memory unless `host_rows`):
//   IdMap: open addressing with linear probing over `capacity` slots (a power
//   of two, load factor <= 0.5): keys[s] (int64), state[s] (0 empty, 1 being
//   claimed, 2 ready) and row[s]. Any int64 is a valid key: emptiness lives in
//   `state`, not in a sentinel key. A thread inserting a key claims an empty
//   slot with atomicCAS on its state, writes the key, takes a row with an
//   atomicAdd on the row counter, initialises the row, then publishes the slot
//   (state 2, after a fence). A thread that meets a slot being claimed waits
//   for it to be published before comparing keys, so duplicate keys in one
//   launch all get the one row, and find and find_or_insert can run
//   concurrently.
//   Rows: blocks of `block_rows` rows of `dim + state_dim` floats; a device
//   array of block pointers maps row r to blocks[r / block_rows] +
//   (r % block_rows) * stride. Growing adds blocks and never moves rows;
//   growing the IdMap rehashes keys and row numbers only.
//   With `host_rows`, the blocks are pinned, mapped host memory: the IdMap stays
//   on the GPU and the kernels read and write rows over the bus.
//
// Initial rows are hashtable::init_element(key, j) (csrc/hashtable/initializer.h),
// the CPU tables' function, so an id starts with the same row on either device.
//
// Host-device synchronisation: find_or_insert reads the row counter and the failed-insert count back (16
// bytes) after its launch, to know when to add row blocks and grow the IdMap
// before the next launch (one sync per call). Growth itself (rare) waits for
// the whole device before it frees the old IdMap arrays or block table.
// Nothing else on the forward or backward path waits for the device.
// find_or_insert reserves room for every id of the call (it cannot know how
// many are new before the launch), so a call of n ids may allocate up to n rows
// ahead of need; they are used by later inserts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../hashtable/constants.h"
#include "../hashtable/initializer.h"
#include "../hashtable/optimizers.h"

namespace recis {
namespace cuda {

// Where the tables' device memory comes from: their row blocks, IdMap arrays
// and per-call scratch. The op library installs torch's caching allocator
// (gpu_table_ops.cpp), so tables share one cache with the model, scratch is
// reused across calls without cudaMalloc, and an out-of-memory frees torch's
// cached blocks and retries before it raises (torch.OutOfMemoryError). Without
// one installed (this file's own tests), cudaMallocAsync / cudaMalloc.
struct DeviceAllocator {
  void* (*allocate)(size_t bytes, cudaStream_t stream);
  void (*release)(void* ptr);
};
void set_device_allocator(const DeviceAllocator* allocator);

struct GpuTableConfig {
  int64_t dim = 0;
  int64_t state_dim = 0;
  int64_t initial_capacity = 0;  // rows to reserve
  int64_t block_rows = 65536;
  hashtable::InitSpec init;
  bool host_rows = false;  // rows in pinned host memory, IdMap on the GPU
  int device = 0;
};

// Pooling modes (hashtable/constants.h), as the CPU ops number them.
constexpr int kPoolSum = static_cast<int>(hashtable::PoolingMode::kSum);
constexpr int kPoolMean = static_cast<int>(hashtable::PoolingMode::kMean);

class GpuHashTable {
 public:
  explicit GpuHashTable(const GpuTableConfig& config);
  ~GpuHashTable();
  GpuHashTable(const GpuHashTable&) = delete;
  GpuHashTable& operator=(const GpuHashTable&) = delete;

  int64_t dim() const { return config_.dim; }
  int device() const { return config_.device; }
  int64_t state_dim() const { return config_.state_dim; }
  int64_t stride() const { return config_.dim + config_.state_dim; }
  int64_t size() const { return rows_; }  // rows (ids) held, as of the last insert
  int64_t capacity() const { return capacity_; }
  const hashtable::InitSpec& init() const { return config_.init; }

  // rows[i] = the row of ids[i], or -1 if absent. Device pointers; async on `stream`.
  void find(const int64_t* ids, int64_t n, int64_t* rows, cudaStream_t stream) const;
  // As find, inserting absent ids with their initial rows. Synchronises `stream` once (see above).
  void find_or_insert(const int64_t* ids, int64_t n, int64_t* rows, cudaStream_t stream);
  // Every (id, row) pair, in no particular order: ids (size()), rows (size()), device pointers.
  void export_ids(int64_t* ids, int64_t* rows, cudaStream_t stream) const;
  // Copies rows [row(ids)] (stride floats each) into out (n x stride), device pointers.
  void gather_rows(const int64_t* rows, int64_t n, float* out, cudaStream_t stream) const;
  // Writes n rows (stride floats each, device) to the rows of ids, inserting absent ids.
  void scatter_rows(const int64_t* ids, const float* values, int64_t n, cudaStream_t stream);

  float* const* blocks() const { return d_blocks_; }
  int64_t block_rows() const { return config_.block_rows; }

 private:
  void reserve_rows(int64_t rows, cudaStream_t stream);
  void reserve_slots(int64_t keys, cudaStream_t stream);

  GpuTableConfig config_;
  int64_t capacity_ = 0;  // IdMap slots
  int64_t rows_ = 0;      // rows handed out (host mirror of *d_count_)
  int64_t max_blocks_ = 0;
  int64_t* d_keys_ = nullptr;
  uint32_t* d_state_ = nullptr;
  int64_t* d_slot_row_ = nullptr;
  unsigned long long* d_count_ = nullptr;  // [0] rows handed out, [1] inserts that found no slot
  float** d_blocks_ = nullptr;
  std::vector<float*> h_blocks_;      // device-visible block pointers, as the kernels see them
  std::vector<float*> host_allocs_;  // host_rows: the pinned allocations
};

// out[b, col : col + dim] = pooled rows of bag b (offsets: num_bags + 1, over values).
// rows[i] < 0 (an id absent in evaluation) reads the id's initial row.
// out has `out_stride` floats per bag row.
void pooled_forward(const GpuHashTable& table, const int64_t* ids, const int64_t* rows, const int64_t* offsets,
                    const float* weights, int64_t num_bags, int mode, float* out, int64_t out_stride, int64_t col,
                    cudaStream_t stream);

// The fused backward: sorts the values by row, sums each row's gradient
// contributions (grad of its bag, times its weight, divided by the bag length
// for mean) in one warp per distinct row (a row with more than 256 values, a
// hot id, is summed in chunks of 256 by as many warps first, then its warp adds
// the chunks in order), and applies the optimizer to the row in place. No float atomics; no host synchronisation (the number of distinct
// rows stays on the device). Values with rows < 0 get no update.
void pooled_backward_update(GpuHashTable& table, const int64_t* rows, const int64_t* offsets, const float* weights,
                            int64_t num_values, int64_t num_bags, int mode, const float* grad, int64_t grad_stride,
                            int64_t col, const hashtable::OptimParams& params, cudaStream_t stream);

// owner[i] = hashtable::owner_of(ids[i], world_size).
void owner_of(const int64_t* ids, int64_t n, int64_t world_size, int64_t* owner, cudaStream_t stream);

// perm: value positions sorted (stably) by owner rank; counts: ids per rank (world_size, int64).
void bucketize_by_owner(const int64_t* ids, int64_t n, int64_t world_size, int64_t* perm, int64_t* counts,
                        cudaStream_t stream);

// Throws std::runtime_error naming `what` when `err` is not cudaSuccess.
void check(cudaError_t err, const char* what);

}  // namespace cuda
}  // namespace recis
