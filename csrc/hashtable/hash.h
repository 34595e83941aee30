// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Mixing hashes used by the hashtable core. Torch-free.
#pragma once

#include <cstdint>

// Host and device: the CUDA tables (csrc/cuda/) use the same hashes, so an id
// has the same owner rank and the same initial row on either device.
#ifdef __CUDACC__
#define RECIS_HD __host__ __device__
#else
#define RECIS_HD
#endif

namespace recis {
namespace hashtable {

// MurmurHash3's 64-bit finaliser (fmix64). A bijection on uint64, so distinct
// keys never collide in the full 64-bit hash; its avalanche spreads sequential
// ids over all bits, which both the IDMap slot/shard choice and the owner-rank
// choice of the sharder rely on.
RECIS_HD inline uint64_t mix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

// SplitMix64 step: the counter-based generator behind per-id initialisation.
RECIS_HD inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The rank that owns `key` among `world_size` ranks: a salted mix (so that the
// owner does not correlate with the IdMap's shard and slot bits, which use the
// unsalted mix64) reduced by multiply-shift, so sequential ids spread evenly.
// Checkpoints reshard with the same function.
RECIS_HD inline int64_t owner_of(int64_t key, int64_t world_size) {
  const uint64_t h = mix64(static_cast<uint64_t>(key) ^ 0x5851f42d4c957f2dULL);
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(__umul64hi(h, static_cast<uint64_t>(world_size)));
#else
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * static_cast<uint64_t>(world_size)) >> 64);
#endif
}

// Uniform float in [0, 1) from the top 24 bits of a 64-bit word.
RECIS_HD inline float unit_float(uint64_t x) {
  return static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
}

}  // namespace hashtable
}  // namespace recis
