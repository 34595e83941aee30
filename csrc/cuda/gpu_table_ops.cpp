// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Torch ops over the GPU hash table (csrc/cuda/gpu_table.h). Built only with
// RECIS_CUDA=1. Tables are held in a registry and named by an int handle, as
// the CPU tables are (csrc/ops/table_registry.h). Every op runs on the
// current CUDA stream of the tensors' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <vector>

#include "gpu_table.h"

namespace recis {
namespace {

using cuda::GpuHashTable;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::mutex g_mutex;
std::vector<std::shared_ptr<GpuHashTable>> g_tables;

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
  return kHandleBase + static_cast<int64_t>(g_tables.size()) - 1;
}

void gpu_table_release(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t i = handle - kHandleBase;
  if (i >= 0 && i < static_cast<int64_t>(g_tables.size())) g_tables[i].reset();
}

int64_t gpu_table_size(int64_t handle) { return table_ptr(handle, "recis::gpu_table_size")->size(); }

// The rows of ids (find), inserting absent ids first (find_or_insert) when `insert`.
at::Tensor lookup_rows(int64_t handle, const at::Tensor& ids, bool insert, const char* op) {
  check_cuda_1d(ids, op, "ids", at::kLong);
  const auto table = table_ptr(handle, op);
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

at::Tensor gpu_find(int64_t handle, const at::Tensor& ids) {
  return lookup_rows(handle, ids, false, "recis::gpu_find");
}

at::Tensor gpu_find_or_insert(int64_t handle, const at::Tensor& ids) {
  return lookup_rows(handle, ids, true, "recis::gpu_find_or_insert");
}

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
  const auto table_holder = table_ptr(handle, op);
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
                                int64_t col, int64_t optimizer, double lr, double eps, double beta1, double beta2,
                                double weight_decay, int64_t wd_mode, int64_t step) {
  const char* op = "recis::gpu_pooled_backward_update";
  check_cuda_1d(rows, op, "rows", at::kLong);
  check_cuda_1d(offsets, op, "offsets", at::kLong);
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.scalar_type() == at::kFloat, op,
              ": grad must be a 2-D float32 CUDA tensor");
  TORCH_CHECK(hashtable::is_optimizer_code(optimizer), op, ": unknown optimizer code ", optimizer);
  TORCH_CHECK(wd_mode >= 0 && wd_mode <= 2, op, ": unknown weight decay mode ", wd_mode);
  TORCH_CHECK(mode == cuda::kPoolSum || mode == cuda::kPoolMean, op, ": unknown pooling mode ", mode);
  TORCH_CHECK(optimizer != static_cast<int64_t>(hashtable::OptimType::kAdam) || step >= 1, op,
              ": Adam's step must be >= 1, got ", step);
  const auto table_holder = table_ptr(handle, op);
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
  hashtable::OptimParams p;
  p.type = static_cast<hashtable::OptimType>(optimizer);
  p.lr = static_cast<float>(lr);
  p.eps = static_cast<float>(eps);
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.weight_decay = static_cast<float>(weight_decay);
  p.wd_mode = static_cast<hashtable::WeightDecayMode>(wd_mode);
  p.step = step;
  c10::cuda::CUDAGuard guard(rows.device());
  auto rows_c = rows.contiguous();
  auto offsets_c = offsets.contiguous();
  auto grad_c = grad.contiguous();
  cuda::pooled_backward_update(table, rows_c.data_ptr<int64_t>(), offsets_c.data_ptr<int64_t>(), w, rows_c.numel(),
                               num_bags, static_cast<int>(mode), grad_c.data_ptr<float>(), grad_c.size(1), col, p,
                               current_stream());
}

std::tuple<at::Tensor, at::Tensor> gpu_table_export(int64_t handle, int64_t device) {
  const char* op = "recis::gpu_table_export";
  const auto table_holder = table_ptr(handle, op);
  auto& table = *table_holder;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto opts = at::TensorOptions().device(at::kCUDA, device);
  auto ids = at::empty({table.size()}, opts.dtype(at::kLong));
  auto rows = at::empty({table.size()}, opts.dtype(at::kLong));
  cudaStream_t stream = current_stream();
  table.export_ids(ids.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), stream);
  auto data = at::empty({table.size(), table.stride()}, opts.dtype(at::kFloat));
  table.gather_rows(rows.data_ptr<int64_t>(), rows.numel(), data.data_ptr<float>(), stream);
  return {ids, data};
}

void gpu_table_import(int64_t handle, const at::Tensor& ids, const at::Tensor& data) {
  const char* op = "recis::gpu_table_import";
  check_cuda_1d(ids, op, "ids", at::kLong);
  const auto table_holder = table_ptr(handle, op);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(recis, m) {
  m.def("gpu_table_create(int dim, int state_dim, int capacity, int block_rows, int init_kind, float a, float b, "
        "int seed, bool host_rows, int device) -> int",
        &gpu_table_create);
  m.def("gpu_table_release(int handle) -> ()", &gpu_table_release);
  m.def("gpu_table_size(int handle) -> int", &gpu_table_size);
  m.def("gpu_table_export(int handle, int device) -> (Tensor, Tensor)", &gpu_table_export);
  m.def("gpu_find(int handle, Tensor ids) -> Tensor");
  m.def("gpu_find_or_insert(int handle, Tensor ids) -> Tensor");
  m.def("gpu_pooled_forward(int handle, Tensor ids, Tensor rows, Tensor offsets, Tensor? weights, int mode, "
        "Tensor(a!) out, int col) -> ()");
  m.def("gpu_pooled_backward_update(int handle, Tensor rows, Tensor offsets, Tensor? weights, int mode, "
        "Tensor grad, int col, int optimizer, float lr, float eps, float beta1, float beta2, float weight_decay, "
        "int wd_mode, int step) -> ()");
  m.def("gpu_table_import(int handle, Tensor ids, Tensor data) -> ()");
  m.def("gpu_bucketize_by_owner(Tensor ids, int world_size) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(recis, CUDA, m) {
  m.impl("gpu_find", &gpu_find);
  m.impl("gpu_find_or_insert", &gpu_find_or_insert);
  m.impl("gpu_pooled_forward", &gpu_pooled_forward);
  m.impl("gpu_pooled_backward_update", &gpu_pooled_backward_update);
  m.impl("gpu_table_import", &gpu_table_import);
  m.impl("gpu_bucketize_by_owner", &gpu_bucketize_by_owner);
  m.impl("owner_of", &owner_of_cuda);
}

}  // namespace recis
