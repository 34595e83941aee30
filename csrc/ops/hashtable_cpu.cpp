// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of the table ops: find, find_or_insert, table_export, table_import.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "table_registry.h"

namespace recis {
namespace {

std::vector<TablePtr> resolve(at::IntArrayRef handles, const char* op) {
  std::vector<TablePtr> out;
  out.reserve(handles.size());
  for (int64_t h : handles) out.push_back(h < 0 ? nullptr : get_table(h, op));
  return out;
}

std::vector<TablePtr> non_null(const std::vector<TablePtr>& tables) {
  std::vector<TablePtr> out;
  for (const auto& t : tables) {
    if (t) out.push_back(t);
  }
  return out;
}

at::Tensor lookup(at::IntArrayRef handles, const at::Tensor& ids, const at::Tensor& segment_offsets, bool insert,
                  int64_t clock) {
  const char* op = insert ? "recis::find_or_insert" : "recis::find";
  check_cpu_1d(ids, op, "ids", at::kLong);
  check_cpu_1d(segment_offsets, op, "segment_offsets", at::kLong);
  const int64_t num_segments = static_cast<int64_t>(handles.size());
  TORCH_CHECK(segment_offsets.numel() == num_segments + 1, op, ": segment_offsets must have len(tables) + 1 = ",
              num_segments + 1, " entries, got ", segment_offsets.numel());
  const auto ids_c = ids.contiguous();
  const auto seg = segment_offsets.contiguous();
  const int64_t* so = seg.data_ptr<int64_t>();
  TORCH_CHECK(so[0] == 0 && so[num_segments] == ids.numel(), op, ": segment_offsets must run from 0 to ids.numel() = ",
              ids.numel(), ", got ", so[0], " .. ", so[num_segments]);
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(so[s + 1] >= so[s], op, ": segment_offsets decrease at segment ", s);
  }

  const auto tables = resolve(handles, op);
  at::Tensor rows = at::empty_like(ids_c);
  if (ids_c.numel() == 0) return rows;
  const int64_t* keys = ids_c.data_ptr<int64_t>();
  int64_t* out = rows.data_ptr<int64_t>();

  TableLocks locks(non_null(tables), /*exclusive=*/insert);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t b = so[s], n = so[s + 1] - so[s];
    if (n == 0) continue;
    if (!tables[s]) {
      std::fill(out + b, out + b + n, int64_t{-1});
    } else if (insert) {
      tables[s]->table.find_or_insert(keys + b, n, out + b, AtParallelFor{}, clock);
    } else {
      tables[s]->table.find(keys + b, n, out + b, AtParallelFor{});
    }
  }
  return rows;
}

at::Tensor find_cpu(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& segment_offsets) {
  return lookup(tables, ids, segment_offsets, /*insert=*/false, 0);
}

at::Tensor find_or_insert_cpu(at::IntArrayRef tables, const at::Tensor& ids, const at::Tensor& segment_offsets,
                              int64_t clock) {
  return lookup(tables, ids, segment_offsets, /*insert=*/true, clock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> table_export_cpu(int64_t handle, int64_t since) {
  const char* op = "recis::table_export";
  const auto t = get_table(handle, op);
  TableLocks lock({t}, /*exclusive=*/false);
  const auto& table = t->table;
  const int64_t cap = table.size();
  auto ids = at::empty({cap}, at::kLong);
  auto weights = at::empty({cap, table.dim()}, row_scalar_type(table.row_type()));
  auto state = at::empty({cap, table.state_dim()}, at::kFloat);
  auto meta = at::empty({cap, 3}, at::kLong);
  int64_t n = 0;
  if (cap > 0) {
    n = table.export_rows(ids.data_ptr<int64_t>(), weights.data_ptr(),
                          table.state_dim() > 0 ? state.data_ptr<float>() : nullptr, meta.data_ptr<int64_t>(), since,
                          AtParallelFor{});
  }
  return {ids.narrow(0, 0, n), weights.narrow(0, 0, n), state.narrow(0, 0, n), meta.narrow(0, 0, n)};
}

at::Tensor checked_rows_arg(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n,
                            int64_t width, at::ScalarType dtype = at::kFloat) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == width, op, ": ", name, " must have shape (", n,
              ", ", width, "), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), op, ": ", name, " must be a ", dtype,
              " CPU tensor (the table's row dtype), got ", t->scalar_type(), " on ", t->device());
  return t->contiguous();
}

void table_import_cpu(int64_t handle, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                      const std::optional<at::Tensor>& state, const std::optional<at::Tensor>& meta) {
  const char* op = "recis::table_import";
  const auto t = get_table(handle, op);
  auto& table = t->table;
  check_cpu_1d(ids, op, "ids", at::kLong);
  const int64_t n = ids.numel();
  const at::Tensor w_c = checked_rows_arg(op, "weights", weights, n, table.dim(), row_scalar_type(table.row_type()));
  const at::Tensor s_c = checked_rows_arg(op, "state", state, n, table.state_dim());
  at::Tensor m_c;
  if (meta.has_value()) {
    TORCH_CHECK(meta->dim() == 2 && meta->size(0) == n && meta->size(1) == 3 && meta->scalar_type() == at::kLong &&
                    meta->device().is_cpu(),
                op, ": meta must be an int64 CPU tensor of shape (", n, ", 3), got ", meta->scalar_type(), " ",
                meta->sizes());
    m_c = meta->contiguous();
  }
  if (n == 0) return;
  const auto ids_c = ids.contiguous();
  TableLocks lock({t}, /*exclusive=*/true);
  const bool distinct =
      table.import_rows(ids_c.data_ptr<int64_t>(), n, w_c.defined() ? w_c.data_ptr() : nullptr,
                        s_c.defined() && table.state_dim() > 0 ? s_c.data_ptr<float>() : nullptr,
                        m_c.defined() ? m_c.data_ptr<int64_t>() : nullptr, AtParallelFor{});
  TORCH_CHECK(distinct, op, ": ids must be distinct (nothing was written)");
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("find", &find_cpu);
  m.impl("find_or_insert", &find_or_insert_cpu);
}

// Ops whose only tensor arguments may be absent (table_export) or that do
// not dispatch on a tensor need a backend-independent registration.
TORCH_LIBRARY_IMPL(recis, CompositeExplicitAutograd, m) {
  m.impl("table_export", &table_export_cpu);
  m.impl("table_import", &table_import_cpu);
}

}  // namespace recis
