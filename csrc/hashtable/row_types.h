// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Row element types: the embedding part of a row is stored as float32, float16
// or bfloat16 (optimizer state stays float32, as FBGEMM keeps it). Arithmetic
// is always float32: rows are widened on load and rounded to nearest-even on
// store. Torch-free.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace recis {
namespace hashtable {

enum class RowType : int32_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
};

inline int64_t element_bytes(RowType t) { return t == RowType::kF32 ? 4 : 2; }

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The conversions in portable C++ (what builds without F16C use; checked against F16C in tests/).
inline float half_to_float_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal: normalise.
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_to_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (man << 13));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even; overflow gives inf, NaN stays a NaN.
inline uint16_t float_to_half_portable(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal, or zero
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
    // The value in units of 2^-24 (the subnormal step) is man24 >> (126 - exp), rounded.
    const uint32_t exp = abs >> 23;
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t drop = 126 - exp;  // 14 .. 24
    uint32_t v = man >> drop;
    const uint32_t rem = man & ((1u << drop) - 1u), half = 1u << (drop - 1);
    if (rem > half || (rem == half && (v & 1u))) ++v;  // 1024 becomes the smallest normal: still right
    return static_cast<uint16_t>(sign | v);
  }
  uint32_t v = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
  return static_cast<uint16_t>(sign | v);
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_to_float_portable(h);
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  return float_to_half_portable(f);
#endif
}

// dst[0, n) = the n elements at src, as float32.
inline void load_elements(const void* src, RowType t, float* dst, int64_t n) {
  if (t == RowType::kF32) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (t == RowType::kF16) {
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    }
#endif
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
      const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    }
#endif
    for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  }
}

// The n floats at src stored as elements of type t at dst (rounded to nearest even).
inline void store_elements(void* dst, RowType t, const float* src, int64_t n) {
  if (t == RowType::kF32) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  if (t == RowType::kF16) {
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {
    for (; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

}  // namespace hashtable
}  // namespace recis
