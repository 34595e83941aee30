// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// XXH64 (xxHash, 64-bit), the project's one string hash: string ids are
// hashed with it (seed 0 unless a feature asks for a salt) and the result's
// bits are read as an int64 id. Written from the published algorithm; checked
// against the reference implementation's test vectors in tests/. Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#include "xxh64_core.h"

namespace recis {
namespace hashtable {

namespace xxh64_detail {

using namespace recis::xxh64;

inline uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts (x86-64, aarch64)
}
inline uint32_t read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t merge_round(uint64_t acc, uint64_t val) {
  acc ^= round(0, val);
  return acc * kP1 + kP4;
}

// The tail (fewer than 32 bytes) and the final mix, shared by the one-shot
// hash and the stream.
inline uint64_t finish(uint64_t h, const uint8_t* p, const uint8_t* end) {
  while (p + 8 <= end) {
    h = lane(h, read64(p));
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(read32(p)) * kP1;
    h = rotl(h, 23) * kP2 + kP3;
    p += 4;
  }
  while (p < end) {
    h ^= static_cast<uint64_t>(*p) * kP5;
    h = rotl(h, 11) * kP1;
    ++p;
  }
  return avalanche(h);
}

inline uint64_t converge(const uint64_t v[4]) {
  uint64_t h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
  for (int i = 0; i < 4; ++i) h = merge_round(h, v[i]);
  return h;
}

}  // namespace xxh64_detail

inline uint64_t xxh64(const void* data, size_t len, uint64_t seed) {
  using namespace xxh64_detail;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint8_t* const end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v[4] = {seed + kP1 + kP2, seed + kP2, seed, seed - kP1};
    const uint8_t* const limit = end - 32;
    do {
      v[0] = round(v[0], read64(p));
      v[1] = round(v[1], read64(p + 8));
      v[2] = round(v[2], read64(p + 16));
      v[3] = round(v[3], read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = converge(v);
  } else {
    h = seed + kP5;
  }
  return finish(h + static_cast<uint64_t>(len), p, end);
}

// XXH64 of bytes that arrive in pieces: update() with each piece in order, then
// digest(); equal to xxh64() of the concatenation.
class Xxh64Stream {
 public:
  explicit Xxh64Stream(uint64_t seed = 0)
      : v_{seed + recis::xxh64::kP1 + recis::xxh64::kP2, seed + recis::xxh64::kP2, seed, seed - recis::xxh64::kP1}, seed_(seed) {}

  void update(const void* data, size_t len) {
    using namespace xxh64_detail;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    const uint8_t* const end = p + len;
    total_ += len;
    if (buffered_ + len < 32) {
      std::memcpy(buf_ + buffered_, p, len);
      buffered_ += len;
      return;
    }
    if (buffered_) {  // complete the stripe held from the last piece
      const size_t take = 32 - buffered_;
      std::memcpy(buf_ + buffered_, p, take);
      stripe(buf_);
      p += take;
      buffered_ = 0;
    }
    for (; p + 32 <= end; p += 32) stripe(p);
    buffered_ = static_cast<size_t>(end - p);
    std::memcpy(buf_, p, buffered_);
  }

  uint64_t digest() const {
    using namespace xxh64_detail;
    const uint64_t h = total_ >= 32 ? converge(v_) : seed_ + kP5;
    return finish(h + total_, buf_, buf_ + buffered_);
  }

 private:
  void stripe(const uint8_t* p) {
    using namespace xxh64_detail;
    for (int i = 0; i < 4; ++i) v_[i] = round(v_[i], read64(p + 8 * i));
  }

  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t buf_[32];
  size_t buffered_ = 0;
};

}  // namespace hashtable
}  // namespace recis
