// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Python bindings for table lifetime and introspection. The data path goes
// through the torch.ops.recis ops; these functions only create, release and
// describe tables.
#include <torch/extension.h>

#include "../hashtable/constants.h"
#include "../hashtable/optimizers.h"
#include "checks.h"
#include "table_registry.h"

namespace recis {
namespace {

int64_t py_create_table(int64_t dim, int64_t state_dim, int64_t initial_capacity, int64_t block_rows,
                        int64_t init_kind, double init_a, double init_b, uint64_t seed, int64_t admit_threshold,
                        int64_t ttl_steps, int64_t max_capacity, int64_t policy, int64_t row_type,
                        int64_t admit_capacity) {
  TORCH_CHECK(dim > 0, "create_table: dim must be > 0, got ", dim);
  TORCH_CHECK(state_dim >= 0, "create_table: state_dim must be >= 0, got ", state_dim);
  TORCH_CHECK(initial_capacity >= 0, "create_table: initial_capacity must be >= 0, got ", initial_capacity);
  TORCH_CHECK(block_rows > 0 && (block_rows & (block_rows - 1)) == 0,
              "create_table: block_rows must be a power of two, got ", block_rows);
  TORCH_CHECK(init_kind >= 0 && init_kind <= 3, "create_table: unknown init_kind ", init_kind);
  TORCH_CHECK(admit_threshold >= 0 && ttl_steps >= 0 && max_capacity >= 0 && admit_capacity >= 0,
              "create_table: admit_threshold, admit_capacity, ttl_steps and max_capacity must be >= 0");
  bool known_policy = false;
#define RECIS_POLICY_KNOWN(name, value, str) known_policy = known_policy || policy == value;
  RECIS_EVICTION_POLICIES(RECIS_POLICY_KNOWN)
#undef RECIS_POLICY_KNOWN
  TORCH_CHECK(known_policy, "create_table: unknown eviction policy ", policy);
  TORCH_CHECK(max_capacity == 0 || policy != 0, "create_table: max_capacity needs an eviction policy (LRU or LFU)");
  TORCH_CHECK(row_type >= 0 && row_type <= 2, "create_table: unknown row_type ", row_type,
              " (0 = float32, 1 = float16, 2 = bfloat16)");
  hashtable::HashTableConfig cfg;
  cfg.dim = dim;
  cfg.state_dim = state_dim;
  cfg.initial_capacity = initial_capacity;
  cfg.block_rows = block_rows;
  cfg.init.kind = static_cast<hashtable::InitKind>(init_kind);
  cfg.init.a = static_cast<float>(init_a);
  cfg.init.b = static_cast<float>(init_b);
  cfg.init.seed = seed;
  cfg.admit_threshold = admit_threshold;
  cfg.admit_capacity = admit_capacity;
  cfg.ttl_steps = ttl_steps;
  cfg.max_capacity = max_capacity;
  cfg.policy = static_cast<hashtable::EvictionPolicy>(policy);
  cfg.row_type = static_cast<hashtable::RowType>(row_type);
  return create_table(cfg);
}

py::dict py_table_info(int64_t handle) {
  const auto entry = get_table(handle, "table_info");
  std::shared_lock<std::shared_mutex> lock(entry->mutex);
  const auto& t = entry->table;
  py::dict d;
  d["rows"] = t.size();
  d["capacity"] = t.capacity();
  d["memory_bytes"] = t.memory_bytes();
  d["used_bytes"] = t.used_bytes();
  d["pending_bytes"] = t.pending_bytes();
  d["dim"] = t.dim();
  d["state_dim"] = t.state_dim();
  d["row_bytes"] = t.blocks().stride_bytes();
  d["num_blocks"] = t.blocks().num_blocks();
  d["block_rows"] = t.blocks().block_rows();
  d["admitted"] = t.counters().admitted;
  d["evicted"] = t.counters().evicted;
  d["rejected"] = t.counters().rejected;
  d["pending"] = t.pending();
  d["snapshot_copies"] = t.snapshot_copies();
  // memory_bytes by what holds it (the parts add up to it).
  const auto b = t.blocks().bytes();
  py::dict m;
  m["embedding"] = b.embedding;
  m["optimizer_state"] = b.state;
  m["row_padding"] = b.padding;
  m["ids"] = b.ids;
  m["metadata"] = b.metadata;
  m["spare_blocks"] = b.spare;
  m["block_slack"] = b.slack;
  m["id_map"] = t.id_map_bytes();
  m["other"] = t.memory_bytes() - t.blocks().memory_bytes() - t.id_map_bytes() + b.snapshot;
  d["memory"] = m;
  return d;
}

// Checks the host buffers export_chunk and snapshot_read fill: contiguous ids int64 (n,), emb of the
// table's row type (n, dim), state float32 (n, state_dim), meta int64 (n, 3). Returns n.
int64_t check_row_buffers(const hashtable::HashTable& t, const at::Tensor& ids, const at::Tensor& emb,
                          const at::Tensor& state, const at::Tensor& meta, const char* op) {
  const int64_t cap = ids.numel();
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && emb.scalar_type() == row_scalar_type(t.row_type()) &&
                  emb.is_contiguous() && emb.numel() == cap * t.dim() && state.scalar_type() == at::kFloat &&
                  state.is_contiguous() && state.numel() == cap * t.state_dim() && meta.scalar_type() == at::kLong &&
                  meta.is_contiguous() && meta.numel() == cap * 3,
              op, ": buffers must be contiguous: ids int64 (n,), emb ", row_scalar_type(t.row_type()), " (n, ", t.dim(),
              "), state float32 (n, ", t.state_dim(), "), meta int64 (n, 3)");
  return cap;
}

std::tuple<int64_t, int64_t> py_export_chunk(int64_t handle, int64_t start, int64_t since, at::Tensor ids,
                                             at::Tensor emb, at::Tensor state, at::Tensor meta) {
  const auto entry = get_table(handle, "export_chunk");
  const auto& t = entry->table;
  const int64_t cap = check_row_buffers(t, ids, emb, state, meta, "export_chunk");
  TableLocks lock({entry}, /*exclusive=*/false);
  const auto out = t.export_chunk(start, cap, since, ids.data_ptr<int64_t>(), emb.data_ptr(),
                                  t.state_dim() > 0 ? state.data_ptr<float>() : nullptr, meta.data_ptr<int64_t>(),
                                  AtParallelFor{});
  return {out.first, out.second};
}

// Copy-on-write snapshots (hash_table.h): what a background checkpoint reads while training goes on.
int64_t py_snapshot_begin(int64_t handle) {
  const auto entry = get_table(handle, "snapshot_begin");
  std::lock_guard<std::mutex> snap(entry->snapshot_mutex);
  TableLocks lock({entry}, /*exclusive=*/true);
  try {
    return entry->table.begin_snapshot();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "snapshot_begin: table ", handle, ": ", e.what());
  }
  return 0;
}

void py_snapshot_end(int64_t handle) {
  const auto entry = get_table(handle, "snapshot_end");
  std::lock_guard<std::mutex> snap(entry->snapshot_mutex);
  TableLocks lock({entry}, /*exclusive=*/true);
  entry->table.end_snapshot();
}

// Fills the buffers with the snapshot's next live rows (as export_chunk lays them out); returns (rows
// copied, the row index the next read starts from); the second is the snapshot's row limit when it
// is read through. Runs without the GIL and without the table lock: it claims each row as it reads
// it (embedding_blocks.h), so a training step never waits for it, except for a row it is reading.
std::tuple<int64_t, int64_t> py_snapshot_read(int64_t handle, at::Tensor ids, at::Tensor emb, at::Tensor state,
                                              at::Tensor meta) {
  constexpr int64_t kScan = 8192;  // rows between updates of where the reader is (writers skip rows behind it)
  const auto entry = get_table(handle, "snapshot_read");
  auto& t = entry->table;
  const int64_t cap = check_row_buffers(t, ids, emb, state, meta, "snapshot_read");
  const int64_t emb_bytes = t.dim() * static_cast<int64_t>(emb.element_size()), sdim = t.state_dim();
  auto* ip = ids.data_ptr<int64_t>();
  auto* ep = static_cast<uint8_t*>(emb.data_ptr());
  auto* sp = state.data_ptr<float>();
  auto* mp = meta.data_ptr<int64_t>();
  std::lock_guard<std::mutex> snap(entry->snapshot_mutex);
  TORCH_CHECK(t.snapshot_active(), "snapshot_read: table ", handle, " has no snapshot in progress");
  const int64_t limit = t.snapshot_limit();
  int64_t n = 0, next = t.snapshot_next();
  while (n < cap && next < limit) {
    const int64_t end = std::min(limit, next + std::min(kScan, cap - n));
    n += t.read_snapshot(end, ip + n, ep + n * emb_bytes, sdim > 0 ? sp + n * sdim : nullptr, mp + 3 * n);
    next = end;
  }
  return {n, next};
}

void py_clear(int64_t handle) {
  const auto entry = get_table(handle, "clear");
  TableLocks lock({entry}, /*exclusive=*/true);
  entry->table.clear();
}

int64_t py_evict_stale(int64_t handle, int64_t clock) {
  const auto entry = get_table(handle, "evict_stale");
  TableLocks lock({entry}, /*exclusive=*/true);
  return entry->table.evict_stale(clock);
}

int64_t py_erase(int64_t handle, const at::Tensor& ids, int64_t clock) {
  check_cpu_1d(ids, "erase", "ids", at::kLong);
  const auto entry = get_table(handle, "erase");
  const auto ids_c = ids.contiguous();
  TableLocks lock({entry}, /*exclusive=*/true);
  return entry->table.erase(ids_c.data_ptr<int64_t>(), ids_c.numel(), clock);
}

std::tuple<at::Tensor, at::Tensor> py_evicted_since(int64_t handle, int64_t since) {
  const auto entry = get_table(handle, "evicted_since");
  TableLocks lock({entry}, /*exclusive=*/false);
  std::vector<int64_t> ids, steps;
  TORCH_CHECK(entry->table.evicted_since(since, &ids, &steps), "evicted_since: the eviction log of table ", handle,
              " no longer reaches back to step ", since,
              " (too many evictions since, or the table was restored after it); export a full checkpoint instead of a delta");
  return {at::tensor(ids, at::kLong), at::tensor(steps, at::kLong)};
}

void py_restart_eviction_log(int64_t handle, int64_t clock) {
  const auto entry = get_table(handle, "restart_eviction_log");
  TableLocks lock({entry}, /*exclusive=*/true);
  entry->table.restart_eviction_log(clock);
}

std::tuple<at::Tensor, at::Tensor> py_export_pending(int64_t handle) {
  const auto entry = get_table(handle, "export_pending");
  TableLocks lock({entry}, /*exclusive=*/false);
  std::vector<int64_t> ids, counts;
  entry->table.export_pending(&ids, &counts);
  return {at::tensor(ids, at::kLong), at::tensor(counts, at::kLong)};
}

void py_import_pending(int64_t handle, const at::Tensor& ids, const at::Tensor& counts) {
  check_cpu_1d(ids, "import_pending", "ids", at::kLong);
  check_cpu_1d(counts, "import_pending", "counts", at::kLong);
  TORCH_CHECK(ids.numel() == counts.numel(), "import_pending: ids and counts differ in length");
  const auto entry = get_table(handle, "import_pending");
  const auto i = ids.contiguous(), c = counts.contiguous();
  TableLocks lock({entry}, /*exclusive=*/true);
  entry->table.import_pending(i.data_ptr<int64_t>(), c.data_ptr<int64_t>(), i.numel());
}

// Every enum Python needs, by name, from the C++ definitions (recis_torchrec/ops/constants.py).
py::dict py_constants() {
  using namespace hashtable;
  auto code = [](auto e) { return static_cast<int64_t>(e); };
  py::dict init, policy, pooling, optimizer, wd, row;
  init["uniform"] = code(InitKind::kUniform);
  init["normal"] = code(InitKind::kNormal);
  init["truncated_normal"] = code(InitKind::kTruncatedNormal);
  init["constant"] = code(InitKind::kConstant);
#define RECIS_POLICY_NAME(name, value, str) policy[str] = code(EvictionPolicy::name);
  RECIS_EVICTION_POLICIES(RECIS_POLICY_NAME)
#undef RECIS_POLICY_NAME
  pooling["sum"] = code(PoolingMode::kSum);
  pooling["mean"] = code(PoolingMode::kMean);
#define RECIS_OPTIM_NAME(name, value, str) optimizer[str] = code(OptimType::name);
  RECIS_OPTIMIZERS(RECIS_OPTIM_NAME)
#undef RECIS_OPTIM_NAME
  py::list hyperparameters;
#define RECIS_HYPERPARAMETER_NAME(field, str) hyperparameters.append(str);
  RECIS_HYPERPARAMETERS(RECIS_HYPERPARAMETER_NAME)
#undef RECIS_HYPERPARAMETER_NAME
  wd["none"] = code(WeightDecayMode::kNone);
  wd["l2"] = code(WeightDecayMode::kL2);
  wd["decoupled"] = code(WeightDecayMode::kDecoupled);
  row["float32"] = code(RowType::kF32);
  row["float16"] = code(RowType::kF16);
  row["bfloat16"] = code(RowType::kBF16);
  py::dict d;
  d["init_kind"] = init;
  d["eviction_policy"] = policy;
  d["pooling"] = pooling;
  d["optimizer"] = optimizer;
  d["weight_decay_mode"] = wd;
  d["hyperparameters"] = hyperparameters;
  d["row_type"] = row;
  d["row_meta_columns"] = kRowMetaColumns;
  return d;
}

}  // namespace

void bind_disk(py::module_& m);  // disk_bindings.cpp

}  // namespace recis

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recis_torchrec C++ extension: table lifetime; ops are under torch.ops.recis";
  m.def("create_table", &recis::py_create_table, py::arg("dim"), py::arg("state_dim"), py::arg("initial_capacity"),
        py::arg("block_rows"), py::arg("init_kind"), py::arg("init_a"), py::arg("init_b"), py::arg("seed"),
        py::arg("admit_threshold") = 0, py::arg("ttl_steps") = 0, py::arg("max_capacity") = 0, py::arg("policy") = 0,
        py::arg("row_type") = 0, py::arg("admit_capacity") = 0);
  m.def("clear", &recis::py_clear, py::arg("handle"));
  m.def("export_chunk", &recis::py_export_chunk, py::arg("handle"), py::arg("start"), py::arg("since"),
        py::arg("ids"), py::arg("emb"), py::arg("state"), py::arg("meta"));
  m.def("snapshot_begin", &recis::py_snapshot_begin, py::arg("handle"));
  m.def("snapshot_end", &recis::py_snapshot_end, py::arg("handle"));
  m.def("snapshot_read", &recis::py_snapshot_read, py::arg("handle"), py::arg("ids"), py::arg("emb"),
        py::arg("state"), py::arg("meta"), py::call_guard<py::gil_scoped_release>());
  m.def("evict_stale", &recis::py_evict_stale, py::arg("handle"), py::arg("clock"));
  m.def("erase", &recis::py_erase, py::arg("handle"), py::arg("ids"), py::arg("clock"));
  m.def("evicted_since", &recis::py_evicted_since, py::arg("handle"), py::arg("since"));
  m.def("constants", &recis::py_constants);
  m.def("restart_eviction_log", &recis::py_restart_eviction_log, py::arg("handle"), py::arg("clock"));
  m.def("export_pending", &recis::py_export_pending, py::arg("handle"));
  m.def("import_pending", &recis::py_import_pending, py::arg("handle"), py::arg("ids"), py::arg("counts"));
  m.def("release_table", &recis::release_table, py::arg("handle"));
  m.def("table_info", &recis::py_table_info, py::arg("handle"));
  recis::bind_disk(m);
}
