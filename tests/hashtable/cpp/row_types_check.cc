// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The portable float16 conversions of csrc/hashtable/row_types.h (used by builds without F16C)
// against the F16C instructions: every half to float, and floats to half for every float whose
// upper 20 bits are given (all exponents, all rounding cases near a half's ulp) plus edge values.
// bfloat16 stores against the round-to-nearest-even definition. Built with -mf16c.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <immintrin.h>
#include <initializer_list>

#include "row_types.h"

using namespace recis::hashtable;

static bool same_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  return float_to_bits(a) == float_to_bits(b);
}

int main() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float want = _cvtsh_ss(static_cast<uint16_t>(h));
    if (!same_float(half_to_float_portable(static_cast<uint16_t>(h)), want)) {
      std::printf("half_to_float(0x%04x) differs\n", h);
      return 1;
    }
  }
  // Every float with its low 12 bits 0x000, 0x800 (a tie at half precision), 0x801, 0x7ff and 0xfff.
  const uint32_t lows[] = {0x000u, 0x800u, 0x801u, 0x7ffu, 0xfffu, 0x1000u};
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t low : lows) {
      const uint32_t u = (hi << 13) ^ low;
      for (uint32_t sign : {0u, 0x80000000u}) {
        const float f = bits_to_float(u | sign);
        const uint16_t want = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
        const uint16_t got = float_to_half_portable(f);
        const bool nan = std::isnan(f);
        if (nan ? ((got & 0x7c00u) != 0x7c00u || (got & 0x3ffu) == 0) : got != want) {
          std::printf("float_to_half(0x%08x) = 0x%04x, F16C gives 0x%04x\n", u | sign, got, want);
          return 1;
        }
      }
    }
  }
  // bfloat16: nearest even of the upper 16 bits.
  const float cases[] = {1.0f, 1.00390625f, 1.005859375f, 1.0078125f, -3.14159f, 1e-40f, 3.4e38f, 0.0f, -0.0f};
  const uint16_t want_bf16[] = {0x3f80, 0x3f80, 0x3f81, 0x3f81, 0xc049, 0x0001, 0x7f80, 0x0000, 0x8000};
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    if (float_to_bf16(cases[i]) != want_bf16[i]) {
      std::printf("float_to_bf16(%g) = 0x%04x, expected 0x%04x\n", cases[i], float_to_bf16(cases[i]), want_bf16[i]);
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}
