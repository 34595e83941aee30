// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Python bindings of a table's disk tier (storage="ssd"; csrc/hashtable/disk_rows.h): the table is the
// cache of hot rows, and these calls move rows between it and its DiskRows store under the table's
// disk_mutex (table_registry.h). A disk record is a row as the table stores it: the embedding elements,
// then the state floats. The calls that do I/O run without the GIL and hold the table lock only while
// rows go in or out of the table, so a prefetch thread reads and writes while the training thread runs.
#include <torch/extension.h>

#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "table_registry.h"

namespace recis {
namespace {

hashtable::DiskRows& disk_of(const TablePtr& entry, int64_t handle, const char* op) {
  TORCH_CHECK(entry->disk != nullptr, op, ": table ", handle, " has no disk tier (storage='ssd')");
  return *entry->disk;
}

int64_t emb_bytes(const hashtable::HashTable& t) { return t.dim() * hashtable::element_bytes(t.row_type()); }

// The ids, checked, as a contiguous 1-d int64 tensor.
at::Tensor cpu_ids(const at::Tensor& ids, const char* op) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, op, ": ids must be a CPU int64 tensor");
  return ids.reshape(-1).contiguous();
}

// The ids as a contiguous int64 vector (repeats kept).
std::vector<int64_t> contiguous_ids(const at::Tensor& ids, const char* op) {
  const auto c = cpu_ids(ids, op);
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// n records (each a row as the table stores it: eb embedding bytes, then sdim state floats) into
// separate embedding and state buffers, and back.
void split_records(const uint8_t* records, int64_t n, int64_t eb, int64_t sdim, uint8_t* emb, float* state) {
  const int64_t rb = eb + 4 * sdim;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(emb + i * eb, records + i * rb, eb);
    std::memcpy(state + i * sdim, records + i * rb + eb, 4 * sdim);
  }
}

void join_records(const uint8_t* emb, const float* state, int64_t n, int64_t eb, int64_t sdim, uint8_t* records) {
  const int64_t rb = eb + 4 * sdim;
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(records + i * rb, emb + i * eb, eb);
    std::memcpy(records + i * rb + eb, state + i * sdim, 4 * sdim);
  }
}

// Distinct ids (the disk's erase takes each id once).
std::vector<int64_t> distinct(const at::Tensor& ids, const char* op) {
  std::vector<int64_t> v = contiguous_ids(ids, op);
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

void py_disk_attach(int64_t handle, const std::string& dir, int64_t io_threads) {
  const auto entry = get_table(handle, "disk_attach");
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  TableLocks lock({entry}, /*exclusive=*/true);
  TORCH_CHECK(entry->disk == nullptr, "disk_attach: table ", handle, " already has a disk tier");
  TORCH_CHECK(entry->table.size() == 0, "disk_attach: table ", handle, " must be empty");
  const auto& t = entry->table;
  entry->disk = std::make_unique<hashtable::DiskRows>(dir, emb_bytes(t) + 4 * t.state_dim(),
                                                      static_cast<int>(io_threads));
  entry->table.track_access();  // the rows a step uses are marked, so that disk_spill leaves them
}

// Moves the rows of `ids` that are on disk into the table; returns how many. The disk is read
// without the table lock (a training step runs meanwhile); the rows go into the table under it, and
// only then leave the disk, so a row is always in one place or both, never in neither.
int64_t py_disk_fill(int64_t handle, const at::Tensor& ids) {
  const auto entry = get_table(handle, "disk_fill");
  const std::vector<int64_t> keys = contiguous_ids(ids, "disk_fill");
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  auto& disk = disk_of(entry, handle, "disk_fill");
  auto& t = entry->table;
  const int64_t eb = emb_bytes(t), sdim = t.state_dim(), rb = disk.record_bytes();
  std::vector<std::pair<int64_t, int64_t>> found;  // (slot, id): an id repeated in `ids` once
  std::vector<int64_t> got_ids, slots, meta;
  {
    std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
    std::vector<int64_t> all(keys.size());
    disk.find(keys.data(), static_cast<int64_t>(keys.size()), all.data());
    for (size_t i = 0; i < keys.size(); ++i) {
      if (all[i] >= 0) found.push_back({all[i], keys[i]});
    }
    std::sort(found.begin(), found.end());
    found.erase(std::unique(found.begin(), found.end()), found.end());
    for (const auto& f : found) {
      slots.push_back(f.first);
      got_ids.push_back(f.second);
      meta.resize(meta.size() + 3);
      disk.meta_of(f.first, meta.data() + meta.size() - 3);
    }
  }
  const int64_t got = static_cast<int64_t>(got_ids.size());
  if (got == 0) return 0;
  std::vector<uint8_t> records(static_cast<size_t>(got * rb)), emb(static_cast<size_t>(got * eb));
  std::vector<float> state(static_cast<size_t>(got * sdim));
  disk.read_slots(slots.data(), got, records.data());
  split_records(records.data(), got, eb, sdim, emb.data(), state.data());
  {
    TableLocks lock({entry}, /*exclusive=*/true);
    const bool ok = t.import_rows(got_ids.data(), got, emb.data(), sdim > 0 ? state.data() : nullptr, meta.data(),
                                  AtParallelFor{}, /*count_admitted=*/false);
    TORCH_CHECK(ok, "disk_fill: table ", handle, ": an id repeats (internal error)");
  }
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  disk.erase(got_ids.data(), got);
  return got;
}

// Whether any of `ids` has its row on disk (a lookup whose rows are all cached or new skips the fill,
// and does not wait for a prefetch in flight).
bool py_disk_has_any(int64_t handle, const at::Tensor& ids) {
  const auto entry = get_table(handle, "disk_has_any");
  const auto keys = cpu_ids(ids, "disk_has_any");
  std::vector<int64_t> slots(static_cast<size_t>(keys.numel()));
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  return disk_of(entry, handle, "disk_has_any").find(keys.data_ptr<int64_t>(), keys.numel(), slots.data()) > 0;
}

// Moves up to `want` of the table's coldest rows (none seen at `clock` or later, none of `keep`) to
// disk; returns how many. The rows are copied out under a shared table lock, written to disk without
// it, and freed under it only if no step saw or wrote them meanwhile (those stay cached, and their
// disk copies go). Until they are freed they are cached too, so no lookup reads their slots early.
int64_t py_disk_spill(int64_t handle, int64_t want, int64_t clock, const at::Tensor& keep) {
  const auto entry = get_table(handle, "disk_spill");
  const std::vector<int64_t> kept = contiguous_ids(keep, "disk_spill");  // repeats are harmless
  TORCH_CHECK(want >= 0, "disk_spill: want must be >= 0, got ", want);
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  auto& disk = disk_of(entry, handle, "disk_spill");
  auto& t = entry->table;
  const int64_t eb = emb_bytes(t), sdim = t.state_dim(), rb = disk.record_bytes();
  std::vector<int64_t> ids, meta;
  std::vector<uint8_t> emb;
  std::vector<float> state;
  int64_t n = 0;
  {
    TableLocks lock({entry}, /*exclusive=*/false);
    want = std::min<int64_t>(want, t.size());
    ids.resize(static_cast<size_t>(want));
    meta.resize(static_cast<size_t>(3 * want));
    emb.resize(static_cast<size_t>(want * eb));
    state.resize(static_cast<size_t>(want * sdim));
    n = t.copy_coldest(want, clock, kept.data(), static_cast<int64_t>(kept.size()), ids.data(), emb.data(),
                       sdim > 0 ? state.data() : nullptr, meta.data(), AtParallelFor{});
  }
  std::vector<uint8_t> records(static_cast<size_t>(n * rb));
  join_records(emb.data(), state.data(), n, eb, sdim, records.data());
  std::vector<int64_t> slots(static_cast<size_t>(n));
  {
    std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
    disk.assign(ids.data(), n, meta.data(), slots.data());
  }
  disk.write_slots(slots.data(), n, records.data());
  std::vector<uint8_t> dropped(static_cast<size_t>(n));
  int64_t freed = 0;
  {
    TableLocks lock({entry}, /*exclusive=*/true);
    freed = t.drop_unchanged(ids.data(), n, meta.data(), dropped.data());
  }
  std::vector<int64_t> stale;
  for (int64_t i = 0; i < n; ++i) {
    if (!dropped[i]) stale.push_back(ids[i]);
  }
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  disk.erase(stale.data(), static_cast<int64_t>(stale.size()));
  disk.compact();  // once the holes rows coming back left pass a quarter of the rows on disk
  return freed;
}

int64_t py_disk_erase(int64_t handle, const at::Tensor& ids) {
  const auto entry = get_table(handle, "disk_erase");
  const std::vector<int64_t> keys = distinct(ids, "disk_erase");
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  return disk_of(entry, handle, "disk_erase").erase(keys.data(), static_cast<int64_t>(keys.size()));
}

// Drops the disk rows unseen since clock - ttl_steps (the table's TTL rule), recording them in the
// table's eviction log as evicted at `clock`; returns their ids.
at::Tensor py_disk_evict_stale(int64_t handle, int64_t clock, int64_t ttl_steps) {
  const auto entry = get_table(handle, "disk_evict_stale");
  TORCH_CHECK(ttl_steps > 0, "disk_evict_stale: ttl_steps must be > 0, got ", ttl_steps);
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  std::vector<int64_t> ids;
  {
    std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
    disk_of(entry, handle, "disk_evict_stale").evict_stale(clock, ttl_steps, &ids);
  }
  TableLocks lock({entry}, /*exclusive=*/true);
  for (int64_t id : ids) entry->table.log_eviction(id, clock);
  return at::tensor(ids, at::kLong);
}

// (on_disk bool (n,), emb (n, dim) of the row dtype, state (n, state_dim)) of `ids`, read from disk
// and left there; rows not on disk are zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> py_disk_read(int64_t handle, const at::Tensor& ids) {
  const auto entry = get_table(handle, "disk_read");
  const auto keys = cpu_ids(ids, "disk_read");
  const int64_t n = keys.numel();
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  const auto& disk = disk_of(entry, handle, "disk_read");
  const auto& t = entry->table;
  const int64_t eb = emb_bytes(t), sdim = t.state_dim(), rb = disk.record_bytes();
  std::vector<int64_t> slots(static_cast<size_t>(n));
  std::vector<uint8_t> records(static_cast<size_t>(n * rb), 0);
  disk.read(keys.data_ptr<int64_t>(), n, slots.data(), records.data());
  at::Tensor found = at::empty({n}, at::kBool);
  for (int64_t i = 0; i < n; ++i) found.data_ptr<bool>()[i] = slots[i] >= 0;
  at::Tensor emb = at::empty({n, t.dim()}, at::TensorOptions().dtype(row_scalar_type(t.row_type())));
  at::Tensor state = at::empty({n, sdim}, at::kFloat);
  // the records of ids not on disk were left zero: so are their rows
  split_records(records.data(), n, eb, sdim, static_cast<uint8_t*>(emb.data_ptr()), state.data_ptr<float>());
  return {found, emb, state};
}

// Like export_chunk, over the disk's slots: fills the buffers with up to ids.numel() disk rows written
// after `since`, from slot `start` on; returns (rows copied, the slot to continue from).
std::tuple<int64_t, int64_t> py_disk_export_chunk(int64_t handle, int64_t start, int64_t since, at::Tensor ids,
                                                  at::Tensor emb, at::Tensor state, at::Tensor meta) {
  const auto entry = get_table(handle, "disk_export_chunk");
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  const auto& disk = disk_of(entry, handle, "disk_export_chunk");
  const auto& t = entry->table;
  const int64_t cap = ids.numel(), eb = emb_bytes(t), sdim = t.state_dim(), rb = disk.record_bytes();
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  emb.scalar_type() == row_scalar_type(t.row_type()) && emb.is_contiguous() &&
                  emb.numel() == cap * t.dim() && state.scalar_type() == at::kFloat && state.is_contiguous() &&
                  state.numel() == cap * sdim && meta.scalar_type() == at::kLong && meta.is_contiguous() &&
                  meta.numel() == cap * 3,
              "disk_export_chunk: buffers must be contiguous: ids int64 (n,), emb ", row_scalar_type(t.row_type()),
              " (n, ", t.dim(), "), state float32 (n, ", sdim, "), meta int64 (n, 3)");
  std::vector<uint8_t> records(static_cast<size_t>(cap * rb));
  const auto out = disk.export_chunk(start, cap, since, ids.data_ptr<int64_t>(), records.data(),
                                     meta.data_ptr<int64_t>());
  split_records(records.data(), out.first, eb, sdim, static_cast<uint8_t*>(emb.data_ptr()),
                state.data_ptr<float>());
  return {out.first, out.second};
}

void py_disk_clear(int64_t handle) {
  const auto entry = get_table(handle, "disk_clear");
  std::lock_guard<std::mutex> disk_lock(entry->disk_mutex);
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  disk_of(entry, handle, "disk_clear").clear();
}

py::dict py_disk_info(int64_t handle) {
  const auto entry = get_table(handle, "disk_info");
  std::lock_guard<std::mutex> map_lock(entry->disk_map_mutex);
  const auto& disk = disk_of(entry, handle, "disk_info");
  py::dict d;
  d["rows"] = disk.size();
  d["slots"] = disk.num_slots();
  d["record_bytes"] = disk.record_bytes();
  d["file_bytes"] = disk.file_bytes();
  d["memory_bytes"] = disk.memory_bytes();
  d["bytes_read"] = disk.bytes_read();
  d["bytes_written"] = disk.bytes_written();
  return d;
}

}  // namespace

void bind_disk(py::module_& m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("disk_attach", &py_disk_attach, py::arg("handle"), py::arg("dir"), py::arg("io_threads"));
  m.def("disk_fill", &py_disk_fill, py::arg("handle"), py::arg("ids"), release());
  m.def("disk_spill", &py_disk_spill, py::arg("handle"), py::arg("want"), py::arg("clock"), py::arg("keep"),
        release());
  m.def("disk_has_any", &py_disk_has_any, py::arg("handle"), py::arg("ids"));
  m.def("disk_erase", &py_disk_erase, py::arg("handle"), py::arg("ids"), release());
  m.def("disk_evict_stale", &py_disk_evict_stale, py::arg("handle"), py::arg("clock"), py::arg("ttl_steps"));
  m.def("disk_read", &py_disk_read, py::arg("handle"), py::arg("ids"), release());
  m.def("disk_export_chunk", &py_disk_export_chunk, py::arg("handle"), py::arg("start"), py::arg("since"),
        py::arg("ids"), py::arg("emb"), py::arg("state"), py::arg("meta"), release());
  m.def("disk_clear", &py_disk_clear, py::arg("handle"));
  m.def("disk_info", &py_disk_info, py::arg("handle"));
}

}  // namespace recis
