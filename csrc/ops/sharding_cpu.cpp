// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of the sharding ops: owner_of and bucketize_dedup, the input
// side of the hash-sharded all-to-all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../hashtable/hash.h"
#include "checks.h"

namespace recis {
namespace {

using hashtable::mix64;
using hashtable::owner_of;

at::Tensor owner_of_cpu(const at::Tensor& ids, int64_t world_size) {
  const char* op = "recis::owner_of";
  check_cpu_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  const auto ids_c = ids.contiguous();
  at::Tensor out = at::empty_like(ids_c);
  const int64_t* k = ids_c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, ids_c.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = owner_of(k[i], world_size);
  });
  return out;
}

// A first-occurrence-ordered set of int64 keys: insert() returns the key's
// index in insertion order.
class UniqueIndex {
 public:
  explicit UniqueIndex(int64_t n) {
    int64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    mask_ = static_cast<uint64_t>(cap - 1);
    keys_.resize(static_cast<size_t>(cap));
    index_.assign(static_cast<size_t>(cap), -1);
  }
  int32_t insert(int64_t key, std::vector<int64_t>* uniques) {
    uint64_t i = mix64(static_cast<uint64_t>(key)) & mask_;
    for (;;) {
      if (index_[i] < 0) {
        keys_[i] = key;
        index_[i] = static_cast<int32_t>(uniques->size());
        uniques->push_back(key);
        return index_[i];
      }
      if (keys_[i] == key) return index_[i];
      i = (i + 1) & mask_;
    }
  }

 private:
  uint64_t mask_ = 0;
  std::vector<int64_t> keys_;
  std::vector<int32_t> index_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bucketize_dedup_cpu(
    const at::Tensor& ids, const at::Tensor& offsets, int64_t world_size) {
  const char* op = "recis::bucketize_dedup";
  check_cpu_1d(ids, op, "ids", at::kLong);
  check_cpu_1d(offsets, op, "offsets", at::kLong);
  TORCH_CHECK(world_size >= 1, op, ": world_size must be >= 1, got ", world_size);
  const int64_t n = ids.numel();
  const int64_t num_bags = offsets.numel() - 1;
  TORCH_CHECK(num_bags >= 0, op, ": offsets must have at least one entry");
  TORCH_CHECK(n < (int64_t{1} << 31), op, ": at most 2**31 - 1 ids per call, got ", n);
  const auto ids_c = ids.contiguous();
  const auto off_c = offsets.contiguous();
  const int64_t* key = ids_c.data_ptr<int64_t>();
  const int64_t* off = off_c.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[num_bags] == n, op, ": offsets must run from 0 to ids.numel() = ", n, ", got ",
              off[0], " .. ", off[num_bags]);
  for (int64_t q = 0; q < num_bags; ++q) {
    TORCH_CHECK(off[q + 1] >= off[q], op, ": offsets decrease at bag ", q);
  }

  // 1. The owner of every value.
  std::vector<int32_t> owner(static_cast<size_t>(n));
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) owner[i] = static_cast<int32_t>(owner_of(key[i], world_size));
  });

  // 2. Per-owner bag lengths and value counts; a stable owner-major order.
  at::Tensor bag_lengths = at::zeros({world_size, num_bags}, at::kInt);
  at::Tensor value_counts = at::zeros({world_size}, at::kLong);
  int32_t* bl = bag_lengths.data_ptr<int32_t>();
  int64_t* vc = value_counts.data_ptr<int64_t>();
  for (int64_t q = 0; q < num_bags; ++q) {
    for (int64_t i = off[q]; i < off[q + 1]; ++i) ++bl[owner[i] * num_bags + q];
  }
  for (int64_t i = 0; i < n; ++i) ++vc[owner[i]];
  std::vector<int64_t> value_begin(static_cast<size_t>(world_size) + 1, 0);
  for (int64_t o = 0; o < world_size; ++o) value_begin[o + 1] = value_begin[o] + vc[o];
  at::Tensor value_perm = at::empty({n}, at::kLong);
  int64_t* perm = value_perm.data_ptr<int64_t>();
  {
    std::vector<int64_t> cursor(value_begin.begin(), value_begin.end() - 1);
    for (int64_t i = 0; i < n; ++i) perm[cursor[owner[i]]++] = i;
  }

  // 3. Per owner, in parallel: unique ids in first-occurrence order and the
  //    index of every value among them.
  at::Tensor inverse = at::empty({n}, at::kInt);
  int32_t* inv = inverse.data_ptr<int32_t>();
  std::vector<std::vector<int64_t>> uniques(static_cast<size_t>(world_size));
  at::parallel_for(0, world_size, 1, [&](int64_t ob, int64_t oe) {
    for (int64_t o = ob; o < oe; ++o) {
      const int64_t b = value_begin[o], e = value_begin[o + 1];
      UniqueIndex index(e - b);
      for (int64_t j = b; j < e; ++j) inv[j] = index.insert(key[perm[j]], &uniques[o]);
    }
  });
  at::Tensor unique_counts = at::empty({world_size}, at::kLong);
  int64_t total = 0;
  for (int64_t o = 0; o < world_size; ++o) {
    unique_counts.data_ptr<int64_t>()[o] = static_cast<int64_t>(uniques[o].size());
    total += static_cast<int64_t>(uniques[o].size());
  }
  at::Tensor unique_ids = at::empty({total}, at::kLong);
  int64_t* u = unique_ids.data_ptr<int64_t>();
  for (int64_t o = 0; o < world_size; ++o) u = std::copy(uniques[o].begin(), uniques[o].end(), u);
  return {unique_ids, unique_counts, inverse, value_counts, value_perm, bag_lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("owner_of", &owner_of_cpu);
  m.impl("bucketize_dedup", &bucketize_dedup_cpu);
}

}  // namespace recis
