// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CUDA kernels of the fused feature ops, torch-free: raw device pointers and
// a stream in, nothing allocated. csrc/ops/features_cuda_ops.cpp sizes the
// outputs (with torch ops on the device) and registers the CUDA dispatch key
// when the extension is built with RECIS_CUDA=1. The per-value arithmetic is
// feature_kernels.h, shared with the CPU kernels, so both give the same bits.
//
// Layouts are the CPU ops' (see csrc/ops/schema.cpp): a KJT-layout input of
// F features x B bags; `seg_out` (S + 1) are the output value offsets of the
// S output segments and `seg_in` (S) the input offset each segment reads from.
#include <cuda_runtime.h>

#include <cstdint>

#include "feature_kernels.h"
#include "features_cuda.h"

namespace recis {
namespace features {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

// The segment holding output index o: the last s with seg_out[s] <= o.
__device__ __forceinline__ int64_t segment_of(const int64_t* seg_out, int64_t num_segments, int64_t o) {
  int64_t lo = 0, hi = num_segments;  // seg_out[lo] <= o < seg_out[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (seg_out[mid] <= o) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void hash_kernel(const int64_t* values, const int64_t* seg_in, const int64_t* seg_out, int64_t S,
                            const uint64_t* seeds, const uint64_t* moduli, int64_t total, int64_t* out) {
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (o >= total) return;
  const int64_t s = segment_of(seg_out, S, o);
  const uint64_t v = static_cast<uint64_t>(values[seg_in[s] + (o - seg_out[s])]);
  out[o] = umod(seeds == nullptr ? v : hash_id(v, seeds[s]), moduli[s]);
}

__global__ void copy_weights_kernel(const float* weights, const int64_t* seg_in, const int64_t* seg_out, int64_t S,
                                    int64_t total, float* out) {
  const int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (o >= total) return;
  const int64_t s = segment_of(seg_out, S, o);
  out[o] = weights[seg_in[s] + (o - seg_out[s])];
}

__global__ void truncate_kernel(const int64_t* values, const float* weights, const int64_t* in_bag_offsets,
                                const int64_t* src_bag, const int64_t* out_offsets, const int64_t* out_lengths,
                                const int64_t* from_end_per_bag, int64_t num_bags, int64_t* out, float* out_w) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= num_bags) return;
  const int64_t bag = src_bag[j], keep = out_lengths[j];
  const int64_t start = from_end_per_bag[j] ? in_bag_offsets[bag + 1] - keep : in_bag_offsets[bag];
  for (int64_t k = 0; k < keep; ++k) {
    out[out_offsets[j] + k] = values[start + k];
    if (out_w != nullptr) out_w[out_offsets[j] + k] = weights[start + k];
  }
}

__global__ void cross_kernel(const int64_t* values, const float* weights, const int64_t* in_bag_offsets,
                             const int64_t* left_bag, const int64_t* right_bag, const int64_t* out_offsets,
                             const uint64_t* seeds, const uint64_t* moduli, int64_t batch, int64_t num_bags,
                             int64_t* out, float* out_w) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= num_bags) return;
  const int64_t p = j / batch;
  const int64_t a0 = in_bag_offsets[left_bag[j]], a1 = in_bag_offsets[left_bag[j] + 1];
  const int64_t b0 = in_bag_offsets[right_bag[j]], b1 = in_bag_offsets[right_bag[j] + 1];
  int64_t k = out_offsets[j];
  for (int64_t x = a0; x < a1; ++x) {
    for (int64_t y = b0; y < b1; ++y, ++k) {
      out[k] = umod(hash_pair(static_cast<uint64_t>(values[x]), static_cast<uint64_t>(values[y]), seeds[p]),
                    moduli[p]);
      if (out_w != nullptr) out_w[k] = weights[x] * weights[y];
    }
  }
}

__global__ void bucketize_kernel(const float* dense, int64_t num_columns, const int64_t* columns,
                                 const float* boundaries, const int64_t* boundary_offsets, int64_t batch,
                                 int64_t total, int64_t* out) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= total) return;
  const int64_t g = j / batch, b = j % batch;
  const int64_t s = boundary_offsets[g];
  out[j] = bucket_of(dense[b * num_columns + columns[g]], boundaries + s, boundary_offsets[g + 1] - s);
}

}  // namespace

cudaError_t launch_hash(const int64_t* values, const int64_t* seg_in, const int64_t* seg_out, int64_t num_segments,
                 const uint64_t* seeds, const uint64_t* moduli, int64_t total, int64_t* out, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  hash_kernel<<<blocks_for(total), kThreads, 0, stream>>>(values, seg_in, seg_out, num_segments, seeds, moduli, total,
                                                          out);
  return cudaGetLastError();
}

cudaError_t launch_copy_weights(const float* weights, const int64_t* seg_in, const int64_t* seg_out, int64_t num_segments,
                         int64_t total, float* out, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  copy_weights_kernel<<<blocks_for(total), kThreads, 0, stream>>>(weights, seg_in, seg_out, num_segments, total, out);
  return cudaGetLastError();
}

cudaError_t launch_truncate(const int64_t* values, const float* weights, const int64_t* in_bag_offsets,
                     const int64_t* src_bag, const int64_t* out_offsets, const int64_t* out_lengths,
                     const int64_t* from_end_per_bag, int64_t num_bags, int64_t* out, float* out_w,
                     cudaStream_t stream) {
  if (num_bags == 0) return cudaSuccess;
  truncate_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(values, weights, in_bag_offsets, src_bag,
                                                                  out_offsets, out_lengths, from_end_per_bag,
                                                                  num_bags, out, out_w);
  return cudaGetLastError();
}

cudaError_t launch_cross(const int64_t* values, const float* weights, const int64_t* in_bag_offsets, const int64_t* left_bag,
                  const int64_t* right_bag, const int64_t* out_offsets, const uint64_t* seeds,
                  const uint64_t* moduli, int64_t batch, int64_t num_bags, int64_t* out, float* out_w,
                  cudaStream_t stream) {
  if (num_bags == 0) return cudaSuccess;
  cross_kernel<<<blocks_for(num_bags), kThreads, 0, stream>>>(values, weights, in_bag_offsets, left_bag, right_bag,
                                                               out_offsets, seeds, moduli, batch, num_bags, out,
                                                               out_w);
  return cudaGetLastError();
}

cudaError_t launch_bucketize(const float* dense, int64_t num_columns, const int64_t* columns, const float* boundaries,
                      const int64_t* boundary_offsets, int64_t batch, int64_t total, int64_t* out,
                      cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  bucketize_kernel<<<blocks_for(total), kThreads, 0, stream>>>(dense, num_columns, columns, boundaries,
                                                                boundary_offsets, batch, total, out);
  return cudaGetLastError();
}

}  // namespace features
}  // namespace recis
