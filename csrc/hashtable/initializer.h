// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Deterministic per-id row initialisation. Torch-free.
//
// Element j of the row of id `k` in a table seeded with `seed` is a pure
// function of (seed, k, j): the same id gets the same initial row whatever the
// arrival order, the batch, the thread or the world size.
#pragma once

#include <cmath>
#include <cstdint>

#include "hash.h"

namespace recis {
namespace hashtable {

enum class InitKind : int32_t {
  kUniform = 0,          // U(a, b)
  kNormal = 1,           // N(a, b^2): a = mean, b = std
  kTruncatedNormal = 2,  // N(a, b^2) truncated to [a - 2b, a + 2b]
  kConstant = 3,         // every element = a
};

struct InitSpec {
  InitKind kind = InitKind::kUniform;
  float a = -0.01f;
  float b = 0.01f;
  uint64_t seed = 0;
};

namespace detail {

RECIS_HD inline uint64_t row_stream(uint64_t seed, int64_t key) {
  return mix64(static_cast<uint64_t>(key) ^ mix64(seed + 0x632be59bd9b4e019ULL));
}

// Standard normal from two independent uniform words (Box-Muller, one output).
RECIS_HD inline float std_normal(uint64_t w0, uint64_t w1) {
  // u0 in (0, 1]: avoids log(0).
  const float u0 = 1.0f - unit_float(w0);
  const float u1 = unit_float(w1);
  return sqrtf(-2.0f * logf(u0)) * cosf(6.28318530717958647692f * u1);
}


// One element of a row whose stream is `stream` (see row_stream).
RECIS_HD inline float init_from_stream(uint64_t stream, int64_t j, const InitSpec& spec) {
  switch (spec.kind) {
    case InitKind::kUniform:
      return fmaf(spec.b - spec.a, unit_float(splitmix64(stream + static_cast<uint64_t>(j))), spec.a);
    case InitKind::kNormal: {
      const uint64_t c = stream + 2 * static_cast<uint64_t>(j);
      return fmaf(spec.b, std_normal(splitmix64(c), splitmix64(c + 1)), spec.a);
    }
    case InitKind::kTruncatedNormal: {
      // Redraw (deterministically, from the next counter) until |z| <= 2.
      // P(|z| > 2) ~ 4.6%, so the bounded loop virtually never runs out;
      // if it does, clamp so the value stays inside the documented range.
      float z = 0.0f;
      for (uint64_t attempt = 0; attempt < 64; ++attempt) {
        const uint64_t c = stream ^ mix64((static_cast<uint64_t>(j) << 7) | (attempt << 1));
        z = std_normal(splitmix64(c), splitmix64(c + 1));
        if (z >= -2.0f && z <= 2.0f) break;
      }
      z = z < -2.0f ? -2.0f : (z > 2.0f ? 2.0f : z);
      return fmaf(spec.b, z, spec.a);
    }
    case InitKind::kConstant:
      return spec.a;
  }
  return 0.0f;
}

}  // namespace detail

// Element j of `key`'s initial row (what init_row writes at dst[j]). The affine
// steps are explicit fmaf, exactly rounded on host and device whatever the
// compilers' contraction settings, so a row starts the same on the CPU and GPU.
RECIS_HD inline float init_element(int64_t key, int64_t j, const InitSpec& spec) {
  return detail::init_from_stream(detail::row_stream(spec.seed, key), j, spec);
}

// Writes the initial `dim` floats of `key`'s row into dst (dim,).
inline void init_row(float* dst, int64_t key, int64_t dim, const InitSpec& spec) {
  const uint64_t stream = detail::row_stream(spec.seed, key);
  for (int64_t j = 0; j < dim; ++j) dst[j] = detail::init_from_stream(stream, j, spec);
}

}  // namespace hashtable
}  // namespace recis
