// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Torch ops over the GPU hash table (csrc/cuda/gpu_table.h). Built only with
// RECIS_CUDA=1. Tables are held in a registry and named by an int handle, as
// the CPU tables are (csrc/ops/table_registry.h). Every op runs on the
// current CUDA stream of the tensors' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "gpu_table.h"
#include "../ops/optim_params.h"

namespace recis {
namespace {

using cuda::GpuHashTable;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The tables allocate through torch's caching allocator (gpu_table.h): on the
// current device, ordered on the given stream.
void* torch_allocate(size_t bytes, cudaStream_t stream) {
  return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(bytes, stream);
}
void torch_release(void* ptr) { c10::cuda::CUDACachingAllocator::raw_delete(ptr); }
const cuda::DeviceAllocator kTorchAllocator{&torch_allocate, &torch_release};
[[maybe_unused]] const bool kAllocatorInstalled = (cuda::set_device_allocator(&kTorchAllocator), true);

std::mutex g_mutex;
std::vector<std::shared_ptr<GpuHashTable>> g_tables;
// One lock per table (as the CPU tables have): torch.ops release the GIL, and two Python threads
// running ops on one table at once raced on its growth (overrunning the reserved blocks, or reading
// IdMap arrays the other had freed). Every op that reads or changes a table's rows or IdMap holds it
// while it enqueues its work.
std::vector<std::shared_ptr<std::mutex>> g_table_locks;

// CUDA handles start far above the CPU registry's (which counts from 1), so a
// CUDA handle given to a CPU op, or the reverse, is an unknown handle (an
// error) and never another table's (a checkpoint once wrote a CPU table's rows
// for a CUDA table with the same number).
constexpr int64_t kHandleBase = int64_t{1} << 40;

// A reference to the table that stays valid while the caller holds it, even if
// the table is released concurrently.
std::shared_ptr<GpuHashTable> table_ptr(int64_t handle, const char* op) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t i = handle - kHandleBase;
  TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(g_tables.size()) && g_tables[i] != nullptr, op,
              ": no CUDA table with handle ", handle, " (released, never created, or a CPU table's)");
  return g_tables[i];
}

// A table held under its lock for the caller's scope.
struct LockedTable {
  std::shared_ptr<GpuHashTable> table;
  std::shared_ptr<std::mutex> mutex;
  std::unique_lock<std::mutex> lock;
  GpuHashTable* operator->() const { return table.get(); }
  GpuHashTable& operator*() const { return *table; }
};

LockedTable locked_table(int64_t handle, const char* op) {
  std::shared_ptr<std::mutex> mutex;
  std::shared_ptr<GpuHashTable> table;
  {
    std::lock_guard<std::mutex> registry(g_mutex);
    const int64_t i = handle - kHandleBase;
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(g_tables.size()) && g_tables[i] != nullptr, op,
                ": no CUDA table with handle ", handle, " (released, never created, or a CPU table's)");
    table = g_tables[i];
    mutex = g_table_locks[i];
  }
  std::unique_lock<std::mutex> lock(*mutex);  // (not under the registry's lock: other tables go on)
  return LockedTable{std::move(table), std::move(mutex), std::move(lock)};
}

void check_cuda_1d(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_on_table_device(const at::Tensor& t, const GpuHashTable& table, const char* op, const char* name) {
  TORCH_CHECK(t.device().index() == table.device(), op, ": ", name, " is on ", t.device(),
              " but the table lives on cuda:", table.device());
}

int64_t gpu_table_create(int64_t dim, int64_t state_dim, int64_t capacity, int64_t block_rows, int64_t init_kind,
                         double a, double b, int64_t seed, bool host_rows, int64_t device) {
  cuda::GpuTableConfig config;
  config.dim = dim;
  config.state_dim = state_dim;
  config.initial_capacity = capacity;
  config.block_rows = block_rows;
  config.init.kind = static_cast<hashtable::InitKind>(init_kind);
  config.init.a = static_cast<float>(a);
  config.init.b = static_cast<float>(b);
  config.init.seed = static_cast<uint64_t>(seed);
  config.host_rows = host_rows;
  config.device = static_cast<int>(device);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  auto table = std::make_shared<GpuHashTable>(config);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_tables.push_back(std::move(table));
  g_table_locks.push_back(std::make_shared<std::mutex>());
  return kHandleBase + static_cast<int64_t>(g_tables.size()) - 1;
}

void gpu_table_release(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t i = handle - kHandleBase;
  if (i >= 0 && i < static_cast<int64_t>(g_tables.size())) g_tables[i].reset();
}

int64_t gpu_table_size(int64_t handle) { return locked_table(handle, "recis::gpu_table_size")->size(); }

// The rows of ids (find), inserting absent ids first (find_or_insert) when `insert`.
at::Tensor lookup_rows(int64_t handle, const at::Tensor& ids, bool insert, const char* op) {
  check_cuda_1d(ids, op, "ids", at::kLong);
  const auto table = locked_table(handle, op);
  check_on_table_device(ids, *table, op, "ids");
  c10::cuda::CUDAGuard guard(ids.device());
  auto ids_c = ids.contiguous();
  auto rows = at::empty_like(ids_c);
  if (insert) {
    table->find_or_insert(ids_c.data_ptr<int64_t>(), ids_c.numel(), rows.data_ptr<int64_t>(), current_stream());
  } else {
    table->find(ids_c.data_ptr<int64_t>(), ids_c.numel(), rows.data_ptr<int64_t>(), current_stream());
  }
  return rows;
}

// One table's pooled forward and fused backward, the bodies of the shared ops
// below (which run them per table of a call).
void gpu_pooled_forward(int64_t handle, const at::Tensor& ids, const at::Tensor& rows, const at::Tensor& offsets,
                        const c10::optional<at::Tensor>& weights, int64_t mode, const at::Tensor& out, int64_t col) {
  const char* op = "recis::gpu_pooled_forward";
  check_cuda_1d(ids, op, "ids", at::kLong);
  check_cuda_1d(rows, op, "rows", at::kLong);
  check_cuda_1d(offsets, op, "offsets", at::kLong);
  TORCH_CHECK(ids.numel() == rows.numel(), op, ": ids and rows differ in length");
  TORCH_CHECK(offsets.numel() >= 1, op, ": offsets must hold num_bags + 1 entries");
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous(), op,
              ": out must be a contiguous 2-D float32 CUDA tensor");
  TORCH_CHECK(mode == cuda::kPoolSum || mode == cuda::kPoolMean, op, ": unknown pooling mode ", mode);
  const auto table_holder = locked_table(handle, op);
  auto& table = *table_holder;
  check_on_table_device(ids, table, op, "ids");
  check_on_table_device(out, table, op, "out");
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK(out.size(0) == num_bags && col >= 0 && col + table.dim() <= out.size(1), op, ": out has shape ",
              out.sizes(), ", which cannot hold ", num_bags, " bags at columns [", col, ", ", col + table.dim(), ")");
  const float* w = nullptr;
  at::Tensor weights_c;
  if (weights.has_value()) {
    check_cuda_1d(*weights, op, "weights", at::kFloat);
    TORCH_CHECK(weights->numel() == ids.numel(), op, ": ", weights->numel(), " weights for ", ids.numel(), " ids");
    weights_c = weights->contiguous();
    w = weights_c.data_ptr<float>();
  }
  c10::cuda::CUDAGuard guard(ids.device());
  auto ids_c = ids.contiguous();
  auto rows_c = rows.contiguous();
  auto offsets_c = offsets.contiguous();
  cuda::pooled_forward(table, ids_c.data_ptr<int64_t>(), rows_c.data_ptr<int64_t>(), offsets_c.data_ptr<int64_t>(),
                       w, num_bags, static_cast<int>(mode), out.data_ptr<float>(), out.size(1), col,
                       current_stream());
}

void gpu_pooled_backward_update(int64_t handle, const at::Tensor& rows, const at::Tensor& offsets,
                                const c10::optional<at::Tensor>& weights, int64_t mode, const at::Tensor& grad,
                                int64_t col, int64_t optimizer, at::ArrayRef<double> hyperparameters,
                                int64_t wd_mode, int64_t step) {
  const char* op = "recis::gpu_pooled_backward_update";
  check_cuda_1d(rows, op, "rows", at::kLong);
  check_cuda_1d(offsets, op, "offsets", at::kLong);
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.scalar_type() == at::kFloat, op,
              ": grad must be a 2-D float32 CUDA tensor");
  const hashtable::OptimParams p = make_optim_params(op, optimizer, hyperparameters, wd_mode, step);
  TORCH_CHECK(mode == cuda::kPoolSum || mode == cuda::kPoolMean, op, ": unknown pooling mode ", mode);
  const auto table_holder = locked_table(handle, op);
  auto& table = *table_holder;
  check_on_table_device(rows, table, op, "rows");
  check_on_table_device(grad, table, op, "grad");
  const int64_t need = hashtable::optimizer_state_dim(static_cast<hashtable::OptimType>(optimizer), table.dim());
  TORCH_CHECK(table.state_dim() == need, op, ": the table holds ", table.state_dim(),
              " optimizer-state floats per row, but optimizer code ", optimizer, " needs ", need,
              " (create the table with the optimizer it is trained with)");
  TORCH_CHECK(offsets.numel() >= 1, op, ": offsets must hold num_bags + 1 entries");
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK(grad.size(0) == num_bags && col >= 0 && col + table.dim() <= grad.size(1), op, ": grad has shape ",
              grad.sizes(), ", which cannot hold ", num_bags, " bags at columns [", col, ", ", col + table.dim(), ")");
  const float* w = nullptr;
  at::Tensor weights_c;
  if (weights.has_value()) {
    check_cuda_1d(*weights, op, "weights", at::kFloat);
    TORCH_CHECK(weights->numel() == rows.numel(), op, ": ", weights->numel(), " weights for ", rows.numel(), " rows");
    weights_c = weights->contiguous();
    w = weights_c.data_ptr<float>();
  }
  c10::cuda::CUDAGuard guard(rows.device());
  auto rows_c = rows.contiguous();
  auto offsets_c = offsets.contiguous();
  auto grad_c = grad.contiguous();
  cuda::pooled_backward_update(table, rows_c.data_ptr<int64_t>(), offsets_c.data_ptr<int64_t>(), w, rows_c.numel(),
                               num_bags, static_cast<int>(mode), grad_c.data_ptr<float>(), grad_c.size(1), col, p,
                               current_stream());
}

// Every (id, row) of the table, ordered by id, on its device (16 bytes a row:
// an export then gathers the rows chunk by chunk, never a second copy of the
// whole table on the GPU).
std::tuple<at::Tensor, at::Tensor> gpu_table_export_ids(int64_t handle, int64_t device) {
  const char* op = "recis::gpu_table_export_ids";
  const auto table_holder = locked_table(handle, op);
  auto& table = *table_holder;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto opts = at::TensorOptions().device(at::kCUDA, device);
  auto ids = at::empty({table.size()}, opts.dtype(at::kLong));
  auto rows = at::empty({table.size()}, opts.dtype(at::kLong));
  table.export_ids(ids.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), current_stream());
  auto [sorted, order] = ids.sort();
  return {sorted, rows.index_select(0, order)};
}

// The stored rows (weights then optimizer state, (n, stride) float32) at `rows`.
at::Tensor gpu_table_gather(int64_t handle, const at::Tensor& rows) {
  const char* op = "recis::gpu_table_gather";
  check_cuda_1d(rows, op, "rows", at::kLong);
  const auto table_holder = locked_table(handle, op);
  auto& table = *table_holder;
  check_on_table_device(rows, table, op, "rows");
  c10::cuda::CUDAGuard guard(rows.device());
  auto rows_c = rows.contiguous();
  TORCH_CHECK(rows_c.numel() == 0 || (rows_c.min().item<int64_t>() >= 0 &&
                                       rows_c.max().item<int64_t>() < table.size()),
              op, ": rows must be in [0, ", table.size(), ")");
  auto data = at::empty({rows_c.numel(), table.stride()}, rows.options().dtype(at::kFloat));
  table.gather_rows(rows_c.data_ptr<int64_t>(), rows_c.numel(), data.data_ptr<float>(), current_stream());
  return data;
}

void gpu_table_import(int64_t handle, const at::Tensor& ids, const at::Tensor& data) {
  const char* op = "recis::gpu_table_import";
  check_cuda_1d(ids, op, "ids", at::kLong);
  const auto table_holder = locked_table(handle, op);
  auto& table = *table_holder;
  TORCH_CHECK(data.is_cuda() && data.dim() == 2 && data.scalar_type() == at::kFloat &&
                  data.size(0) == ids.numel() && data.size(1) == table.stride(),
              op, ": data must be float32 (", ids.numel(), ", ", table.stride(), ") on the GPU, got ", data.sizes());
  c10::cuda::CUDAGuard guard(ids.device());
  auto ids_c = ids.contiguous();
  auto data_c = data.contiguous();
  table.scatter_rows(ids_c.data_ptr<int64_t>(), data_c.data_ptr<float>(), ids_c.numel(),
                     current_stream());
}

at::Tensor owner_of_cuda(const at::Tensor& ids, int64_t world_size) {
  const char* op = "recis::owner_of";
  check_cuda_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  c10::cuda::CUDAGuard guard(ids.device());
  auto ids_c = ids.contiguous();
  auto out = at::empty_like(ids_c);
  cuda::owner_of(ids_c.data_ptr<int64_t>(), ids_c.numel(), world_size, out.data_ptr<int64_t>(),
                 current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> gpu_bucketize_by_owner(const at::Tensor& ids, int64_t world_size) {
  const char* op = "recis::gpu_bucketize_by_owner";
  check_cuda_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  c10::cuda::CUDAGuard guard(ids.device());
  auto ids_c = ids.contiguous();
  auto perm = at::empty_like(ids_c);
  auto counts = at::empty({world_size}, ids_c.options());
  cuda::bucketize_by_owner(ids_c.data_ptr<int64_t>(), ids_c.numel(), world_size, perm.data_ptr<int64_t>(),
                           counts.data_ptr<int64_t>(), current_stream());
  return {perm, counts};
}

// -- The shared ops (csrc/ops/schema.cpp) under the CUDA dispatch key ------------------
//
// The same ops as the CPU's, on CUDA tensors and CUDA tables. Host-device
// synchronisation: the segment and feature boundaries (F + 1 values, read with
// the offsets' and the given rows' range checks) are read to the host once per call; find_or_insert reads the row counter back once per
// table (csrc/cuda/gpu_table.h). Nothing else waits for the device.

// The first index at which `bad` holds, or -1, as a 1-element int64 device tensor (no host sync).
at::Tensor first_true(const at::Tensor& bad) {
  const auto none = at::full({1}, -1, bad.options().dtype(at::kLong));
  if (bad.numel() == 0) return none;
  return at::where(bad.any(), bad.to(at::kInt).argmax().to(at::kLong), none);
}

std::vector<int64_t> host_values(const at::Tensor& t) {
  const auto host = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
}

at::Tensor segmented_lookup(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& segment_offsets,
                            bool insert, const char* op) {
  check_cuda_1d(ids, op, "ids", at::kLong);
  const auto seg = host_values(segment_offsets);
  TORCH_CHECK(seg.size() == tables.size() + 1 && seg.front() == 0 && seg.back() == ids.numel(), op,
              ": segment_offsets must hold len(tables) + 1 offsets from 0 to ", ids.numel());
  c10::cuda::CUDAGuard guard(ids.device());
  const auto ids_c = ids.contiguous();
  auto rows = at::full_like(ids_c, -1);
  for (size_t s = 0; s < tables.size(); ++s) {
    const int64_t b = seg[s], n = seg[s + 1] - seg[s];
    TORCH_CHECK(n >= 0, op, ": segment_offsets decrease at segment ", s);
    if (tables[s] < 0 || n == 0) continue;
    rows.narrow(0, b, n).copy_(lookup_rows(tables[s], ids_c.narrow(0, b, n), insert, op));
  }
  return rows;
}

at::Tensor find_cuda(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& segment_offsets) {
  return segmented_lookup(tables, ids, segment_offsets, false, "recis::find");
}

at::Tensor find_or_insert_cuda(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& segment_offsets,
                               int64_t clock) {
  (void)clock;  // CUDA tables keep no access metadata (no TTL or cap): nothing to mark
  return segmented_lookup(tables, ids, segment_offsets, true, "recis::find_or_insert");
}

struct CudaLayout {
  int64_t num_features = 0, batch = 0;
  std::vector<int64_t> bounds;  // value offset of each feature's first bag, and the end
};

// The layout of a call's bags, checked as the CPU's check_bag_offsets checks it. One host copy: the
// F + 1 feature boundaries, the first bag whose offsets decrease and (with `rows`, when the caller
// gives rows rather than the op looking them up) the first row past its feature's table (a
// negative row is an absent id, as on the CPU), the last two computed on the device. With offsets that start at 0, never
// decrease and end at the number of values, every bag lies inside the values, so no kernel reads
// outside ids, rows or weights.
CudaLayout cuda_layout(const char* op, const at::Tensor& ids, const at::Tensor& offsets, at::IntArrayRef feature_table,
                       at::IntArrayRef feature_mode, at::IntArrayRef feature_col, at::IntArrayRef tables,
                       int64_t out_dim, const at::Tensor* rows = nullptr) {
  check_cuda_1d(offsets, op, "offsets", at::kLong);
  CudaLayout l;
  l.num_features = static_cast<int64_t>(feature_table.size());
  TORCH_CHECK(l.num_features > 0 && feature_mode.size() == feature_table.size() &&
                  feature_col.size() == feature_table.size(),
              op, ": feature_table, feature_mode and feature_col must be non-empty and of one length");
  const int64_t n = offsets.numel();
  TORCH_CHECK(n >= 1 && (n - 1) % l.num_features == 0, op, ": offsets has ", n,
              " entries, which is not num_features * batch_size + 1");
  TORCH_CHECK(ids.device() == offsets.device(), op, ": offsets are on ", offsets.device(), ", the ids on ",
              ids.device());
  l.batch = (n - 1) / l.num_features;
  for (int64_t f = 0; f < l.num_features; ++f) {
    const int64_t t = feature_table[f];
    TORCH_CHECK(t >= -1 && t < static_cast<int64_t>(tables.size()), op, ": feature index ", f, " names table ", t);
  }
  auto idx = at::arange(0, l.num_features * l.batch + 1, l.batch > 0 ? l.batch : 1, offsets.options());
  if (l.batch == 0) idx = at::zeros({l.num_features + 1}, offsets.options());
  std::vector<at::Tensor> parts{offsets.index_select(0, idx)};
  parts.push_back(first_true(offsets.narrow(0, 1, n - 1) < offsets.narrow(0, 0, n - 1)));
  if (rows != nullptr) {
    TORCH_CHECK(rows->numel() == ids.numel(), op, ": ", rows->numel(), " rows for ", ids.numel(), " ids");
    std::vector<int64_t> limit(l.num_features, std::numeric_limits<int64_t>::max());
    for (int64_t f = 0; f < l.num_features; ++f) {
      if (feature_table[f] >= 0) limit[f] = table_ptr(tables[feature_table[f]], op)->size();
    }
    if (l.batch > 0 && rows->numel() > 0) {
      // Each value's feature, from its bag (found in offsets, which are checked to be sorted first).
      const auto pos = at::arange(rows->numel(), offsets.options());
      const auto bag = (at::searchsorted(offsets, pos, /*out_int32=*/false, /*right=*/true) - 1)
                           .clamp_(0, l.num_features * l.batch - 1);
      const auto limits = at::tensor(limit, at::kLong).to(offsets.device(), /*non_blocking=*/false);
      const auto lim = limits.index_select(0, at::div(bag, l.batch, "floor"));
      parts.push_back(first_true(*rows >= lim));
    } else {
      parts.push_back(at::full({1}, -1, offsets.options()));
    }
  }
  const auto host = at::cat(parts).cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  l.bounds.assign(h, h + l.num_features + 1);
  const int64_t bad_bag = h[l.num_features + 1];
  TORCH_CHECK(l.bounds.front() == 0, op, ": offsets[0] must be 0, got ", l.bounds.front());
  TORCH_CHECK(bad_bag < 0, op, ": offsets decrease inside feature index ", l.batch > 0 ? bad_bag / l.batch : 0,
              " (negative length at bag ", bad_bag, ")");
  TORCH_CHECK(l.bounds.back() == ids.numel(), op, ": offsets end at ", l.bounds.back(), " but there are ",
              ids.numel(), " values (lengths do not sum to the number of values)");
  if (rows != nullptr && h[l.num_features + 2] >= 0) {
    const int64_t i = h[l.num_features + 2];
    const int64_t f = l.batch > 0 ? (std::upper_bound(l.bounds.begin(), l.bounds.end(), i) - l.bounds.begin()) - 1 : 0;
    TORCH_CHECK(false, op, ": rows[", i, "] = ", (*rows)[i].item<int64_t>(), " is not a row of table ",
                feature_table[f], " (feature index ", f, ")");
  }
  for (int64_t f = 0; f < l.num_features; ++f) {
    const int64_t t = feature_table[f];
    if (t < 0) continue;
    TORCH_CHECK(feature_mode[f] == cuda::kPoolSum || feature_mode[f] == cuda::kPoolMean, op, ": feature index ", f,
                " has pooling mode ", feature_mode[f]);
    TORCH_CHECK(feature_col[f] >= 0 && feature_col[f] + table_ptr(tables[t], op)->dim() <= out_dim, op,
                ": feature index ", f, " writes columns outside the output's ", out_dim);
  }
  return l;
}

// The bags of feature f, rebased to its own values (num_bags + 1 offsets).
at::Tensor feature_offsets(const at::Tensor& offsets, const CudaLayout& l, int64_t f) {
  return offsets.narrow(0, f * l.batch, l.batch + 1) - l.bounds[f];
}

void pool_features(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& rows, const at::Tensor& offsets,
                   const c10::optional<at::Tensor>& weights, const CudaLayout& l, at::IntArrayRef feature_table,
                   at::IntArrayRef feature_mode, at::IntArrayRef feature_col, const at::Tensor& out) {
  for (int64_t f = 0; f < l.num_features; ++f) {
    const int64_t t = feature_table[f];
    if (t < 0 || l.batch == 0) continue;
    const int64_t b = l.bounds[f], n = l.bounds[f + 1] - b;
    c10::optional<at::Tensor> w;
    if (weights.has_value()) w = weights->narrow(0, b, n);
    gpu_pooled_forward(tables[t], ids.narrow(0, b, n), rows.narrow(0, b, n), feature_offsets(offsets, l, f), w,
                       feature_mode[f], out, feature_col[f]);
  }
}

at::Tensor pooled_forward_cuda(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& rows,
                               const at::Tensor& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                               at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
                               at::IntArrayRef feature_col, int64_t out_dim) {
  const char* op = "recis::pooled_forward";
  check_cuda_1d(ids, op, "ids", at::kLong);
  c10::cuda::CUDAGuard guard(ids.device());
  check_cuda_1d(rows, op, "rows", at::kLong);
  const CudaLayout l =
      cuda_layout(op, ids, offsets, feature_table, feature_mode, feature_col, tables, out_dim, &rows);
  auto out = at::zeros({l.batch, out_dim}, ids.options().dtype(at::kFloat));
  pool_features(tables, ids.contiguous(), rows.contiguous(), offsets.contiguous(), per_sample_weights, l,
                feature_table, feature_mode, feature_col, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> lookup_pooled_forward_cuda(
    at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& per_sample_weights, at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
    at::IntArrayRef feature_col, int64_t out_dim, bool insert, int64_t clock) {
  (void)clock;
  const char* op = "recis::lookup_pooled_forward";
  check_cuda_1d(ids, op, "ids", at::kLong);
  c10::cuda::CUDAGuard guard(ids.device());
  const CudaLayout l = cuda_layout(op, ids, offsets, feature_table, feature_mode, feature_col, tables, out_dim);
  const auto ids_c = ids.contiguous();
  auto rows = at::full_like(ids_c, -1);
  // One lookup per table, over all its features' values (one row-counter read per table).
  for (int64_t t = 0; t < static_cast<int64_t>(tables.size()); ++t) {
    std::vector<at::Tensor> parts;
    for (int64_t f = 0; f < l.num_features; ++f) {
      if (feature_table[f] == t) parts.push_back(ids_c.narrow(0, l.bounds[f], l.bounds[f + 1] - l.bounds[f]));
    }
    if (parts.empty()) continue;
    const auto found = lookup_rows(tables[t], at::cat(parts), insert, op);
    int64_t at_ = 0;
    for (int64_t f = 0; f < l.num_features; ++f) {
      if (feature_table[f] != t) continue;
      const int64_t n = l.bounds[f + 1] - l.bounds[f];
      rows.narrow(0, l.bounds[f], n).copy_(found.narrow(0, at_, n));
      at_ += n;
    }
  }
  auto out = at::zeros({l.batch, out_dim}, ids.options().dtype(at::kFloat));
  pool_features(tables, ids_c, rows, offsets.contiguous(), per_sample_weights, l, feature_table, feature_mode,
                feature_col, out);
  return {out, rows};
}

void pooled_backward_update_cuda(at::IntArrayRef tables, const at::Tensor& grad_output, const at::Tensor& rows,
                                 const at::Tensor& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                                 at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
                                 at::IntArrayRef feature_col, int64_t optimizer, at::ArrayRef<double> hyperparameters,
                                 int64_t weight_decay_mode, at::IntArrayRef steps) {
  const char* op = "recis::pooled_backward_update";
  check_cuda_1d(rows, op, "rows", at::kLong);
  TORCH_CHECK(steps.size() == tables.size(), op, ": steps must hold one update count per table");
  c10::cuda::CUDAGuard guard(rows.device());
  const CudaLayout l =
      cuda_layout(op, rows, offsets, feature_table, feature_mode, feature_col, tables, grad_output.size(1), &rows);
  const auto grad = grad_output.contiguous();
  // Per table, its features' bags as one list (their gradient columns stacked, offsets rebased), so
  // a row read by several features gets one optimizer update.
  for (int64_t t = 0; t < static_cast<int64_t>(tables.size()); ++t) {
    std::vector<int64_t> feats;
    for (int64_t f = 0; f < l.num_features; ++f) {
      if (feature_table[f] == t) feats.push_back(f);
    }
    if (feats.empty() || l.batch == 0) continue;
    const int64_t dim = table_ptr(tables[t], op)->dim();
    std::vector<at::Tensor> r, w, o, g;
    int64_t base = 0;
    for (size_t j = 0; j < feats.size(); ++j) {
      const int64_t f = feats[j], b = l.bounds[f], n = l.bounds[f + 1] - b;
      r.push_back(rows.narrow(0, b, n));
      if (per_sample_weights.has_value()) w.push_back(per_sample_weights->narrow(0, b, n));
      auto fo = feature_offsets(offsets, l, f) + base;
      o.push_back(j + 1 == feats.size() ? fo : fo.narrow(0, 0, l.batch));
      g.push_back(grad.narrow(1, feature_col[f], dim));
      base += n;
    }
    c10::optional<at::Tensor> tw;
    if (!w.empty()) tw = at::cat(w);
    gpu_pooled_backward_update(tables[t], at::cat(r), at::cat(o), tw, feature_mode[feats[0]], at::cat(g).contiguous(),
                               0, optimizer, hyperparameters, weight_decay_mode, steps[t]);
  }
}

at::Tensor pooled_weight_grad_cuda(at::IntArrayRef, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef) {
  TORCH_CHECK(false, "recis::pooled_weight_grad: per-sample weight gradients are not implemented on CUDA tables yet "
                     "(use weights that do not require grad, or CPU tables)");
  return at::Tensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recis, m) {
  m.def("gpu_table_create(int dim, int state_dim, int capacity, int block_rows, int init_kind, float a, float b, "
        "int seed, bool host_rows, int device) -> int",
        &gpu_table_create);
  m.def("gpu_table_release(int handle) -> ()", &gpu_table_release);
  m.def("gpu_table_size(int handle) -> int", &gpu_table_size);
  m.def("gpu_table_export_ids(int handle, int device) -> (Tensor, Tensor)", &gpu_table_export_ids);
  m.def("gpu_table_gather(int handle, Tensor rows) -> Tensor", &gpu_table_gather);
  m.def("gpu_table_import(int handle, Tensor ids, Tensor data) -> ()");
  m.def("gpu_bucketize_by_owner(Tensor ids, int world_size) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(recis, CUDA, m) {
  m.impl("find", &find_cuda);
  m.impl("find_or_insert", &find_or_insert_cuda);
  m.impl("pooled_forward", &pooled_forward_cuda);
  m.impl("lookup_pooled_forward", &lookup_pooled_forward_cuda);
  m.impl("pooled_backward_update", &pooled_backward_update_cuda);
  m.impl("pooled_weight_grad", &pooled_weight_grad_cuda);
  m.impl("gpu_table_import", &gpu_table_import);
  m.impl("gpu_bucketize_by_owner", &gpu_bucketize_by_owner);
  m.impl("owner_of", &owner_of_cuda);
}

}  // namespace recis
