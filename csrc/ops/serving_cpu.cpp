// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Read-only served tables (serving.h).
//
// A served table is plain tensors: an open-addressing index (keys (C,) int64,
// rows (C,) int32, -1 = empty slot) over its ids, and its rows packed densely,
// (n, dim) float32/float16/bfloat16 or, row-wise INT8, (n, dim + 8) uint8 as
// FBGEMM's fused 8-bit row-wise layout stores them (dim bytes, then a float
// scale and a float bias). No state, no locks: requests read it concurrently,
// and an update builds new tensors.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../hashtable/constants.h"
#include "../hashtable/hash.h"
#include "../hashtable/initializer.h"
#include "checks.h"
#include "pooling.h"
#include "serving.h"

namespace recis {
namespace {

using namespace pooling;  // NOLINT: the shared kernels
constexpr int64_t kSum = static_cast<int64_t>(hashtable::PoolingMode::kSum);
constexpr int64_t kMean = static_cast<int64_t>(hashtable::PoolingMode::kMean);

// Index probes started ahead of the one being resolved.
constexpr int64_t kProbeAhead = 16;

inline int64_t index_slot(int64_t key, int64_t cap) {
  const uint64_t h = hashtable::mix64(static_cast<uint64_t>(key));
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * static_cast<uint64_t>(cap)) >> 64);
}

// A served table as pool_bag reads it.
struct PackedRows {
  const uint8_t* data;
  int64_t stride;  // bytes from one row to the next
  int64_t n;
  int64_t dim;
  hashtable::RowType type;
  bool zero_default;
  hashtable::InitSpec init;

  int64_t row_limit() const { return n; }
  const uint8_t* row_bytes(int64_t r) const { return data + r * stride; }
  hashtable::RowType row_type() const { return type; }
  void initial_row(int64_t key, float* dst) const {
    if (zero_default) {
      std::fill(dst, dst + dim, 0.0f);
      return;
    }
    hashtable::init_row(dst, key, dim, init);
    for (int64_t i = 0; i < dim && type != hashtable::RowType::kF32; ++i) {
      dst[i] = type == hashtable::RowType::kF16 ? hashtable::half_to_float(hashtable::float_to_half(dst[i]))
                                                : hashtable::bf16_to_float(hashtable::float_to_bf16(dst[i]));
    }
  }
};

}  // namespace


// The index over `ids` (distinct): slots = ceil(n / 0.75) + 1, linear probing.
std::tuple<at::Tensor, at::Tensor> serving_index_cpu(const at::Tensor& ids) {
  const char* op = "recis::serving_index";
  check_cpu_1d(ids, op, "ids", at::kLong);
  const at::Tensor ids_c = ids.contiguous();
  const int64_t n = ids_c.numel();
  TORCH_CHECK(n < (int64_t{1} << 31) - 1, op, ": ", n, " ids do not fit an int32 row index");
  const int64_t cap = n + (n + 2) / 3 + 1;
  at::Tensor keys = at::zeros({cap}, at::kLong);
  at::Tensor rows = at::full({cap}, -1, at::kInt);
  int64_t* k = keys.data_ptr<int64_t>();
  int32_t* r = rows.data_ptr<int32_t>();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t s = index_slot(id[i], cap);
    while (r[s] >= 0) {
      TORCH_CHECK(k[s] != id[i], op, ": id ", id[i], " appears twice");
      if (++s == cap) s = 0;
    }
    k[s] = id[i];
    r[s] = static_cast<int32_t>(i);
  }
  return {keys, rows};
}

// Pools bags of `ids` (offsets (B + 1,)) from a served table: (B, dim) float32.
// Unseen ids read zeros (init_kind -1) or their deterministic initial row.
// Float rows pool exactly as the training table's forward pools them.
at::Tensor serving_pooled_cpu(const at::Tensor& index_keys, const at::Tensor& index_rows, const at::Tensor& rows,
                              int64_t row_format, const at::Tensor& ids, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& per_sample_weights, int64_t mode, int64_t init_kind,
                              double init_a, double init_b, int64_t init_seed) {
  const char* op = "recis::serving_pooled";
  check_cpu_1d(ids, op, "ids", at::kLong);
  check_cpu_1d(offsets, op, "offsets", at::kLong);
  check_cpu_1d(index_keys, op, "index_keys", at::kLong);
  check_cpu_1d(index_rows, op, "index_rows", at::kInt);
  TORCH_CHECK(index_keys.numel() == index_rows.numel() && index_keys.numel() > 0, op,
              ": index_keys and index_rows must be non-empty and of one length");
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.is_contiguous(), op,
              ": rows must be a contiguous 2-D CPU tensor, got ", rows.sizes());
  TORCH_CHECK(row_format >= kServingF32 && row_format <= kServingInt8, op, ": unknown row_format ", row_format);
  static const at::ScalarType want[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kByte};
  TORCH_CHECK(rows.scalar_type() == want[row_format], op, ": rows of format ", row_format, " must be ",
              want[row_format], ", got ", rows.scalar_type());
  TORCH_CHECK(mode == kSum || mode == kMean, op, ": mode must be 0 (sum) or 1 (mean), got ", mode);
  const int64_t dim = row_format == kServingInt8 ? rows.size(1) - 8 : rows.size(1);
  TORCH_CHECK(dim > 0, op, ": rows have no embedding columns");
  const int64_t n = rows.size(0), N = ids.numel(), B = offsets.numel() - 1;
  TORCH_CHECK(B >= 0, op, ": offsets must have at least one entry");
  const at::Tensor ids_c = ids.contiguous(), off_c = offsets.contiguous();
  const int64_t* key = ids_c.data_ptr<int64_t>();
  const int64_t* off = off_c.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[B] == N, op, ": offsets must run from 0 to the number of ids (", N, "), got ",
              off[0], " .. ", off[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(off[b] <= off[b + 1], op, ": offsets decrease at bag ", b);
  }
  const float* w = nullptr;
  at::Tensor w_c;
  if (per_sample_weights.has_value()) {
    w_c = per_sample_weights->contiguous();
    check_cpu_1d(w_c, op, "per_sample_weights", at::kFloat);
    TORCH_CHECK(w_c.numel() == N, op, ": ", w_c.numel(), " per-sample weights for ", N, " ids");
    w = w_c.data_ptr<float>();
  }
  PackedRows table{static_cast<const uint8_t*>(rows.data_ptr()), rows.size(1) * static_cast<int64_t>(rows.element_size()),
                   n, dim, row_format == kServingF16 ? hashtable::RowType::kF16
                           : row_format == kServingBF16 ? hashtable::RowType::kBF16 : hashtable::RowType::kF32,
                   init_kind < 0, {}};
  if (init_kind >= 0) {
    table.init = hashtable::InitSpec{static_cast<hashtable::InitKind>(init_kind), static_cast<float>(init_a),
                                     static_cast<float>(init_b), static_cast<uint64_t>(init_seed)};
  }
  // Rows of the ids, -1 where unseen.
  std::vector<int64_t> row(static_cast<size_t>(N));
  const int64_t cap = index_keys.numel();
  const int64_t* ik = index_keys.data_ptr<int64_t>();
  const int32_t* ir = index_rows.data_ptr<int32_t>();
  at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i + kProbeAhead < e) {  // the probes are cache misses: start the later ones now
        const int64_t sj = index_slot(key[i + kProbeAhead], cap);
        __builtin_prefetch(ir + sj);
        __builtin_prefetch(ik + sj);
      }
      int64_t s = index_slot(key[i], cap), r;
      while ((r = ir[s]) >= 0 && ik[s] != key[i]) {
        if (++s == cap) s = 0;
      }
      TORCH_CHECK(r < n, op, ": the index points at row ", r, " of a table of ", n, " rows (corrupt index)");
      row[i] = r;
    }
  });
  at::Tensor out = at::empty({B, dim}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t qb, int64_t qe) {
    std::vector<float> buf(static_cast<size_t>(dim));
    if (row_format == kServingInt8) {
      for (int64_t q = qb; q < qe; ++q) {
        float* dst = o + q * dim;
        std::fill(dst, dst + dim, 0.0f);
        for (int64_t i = off[q]; i < off[q + 1]; ++i) {
          const int64_t j = i + kPrefetchDistance;
          if (j < N && row[j] >= 0) prefetch_bytes(table.row_bytes(row[j]), dim + 8);
          const float wi = w ? w[i] : 1.0f;
          if (row[i] >= 0) {
            const uint8_t* p = table.row_bytes(row[i]);
            float scale, bias;
            std::memcpy(&scale, p + dim, 4);
            std::memcpy(&bias, p + dim + 4, 4);
            const float a = wi * scale, c = wi * bias;
            for (int64_t d = 0; d < dim; ++d) dst[d] += a * static_cast<float>(p[d]) + c;
          } else {
            table.initial_row(key[i], buf.data());
            axpy<0>(dst, buf.data(), wi, dim);
          }
        }
        if (mode == kMean && off[q + 1] > off[q]) {
          const float scale = 1.0f / static_cast<float>(off[q + 1] - off[q]);
          for (int64_t d = 0; d < dim; ++d) dst[d] *= scale;
        }
      }
      return;
    }
    dispatch_row_type(table.row_type(), [&](auto elem) {
      dispatch_dim(dim, [&](auto kd) {
        for (int64_t q = qb; q < qe; ++q) {
          pool_bag<decltype(kd)::value, decltype(elem), PackedRows>(o + q * dim, dim, table, 0, row.data(), key, w,
                                                                    off[q], off[q + 1], off[B], mode == kMean,
                                                                    buf.data());
        }
      });
    });
  });
  return out;
}

}  // namespace recis
