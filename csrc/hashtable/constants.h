// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Constants the ops, the CUDA kernels and Python share. Python reads every
// enum of the project from the op library (recis_torchrec.ops.constants), so
// its codes cannot drift from these. Torch-free.
#pragma once

#include <cstdint>

namespace recis {
namespace hashtable {

// How a bag's rows are pooled.
enum class PoolingMode : int32_t {
  kSum = 0,
  kMean = 1,
};

// The columns of a row's exported metadata: (last_seen, last_update, freq).
constexpr int64_t kRowMetaColumns = 3;

}  // namespace hashtable
}  // namespace recis
