// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Baselines for the benchmark suite, timed inside C++ so that only the map's
// own work is measured: std::unordered_map<int64_t, int64_t> (reserved up
// front, one thread) inserting keys and then finding others.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <chrono>
#include <unordered_map>

#include "checks.h"

namespace recis {
namespace {

at::Tensor bench_unordered_map_cpu(const at::Tensor& insert_keys, const at::Tensor& find_keys) {
  const char* op = "recis_bench::unordered_map";
  check_cpu_1d(insert_keys, op, "insert_keys", at::kLong);
  check_cpu_1d(find_keys, op, "find_keys", at::kLong);
  const auto ins = insert_keys.contiguous();
  const auto fnd = find_keys.contiguous();
  const int64_t* k = ins.data_ptr<int64_t>();
  const int64_t* q = fnd.data_ptr<int64_t>();
  const int64_t n = ins.numel(), m = fnd.numel();
  std::unordered_map<int64_t, int64_t> map;
  map.reserve(static_cast<size_t>(n));
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  for (int64_t i = 0; i < n; ++i) map.emplace(k[i], i);
  auto t1 = clock::now();
  int64_t found = 0, sum = 0;
  for (int64_t i = 0; i < m; ++i) {
    auto it = map.find(q[i]);
    if (it != map.end()) {
      ++found;
      sum += it->second;
    }
  }
  auto t2 = clock::now();
  at::Tensor out = at::empty({4}, at::kDouble);
  double* o = out.data_ptr<double>();
  o[0] = std::chrono::duration<double>(t1 - t0).count();
  o[1] = std::chrono::duration<double>(t2 - t1).count();
  o[2] = static_cast<double>(found);
  o[3] = static_cast<double>(sum);  // keeps the lookups from being optimised away
  return out;
}

}  // namespace

// Its own op namespace, apart from the package's ``recis`` ops: nothing in
// recis_torchrec calls it; only benchmarks/ does, as torch.ops.recis_bench.
TORCH_LIBRARY(recis_bench, m) {
  // std::unordered_map<int64, int64> (reserved, one thread) inserts
  // insert_keys, then finds find_keys; returns float64 (insert seconds, find
  // seconds, keys found, checksum).
  m.def("unordered_map(Tensor insert_keys, Tensor find_keys) -> Tensor");
}

TORCH_LIBRARY_IMPL(recis_bench, CPU, m) { m.impl("unordered_map", &bench_unordered_map_cpu); }

}  // namespace recis
