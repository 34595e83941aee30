// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// A baseline for the benchmark suite, timed inside C++ so that only the map's own work is
// measured: std::unordered_map<int64_t, int64_t> (reserved up front, one thread) inserting keys,
// then finding others. Built by benchmarks/cpp_baselines.py for the benchmarks only (it is not part
// of the recis_torchrec extension) and called through ctypes, so it needs no torch headers.
#include <chrono>
#include <cstdint>
#include <unordered_map>

extern "C" {

// out: insert seconds, find seconds, keys found, a checksum of the found values (it keeps the
// lookups from being optimised away).
void recis_bench_unordered_map(const int64_t* insert_keys, int64_t n, const int64_t* find_keys, int64_t m,
                               double* out) {
  std::unordered_map<int64_t, int64_t> map;
  map.reserve(static_cast<size_t>(n));
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  for (int64_t i = 0; i < n; ++i) map.emplace(insert_keys[i], i);
  const auto t1 = clock::now();
  int64_t found = 0, sum = 0;
  for (int64_t i = 0; i < m; ++i) {
    const auto it = map.find(find_keys[i]);
    if (it != map.end()) {
      ++found;
      sum += it->second;
    }
  }
  const auto t2 = clock::now();
  out[0] = std::chrono::duration<double>(t1 - t0).count();
  out[1] = std::chrono::duration<double>(t2 - t1).count();
  out[2] = static_cast<double>(found);
  out[3] = static_cast<double>(sum);
}
}
