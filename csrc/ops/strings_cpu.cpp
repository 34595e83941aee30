// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernel of hash_strings: XXH64 over Arrow-style string buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../hashtable/xxhash64.h"
#include "checks.h"

namespace recis {
namespace {

template <typename Offset>
void hash_all(const uint8_t* data, const Offset* off, int64_t n, int64_t data_len, uint64_t seed, int64_t* out) {
  at::parallel_for(0, n, 2048, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t s = static_cast<int64_t>(off[i]), t = static_cast<int64_t>(off[i + 1]);
      TORCH_CHECK(s >= 0 && s <= t && t <= data_len, "recis::hash_strings: string ", i, " spans bytes [", s, ", ",
                  t, ") outside the ", data_len, "-byte data buffer (corrupt offsets)");
      out[i] = static_cast<int64_t>(hashtable::xxh64(data + s, static_cast<size_t>(t - s), seed));
    }
  });
}

at::Tensor hash_strings_cpu(const at::Tensor& data, const at::Tensor& offsets, int64_t seed) {
  const char* op = "recis::hash_strings";
  check_cpu_1d(data, op, "data", at::kByte);
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 1 &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
              op, ": offsets must be a 1-D int32 or int64 CPU tensor, got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(offsets.numel() >= 1, op, ": offsets must have at least one entry");
  const int64_t n = offsets.numel() - 1;
  at::Tensor out = at::empty({n}, at::kLong);
  if (n == 0) return out;
  const auto data_c = data.contiguous();
  const auto off_c = offsets.contiguous();
  const uint8_t* d = data_c.data_ptr<uint8_t>();
  const uint64_t s = static_cast<uint64_t>(seed);
  if (off_c.scalar_type() == at::kInt) {
    hash_all(d, off_c.data_ptr<int32_t>(), n, data_c.numel(), s, out.data_ptr<int64_t>());
  } else {
    hash_all(d, off_c.data_ptr<int64_t>(), n, data_c.numel(), s, out.data_ptr<int64_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("hash_strings", &hash_strings_cpu); }

}  // namespace recis
