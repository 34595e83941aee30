// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// Host launchers of the CUDA feature kernels (features_cuda.cu). Pointers are
// device pointers; nothing is allocated; every launch is asynchronous on
// `stream` and returns the launch's error (cudaSuccess when there is nothing
// to launch); the callers check it (C10_CUDA_CHECK). A null `seeds` in launch_hash means no hash (mod only); a null
// weights output means unweighted.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace recis {
namespace features {

cudaError_t launch_hash(const int64_t* values, const int64_t* seg_in, const int64_t* seg_out, int64_t num_segments,
                 const uint64_t* seeds, const uint64_t* moduli, int64_t total, int64_t* out, cudaStream_t stream);

cudaError_t launch_copy_weights(const float* weights, const int64_t* seg_in, const int64_t* seg_out, int64_t num_segments,
                         int64_t total, float* out, cudaStream_t stream);

cudaError_t launch_truncate(const int64_t* values, const float* weights, const int64_t* in_bag_offsets,
                     const int64_t* src_bag, const int64_t* out_offsets, const int64_t* out_lengths,
                     const int64_t* from_end_per_bag, int64_t num_bags, int64_t* out, float* out_w,
                     cudaStream_t stream);

cudaError_t launch_cross(const int64_t* values, const float* weights, const int64_t* in_bag_offsets, const int64_t* left_bag,
                  const int64_t* right_bag, const int64_t* out_offsets, const uint64_t* seeds,
                  const uint64_t* moduli, int64_t batch, int64_t num_bags, int64_t* out, float* out_w,
                  cudaStream_t stream);

cudaError_t launch_bucketize(const float* dense, int64_t num_columns, const int64_t* columns, const float* boundaries,
                      const int64_t* boundary_offsets, int64_t batch, int64_t total, int64_t* out,
                      cudaStream_t stream);

}  // namespace features
}  // namespace recis
