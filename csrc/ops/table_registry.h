// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The binding layer's table registry. Ops name a table by an int64 handle;
// the registry owns the tables and a reader/writer lock per table.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "../hashtable/disk_rows.h"
#include "../hashtable/hash_table.h"

namespace recis {

// at::parallel_for in the shape the torch-free core expects.
// A ParFor runs fn(b, e) over chunks of [begin, end) and says on how many
// threads (threads()); the table's inserts pick their path by it.
struct AtParallelFor {
  template <typename Fn>
  void operator()(int64_t begin, int64_t end, int64_t grain, Fn&& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
  int threads() const { return at::in_parallel_region() ? 1 : at::get_num_threads(); }
};

// A serial loop in the same shape, for work already inside a parallel region.
struct SerialFor {
  template <typename Fn>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, Fn&& fn) const {
    if (begin < end) fn(begin, end);
  }
  int threads() const { return 1; }
};

struct TableEntry {
  explicit TableEntry(const hashtable::HashTableConfig& cfg) : table(cfg) {}
  hashtable::HashTable table;
  mutable std::shared_mutex mutex;
  // Serialises a snapshot's begin, reads and end with each other; the reads take no table lock.
  std::mutex snapshot_mutex;
  // The rows kept on disk behind this table (storage="ssd"), or null. A fill or a spill holds
  // disk_mutex from start to end (taken before the table lock): the disk does not change between a
  // fill's read and its import, or a spill's copy and its drop. The table lock is held only while rows
  // go in or out of the table, and disk_map_mutex only while the disk's index changes, not during its
  // I/O: training steps run meanwhile, and disk_has_any answers at once.
  std::unique_ptr<hashtable::DiskRows> disk;
  std::mutex disk_mutex;
  std::mutex disk_map_mutex;
};

using TablePtr = std::shared_ptr<TableEntry>;

int64_t create_table(const hashtable::HashTableConfig& cfg);
void release_table(int64_t handle);
// Throws a c10::Error naming the handle if it is unknown or released.
TablePtr get_table(int64_t handle, const char* op);

// Locks a set of tables (each once, in handle order, so no two ops can
// deadlock) for reading or writing.
class TableLocks {
 public:
  TableLocks(const std::vector<TablePtr>& tables, bool exclusive);
  ~TableLocks();
  TableLocks(const TableLocks&) = delete;
  TableLocks& operator=(const TableLocks&) = delete;

 private:
  std::vector<TableEntry*> locked_;
  bool exclusive_;
};

}  // namespace recis
