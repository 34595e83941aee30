// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Read-only served tables: the lookup library an inference package is served
// with, from Python (torch.ops.recis.serving_index / serving_pooled) and from
// the C++ runner (csrc/serving/runner.cpp), which links it without Python.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace recis {

// Row formats of a served table.
constexpr int64_t kServingF32 = 0, kServingF16 = 1, kServingBF16 = 2, kServingInt8 = 3;

// The index over `ids` (distinct): (keys (C,) int64, rows (C,) int32, -1 = empty slot).
std::tuple<at::Tensor, at::Tensor> serving_index_cpu(const at::Tensor& ids);

// Pools bags of `ids` (offsets (B + 1,)) from a served table: (B, dim) float32, sum (mode 0) or
// mean (1). Unseen ids read zeros (init_kind -1) or their deterministic initial row.
at::Tensor serving_pooled_cpu(const at::Tensor& index_keys, const at::Tensor& index_rows, const at::Tensor& rows,
                              int64_t row_format, const at::Tensor& ids, const at::Tensor& offsets,
                              const std::optional<at::Tensor>& per_sample_weights, int64_t mode, int64_t init_kind,
                              double init_a, double init_b, int64_t init_seed);

}  // namespace recis
