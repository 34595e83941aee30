// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels over Arrow-style string buffers: hash_strings (XXH64 of each
// string) and parse_id_lists (delimited id lists, as CSV/TSV fields hold them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

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

namespace recis {
namespace {

// An id field: a decimal int64 written canonically (no leading zero, no "-0") is that integer;
// anything else is the XXH64 of its bytes. The Python loader's rule (io/arrow.py) is the same.
inline int64_t parse_id(const uint8_t* s, int64_t n, uint64_t seed) {
  const bool neg = n > 0 && s[0] == '-';
  const int64_t digits = n - (neg ? 1 : 0);
  const uint8_t* d = s + (neg ? 1 : 0);
  bool is_int = digits >= 1 && digits <= 19 && !(digits > 1 && d[0] == '0') && !(neg && digits == 1 && d[0] == '0');
  uint64_t v = 0;
  for (int64_t i = 0; is_int && i < digits; ++i) {
    if (d[i] < '0' || d[i] > '9') {
      is_int = false;
      break;
    }
    v = v * 10 + static_cast<uint64_t>(d[i] - '0');  // 19 digits fit in uint64
  }
  if (is_int && (neg ? v <= (uint64_t{1} << 63) : v <= (uint64_t{1} << 63) - 1)) {
    return neg ? static_cast<int64_t>(~v + 1) : static_cast<int64_t>(v);
  }
  return static_cast<int64_t>(hashtable::xxh64(s, static_cast<size_t>(n), seed));
}

// Calls fn(begin, length) for each non-empty item of s[0, n) split by `delim` (the whole string
// when delim is empty).
template <typename Fn>
inline void for_each_item(const uint8_t* s, int64_t n, const std::string& delim, Fn fn) {
  if (delim.empty()) {
    if (n > 0) fn(s, n);
    return;
  }
  const int64_t k = static_cast<int64_t>(delim.size());
  int64_t start = 0;
  for (int64_t i = 0; i + k <= n;) {
    if (std::memcmp(s + i, delim.data(), static_cast<size_t>(k)) == 0) {
      if (i > start) fn(s + start, i - start);
      i += k;
      start = i;
    } else {
      ++i;
    }
  }
  if (n > start) fn(s + start, n - start);
}

template <typename Offset>
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> parse_lists(
    const uint8_t* data, const Offset* off, const bool* nulls, int64_t rows, int64_t data_len,
    const std::string& delim, const std::string& wdelim, uint64_t seed, const std::string& column) {
  const char* op = "recis::parse_id_lists";
  at::Tensor lengths = at::zeros({rows}, at::kLong);
  int64_t* len = lengths.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1024, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t s = static_cast<int64_t>(off[r]), t = static_cast<int64_t>(off[r + 1]);
      TORCH_CHECK(s >= 0 && s <= t && t <= data_len, op, ": column '", column, "': row ", r, " spans bytes [", s,
                  ", ", t, ") outside the ", data_len, "-byte data buffer (corrupt offsets)");
      if (nulls != nullptr && nulls[r]) continue;
      int64_t c = 0;
      for_each_item(data + s, t - s, delim, [&](const uint8_t*, int64_t) { ++c; });
      len[r] = c;
    }
  });
  at::Tensor starts = at::cat({at::zeros({1}, at::kLong), lengths.cumsum(0)});
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t total = st[rows];
  at::Tensor ids = at::empty({total}, at::kLong);
  int64_t* out = ids.data_ptr<int64_t>();
  c10::optional<at::Tensor> weights;
  float* w = nullptr;
  if (!wdelim.empty()) {
    weights = at::empty({total}, at::kFloat);
    w = weights->data_ptr<float>();
  }
  const int64_t wk = static_cast<int64_t>(wdelim.size());
  at::parallel_for(0, rows, 1024, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (nulls != nullptr && nulls[r]) continue;
      const int64_t s = static_cast<int64_t>(off[r]), t = static_cast<int64_t>(off[r + 1]);
      int64_t k = st[r];
      for_each_item(data + s, t - s, delim, [&](const uint8_t* item, int64_t n) {
        int64_t id_len = n;
        if (w != nullptr) {
          // "id<wdelim>weight": split at the last weight delimiter; no weight (or an empty one) weighs 1.
          float weight = 1.0f;
          for (int64_t i = n - wk; i >= 0; --i) {
            if (std::memcmp(item + i, wdelim.data(), static_cast<size_t>(wk)) == 0) {
              id_len = i;
              const int64_t wl = n - i - wk;
              if (wl > 0) {
                char buf[64];
                TORCH_CHECK(wl < 64, op, ": column '", column, "': row ", r, ": an item's weight is not a number");
                std::memcpy(buf, item + i + wk, static_cast<size_t>(wl));
                buf[wl] = 0;
                char* end = nullptr;
                weight = std::strtof(buf, &end);
                TORCH_CHECK(end == buf + wl, op, ": column '", column, "': row ", r, ": an item's weight '", buf,
                            "' is not a number");
              }
              break;
            }
          }
          w[k] = weight;
        }
        out[k++] = parse_id(item, id_len, seed);
      });
    }
  });
  return {lengths, ids, weights};
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> parse_id_lists_cpu(
    const at::Tensor& data, const at::Tensor& offsets, const c10::optional<at::Tensor>& nulls,
    c10::string_view delimiter, c10::string_view weight_delimiter, int64_t seed, c10::string_view column) {
  const char* op = "recis::parse_id_lists";
  check_cpu_1d(data, op, "data", at::kByte);
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 1 &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong) && offsets.numel() >= 1,
              op, ": offsets must be a non-empty 1-D int32 or int64 CPU tensor");
  const int64_t rows = offsets.numel() - 1;
  at::Tensor nulls_c;
  if (nulls.has_value()) {
    check_cpu_1d(*nulls, op, "nulls", at::kBool);
    TORCH_CHECK(nulls->numel() == rows, op, ": nulls has ", nulls->numel(), " entries for ", rows, " rows");
    nulls_c = nulls->contiguous();
  }
  const auto data_c = data.contiguous();
  const auto off_c = offsets.contiguous();
  const std::string delim(delimiter), wdelim(weight_delimiter), col(column);
  const bool* np = nulls.has_value() ? nulls_c.data_ptr<bool>() : nullptr;
  if (off_c.scalar_type() == at::kInt) {
    return parse_lists(data_c.data_ptr<uint8_t>(), off_c.data_ptr<int32_t>(), np, rows, data_c.numel(), delim, wdelim,
                       static_cast<uint64_t>(seed), col);
  }
  return parse_lists(data_c.data_ptr<uint8_t>(), off_c.data_ptr<int64_t>(), np, rows, data_c.numel(), delim, wdelim,
                     static_cast<uint64_t>(seed), col);
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("parse_id_lists", &parse_id_lists_cpu); }

}  // namespace recis
