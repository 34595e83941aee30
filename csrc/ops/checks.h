// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Argument checks shared by the CPU op entry points. Every message names the
// op and the argument.
#pragma once

#include <ATen/ATen.h>

#include "../hashtable/row_types.h"
#include <c10/util/Exception.h>

namespace recis {

inline void check_cpu_1d(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Checks the KJT-style offsets (F*B+1,) against `num_values`: starts at 0,
// never decreases, ends at num_values. Names the first bad feature index.
inline void check_bag_offsets(const at::Tensor& offsets, int64_t num_features, int64_t num_values, const char* op) {
  check_cpu_1d(offsets, op, "offsets", at::kLong);
  TORCH_CHECK(num_features > 0, op, ": at least one feature is required");
  const int64_t n = offsets.numel();
  TORCH_CHECK(n >= 1 && (n - 1) % num_features == 0, op, ": offsets has ", n,
              " entries, which is not num_features * batch_size + 1 with num_features = ", num_features);
  const int64_t batch = (n - 1) / num_features;
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(o[i] >= o[i - 1], op, ": offsets decrease inside feature index ",
                batch > 0 ? (i - 1) / batch : 0, " (negative length at bag ", i - 1, ")");
  }
  TORCH_CHECK(o[n - 1] == num_values, op, ": offsets end at ", o[n - 1], " but there are ", num_values,
              " values (lengths do not sum to the number of values)");
}

// The torch dtype of a table's embedding elements.
inline at::ScalarType row_scalar_type(hashtable::RowType t) {
  switch (t) {
    case hashtable::RowType::kF16:
      return at::kHalf;
    case hashtable::RowType::kBF16:
      return at::kBFloat16;
    default:
      return at::kFloat;
  }
}

}  // namespace recis
