// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
#include "table_registry.h"

#include <algorithm>
#include <unordered_map>

namespace recis {
namespace {

struct Registry {
  std::mutex mutex;
  std::unordered_map<int64_t, TablePtr> tables;
  int64_t next_handle = 1;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: ops may run at exit
  return *r;
}

}  // namespace

int64_t create_table(const hashtable::HashTableConfig& cfg) {
  auto entry = std::make_shared<TableEntry>(cfg);
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mutex);
  const int64_t h = r.next_handle++;
  r.tables.emplace(h, std::move(entry));
  return h;
}

void release_table(int64_t handle) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mutex);
  r.tables.erase(handle);
}

TablePtr get_table(int64_t handle, const char* op) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mutex);
  auto it = r.tables.find(handle);
  TORCH_CHECK(it != r.tables.end(), op, ": unknown hash table handle ", handle,
              " (the table was released, or the handle did not come from recis_torchrec)");
  return it->second;
}

TableLocks::TableLocks(const std::vector<TablePtr>& tables, bool exclusive) : exclusive_(exclusive) {
  for (const auto& t : tables) locked_.push_back(t.get());
  std::sort(locked_.begin(), locked_.end());
  locked_.erase(std::unique(locked_.begin(), locked_.end()), locked_.end());
  for (TableEntry* t : locked_) {
    if (exclusive_) {
      t->mutex.lock();
    } else {
      t->mutex.lock_shared();
    }
  }
}

TableLocks::~TableLocks() {
  for (auto it = locked_.rbegin(); it != locked_.rend(); ++it) {
    if (exclusive_) {
      (*it)->mutex.unlock();
    } else {
      (*it)->mutex.unlock_shared();
    }
  }
}

}  // namespace recis
