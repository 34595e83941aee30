// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels that turn Arrow column buffers into model tensors in one pass:
// arrow_scalar_ids (nullable integer id columns -> KJT lengths and values) and
// arrow_dense (nullable numeric columns -> a (B, C) float32 matrix). The
// Python side passes each column's value buffer (already offset to its first
// row) and its validity bitmap with the bitmap's bit offset, zero-copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace recis {
namespace {

inline bool valid_bit(const uint8_t* bitmap, int64_t bit) { return (bitmap[bit >> 3] >> (bit & 7)) & 1; }

void check_columns(const char* op, at::TensorList values, at::TensorList validity, at::IntArrayRef bit_offsets,
                   int64_t num_rows) {
  TORCH_CHECK(values.size() == validity.size() && values.size() == bit_offsets.size(), op,
              ": values, validity and bit_offsets must have one entry per column, got ", values.size(), ", ",
              validity.size(), ", ", bit_offsets.size());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  for (size_t c = 0; c < values.size(); ++c) {
    TORCH_CHECK(values[c].device().is_cpu() && values[c].dim() == 1 && values[c].is_contiguous(), op, ": column ", c,
                " values must be a contiguous 1-D CPU tensor");
    TORCH_CHECK(values[c].numel() >= num_rows, op, ": column ", c, " has ", values[c].numel(), " values for ",
                num_rows, " rows");
    if (validity[c].numel() > 0) {
      TORCH_CHECK(validity[c].scalar_type() == at::kByte && validity[c].is_contiguous(), op, ": column ", c,
                  " validity must be a contiguous uint8 bitmap");
      TORCH_CHECK(bit_offsets[c] >= 0 && validity[c].numel() * 8 >= bit_offsets[c] + num_rows, op, ": column ", c,
                  " validity bitmap is too short for ", num_rows, " rows at bit offset ", bit_offsets[c]);
    }
  }
}

template <typename T>
int64_t copy_ids(const T* src, const uint8_t* bitmap, int64_t bit0, int64_t n, int64_t* lengths, int64_t* out) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = bitmap == nullptr || valid_bit(bitmap, bit0 + i);
    lengths[i] = ok;
    if (ok) out[k++] = static_cast<int64_t>(src[i]);
  }
  return k;
}

std::tuple<at::Tensor, at::Tensor> arrow_scalar_ids_cpu(at::TensorList values, at::TensorList validity,
                                                        at::IntArrayRef bit_offsets, int64_t num_rows) {
  const char* op = "recis::arrow_scalar_ids";
  check_columns(op, values, validity, bit_offsets, num_rows);
  const int64_t C = static_cast<int64_t>(values.size());
  at::Tensor lengths = at::empty({C * num_rows}, at::kLong);
  // Values per column: the valid count, known from the bitmap's popcount.
  std::vector<int64_t> begin(static_cast<size_t>(C) + 1, 0);
  for (int64_t c = 0; c < C; ++c) {
    int64_t valid = num_rows;
    if (validity[c].numel() > 0) {
      const uint8_t* bm = validity[c].data_ptr<uint8_t>();
      valid = 0;
      for (int64_t i = 0; i < num_rows; ++i) valid += valid_bit(bm, bit_offsets[c] + i);
    }
    begin[c + 1] = begin[c] + valid;
  }
  at::Tensor out = at::empty({begin[C]}, at::kLong);
  int64_t* len = lengths.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const uint8_t* bm = validity[c].numel() > 0 ? validity[c].data_ptr<uint8_t>() : nullptr;
      int64_t* dst = o + begin[c];
      int64_t* l = len + c * num_rows;
      switch (values[c].scalar_type()) {
        case at::kLong:
          copy_ids(values[c].data_ptr<int64_t>(), bm, bit_offsets[c], num_rows, l, dst);
          break;
        case at::kInt:
          copy_ids(values[c].data_ptr<int32_t>(), bm, bit_offsets[c], num_rows, l, dst);
          break;
        default:
          TORCH_CHECK(false, op, ": column ", c, " ids must be int64 or int32, got ", values[c].scalar_type());
      }
    }
  });
  return {out, lengths};
}

template <typename T>
void fill_dense(const T* src, const uint8_t* bitmap, int64_t bit0, int64_t n, float fallback, float* out,
                int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = bitmap == nullptr || valid_bit(bitmap, bit0 + i);
    out[i * stride] = ok ? static_cast<float>(src[i]) : fallback;
  }
}

at::Tensor arrow_dense_cpu(at::TensorList values, at::TensorList validity, at::IntArrayRef bit_offsets,
                           at::ArrayRef<double> defaults, int64_t num_rows) {
  const char* op = "recis::arrow_dense";
  check_columns(op, values, validity, bit_offsets, num_rows);
  const int64_t C = static_cast<int64_t>(values.size());
  TORCH_CHECK(static_cast<int64_t>(defaults.size()) == C, op, ": defaults must have one entry per column");
  at::Tensor out = at::empty({num_rows, C}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const uint8_t* bm = validity[c].numel() > 0 ? validity[c].data_ptr<uint8_t>() : nullptr;
      const float d = static_cast<float>(defaults[c]);
      switch (values[c].scalar_type()) {
        case at::kFloat:
          fill_dense(values[c].data_ptr<float>(), bm, bit_offsets[c], num_rows, d, o + c, C);
          break;
        case at::kDouble:
          fill_dense(values[c].data_ptr<double>(), bm, bit_offsets[c], num_rows, d, o + c, C);
          break;
        case at::kLong:
          fill_dense(values[c].data_ptr<int64_t>(), bm, bit_offsets[c], num_rows, d, o + c, C);
          break;
        case at::kInt:
          fill_dense(values[c].data_ptr<int32_t>(), bm, bit_offsets[c], num_rows, d, o + c, C);
          break;
        case at::kChar:
          fill_dense(values[c].data_ptr<int8_t>(), bm, bit_offsets[c], num_rows, d, o + c, C);
          break;
        default:
          TORCH_CHECK(false, op, ": column ", c, " must be float32, float64, int64, int32 or int8, got ",
                      values[c].scalar_type());
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("arrow_scalar_ids", &arrow_scalar_ids_cpu);
  m.impl("arrow_dense", &arrow_dense_cpu);
}

}  // namespace recis
