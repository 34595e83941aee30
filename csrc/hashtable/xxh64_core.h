// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The XXH64 primitives shared by the string hash (xxhash64.h) and the id and
// cross hashes of the feature ops (csrc/features/feature_kernels.h), usable
// from host and device code. Torch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RECIS_HD __host__ __device__ __forceinline__
#else
#define RECIS_HD inline
#endif

namespace recis {
namespace xxh64 {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ULL;

RECIS_HD uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

RECIS_HD uint64_t round(uint64_t acc, uint64_t input) {
  acc += input * kP2;
  acc = rotl(acc, 31);
  return acc * kP1;
}

// Folds one 8-byte little-endian word of the tail into the state.
RECIS_HD uint64_t lane(uint64_t h, uint64_t word) {
  h ^= round(0, word);
  return rotl(h, 27) * kP1 + kP4;
}

RECIS_HD uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

}  // namespace xxh64
}  // namespace recis
