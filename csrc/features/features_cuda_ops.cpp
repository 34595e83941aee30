// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CUDA dispatch of the fused feature ops (built only with RECIS_CUDA=1, see
// setup.py). Output sizes come from torch ops on the device (one host read of
// the total per call); the kernels in features_cuda.cu fill the outputs. The
// arguments and results are the CPU ops' (csrc/ops/schema.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

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
  at::Tensor values, lengths, weights, per_feature, begin;
  int64_t F, B;
  bool weighted;

  DeviceJagged(const at::Tensor& v, const at::Tensor& l, const c10::optional<at::Tensor>& w, int64_t num_features,
               const char* op)
      : F(num_features), weighted(w.has_value()) {
    TORCH_CHECK(v.is_cuda() && l.is_cuda(), op, ": values and lengths must be on the same CUDA device");
    TORCH_CHECK(v.scalar_type() == at::kLong && l.scalar_type() == at::kLong, op,
                ": values and lengths must be int64");
    TORCH_CHECK(F > 0 && l.numel() % F == 0, op, ": lengths has ", l.numel(), " entries, not a multiple of ", F);
    values = v.contiguous();
    lengths = l.contiguous();
    B = l.numel() / F;
    per_feature = lengths.view({F, B}).sum(1);
    begin = at::cat({at::zeros({1}, lengths.options()), per_feature.cumsum(0)});
    TORCH_CHECK(begin[F].item<int64_t>() == v.numel(), op, ": lengths do not sum to the number of values");
    TORCH_CHECK(B == 0 || lengths.min().item<int64_t>() >= 0, op, ": negative length");
    if (weighted) {
      TORCH_CHECK(w->is_cuda() && w->scalar_type() == at::kFloat && w->numel() == v.numel(), op,
                  ": weights must be float32 on the device, one per value");
      weights = w->contiguous();
    }
  }
};

// Output segments for `feats` (each repeated `repeat` times): (seg_in, seg_out, lengths out, total).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> segments(const DeviceJagged& in, at::IntArrayRef feats,
                                                                int64_t repeat, const char* op) {
  for (auto f : feats) TORCH_CHECK(f >= 0 && f < in.F, op, ": feature index ", f, " out of range for ", in.F);
  at::Tensor idx = on(in.lengths, std::vector<int64_t>(feats.begin(), feats.end()));
  if (repeat > 1) idx = idx.repeat_interleave(repeat);
  at::Tensor seg_in = in.begin.index_select(0, idx);
  at::Tensor counts = in.per_feature.index_select(0, idx);
  at::Tensor seg_out = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  at::Tensor out_lengths = in.lengths.view({in.F, in.B}).index_select(0, idx).reshape(-1);
  return {seg_in, seg_out, out_lengths, seg_out[-1].item<int64_t>()};
}

Result elementwise(const DeviceJagged& in, at::IntArrayRef feats, int64_t repeat, const std::vector<int64_t>* seeds,
                   const std::vector<int64_t>& moduli, const char* op) {
  auto [seg_in, seg_out, out_lengths, total] = segments(in, feats, repeat, op);
  const int64_t S = seg_in.numel();
  at::Tensor out = at::empty({total}, in.values.options());
  at::Tensor mod_t = on(in.values, moduli);
  at::Tensor seed_t = seeds != nullptr ? on(in.values, *seeds) : at::Tensor();
  features::launch_hash(in.values.data_ptr<int64_t>(), seg_in.data_ptr<int64_t>(), seg_out.data_ptr<int64_t>(), S,
                        seeds != nullptr ? reinterpret_cast<const uint64_t*>(seed_t.data_ptr<int64_t>()) : nullptr,
                        reinterpret_cast<const uint64_t*>(mod_t.data_ptr<int64_t>()), total,
                        out.data_ptr<int64_t>(), stream());
  c10::optional<at::Tensor> out_w;
  if (in.weighted) {
    out_w = at::empty({total}, in.weights.options());
    features::launch_copy_weights(in.weights.data_ptr<float>(), seg_in.data_ptr<int64_t>(),
                                  seg_out.data_ptr<int64_t>(), S, total, out_w->data_ptr<float>(), stream());
  }
  return {out, out_lengths, out_w};
}

Result feature_hash_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                         int64_t num_features, at::IntArrayRef feats, at::IntArrayRef salts, at::IntArrayRef moduli) {
  const char* op = "recis::feature_hash";
  TORCH_CHECK(salts.size() == feats.size() && moduli.size() == feats.size(), op,
              ": salts and moduli need one entry per feature");
  DeviceJagged in(values, lengths, weights, num_features, op);
  std::vector<int64_t> s(salts.begin(), salts.end()), m(moduli.begin(), moduli.end());
  return elementwise(in, feats, 1, &s, m, op);
}

Result feature_mod_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                        int64_t num_features, at::IntArrayRef feats, at::IntArrayRef moduli) {
  const char* op = "recis::feature_mod";
  TORCH_CHECK(moduli.size() == feats.size(), op, ": moduli needs one entry per feature");
  for (auto x : moduli) TORCH_CHECK(x > 0, op, ": moduli must be > 0, got ", x);
  DeviceJagged in(values, lengths, weights, num_features, op);
  return elementwise(in, feats, 1, nullptr, std::vector<int64_t>(moduli.begin(), moduli.end()), op);
}

Result feature_multi_hash_cuda(const at::Tensor& values, const at::Tensor& lengths,
                               const c10::optional<at::Tensor>& weights, int64_t num_features, at::IntArrayRef feats,
                               at::IntArrayRef salts, at::IntArrayRef moduli, int64_t num_hashes) {
  const char* op = "recis::feature_multi_hash";
  TORCH_CHECK(num_hashes >= 1, op, ": num_hashes must be >= 1");
  TORCH_CHECK(salts.size() == feats.size() && moduli.size() == feats.size(), op,
              ": salts and moduli need one entry per feature");
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
  TORCH_CHECK(max_lengths.size() == feats.size() && from_end.size() == feats.size(), op,
              ": max_lengths and from_end need one entry per feature");
  for (auto n : max_lengths) TORCH_CHECK(n > 0, op, ": max_lengths must be > 0, got ", n);
  DeviceJagged in(values, lengths, weights, num_features, op);
  for (auto f : feats) TORCH_CHECK(f >= 0 && f < in.F, op, ": feature index ", f, " out of range");
  const int64_t B = in.B;
  at::Tensor arange = at::arange(B, in.lengths.options());
  at::Tensor src_bag = (on(in.lengths, std::vector<int64_t>(feats.begin(), feats.end())).unsqueeze(1) * B + arange)
                           .reshape(-1);
  at::Tensor caps = on(in.lengths, std::vector<int64_t>(max_lengths.begin(), max_lengths.end())).repeat_interleave(B);
  at::Tensor ends = on(in.lengths, std::vector<int64_t>(from_end.begin(), from_end.end())).repeat_interleave(B);
  at::Tensor out_lengths = at::minimum(in.lengths.index_select(0, src_bag), caps);
  at::Tensor out_offsets = at::cat({at::zeros({1}, out_lengths.options()), out_lengths.cumsum(0)});
  at::Tensor in_offsets = at::cat({at::zeros({1}, in.lengths.options()), in.lengths.cumsum(0)});
  const int64_t total = out_offsets[-1].item<int64_t>();
  at::Tensor out = at::empty({total}, in.values.options());
  c10::optional<at::Tensor> out_w;
  if (in.weighted) out_w = at::empty({total}, in.weights.options());
  features::launch_truncate(in.values.data_ptr<int64_t>(), in.weighted ? in.weights.data_ptr<float>() : nullptr,
                            in_offsets.data_ptr<int64_t>(), src_bag.data_ptr<int64_t>(),
                            out_offsets.data_ptr<int64_t>(), out_lengths.data_ptr<int64_t>(),
                            ends.data_ptr<int64_t>(), src_bag.numel(), out.data_ptr<int64_t>(),
                            in.weighted ? out_w->data_ptr<float>() : nullptr, stream());
  return {out, out_lengths, out_w};
}

Result feature_cross_cuda(const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& weights,
                          int64_t num_features, at::IntArrayRef left, at::IntArrayRef right, at::IntArrayRef salts,
                          at::IntArrayRef moduli) {
  const char* op = "recis::feature_cross";
  TORCH_CHECK(right.size() == left.size() && salts.size() == left.size() && moduli.size() == left.size(), op,
              ": right, salts and moduli need one entry per cross");
  DeviceJagged in(values, lengths, weights, num_features, op);
  for (auto f : left) TORCH_CHECK(f >= 0 && f < in.F, op, ": left feature index ", f, " out of range");
  for (auto f : right) TORCH_CHECK(f >= 0 && f < in.F, op, ": right feature index ", f, " out of range");
  const int64_t B = in.B;
  at::Tensor arange = at::arange(B, in.lengths.options());
  at::Tensor lb = (on(in.lengths, std::vector<int64_t>(left.begin(), left.end())).unsqueeze(1) * B + arange).reshape(-1);
  at::Tensor rb = (on(in.lengths, std::vector<int64_t>(right.begin(), right.end())).unsqueeze(1) * B + arange).reshape(-1);
  at::Tensor out_lengths = in.lengths.index_select(0, lb) * in.lengths.index_select(0, rb);
  at::Tensor out_offsets = at::cat({at::zeros({1}, out_lengths.options()), out_lengths.cumsum(0)});
  at::Tensor in_offsets = at::cat({at::zeros({1}, in.lengths.options()), in.lengths.cumsum(0)});
  const int64_t total = out_offsets[-1].item<int64_t>();
  at::Tensor out = at::empty({total}, in.values.options());
  c10::optional<at::Tensor> out_w;
  if (in.weighted) out_w = at::empty({total}, in.weights.options());
  at::Tensor seed_t = on(in.values, std::vector<int64_t>(salts.begin(), salts.end()));
  at::Tensor mod_t = on(in.values, std::vector<int64_t>(moduli.begin(), moduli.end()));
  features::launch_cross(in.values.data_ptr<int64_t>(), in.weighted ? in.weights.data_ptr<float>() : nullptr,
                         in_offsets.data_ptr<int64_t>(), lb.data_ptr<int64_t>(), rb.data_ptr<int64_t>(),
                         out_offsets.data_ptr<int64_t>(), reinterpret_cast<const uint64_t*>(seed_t.data_ptr<int64_t>()),
                         reinterpret_cast<const uint64_t*>(mod_t.data_ptr<int64_t>()), B, lb.numel(),
                         out.data_ptr<int64_t>(), in.weighted ? out_w->data_ptr<float>() : nullptr, stream());
  return {out, out_lengths, out_w};
}

std::tuple<at::Tensor, at::Tensor> feature_bucketize_cuda(const at::Tensor& dense, at::IntArrayRef columns,
                                                          const at::Tensor& boundaries,
                                                          at::IntArrayRef boundary_offsets) {
  const char* op = "recis::feature_bucketize";
  TORCH_CHECK(dense.is_cuda() && dense.dim() == 2 && dense.scalar_type() == at::kFloat, op,
              ": dense must be a (B, D) float32 CUDA tensor");
  const int64_t G = static_cast<int64_t>(columns.size()), B = dense.size(0), D = dense.size(1);
  TORCH_CHECK(static_cast<int64_t>(boundary_offsets.size()) == G + 1, op, ": boundary_offsets needs G + 1 entries");
  for (auto c : columns) TORCH_CHECK(c >= 0 && c < D, op, ": column ", c, " out of range for ", D);
  at::Tensor bnd_cpu = boundaries.to(at::kCPU).contiguous();
  const float* bp = bnd_cpu.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = boundary_offsets[g] + 1; i < boundary_offsets[g + 1]; ++i) {
      TORCH_CHECK(bp[i - 1] <= bp[i], op, ": the boundaries of column ", columns[g], " must be sorted");
    }
  }
  at::Tensor x = dense.contiguous();
  at::Tensor bnd = bnd_cpu.to(dense.device());
  at::Tensor cols = on(dense, std::vector<int64_t>(columns.begin(), columns.end()));
  at::Tensor offs = on(dense, std::vector<int64_t>(boundary_offsets.begin(), boundary_offsets.end()));
  at::Tensor out = at::empty({G * B}, dense.options().dtype(at::kLong));
  features::launch_bucketize(x.data_ptr<float>(), D, cols.data_ptr<int64_t>(), bnd.data_ptr<float>(),
                             offs.data_ptr<int64_t>(), B, G * B, out.data_ptr<int64_t>(), stream());
  return {out, at::ones({G * B}, out.options())};
}

Result feature_concat_cuda(at::TensorList values, at::TensorList lengths, at::TensorList weights, int64_t batch,
                           at::IntArrayRef buffers, at::IntArrayRef feats) {
  const char* op = "recis::feature_concat";
  TORCH_CHECK(values.size() == lengths.size() && buffers.size() == feats.size(), op, ": mismatched argument sizes");
  std::vector<std::vector<int64_t>> begin(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    const int64_t F = batch == 0 ? 0 : lengths[i].numel() / batch;
    at::Tensor per = F ? lengths[i].view({F, batch}).sum(1).cumsum(0).to(at::kCPU) : at::zeros({0}, at::kLong);
    begin[i].assign(1, 0);
    for (int64_t f = 0; f < F; ++f) begin[i].push_back(per[f].item<int64_t>());
  }
  std::vector<at::Tensor> vs, ls, ws;
  for (size_t k = 0; k < feats.size(); ++k) {
    const int64_t i = buffers[k], f = feats[k];
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(values.size()), op, ": buffer index ", i, " out of range");
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
