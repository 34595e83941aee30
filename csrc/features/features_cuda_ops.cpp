// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CUDA dispatch of the fused feature ops (built only with RECIS_CUDA=1, see
// setup.py). Each call copies its lengths to the host once (a synchronising
// read: the output sizes depend on them), checks its arguments there with the
// CPU ops' checks (feature_checks.h, same messages), sizes the outputs, and
// launches the kernels of features_cuda.cu on the current stream of the
// inputs' device, checking every launch. The arguments and results are the CPU
// ops' (csrc/ops/schema.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "feature_checks.h"
#include "feature_kernels.h"
#include "features_cuda.h"

namespace recis {
namespace {

using Result = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor on(const at::Tensor& like, const std::vector<int64_t>& xs) {
  return at::tensor(xs, at::kLong).to(like.device());
}

struct DeviceJagged {
  at::Tensor values, lengths, weights, lengths_host;
  std::vector<int64_t> begin;  // (F + 1,) each feature's first value, on the host
  int64_t F, B;
  bool weighted;

  DeviceJagged(const at::Tensor& v, const at::Tensor& l, const c10::optional<at::Tensor>& w, int64_t num_features,
               const char* op)
      : F(num_features), weighted(w.has_value()) {
    TORCH_CHECK(v.is_cuda(), op, ": values must be a CUDA tensor, got ", v.device());
    B = features::check_jagged(v, l, w, F, op);
    values = v.contiguous();
    lengths = l.contiguous();
    lengths_host = lengths.to(at::kCPU);
    begin = features::feature_begin(lengths_host.data_ptr<int64_t>(), F, B, v.numel(), op);
    if (weighted) weights = w->contiguous();
  }
};

// Output segments for `feats` (each repeated `repeat` times): (seg_in, seg_out, lengths out, total).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> segments(const DeviceJagged& in, at::IntArrayRef feats,
                                                                int64_t repeat, const char* op) {
  features::check_features(feats, in.F, op, "feature");
  std::vector<int64_t> seg_in, seg_out{0}, rows;
  for (auto f : feats) {
    for (int64_t r = 0; r < repeat; ++r) {
      seg_in.push_back(in.begin[f]);
      seg_out.push_back(seg_out.back() + in.begin[f + 1] - in.begin[f]);
      rows.push_back(f);
    }
  }
  at::Tensor out_lengths = in.lengths.view({in.F, in.B}).index_select(0, on(in.lengths, rows)).reshape(-1);
  const int64_t total = seg_out.back();
  return {on(in.lengths, seg_in), on(in.lengths, seg_out), out_lengths, total};
}

Result elementwise(const DeviceJagged& in, at::IntArrayRef feats, int64_t repeat, const std::vector<int64_t>* seeds,
                   const std::vector<int64_t>& moduli, const char* op) {
  auto [seg_in, seg_out, out_lengths, total] = segments(in, feats, repeat, op);
  const int64_t S = seg_in.numel();
  at::Tensor out = at::empty({total}, in.values.options());
  at::Tensor mod_t = on(in.values, moduli);
  at::Tensor seed_t = seeds != nullptr ? on(in.values, *seeds) : at::Tensor();
  C10_CUDA_CHECK(features::launch_hash(
      in.values.data_ptr<int64_t>(), seg_in.data_ptr<int64_t>(), seg_out.data_ptr<int64_t>(), S,
      seeds != nullptr ? reinterpret_cast<const uint64_t*>(seed_t.data_ptr<int64_t>()) : nullptr,
      reinterpret_cast<const uint64_t*>(mod_t.data_ptr<int64_t>()), total, out.data_ptr<int64_t>(), stream()));
  c10::optional<at::Tensor> out_w;
  if (in.weighted) {
    out_w = at::empty({total}, in.weights.options());
    C10_CUDA_CHECK(features::launch_copy_weights(in.weights.data_ptr<float>(), seg_in.data_ptr<int64_t>(),
                                                 seg_out.data_ptr<int64_t>(), S, total, out_w->data_ptr<float>(),
                                                 stream()));
  }
  return {out, out_lengths, out_w};
}

Result feature_hash_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                         int64_t num_features, at::IntArrayRef feats, at::IntArrayRef salts, at::IntArrayRef moduli) {
  const char* op = "recis::feature_hash";
  const c10::cuda::CUDAGuard guard(values.device());
  features::check_same_size(salts.size(), feats.size(), op, "salts");
  features::check_same_size(moduli.size(), feats.size(), op, "moduli");
  features::check_moduli(moduli, /*zero_means_none=*/true, op);
  DeviceJagged in(values, lengths, weights, num_features, op);
  std::vector<int64_t> s(salts.begin(), salts.end()), m(moduli.begin(), moduli.end());
  return elementwise(in, feats, 1, &s, m, op);
}

Result feature_mod_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                        int64_t num_features, at::IntArrayRef feats, at::IntArrayRef moduli) {
  const char* op = "recis::feature_mod";
  const c10::cuda::CUDAGuard guard(values.device());
  features::check_same_size(moduli.size(), feats.size(), op, "moduli");
  features::check_moduli(moduli, /*zero_means_none=*/false, op);
  DeviceJagged in(values, lengths, weights, num_features, op);
  return elementwise(in, feats, 1, nullptr, std::vector<int64_t>(moduli.begin(), moduli.end()), op);
}

Result feature_multi_hash_cuda(const at::Tensor& values, const at::Tensor& lengths,
                               const c10::optional<at::Tensor>& weights, int64_t num_features, at::IntArrayRef feats,
                               at::IntArrayRef salts, at::IntArrayRef moduli, int64_t num_hashes) {
  const char* op = "recis::feature_multi_hash";
  const c10::cuda::CUDAGuard guard(values.device());
  features::check_same_size(salts.size(), feats.size(), op, "salts");
  features::check_same_size(moduli.size(), feats.size(), op, "moduli");
  features::check_num_hashes(num_hashes, op);
  features::check_moduli(moduli, /*zero_means_none=*/true, op);
  DeviceJagged in(values, lengths, weights, num_features, op);
  std::vector<int64_t> s, m;
  for (size_t g = 0; g < feats.size(); ++g) {
    for (int64_t r = 0; r < num_hashes; ++r) {
      s.push_back(static_cast<int64_t>(static_cast<uint64_t>(salts[g]) +
                                       static_cast<uint64_t>(r) * features::kSeedStep));
      m.push_back(moduli[g]);
    }
  }
  return elementwise(in, feats, num_hashes, &s, m, op);
}

Result feature_truncate_cuda(const at::Tensor& values, const at::Tensor& lengths,
                             const c10::optional<at::Tensor>& weights, int64_t num_features, at::IntArrayRef feats,
                             at::IntArrayRef max_lengths, at::IntArrayRef from_end) {
  const char* op = "recis::feature_truncate";
  const c10::cuda::CUDAGuard guard(values.device());
  features::check_same_size(max_lengths.size(), feats.size(), op, "max_lengths");
  features::check_same_size(from_end.size(), feats.size(), op, "from_end");
  features::check_max_lengths(max_lengths, op);
  DeviceJagged in(values, lengths, weights, num_features, op);
  features::check_features(feats, in.F, op, "feature");
  const int64_t B = in.B;
  at::Tensor arange = at::arange(B, in.lengths.options());
  at::Tensor src_bag = (on(in.lengths, std::vector<int64_t>(feats.begin(), feats.end())).unsqueeze(1) * B + arange)
                           .reshape(-1);
  at::Tensor caps = on(in.lengths, std::vector<int64_t>(max_lengths.begin(), max_lengths.end())).repeat_interleave(B);
  at::Tensor ends = on(in.lengths, std::vector<int64_t>(from_end.begin(), from_end.end())).repeat_interleave(B);
  at::Tensor out_lengths = at::minimum(in.lengths.index_select(0, src_bag), caps);
  at::Tensor out_offsets = at::cat({at::zeros({1}, out_lengths.options()), out_lengths.cumsum(0)});
  at::Tensor in_offsets = at::cat({at::zeros({1}, in.lengths.options()), in.lengths.cumsum(0)});
  const int64_t* lh = in.lengths_host.data_ptr<int64_t>();
  int64_t total = 0;  // from the host copy: no second read of the device
  for (size_t g = 0; g < feats.size(); ++g) {
    for (int64_t b = 0; b < B; ++b) total += std::min(lh[feats[g] * B + b], max_lengths[g]);
  }
  at::Tensor out = at::empty({total}, in.values.options());
  c10::optional<at::Tensor> out_w;
  if (in.weighted) out_w = at::empty({total}, in.weights.options());
  C10_CUDA_CHECK(features::launch_truncate(
      in.values.data_ptr<int64_t>(), in.weighted ? in.weights.data_ptr<float>() : nullptr,
      in_offsets.data_ptr<int64_t>(), src_bag.data_ptr<int64_t>(), out_offsets.data_ptr<int64_t>(),
      out_lengths.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), src_bag.numel(), out.data_ptr<int64_t>(),
      in.weighted ? out_w->data_ptr<float>() : nullptr, stream()));
  return {out, out_lengths, out_w};
}

Result feature_cross_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                          int64_t num_features, at::IntArrayRef left, at::IntArrayRef right, at::IntArrayRef salts,
                          at::IntArrayRef moduli) {
  const char* op = "recis::feature_cross";
  const c10::cuda::CUDAGuard guard(values.device());
  features::check_same_size(right.size(), left.size(), op, "right");
  features::check_same_size(salts.size(), left.size(), op, "salts");
  features::check_same_size(moduli.size(), left.size(), op, "moduli");
  features::check_moduli(moduli, /*zero_means_none=*/true, op);
  DeviceJagged in(values, lengths, weights, num_features, op);
  features::check_features(left, in.F, op, "left feature");
  features::check_features(right, in.F, op, "right feature");
  const int64_t B = in.B;
  at::Tensor arange = at::arange(B, in.lengths.options());
  at::Tensor lb = (on(in.lengths, std::vector<int64_t>(left.begin(), left.end())).unsqueeze(1) * B + arange).reshape(-1);
  at::Tensor rb = (on(in.lengths, std::vector<int64_t>(right.begin(), right.end())).unsqueeze(1) * B + arange).reshape(-1);
  at::Tensor out_lengths = in.lengths.index_select(0, lb) * in.lengths.index_select(0, rb);
  at::Tensor out_offsets = at::cat({at::zeros({1}, out_lengths.options()), out_lengths.cumsum(0)});
  at::Tensor in_offsets = at::cat({at::zeros({1}, in.lengths.options()), in.lengths.cumsum(0)});
  const int64_t* lh = in.lengths_host.data_ptr<int64_t>();
  int64_t total = 0;  // from the host copy: no second read of the device
  for (size_t g = 0; g < left.size(); ++g) {
    for (int64_t b = 0; b < B; ++b) total += lh[left[g] * B + b] * lh[right[g] * B + b];
  }
  at::Tensor out = at::empty({total}, in.values.options());
  c10::optional<at::Tensor> out_w;
  if (in.weighted) out_w = at::empty({total}, in.weights.options());
  at::Tensor seed_t = on(in.values, std::vector<int64_t>(salts.begin(), salts.end()));
  at::Tensor mod_t = on(in.values, std::vector<int64_t>(moduli.begin(), moduli.end()));
  C10_CUDA_CHECK(features::launch_cross(
      in.values.data_ptr<int64_t>(), in.weighted ? in.weights.data_ptr<float>() : nullptr,
      in_offsets.data_ptr<int64_t>(), lb.data_ptr<int64_t>(), rb.data_ptr<int64_t>(), out_offsets.data_ptr<int64_t>(),
      reinterpret_cast<const uint64_t*>(seed_t.data_ptr<int64_t>()),
      reinterpret_cast<const uint64_t*>(mod_t.data_ptr<int64_t>()), B, lb.numel(), out.data_ptr<int64_t>(),
      in.weighted ? out_w->data_ptr<float>() : nullptr, stream()));
  return {out, out_lengths, out_w};
}

std::tuple<at::Tensor, at::Tensor> feature_bucketize_cuda(const at::Tensor& dense, at::IntArrayRef columns,
                                                          const at::Tensor& boundaries,
                                                          at::IntArrayRef boundary_offsets) {
  const char* op = "recis::feature_bucketize";
  TORCH_CHECK(dense.is_cuda(), op, ": dense must be a CUDA tensor, got ", dense.device());
  const c10::cuda::CUDAGuard guard(dense.device());
  at::Tensor bnd_cpu = boundaries.to(at::kCPU).contiguous();
  const float* bp = bnd_cpu.data_ptr<float>();
  features::check_bucketize(dense, columns, boundaries, bp, boundary_offsets, op);
  const int64_t G = static_cast<int64_t>(columns.size()), B = dense.size(0), D = dense.size(1);
  at::Tensor x = dense.contiguous();
  at::Tensor bnd = bnd_cpu.to(dense.device());
  at::Tensor cols = on(dense, std::vector<int64_t>(columns.begin(), columns.end()));
  at::Tensor offs = on(dense, std::vector<int64_t>(boundary_offsets.begin(), boundary_offsets.end()));
  at::Tensor out = at::empty({G * B}, dense.options().dtype(at::kLong));
  C10_CUDA_CHECK(features::launch_bucketize(x.data_ptr<float>(), D, cols.data_ptr<int64_t>(), bnd.data_ptr<float>(),
                                            offs.data_ptr<int64_t>(), B, G * B, out.data_ptr<int64_t>(), stream()));
  return {out, at::ones({G * B}, out.options())};
}

Result feature_concat_cuda(at::TensorList values, at::TensorList lengths, at::TensorList weights, int64_t batch,
                           at::IntArrayRef buffers, at::IntArrayRef feats) {
  const char* op = "recis::feature_concat";
  TORCH_CHECK(!values.empty() || feats.empty(), op, ": no buffers to take features from");
  if (values.empty()) return {at::empty({0}, at::kLong), at::empty({0}, at::kLong), c10::nullopt};
  TORCH_CHECK(values[0].is_cuda(), op, ": values must be CUDA tensors, got ", values[0].device());
  const c10::cuda::CUDAGuard guard(values[0].device());
  // One copy of every buffer's lengths to the host, for the checks and the output sizes.
  std::vector<at::Tensor> host(lengths.size());
  std::vector<const int64_t*> host_lengths(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    features::check_tensor_1d(lengths[i], values[0].device(), op, "lengths", at::kLong);
    host[i] = lengths[i].to(at::kCPU).contiguous();
    host_lengths[i] = host[i].data_ptr<int64_t>();
  }
  const std::vector<std::vector<int64_t>> begin =
      features::check_concat(values, lengths, weights, batch, buffers, feats, host_lengths, op);
  std::vector<at::Tensor> vs, ls, ws;
  for (size_t k = 0; k < feats.size(); ++k) {
    const int64_t i = buffers[k], f = feats[k];
    if (batch == 0) continue;
    const int64_t s = begin[i][f], n = begin[i][f + 1] - s;
    vs.push_back(values[i].narrow(0, s, n));
    ls.push_back(lengths[i].narrow(0, f * batch, batch));
    if (!weights.empty()) ws.push_back(weights[i].narrow(0, s, n));
  }
  at::Tensor v = vs.empty() ? at::empty({0}, values[0].options()) : at::cat(vs);
  at::Tensor l = ls.empty() ? at::empty({0}, lengths[0].options()) : at::cat(ls);
  c10::optional<at::Tensor> w;
  if (!weights.empty()) w = ws.empty() ? at::empty({0}, weights[0].options()) : at::cat(ws);
  return {v, l, w};
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CUDA, m) {
  m.impl("feature_hash", &feature_hash_cuda);
  m.impl("feature_mod", &feature_mod_cuda);
  m.impl("feature_multi_hash", &feature_multi_hash_cuda);
  m.impl("feature_truncate", &feature_truncate_cuda);
  m.impl("feature_cross", &feature_cross_cuda);
  m.impl("feature_bucketize", &feature_bucketize_cuda);
  m.impl("feature_concat", &feature_concat_cuda);
}

}  // namespace recis
