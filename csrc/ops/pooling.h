// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The pooling kernels the training forward (embedding_bag_cpu.cpp) and the
// served tables (serving_cpu.cpp) share: row element types, dispatch on the
// row type and the dim, and pool_bag, which pools one bag of rows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../hashtable/row_types.h"

namespace recis {
namespace pooling {

// Rows prefetched ahead in the pooled forward (tuned on the DESIGN.md shape: 10-16
// is best for both uniform and Zipf ids).
constexpr int64_t kPrefetchDistance = 16;
constexpr int64_t kUpdatePrefetch = 4;
// Gradient rows prefetched ahead when summing a row's contributions.
constexpr int64_t kGradPrefetch = 16;

inline void prefetch_row(const float* p, int64_t dim) {
  for (int64_t k = 0; k < dim; k += 16) __builtin_prefetch(p + k);
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k);
}

// Row element types as compile-time tags: T is the stored element; load8 widens 8 of them.
typedef float v8f __attribute__((vector_size(32)));

struct ElemF32 {
  using T = float;
  static inline v8f load8(const float* p) {
    v8f v;
    __builtin_memcpy(&v, p, sizeof(v8f));
    return v;
  }
  static inline float load1(const float* p) { return *p; }
};

struct ElemF16 {
  using T = uint16_t;
  static inline v8f load8(const uint16_t* p) {
    v8f v;
#if defined(__F16C__)
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __builtin_memcpy(&v, &x, sizeof(v8f));
#else
    for (int k = 0; k < 8; ++k) v[k] = hashtable::half_to_float(p[k]);
#endif
    return v;
  }
  static inline float load1(const uint16_t* p) { return hashtable::half_to_float(*p); }
};

struct ElemBF16 {
  using T = uint16_t;
  static inline v8f load8(const uint16_t* p) {
    v8f v;
#if defined(__AVX2__)
    const __m256i x = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    __builtin_memcpy(&v, &x, sizeof(v8f));
#else
    for (int k = 0; k < 8; ++k) v[k] = hashtable::bf16_to_float(p[k]);
#endif
    return v;
  }
  static inline float load1(const uint16_t* p) { return hashtable::bf16_to_float(*p); }
};

// Calls fn(Elem tag) for a table's row type.
template <typename Fn>
inline void dispatch_row_type(hashtable::RowType t, Fn&& fn) {
  switch (t) {
    case hashtable::RowType::kF16:
      fn(ElemF16{});
      break;
    case hashtable::RowType::kBF16:
      fn(ElemBF16{});
      break;
    default:
      fn(ElemF32{});
  }
}

// Calls fn(std::integral_constant<int, D>) for the common dims, so the
// per-row loops unroll and vectorise with the accumulator in registers;
// other dims take the runtime-dim path (kD = 0).
template <typename Fn>
inline void dispatch_dim(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 8:
      fn(std::integral_constant<int, 8>{});
      break;
    case 16:
      fn(std::integral_constant<int, 16>{});
      break;
    case 32:
      fn(std::integral_constant<int, 32>{});
      break;
    case 64:
      fn(std::integral_constant<int, 64>{});
      break;
    case 128:
      fn(std::integral_constant<int, 128>{});
      break;
    case 256:
      fn(std::integral_constant<int, 256>{});
      break;
    default:
      fn(std::integral_constant<int, 0>{});
  }
}

// y[0, n) += a * x[0, n), with n fixed at compile time when kD > 0.
template <int kD>
inline void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  if constexpr (kD > 0) {
#pragma omp simd
    for (int d = 0; d < kD; ++d) y[d] += a * x[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
  }
}

// A fixed-size accumulator held in vector registers: kD / 8 vectors of 8
// floats (the compiler maps them onto AVX-512, AVX2 or SSE registers).

template <int kD>
struct RegAcc {
  static_assert(kD % 8 == 0, "RegAcc needs a multiple of 8 floats");
  v8f v[kD / 8];

  inline void zero() {
#pragma GCC unroll 64
    for (int k = 0; k < kD / 8; ++k) v[k] = v8f{};
  }
  template <typename E = ElemF32>
  inline void fma(const typename E::T* __restrict x, float a) {
#pragma GCC unroll 64
    for (int k = 0; k < kD / 8; ++k) v[k] += a * E::load8(x + 8 * k);
  }
  inline void store(float* __restrict y, float scale) const {
#pragma GCC unroll 64
    for (int k = 0; k < kD / 8; ++k) {
      const v8f yk = v[k] * scale;
      __builtin_memcpy(y + 8 * k, &yk, sizeof(v8f));
    }
  }
};

// Pools one bag, values [s, e), into dst (dim,). Rows of -1 read the id's
// initial value. Rows up to prefetch_end (the end of the feature) are
// prefetched kPrefetchDistance ahead. With kD > 0 the accumulator lives in
// registers; otherwise it is dst itself. E: the rows' element type.
template <int kD, typename E, typename Table>
inline void pool_bag(float* __restrict dst, int64_t dim_arg, const Table& table, int64_t t,
                     const int64_t* row, const int64_t* key, const float* weights, int64_t s, int64_t e,
                     int64_t prefetch_end, bool mean, float* init_buf) {
  const int64_t D = kD > 0 ? kD : dim_arg;
  // Row indices run up to the high-water mark: eviction frees rows without
  // compacting the others, so live rows can sit above the live-row count.
  const int64_t num_rows = table.row_limit();
  RegAcc<(kD > 0 ? kD : 8)> acc;
  if constexpr (kD > 0) {
    acc.zero();
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
  }
  for (int64_t i = s; i < e; ++i) {
    const int64_t j = i + kPrefetchDistance;
    if (j < prefetch_end) {
      const int64_t rj = row[j];
      if (rj >= 0 && rj < num_rows) prefetch_bytes(table.row_bytes(rj), D * static_cast<int64_t>(sizeof(typename E::T)));
    }
    const int64_t r = row[i];
    if (r >= num_rows) {
      TORCH_CHECK(false, "recis::pooled_forward: rows[", i, "] = ", r, " is not a row of table ", t, " (rows below ",
                  num_rows, ")");
    }
    const float w = weights ? weights[i] : 1.0f;
    if (r >= 0) {
      const auto* p = reinterpret_cast<const typename E::T*>(table.row_bytes(r));
      if constexpr (kD > 0) {
        acc.template fma<E>(p, w);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] += w * E::load1(p + d);
      }
    } else {
      table.initial_row(key[i], init_buf);
      if constexpr (kD > 0) {
        acc.fma(init_buf, w);
      } else {
        axpy<0>(dst, init_buf, w, D);
      }
    }
  }
  const float scale = (mean && e > s) ? 1.0f / static_cast<float>(e - s) : 1.0f;
  if constexpr (kD > 0) {
    acc.store(dst, scale);
  } else if (scale != 1.0f) {
    for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
  }
}

}  // namespace pooling
}  // namespace recis
