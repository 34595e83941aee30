// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The GPU hash table and its kernels; see gpu_table.h for the design.
#include "gpu_table.h"

#include <cub/cub.cuh>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

// A thread that meets a slot being claimed waits for the claiming thread, which
// may sit in its own warp: that needs independent thread scheduling (Volta, sm_70+).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "recis CUDA tables need sm_70 or newer (independent thread scheduling)"
#endif

namespace recis {
namespace cuda {

using hashtable::init_element;
using hashtable::InitSpec;
using hashtable::mix64;
using hashtable::OptimParams;
using hashtable::OptimType;
using hashtable::WeightDecayMode;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("recis CUDA: ") + what + ": " + cudaGetErrorString(err));
  }
}

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxDim = 1024;  // the backward keeps a row's gradient in registers
constexpr uint32_t kEmpty = 0, kClaiming = 1, kReady = 2;

__device__ __forceinline__ uint32_t load_state(const uint32_t* p) { return *reinterpret_cast<const volatile uint32_t*>(p); }
__device__ __forceinline__ int64_t load64(const int64_t* p) { return *reinterpret_cast<const volatile int64_t*>(p); }

struct RowAddr {
  float* const* blocks;
  int64_t block_rows;
  int64_t stride;
  __device__ __forceinline__ float* operator()(int64_t row) const {
    return blocks[row / block_rows] + (row % block_rows) * stride;
  }
};

struct IdMapView {
  int64_t* keys;
  uint32_t* state;
  int64_t* slot_row;
  uint64_t mask;
};

// The row of `key`, or -1. A slot being claimed is waited for: its key may be ours.
__device__ int64_t probe_find(const IdMapView& m, int64_t key) {
  uint64_t s = mix64(static_cast<uint64_t>(key)) & m.mask;
  for (uint64_t i = 0; i <= m.mask; ++i) {
    uint32_t st = load_state(m.state + s);
    if (st == kEmpty) return -1;
    while (st == kClaiming) st = load_state(m.state + s);
    __threadfence();
    if (load64(m.keys + s) == key) return load64(m.slot_row + s);
    s = (s + 1) & m.mask;
  }
  return -1;
}

// The row of `key`, inserting it (with its initial row) if absent. The host
// keeps the load factor <= 0.5 and enough row blocks for every key of the launch,
// so a probe finds an empty slot; should it not (a table used against its lock),
// the probe stops after one pass over the slots, returns -1 and counts a failure
// in count[1] (find_or_insert raises on it) instead of spinning forever.
__device__ int64_t probe_insert(const IdMapView& m, int64_t key, unsigned long long* count, RowAddr addr,
                                int64_t dim, int64_t state_dim, InitSpec init) {
  uint64_t s = mix64(static_cast<uint64_t>(key)) & m.mask;
  for (uint64_t probes = 0;; ++probes) {
    if (probes > m.mask) {
      atomicAdd(count + 1, 1ULL);
      return -1;
    }
    uint32_t st = load_state(m.state + s);
    if (st == kEmpty) {
      if (atomicCAS(m.state + s, kEmpty, kClaiming) == kEmpty) {
        const int64_t row = static_cast<int64_t>(atomicAdd(count, 1ULL));
        m.keys[s] = key;
        m.slot_row[s] = row;
        float* r = addr(row);
        for (int64_t j = 0; j < dim; ++j) r[j] = init_element(key, j, init);
        for (int64_t j = 0; j < state_dim; ++j) r[dim + j] = 0.0f;
        __threadfence();
        atomicExch(m.state + s, kReady);
        return row;
      }
      st = load_state(m.state + s);
    }
    while (st == kClaiming) st = load_state(m.state + s);
    __threadfence();
    if (load64(m.keys + s) == key) return load64(m.slot_row + s);
    s = (s + 1) & m.mask;
  }
}

__global__ void find_kernel(IdMapView m, const int64_t* ids, int64_t n, int64_t* rows) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) rows[i] = probe_find(m, ids[i]);
}

__global__ void insert_kernel(IdMapView m, const int64_t* ids, int64_t n, int64_t* rows, unsigned long long* count,
                              RowAddr addr, int64_t dim, int64_t state_dim, InitSpec init) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) rows[i] = probe_insert(m, ids[i], count, addr, dim, state_dim, init);
}

// Moves the ready slots of `from` into `to` (distinct keys: no waiting needed).
__global__ void rehash_kernel(IdMapView from, uint64_t from_slots, IdMapView to) {
  const uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x;
  if (i >= from_slots || from.state[i] != kReady) return;
  const int64_t key = from.keys[i];
  uint64_t s = mix64(static_cast<uint64_t>(key)) & to.mask;
  while (atomicCAS(to.state + s, kEmpty, kReady) != kEmpty) s = (s + 1) & to.mask;
  to.keys[s] = key;
  to.slot_row[s] = from.slot_row[i];
}

__global__ void export_kernel(IdMapView m, uint64_t slots, int64_t* ids, int64_t* rows, unsigned long long* next) {
  const uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x;
  if (i >= slots || m.state[i] != kReady) return;
  const unsigned long long k = atomicAdd(next, 1ULL);
  ids[k] = m.keys[i];
  rows[k] = m.slot_row[i];
}

__global__ void gather_kernel(RowAddr addr, const int64_t* rows, int64_t n, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * addr.stride) return;
  const int64_t r = i / addr.stride, j = i % addr.stride;
  out[i] = addr(rows[r])[j];
}

__global__ void scatter_kernel(RowAddr addr, const int64_t* rows, const float* values, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * addr.stride) return;
  const int64_t r = i / addr.stride, j = i % addr.stride;
  addr(rows[r])[j] = values[i];
}

// One warp per bag; lanes stride over the row in VEC-float vectors.
template <int VEC>
__global__ void pooled_forward_kernel(RowAddr addr, const int64_t* ids, const int64_t* rows, const int64_t* offsets,
                                      const float* weights, int64_t num_bags, int mode, float* out,
                                      int64_t out_stride, int64_t col, int64_t dim, InitSpec init) {
  const int64_t bag = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) return;
  const int64_t begin = offsets[bag], end = offsets[bag + 1];
  const float scale = (mode == kPoolMean && end > begin) ? 1.0f / static_cast<float>(end - begin) : 1.0f;
  float* dst = out + bag * out_stride + col;
  for (int64_t q = lane; q * VEC < dim; q += kWarp) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float w = weights != nullptr ? weights[i] : 1.0f;
      const int64_t row = rows[i];
      if (row >= 0) {
        const float* src = addr(row) + q * VEC;
        if constexpr (VEC == 4) {
          const float4 x = *reinterpret_cast<const float4*>(src);
          acc[0] += w * x.x;
          acc[1] += w * x.y;
          acc[2] += w * x.z;
          acc[3] += w * x.w;
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += w * src[v];
        }
      } else {
        // Absent in evaluation: the id's initial row, computed in place.
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += w * init_element(ids[i], q * VEC + v, init);
      }
    }
    if constexpr (VEC == 4) {
      *reinterpret_cast<float4*>(dst + q * VEC) =
          make_float4(acc[0] * scale, acc[1] * scale, acc[2] * scale, acc[3] * scale);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) dst[q * VEC + v] = acc[v] * scale;
    }
  }
}

// Which bag each value is in (binary search over the offsets).
__global__ void bag_of_value_kernel(const int64_t* offsets, int64_t num_bags, int64_t n, int64_t* bag_of) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  int64_t lo = 0, hi = num_bags;  // the last bag b with offsets[b] <= i
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  bag_of[i] = lo;
}

__global__ void iota_kernel(int64_t* out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = i;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// A warp's update of one row with the optimizer's shared element function
// (csrc/hashtable/optimizers.h); lane l holds g for dims l, l + 32, ...
template <typename O, int kPerLane = kMaxDim / kWarp>
__device__ __forceinline__ void warp_update(float* w, float* state, float (&g)[kPerLane], int lane, int64_t dim,
                                            const OptimParams& p, float step_size) {
  float row = 0.0f;
  if constexpr (O::kRowState) {
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) sq += g[k] * g[k];  // zero beyond dim
    sq = warp_sum(sq);
    float* slot = state + O::row_slot(dim);
    const float m = O::row_state(*slot, sq, dim, p);
    row = O::row_factor(m, p);
    __syncwarp();  // every lane has read the row's float
    if (lane == 0) *slot = m;
  }
  if constexpr (O::kPreNorms) {
    float w2 = 0.0f;
    float g2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
      if (d < dim) {
        w2 += w[d] * w[d];
        g2 += g[k] * g[k];
      }
    }
    row = O::pre_factor(warp_sum(w2), warp_sum(g2), p);
  }
  if constexpr (O::kPostNorms) {  // element() writes the step direction into g; the norms scale it
    float w2 = 0.0f;
    float r2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
      if (d < dim) {
        w2 += w[d] * w[d];
        O::element(w[d], state, g[k], d, dim, p, step_size, row);
        r2 += g[k] * g[k];
      }
    }
    const float f = O::post_factor(warp_sum(w2), warp_sum(r2), p);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
      if (d < dim) w[d] -= f * g[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
      if (d < dim) O::element(w[d], state, g[k], d, dim, p, step_size, row);
    }
  }
}

// Values of one row that one warp sums; a row with more (a hot id) is split
// into chunks of this many, summed by as many warps into a scratch buffer,
// so its backward does not serialise on one warp.
constexpr int64_t kChunk = 256;

// The gradient contributions of sorted values [begin, end) into a lane's g.
template <int kPerLane>
__device__ __forceinline__ void add_contributions(float (&g)[kPerLane], int64_t begin, int64_t end,
                                                  const int64_t* sorted_values, const int64_t* bag_of,
                                                  const int64_t* offsets, const float* weights, int mode,
                                                  const float* grad, int64_t grad_stride, int64_t col, int64_t dim,
                                                  int lane) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t v = sorted_values[j];
    const int64_t b = bag_of[v];
    float s = weights != nullptr ? weights[v] : 1.0f;
    if (mode == kPoolMean) s /= static_cast<float>(offsets[b + 1] - offsets[b]);
    const float* gb = grad + b * grad_stride + col;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
      if (d < dim) g[k] += s * gb[d];
    }
  }
}

// Chunks per run: ceil(count / kChunk) for a run longer than kChunk, else 0 (runs
// past *num_runs: 0).
__global__ void chunk_count_kernel(const int64_t* run_counts, const int* num_runs, int64_t n, int64_t* chunks) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= n) return;
  const int64_t c = r < *num_runs ? run_counts[r] : 0;
  chunks[r] = c > kChunk ? (c + kChunk - 1) / kChunk : 0;
}

// One warp per chunk of a long run: its partial gradient sum into partial[chunk, :dim].
// chunk_end is the inclusive scan of the chunk counts; chunk_end[n - 1] is their total.
__global__ void partial_kernel(const int64_t* chunk_end, const int64_t* chunks, const int64_t* run_starts,
                               const int64_t* run_counts, const int* num_runs, int64_t n, int64_t max_chunks,
                               const int64_t* sorted_values, const int64_t* bag_of, const int64_t* offsets,
                               const float* weights, int mode, const float* grad, int64_t grad_stride, int64_t col,
                               int64_t dim, float* partial) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= max_chunks || c >= chunk_end[n - 1]) return;
  int64_t lo = 0, hi = *num_runs;  // the first run whose chunk_end exceeds c
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (chunk_end[mid] <= c) lo = mid + 1; else hi = mid;
  }
  const int64_t k = c - (chunk_end[lo] - chunks[lo]);
  const int64_t begin = run_starts[lo] + k * kChunk;
  const int64_t end = min(run_starts[lo] + run_counts[lo], begin + kChunk);
  constexpr int kPerLane = kMaxDim / kWarp;
  float g[kPerLane];
#pragma unroll
  for (int q = 0; q < kPerLane; ++q) g[q] = 0.0f;
  add_contributions<kPerLane>(g, begin, end, sorted_values, bag_of, offsets, weights, mode, grad, grad_stride, col,
                              dim, lane);
  float* out = partial + c * dim;
#pragma unroll
  for (int q = 0; q < kPerLane; ++q) {
    const int64_t d = lane + static_cast<int64_t>(q) * kWarp;
    if (d < dim) out[d] = g[q];
  }
}

// One warp per distinct row: sum its gradient contributions (a long run: its
// chunks' partial sums, in chunk order, so the result is deterministic), update
// the row in place.
__global__ void update_kernel(RowAddr addr, const int64_t* unique_rows, const int64_t* run_counts,
                              const int64_t* run_starts, const int* num_runs, const int64_t* sorted_values,
                              const int64_t* bag_of, const int64_t* offsets, const float* weights, int mode,
                              const float* grad, int64_t grad_stride, int64_t col, int64_t dim, OptimParams p,
                              float adam_step_size, const int64_t* chunk_end, const int64_t* chunks,
                              const float* partial) {
  const int64_t run = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (run >= *num_runs) return;
  const int64_t row = unique_rows[run];
  if (row < 0) return;  // not admitted, or looked up in evaluation
  const int64_t begin = run_starts[run], end = begin + run_counts[run];
  constexpr int kPerLane = kMaxDim / kWarp;
  float g[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) g[k] = 0.0f;
  if (chunks[run] == 0) {
    add_contributions<kPerLane>(g, begin, end, sorted_values, bag_of, offsets, weights, mode, grad, grad_stride, col,
                                dim, lane);
  } else {
    for (int64_t c = chunk_end[run] - chunks[run]; c < chunk_end[run]; ++c) {
      const float* part = partial + c * dim;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
        if (d < dim) g[k] += part[d];
      }
    }
  }
  float* w = addr(row);
  float* state = w + dim;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t d = lane + static_cast<int64_t>(k) * kWarp;
    if (d < dim) hashtable::apply_weight_decay(w[d], g[k], p);
  }
  // The one dispatch (csrc/hashtable/optimizers.h): an optimizer declared there runs here too; the
  // host entry point refuses unknown codes (make_optim_params) before the launch.
  hashtable::dispatch_optimizer(
      p.type, [&](auto opt) { warp_update<decltype(opt)>(w, state, g, lane, dim, p, adam_step_size); });
}

__global__ void owner_kernel(const int64_t* ids, int64_t n, int64_t world_size, int64_t* owner) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) owner[i] = hashtable::owner_of(ids[i], world_size);
}

__global__ void count_kernel(const int64_t* owner, int64_t n, unsigned long long* counts) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) atomicAdd(counts + owner[i], 1ULL);  // integer counts; no float atomics
}

unsigned grid(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

const DeviceAllocator* g_allocator = nullptr;

// Scratch for one call, ordered on `stream` (freed on it after its last use).
template <typename T>
T* device_alloc(int64_t n, cudaStream_t stream, const char* what) {
  const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
  if (g_allocator != nullptr) return static_cast<T*>(g_allocator->allocate(bytes, stream));
  void* p = nullptr;
  check(cudaMallocAsync(&p, bytes, stream), what);
  return static_cast<T*>(p);
}

void device_free(void* p, cudaStream_t stream) {
  if (p == nullptr) return;
  if (g_allocator != nullptr) {
    g_allocator->release(p);
  } else {
    check(cudaFreeAsync(p, stream), "cudaFreeAsync");
  }
}

// A table's own arrays, used from any stream: every free of one is preceded by a
// device synchronisation (growth, destruction), so no launch still reads it.
// Allocated on `stream`, the stream that first writes them: torch's caching
// allocator hands out a block on a stream only once the work queued on that
// stream before its free is behind it, so memory taken from another stream's pool
// (the default stream's, while the caller runs on a side stream) could still be
// written by that stream's queued work after ours.
template <typename T>
T* table_alloc(int64_t n, cudaStream_t stream, const char* what) {
  const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
  if (g_allocator != nullptr) return static_cast<T*>(g_allocator->allocate(bytes, stream));
  void* p = nullptr;
  check(cudaMalloc(&p, bytes), what);
  return static_cast<T*>(p);
}

void table_free(void* p) {
  if (p == nullptr) return;
  if (g_allocator != nullptr) {
    g_allocator->release(p);
  } else {
    cudaFree(p);
  }
}

}  // namespace

void set_device_allocator(const DeviceAllocator* allocator) { g_allocator = allocator; }

// -- GpuHashTable ------------------------------------------------------------------

GpuHashTable::GpuHashTable(const GpuTableConfig& config) : config_(config) {
  if (config.dim <= 0 || config.dim > kMaxDim) {
    throw std::invalid_argument("recis CUDA table: dim must be in [1, " + std::to_string(kMaxDim) + "], got " +
                                std::to_string(config.dim));
  }
  if (config.block_rows <= 0) throw std::invalid_argument("recis CUDA table: block_rows must be > 0");
  check(cudaSetDevice(config.device), "cudaSetDevice");
  d_count_ = table_alloc<unsigned long long>(2, nullptr, "row counter");  // rows handed out, failed inserts
  check(cudaMemset(d_count_, 0, 2 * sizeof(unsigned long long)), "cudaMemset(row counter)");
  reserve_slots(config.initial_capacity > 0 ? config.initial_capacity : 1024, nullptr);
  reserve_rows(config.initial_capacity > 0 ? config.initial_capacity : 1, nullptr);
  // Everything above ran on the legacy stream; the table is ready for any stream after this.
  check(cudaDeviceSynchronize(), "table construction");
}

GpuHashTable::~GpuHashTable() {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(config_.device);
  cudaDeviceSynchronize();
  table_free(d_keys_);
  table_free(d_state_);
  table_free(d_slot_row_);
  table_free(d_count_);
  table_free(d_blocks_);
  if (config_.host_rows) {
    for (float* b : host_allocs_) cudaFreeHost(b);
  } else {
    for (float* b : h_blocks_) table_free(b);
  }
  cudaSetDevice(previous);
}

void GpuHashTable::reserve_rows(int64_t rows, cudaStream_t stream) {
  const int64_t need = (rows + config_.block_rows - 1) / config_.block_rows;
  if (need <= static_cast<int64_t>(h_blocks_.size())) return;
  const size_t bytes = static_cast<size_t>(config_.block_rows) * static_cast<size_t>(stride()) * sizeof(float);
  while (static_cast<int64_t>(h_blocks_.size()) < need) {
    float* block = nullptr;
    if (config_.host_rows) {
      float* host = nullptr;
      check(cudaHostAlloc(reinterpret_cast<void**>(&host), bytes, cudaHostAllocMapped), "cudaHostAlloc(rows)");
      check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&block), host, 0), "cudaHostGetDevicePointer");
      host_allocs_.push_back(host);
    } else {
      block = table_alloc<float>(static_cast<int64_t>(bytes / sizeof(float)), stream, "row block");
    }
    h_blocks_.push_back(block);
  }
  if (need > max_blocks_) {
    int64_t cap = max_blocks_ > 0 ? max_blocks_ : 16;
    while (cap < need) cap *= 2;
    float** grown = table_alloc<float*>(cap, stream, "block table");
    // No launch on any stream may still read the old table.
    check(cudaDeviceSynchronize(), "block table growth");
    table_free(d_blocks_);
    d_blocks_ = grown;
    max_blocks_ = cap;
  }
  // Ordered before the launches that follow on `stream`; the host vector stays alive until the copy is done.
  check(cudaMemcpyAsync(d_blocks_, h_blocks_.data(), h_blocks_.size() * sizeof(float*), cudaMemcpyHostToDevice,
                        stream),
        "block table copy");
  check(cudaStreamSynchronize(stream), "block table copy");
}

void GpuHashTable::reserve_slots(int64_t keys, cudaStream_t stream) {
  int64_t slots = 1024;
  while (slots < 2 * keys) slots *= 2;  // load factor <= 0.5
  if (slots <= capacity_) return;
  int64_t* keys_new = table_alloc<int64_t>(slots, stream, "IdMap keys");
  uint32_t* state_new = table_alloc<uint32_t>(slots, stream, "IdMap state");
  int64_t* rows_new = table_alloc<int64_t>(slots, stream, "IdMap rows");
  check(cudaMemsetAsync(state_new, 0, slots * sizeof(uint32_t), stream), "cudaMemset(IdMap state)");
  if (capacity_ > 0) {
    IdMapView from{d_keys_, d_state_, d_slot_row_, static_cast<uint64_t>(capacity_ - 1)};
    IdMapView to{keys_new, state_new, rows_new, static_cast<uint64_t>(slots - 1)};
    rehash_kernel<<<grid(capacity_, 256), 256, 0, stream>>>(from, static_cast<uint64_t>(capacity_), to);
    check(cudaGetLastError(), "rehash launch");
  }
  // The old arrays may still be read by launches on other streams: wait for all of them.
  check(cudaDeviceSynchronize(), "IdMap growth");
  table_free(d_keys_);
  table_free(d_state_);
  table_free(d_slot_row_);
  d_keys_ = keys_new;
  d_state_ = state_new;
  d_slot_row_ = rows_new;
  capacity_ = slots;
}

void GpuHashTable::find(const int64_t* ids, int64_t n, int64_t* rows, cudaStream_t stream) const {
  if (n == 0) return;
  IdMapView m{d_keys_, d_state_, d_slot_row_, static_cast<uint64_t>(capacity_ - 1)};
  find_kernel<<<grid(n, 256), 256, 0, stream>>>(m, ids, n, rows);
  check(cudaGetLastError(), "find launch");
}

void GpuHashTable::find_or_insert(const int64_t* ids, int64_t n, int64_t* rows, cudaStream_t stream) {
  if (n == 0) return;
  // At most n new ids: make room for all of them before the launch.
  reserve_slots(rows_ + n, stream);
  reserve_rows(rows_ + n, stream);
  IdMapView m{d_keys_, d_state_, d_slot_row_, static_cast<uint64_t>(capacity_ - 1)};
  RowAddr addr{d_blocks_, config_.block_rows, stride()};
  insert_kernel<<<grid(n, 256), 256, 0, stream>>>(m, ids, n, rows, d_count_, addr, config_.dim, config_.state_dim,
                                                   config_.init);
  check(cudaGetLastError(), "find_or_insert launch");
  // The one synchronisation point: the new row count sizes the next launch's reservations.
  unsigned long long count[2] = {0, 0};
  check(cudaMemcpyAsync(count, d_count_, sizeof(count), cudaMemcpyDeviceToHost, stream), "row count copy");
  check(cudaStreamSynchronize(stream), "find_or_insert");
  rows_ = static_cast<int64_t>(count[0]);
  if (count[1] != 0) {
    check(cudaMemsetAsync(d_count_ + 1, 0, sizeof(unsigned long long), stream), "failure count reset");
    throw std::runtime_error("recis CUDA table: " + std::to_string(count[1]) +
                             " ids found no free slot (the table was changed by another call during this one); "
                             "their rows are -1");
  }
}

void GpuHashTable::export_ids(int64_t* ids, int64_t* rows, cudaStream_t stream) const {
  unsigned long long* next = device_alloc<unsigned long long>(1, stream, "export counter");
  check(cudaMemsetAsync(next, 0, sizeof(unsigned long long), stream), "export counter");
  IdMapView m{d_keys_, d_state_, d_slot_row_, static_cast<uint64_t>(capacity_ - 1)};
  export_kernel<<<grid(capacity_, 256), 256, 0, stream>>>(m, static_cast<uint64_t>(capacity_), ids, rows, next);
  check(cudaGetLastError(), "export launch");
  device_free(next, stream);
}

void GpuHashTable::gather_rows(const int64_t* rows, int64_t n, float* out, cudaStream_t stream) const {
  if (n == 0) return;
  RowAddr addr{d_blocks_, config_.block_rows, stride()};
  gather_kernel<<<grid(n * stride(), 256), 256, 0, stream>>>(addr, rows, n, out);
  check(cudaGetLastError(), "gather launch");
}

void GpuHashTable::scatter_rows(const int64_t* ids, const float* values, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  int64_t* rows = device_alloc<int64_t>(n, stream, "scatter rows");
  find_or_insert(ids, n, rows, stream);
  RowAddr addr{d_blocks_, config_.block_rows, stride()};
  scatter_kernel<<<grid(n * stride(), 256), 256, 0, stream>>>(addr, rows, values, n);
  check(cudaGetLastError(), "scatter launch");
  device_free(rows, stream);
}

// -- embedding kernels ---------------------------------------------------------------

void pooled_forward(const GpuHashTable& table, const int64_t* ids, const int64_t* rows, const int64_t* offsets,
                    const float* weights, int64_t num_bags, int mode, float* out, int64_t out_stride, int64_t col,
                    cudaStream_t stream) {
  if (num_bags == 0) return;
  const int64_t dim = table.dim();
  const bool vec = dim % 4 == 0 && table.stride() % 4 == 0 && col % 4 == 0 && out_stride % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  RowAddr a{table.blocks(), table.block_rows(), table.stride()};
  const unsigned blocks = grid(num_bags, kWarpsPerBlock);
  if (vec) {
    pooled_forward_kernel<4><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(
        a, ids, rows, offsets, weights, num_bags, mode, out, out_stride, col, dim, table.init());
  } else {
    pooled_forward_kernel<1><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(
        a, ids, rows, offsets, weights, num_bags, mode, out, out_stride, col, dim, table.init());
  }
  check(cudaGetLastError(), "pooled_forward launch");
}

void pooled_backward_update(GpuHashTable& table, const int64_t* rows, const int64_t* offsets, const float* weights,
                            int64_t num_values, int64_t num_bags, int mode, const float* grad, int64_t grad_stride,
                            int64_t col, const OptimParams& params, cudaStream_t stream) {
  if (num_values == 0) return;
  if (num_values > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("recis CUDA backward: at most 2**31 - 1 values per table and step, got " +
                                std::to_string(num_values));
  }
  const int64_t n = num_values;
  int64_t* bag_of = device_alloc<int64_t>(n, stream, "bag_of");
  int64_t* values_in = device_alloc<int64_t>(n, stream, "values");
  int64_t* sorted_rows = device_alloc<int64_t>(n, stream, "sorted rows");
  int64_t* sorted_values = device_alloc<int64_t>(n, stream, "sorted values");
  int64_t* unique_rows = device_alloc<int64_t>(n, stream, "unique rows");
  int64_t* run_counts = device_alloc<int64_t>(n, stream, "run counts");
  int64_t* run_starts = device_alloc<int64_t>(n, stream, "run starts");
  int* num_runs = device_alloc<int>(1, stream, "num runs");
  bag_of_value_kernel<<<grid(n, 256), 256, 0, stream>>>(offsets, num_bags, n, bag_of);
  iota_kernel<<<grid(n, 256), 256, 0, stream>>>(values_in, n);
  check(cudaGetLastError(), "backward setup launch");

  size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, rows, sorted_rows, values_in, sorted_values,
                                        static_cast<int>(n), 0, 64, stream), "sort size");
  check(cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, sorted_rows, unique_rows, run_counts, num_runs,
                                           static_cast<int>(n), stream), "run-length size");
  check(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, run_counts, run_starts, static_cast<int>(n), stream),
        "scan size");
  const size_t temp_bytes = std::max(sort_bytes, std::max(rle_bytes, scan_bytes));
  void* temp = device_alloc<char>(static_cast<int64_t>(temp_bytes), stream, "cub scratch");
  check(cub::DeviceRadixSort::SortPairs(temp, sort_bytes, rows, sorted_rows, values_in, sorted_values,
                                        static_cast<int>(n), 0, 64, stream), "sort by row");
  // Counts past num_runs are never written by the encode: zero them first, so that the scan
  // reads defined values (its results for those runs are ignored anyway).
  check(cudaMemsetAsync(run_counts, 0, static_cast<size_t>(n) * sizeof(int64_t), stream), "run counts");
  check(cub::DeviceRunLengthEncode::Encode(temp, rle_bytes, sorted_rows, unique_rows, run_counts, num_runs,
                                           static_cast<int>(n), stream), "runs of rows");
  check(cub::DeviceScan::ExclusiveSum(temp, scan_bytes, run_counts, run_starts, static_cast<int>(n), stream),
        "run starts");
  // Hot rows: runs longer than kChunk are summed in chunks first. Their number is
  // at most 2n / kChunk (each such run has more than kChunk values), so the
  // partial buffer is bounded without reading anything back (no sync).
  int64_t* chunks = device_alloc<int64_t>(n, stream, "chunks per run");
  int64_t* chunk_end = device_alloc<int64_t>(n, stream, "chunk ends");
  const int64_t max_chunks = 2 * n / kChunk + 1;
  float* partial = device_alloc<float>(max_chunks * table.dim(), stream, "partial gradients");
  chunk_count_kernel<<<grid(n, 256), 256, 0, stream>>>(run_counts, num_runs, n, chunks);
  check(cudaGetLastError(), "chunk count launch");
  size_t chunk_scan_bytes = 0;
  check(cub::DeviceScan::InclusiveSum(nullptr, chunk_scan_bytes, chunks, chunk_end, static_cast<int>(n), stream),
        "chunk scan size");
  void* chunk_temp = device_alloc<char>(static_cast<int64_t>(chunk_scan_bytes), stream, "chunk scan scratch");
  check(cub::DeviceScan::InclusiveSum(chunk_temp, chunk_scan_bytes, chunks, chunk_end, static_cast<int>(n), stream),
        "chunk scan");
  partial_kernel<<<grid(max_chunks, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
      chunk_end, chunks, run_starts, run_counts, num_runs, n, max_chunks, sorted_values, bag_of, offsets, weights,
      mode, grad, grad_stride, col, table.dim(), partial);
  check(cudaGetLastError(), "partial sums launch");
  // n is an upper bound on the runs: the grid covers it and the warps past *num_runs exit (no sync).
  RowAddr a{table.blocks(), table.block_rows(), table.stride()};
  const float adam_step_size = params.type == OptimType::kAdam ? params.adam_step_size() : 0.0f;
  update_kernel<<<grid(n, kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
      a, unique_rows, run_counts, run_starts, num_runs, sorted_values, bag_of, offsets, weights, mode, grad,
      grad_stride, col, table.dim(), params, adam_step_size, chunk_end, chunks, partial);
  check(cudaGetLastError(), "update launch");
  for (void* p : {static_cast<void*>(chunks), static_cast<void*>(chunk_end), static_cast<void*>(partial), chunk_temp}) {
    device_free(p, stream);
  }
  for (void* p : {static_cast<void*>(bag_of), static_cast<void*>(values_in), static_cast<void*>(sorted_rows),
                  static_cast<void*>(sorted_values), static_cast<void*>(unique_rows), static_cast<void*>(run_counts),
                  static_cast<void*>(run_starts), static_cast<void*>(num_runs), temp}) {
    device_free(p, stream);
  }
}

void owner_of(const int64_t* ids, int64_t n, int64_t world_size, int64_t* owner, cudaStream_t stream) {
  if (n == 0) return;
  owner_kernel<<<grid(n, 256), 256, 0, stream>>>(ids, n, world_size, owner);
  check(cudaGetLastError(), "owner_of launch");
}

void bucketize_by_owner(const int64_t* ids, int64_t n, int64_t world_size, int64_t* perm, int64_t* counts,
                        cudaStream_t stream) {
  check(cudaMemsetAsync(counts, 0, static_cast<size_t>(world_size) * sizeof(int64_t), stream), "counts");
  if (n == 0) return;
  if (n > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("recis CUDA bucketize_by_owner: at most 2**31 - 1 ids per call, got " +
                                std::to_string(n));
  }
  int64_t* owner = device_alloc<int64_t>(n, stream, "owners");
  int64_t* sorted_owner = device_alloc<int64_t>(n, stream, "sorted owners");
  int64_t* positions = device_alloc<int64_t>(n, stream, "positions");
  owner_kernel<<<grid(n, 256), 256, 0, stream>>>(ids, n, world_size, owner);
  iota_kernel<<<grid(n, 256), 256, 0, stream>>>(positions, n);
  count_kernel<<<grid(n, 256), 256, 0, stream>>>(owner, n, reinterpret_cast<unsigned long long*>(counts));
  check(cudaGetLastError(), "bucketize launch");
  int end_bit = 1;
  while ((int64_t{1} << end_bit) < world_size) ++end_bit;
  size_t bytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, owner, sorted_owner, positions, perm, static_cast<int>(n), 0,
                                        end_bit, stream), "owner sort size");
  void* temp = device_alloc<char>(static_cast<int64_t>(bytes), stream, "owner sort scratch");
  // LSD radix sort is stable: within a rank, values keep their order.
  check(cub::DeviceRadixSort::SortPairs(temp, bytes, owner, sorted_owner, positions, perm, static_cast<int>(n), 0,
                                        end_bit, stream), "owner sort");
  for (void* p : {static_cast<void*>(owner), static_cast<void*>(sorted_owner), static_cast<void*>(positions), temp}) {
    device_free(p, stream);
  }
}

}  // namespace cuda
}  // namespace recis
