// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Python bindings for table lifetime and introspection. The data path goes
// through the torch.ops.recis ops; these functions only create, release and
// describe tables.
#include <torch/extension.h>

#include "table_registry.h"

namespace recis {
namespace {

int64_t py_create_table(int64_t dim, int64_t state_dim, int64_t initial_capacity, int64_t block_rows,
                        int64_t init_kind, double init_a, double init_b, uint64_t seed) {
  TORCH_CHECK(dim > 0, "create_table: dim must be > 0, got ", dim);
  TORCH_CHECK(state_dim >= 0, "create_table: state_dim must be >= 0, got ", state_dim);
  TORCH_CHECK(initial_capacity >= 0, "create_table: initial_capacity must be >= 0, got ", initial_capacity);
  TORCH_CHECK(block_rows > 0 && (block_rows & (block_rows - 1)) == 0,
              "create_table: block_rows must be a power of two, got ", block_rows);
  TORCH_CHECK(init_kind >= 0 && init_kind <= 3, "create_table: unknown init_kind ", init_kind);
  hashtable::HashTableConfig cfg;
  cfg.dim = dim;
  cfg.state_dim = state_dim;
  cfg.initial_capacity = initial_capacity;
  cfg.block_rows = block_rows;
  cfg.init.kind = static_cast<hashtable::InitKind>(init_kind);
  cfg.init.a = static_cast<float>(init_a);
  cfg.init.b = static_cast<float>(init_b);
  cfg.init.seed = seed;
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
  d["dim"] = t.dim();
  d["state_dim"] = t.state_dim();
  d["row_stride"] = t.blocks().stride();
  d["num_blocks"] = t.blocks().num_blocks();
  d["block_rows"] = t.blocks().block_rows();
  return d;
}

}  // namespace
}  // namespace recis

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recis_torchrec C++ extension: table lifetime; ops are under torch.ops.recis";
  m.def("create_table", &recis::py_create_table, py::arg("dim"), py::arg("state_dim"), py::arg("initial_capacity"),
        py::arg("block_rows"), py::arg("init_kind"), py::arg("init_a"), py::arg("init_b"), py::arg("seed"));
  m.def("release_table", &recis::release_table, py::arg("handle"));
  m.def("table_info", &recis::py_table_info, py::arg("handle"));
  m.def("live_tables", &recis::live_tables);
}
