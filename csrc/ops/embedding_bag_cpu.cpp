// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// CPU kernels of the pooled lookup: pooled_forward, pooled_backward,
// sparse_update and the fused pooled_backward_update.
//
// Backward groups the gradient contributions by row with a stable radix sort
// per table (tables sorted in parallel), then reduces each row's contributions
// in input order, so results are deterministic and no float atomics are used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../hashtable/constants.h"
#include "../hashtable/optimizers.h"
#include "checks.h"
#include "optim_params.h"
#include "pooling.h"
#include "radix_sort.h"
#include "serving.h"
#include "table_registry.h"

namespace recis {
namespace {

using hashtable::OptimParams;
using hashtable::OptimType;
using hashtable::WeightDecayMode;
using namespace pooling;  // NOLINT: the shared kernels
constexpr int64_t kSum = static_cast<int64_t>(hashtable::PoolingMode::kSum);
constexpr int64_t kMean = static_cast<int64_t>(hashtable::PoolingMode::kMean);

// The KJT-style layout shared by forward and backward, validated once.
struct BagLayout {
  int64_t num_features = 0;
  int64_t batch = 0;
  int64_t num_values = 0;
  const int64_t* offsets = nullptr;
  const float* weights = nullptr;  // (num_values,) or nullptr
  std::vector<int64_t> table, mode, col;

  int64_t bag_begin(int64_t q) const { return offsets[q]; }
  int64_t bag_end(int64_t q) const { return offsets[q + 1]; }
};

BagLayout make_layout(const char* op, const at::Tensor& rows, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& per_sample_weights, at::IntArrayRef feature_table,
                      at::IntArrayRef feature_mode, at::IntArrayRef feature_col, const std::vector<int64_t>& dims,
                      int64_t out_dim) {
  BagLayout l;
  check_cpu_1d(rows, op, "rows", at::kLong);
  TORCH_CHECK(rows.is_contiguous(), op, ": rows must be contiguous");
  l.num_features = static_cast<int64_t>(feature_table.size());
  TORCH_CHECK(static_cast<int64_t>(feature_mode.size()) == l.num_features &&
                  static_cast<int64_t>(feature_col.size()) == l.num_features,
              op, ": feature_table, feature_mode and feature_col must have the same length, got ",
              feature_table.size(), ", ", feature_mode.size(), ", ", feature_col.size());
  l.num_values = rows.numel();
  check_bag_offsets(offsets, l.num_features, l.num_values, op);
  TORCH_CHECK(offsets.is_contiguous(), op, ": offsets must be contiguous");
  l.offsets = offsets.data_ptr<int64_t>();
  l.batch = (offsets.numel() - 1) / l.num_features;
  if (per_sample_weights.has_value()) {
    const auto& w = *per_sample_weights;
    TORCH_CHECK(w.device().is_cpu(), op, ": per_sample_weights must be a CPU tensor, got ", w.device());
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, ": per_sample_weights must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.numel() == l.num_values && w.is_contiguous(), op,
                ": per_sample_weights must be contiguous with shape (", l.num_values, ",), got ", w.sizes());
    l.weights = w.data_ptr<float>();
  }
  const int64_t num_tables = static_cast<int64_t>(dims.size());
  l.table.assign(feature_table.begin(), feature_table.end());
  l.mode.assign(feature_mode.begin(), feature_mode.end());
  l.col.assign(feature_col.begin(), feature_col.end());
  for (int64_t f = 0; f < l.num_features; ++f) {
    const int64_t t = l.table[f];
    TORCH_CHECK(t >= -1 && t < num_tables, op, ": feature index ", f, " names table ", t, " but there are ",
                num_tables, " tables");
    if (t < 0) continue;
    TORCH_CHECK(l.mode[f] == kSum || l.mode[f] == kMean, op, ": feature index ", f, " has pooling mode ", l.mode[f],
                " (0 = sum, 1 = mean)");
    TORCH_CHECK(l.col[f] >= 0 && l.col[f] + dims[t] <= out_dim, op, ": feature index ", f, " writes columns [",
                l.col[f], ", ", l.col[f] + dims[t], ") outside the output's ", out_dim, " columns");
  }
  return l;
}

// True when the features' column ranges tile [0, out_dim) exactly, so every
// output element is written and the output need not be zero-filled first.
bool columns_tile(const BagLayout& l, const std::vector<int64_t>& dims, int64_t out_dim) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t f = 0; f < l.num_features; ++f) {
    if (l.table[f] >= 0) ranges.emplace_back(l.col[f], l.col[f] + dims[l.table[f]]);
  }
  std::sort(ranges.begin(), ranges.end());
  int64_t next = 0;
  for (const auto& r : ranges) {
    if (r.first != next) return false;
    next = r.second;
  }
  return next == out_dim;
}

std::vector<TablePtr> resolve_tables(at::IntArrayRef handles, const char* op, std::vector<int64_t>* dims) {
  std::vector<TablePtr> tables;
  for (int64_t h : handles) {
    tables.push_back(get_table(h, op));
    dims->push_back(tables.back()->table.dim());
  }
  return tables;
}

// Pools bags [qb, qe) (bag q = f * B + b) into o. With `lookup`, first
// fills row[i] for the values of each tile of bags by finding ids in the
// feature's table (-1 where absent), so ids and rows are still in cache when
// the tile is pooled. Returns the number of ids found absent.
int64_t pool_range(const BagLayout& l, const std::vector<TablePtr>& tables, const std::vector<int64_t>& dims,
                   const int64_t* key, int64_t* row, float* o, int64_t out_dim, int64_t qb, int64_t qe, bool lookup,
                   float* init_buf) {
  constexpr int64_t kTileBags = 32;
  const int64_t B = l.batch;
  int64_t absent = 0;
  int64_t q = qb;
  while (q < qe) {
    const int64_t f = q / B, t = l.table[f];
    const int64_t tile_end = std::min({q + kTileBags, qe, (f + 1) * B});
    if (t < 0) {
      if (lookup) std::fill(row + l.bag_begin(q), row + l.bag_begin(tile_end), int64_t{-1});
      q = tile_end;
      continue;
    }
    const auto& table = tables[t]->table;
    if (lookup) {
      const int64_t s = l.bag_begin(q);
      absent += table.find(key + s, l.bag_begin(tile_end) - s, row + s, SerialFor{});
    }
    const int64_t feature_end = l.offsets[(f + 1) * B];
    dispatch_row_type(table.row_type(), [&](auto elem) {
      dispatch_dim(dims[t], [&](auto kd) {
        for (; q < tile_end; ++q) {
          pool_bag<decltype(kd)::value, decltype(elem), hashtable::HashTable>(o + (q % B) * out_dim + l.col[f], dims[t], table, t, row,
                                                        key, l.weights, l.bag_begin(q), l.bag_end(q), feature_end,
                                                        l.mode[f] == kMean, init_buf);
        }
      });
    });
  }
  return absent;
}

at::Tensor pooled_output(const BagLayout& l, const std::vector<int64_t>& dims, int64_t out_dim) {
  return columns_tile(l, dims, out_dim) ? at::empty({l.batch, out_dim}, at::kFloat)
                                        : at::zeros({l.batch, out_dim}, at::kFloat);
}

at::Tensor pooled_forward_cpu(at::IntArrayRef handles, const at::Tensor& ids, const at::Tensor& rows,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
                              at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
                              at::IntArrayRef feature_col, int64_t out_dim) {
  const char* op = "recis::pooled_forward";
  check_cpu_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(ids.numel() == rows.numel() && ids.is_contiguous(), op,
              ": ids must be contiguous with as many entries as rows (", rows.numel(), "), got ", ids.sizes());
  TORCH_CHECK(out_dim >= 0, op, ": out_dim must be >= 0, got ", out_dim);
  std::vector<int64_t> dims;
  const auto tables = resolve_tables(handles, op, &dims);
  const BagLayout l =
      make_layout(op, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, dims, out_dim);
  at::Tensor out = pooled_output(l, dims, out_dim);
  if (l.batch == 0 || out_dim == 0) return out;
  const int64_t max_dim = *std::max_element(dims.begin(), dims.end());
  // Not written: pool_range only reads rows when lookup is false.
  int64_t* row = const_cast<int64_t*>(rows.data_ptr<int64_t>());
  TableLocks locks(tables, /*exclusive=*/false);
  at::parallel_for(0, l.num_features * l.batch, 16, [&](int64_t qb, int64_t qe) {
    std::vector<float> init_buf(static_cast<size_t>(max_dim));
    pool_range(l, tables, dims, ids.data_ptr<int64_t>(), row, out.data_ptr<float>(), out_dim, qb, qe,
               /*lookup=*/false, init_buf.data());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lookup_pooled_forward_cpu(
    at::IntArrayRef handles, const at::Tensor& ids, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
    at::IntArrayRef feature_col, int64_t out_dim, bool insert, int64_t clock) {
  const char* op = "recis::lookup_pooled_forward";
  check_cpu_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(out_dim >= 0, op, ": out_dim must be >= 0, got ", out_dim);
  const at::Tensor ids_c = ids.contiguous();
  at::Tensor rows = at::empty_like(ids_c);
  std::vector<int64_t> dims;
  const auto tables = resolve_tables(handles, op, &dims);
  const BagLayout l =
      make_layout(op, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, dims, out_dim);
  at::Tensor out = pooled_output(l, dims, out_dim);
  const int64_t* key = ids_c.data_ptr<int64_t>();
  int64_t* row = rows.data_ptr<int64_t>();
  const int64_t B = l.batch;
  TableLocks locks(tables, /*exclusive=*/insert);
  if (insert) {
    for (const auto& t : tables) t->table.tick(clock);  // TTL eviction, before anything is looked up
  }
  if (B == 0 || out_dim == 0) {
    rows.fill_(-1);  // no feature reads a table
    return {out, rows};
  }
  const int64_t max_dim = *std::max_element(dims.begin(), dims.end());
  at::parallel_for(0, l.num_features * B, 16, [&](int64_t qb, int64_t qe) {
    std::vector<float> init_buf(static_cast<size_t>(max_dim));
    pool_range(l, tables, dims, key, row, out.data_ptr<float>(), out_dim, qb, qe, /*lookup=*/true, init_buf.data());
  });
  if (!insert) return {out, rows};
  // Training: mark the rows found as seen (so that no eviction below takes
  // them), then give the absent ids their rows. The output already holds the
  // absent ids' initial values, which is exactly what new rows start at.
  for (int64_t t = 0; t < static_cast<int64_t>(tables.size()); ++t) {
    auto& table = tables[t]->table;
    std::vector<int64_t> pos, miss_keys, found;
    for (int64_t f = 0; f < l.num_features; ++f) {
      if (l.table[f] != t) continue;
      for (int64_t i = l.offsets[f * B]; i < l.offsets[(f + 1) * B]; ++i) {
        if (row[i] < 0) {
          pos.push_back(i);
          miss_keys.push_back(key[i]);
        } else if (table.config().tracks_access()) {
          found.push_back(row[i]);
        }
      }
    }
    if (!found.empty()) table.touch(found.data(), static_cast<int64_t>(found.size()), clock, AtParallelFor{});
    if (pos.empty()) continue;
    std::vector<int64_t> miss_rows(pos.size());
    table.find_or_insert(miss_keys.data(), static_cast<int64_t>(pos.size()), miss_rows.data(), AtParallelFor{},
                         clock);
    for (size_t k = 0; k < pos.size(); ++k) row[pos[k]] = miss_rows[k];
  }
  return {out, rows};
}

// Gradient contributions of every table, grouped by row. For table t,
// rows[t] holds the rows in ascending order (with repeats) and vals[t] the
// value index of each contribution; seg[t] delimits the unique rows. Value i
// contributes scale[i] * grad_out[src_off[i] : src_off[i] + dim].
struct RowGroups {
  std::vector<std::vector<int64_t>> rows, vals, seg;
  std::vector<int64_t> src_off;      // value index -> offset of its bag's gradient in grad_out
  std::vector<float> scale;          // value index -> weight (and 1 / bag length for mean)
  std::vector<int64_t> unique_base;  // prefix sum of unique rows over tables

  int64_t total_unique() const { return unique_base.back(); }
};

RowGroups group_rows(const char* op, const BagLayout& l, const int64_t* row, int64_t num_tables, int64_t out_dim,
                     const std::vector<int64_t>* table_sizes) {
  RowGroups g;
  const int64_t B = l.batch;
  g.src_off.resize(static_cast<size_t>(l.num_values));
  g.scale.resize(static_cast<size_t>(l.num_values));
  g.rows.resize(num_tables);
  g.vals.resize(num_tables);
  g.seg.resize(num_tables);
  at::parallel_for(0, num_tables, 1, [&](int64_t tb, int64_t te) {
    std::vector<int64_t> tmp_k, tmp_v;
    for (int64_t t = tb; t < te; ++t) {
      auto& keys = g.rows[t];
      auto& vals = g.vals[t];
      int64_t max_row = 0;
      int64_t count = 0;
      for (int64_t f = 0; f < l.num_features; ++f) {
        if (l.table[f] == t) count += l.offsets[(f + 1) * B] - l.offsets[f * B];
      }
      keys.reserve(static_cast<size_t>(count));
      vals.reserve(static_cast<size_t>(count));
      for (int64_t f = 0; f < l.num_features; ++f) {
        if (l.table[f] != t) continue;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t q = f * B + b;
          const int64_t s = l.bag_begin(q), e = l.bag_end(q);
          const float bag_scale = l.mode[f] == kMean ? 1.0f / static_cast<float>(e - s) : 1.0f;
          const int64_t off = b * out_dim + l.col[f];
          for (int64_t i = s; i < e; ++i) {
            const int64_t r = row[i];
            if (r < 0) continue;  // not in the table (eval lookups): no gradient
            keys.push_back(r);
            vals.push_back(i);
            g.src_off[i] = off;
            g.scale[i] = l.weights ? l.weights[i] * bag_scale : bag_scale;
            max_row = std::max(max_row, r);
          }
        }
      }
      if (table_sizes != nullptr) {
        TORCH_CHECK(keys.empty() || max_row < (*table_sizes)[t], op, ": row ", max_row, " is not a row of table ",
                    t, " (", (*table_sizes)[t], " rows)");
      }
      radix_sort_pairs(keys.data(), vals.data(), static_cast<int64_t>(keys.size()), static_cast<uint64_t>(max_row),
                       tmp_k, tmp_v);
      auto& seg = g.seg[t];
      for (size_t j = 0; j < keys.size(); ++j) {
        if (j == 0 || keys[j] != keys[j - 1]) seg.push_back(static_cast<int64_t>(j));
      }
      seg.push_back(static_cast<int64_t>(keys.size()));
    }
  });
  g.unique_base.assign(static_cast<size_t>(num_tables) + 1, 0);
  for (int64_t t = 0; t < num_tables; ++t) {
    g.unique_base[t + 1] = g.unique_base[t] + static_cast<int64_t>(g.seg[t].size()) - 1;
  }
  return g;
}

// Sums the contributions [j0, j1) of one row into acc (dim,), in input order.
template <int kD>
inline void sum_row_grad(float* __restrict acc, int64_t dim_arg, const RowGroups& g, const std::vector<int64_t>& vals,
                         int64_t j0, int64_t j1, const float* grad_out) {
  const int64_t D = kD > 0 ? kD : dim_arg;
  float local[kD > 0 ? kD : 1];
  float* a = kD > 0 ? local : acc;
  for (int64_t d = 0; d < D; ++d) a[d] = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    // The contributions' gradient rows lie at random in grad_out: fetch a
    // few ahead (past j1 too: the next row's contributions come next).
    if (j + kGradPrefetch < static_cast<int64_t>(vals.size())) {
      prefetch_row(grad_out + g.src_off[vals[j + kGradPrefetch]], D);
    }
    const int64_t i = vals[j];
    axpy<kD>(a, grad_out + g.src_off[i], g.scale[i], D);
  }
  if (kD > 0) {
    for (int64_t d = 0; d < D; ++d) acc[d] = a[d];
  }
}

// Calls fn(t, u, row, grad, kd) for every unique row u of every table t, in
// parallel, with grad (dim,) the row's summed gradient in scratch memory that
// fn may overwrite, and kd the integral_constant of the table's dim (or 0).
// prefetch(t, row) is called kUpdatePrefetch rows ahead, so the rows that fn
// updates arrive in cache before it needs them.
template <typename Fn, typename Prefetch>
void reduce_rows(const BagLayout& l, const RowGroups& g, const std::vector<int64_t>& dims, const float* grad_out,
                 int64_t out_dim, Fn&& fn, Prefetch&& prefetch) {
  const int64_t max_dim = dims.empty() ? 0 : *std::max_element(dims.begin(), dims.end());
  at::parallel_for(0, g.total_unique(), 64, [&](int64_t ub, int64_t ue) {
    std::vector<float> buf(static_cast<size_t>(max_dim));
    float* acc = buf.data();
    int64_t t = std::upper_bound(g.unique_base.begin(), g.unique_base.end(), ub) - g.unique_base.begin() - 1;
    for (int64_t u_global = ub; u_global < ue; ++u_global) {
      while (u_global >= g.unique_base[t + 1]) ++t;
      const int64_t u = u_global - g.unique_base[t];
      const auto& seg = g.seg[t];
      if (u + kUpdatePrefetch < static_cast<int64_t>(seg.size()) - 1) {
        prefetch(t, g.rows[t][seg[u + kUpdatePrefetch]]);
      }
      dispatch_dim(dims[t], [&](auto kd) {
        sum_row_grad<decltype(kd)::value>(acc, dims[t], g, g.vals[t], seg[u], seg[u + 1], grad_out);
        fn(t, u, g.rows[t][seg[u]], acc, kd);
      });
    }
  });
}

at::Tensor checked_grad(const char* op, const at::Tensor& grad_output, int64_t batch) {
  TORCH_CHECK(grad_output.device().is_cpu() && grad_output.scalar_type() == at::kFloat && grad_output.dim() == 2,
              op, ": grad_output must be a 2-D float32 CPU tensor, got ", grad_output.scalar_type(), " ",
              grad_output.sizes(), " on ", grad_output.device());
  TORCH_CHECK(grad_output.size(0) == batch, op, ": grad_output has ", grad_output.size(0),
              " rows but the batch size is ", batch);
  return grad_output.contiguous();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pooled_backward_cpu(
    at::IntArrayRef table_dims, const at::Tensor& grad_output, const at::Tensor& rows, const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights, at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
    at::IntArrayRef feature_col) {
  const char* op = "recis::pooled_backward";
  std::vector<int64_t> dims(table_dims.begin(), table_dims.end());
  for (size_t t = 0; t < dims.size(); ++t) {
    TORCH_CHECK(dims[t] > 0, op, ": table_dims[", t, "] must be > 0, got ", dims[t]);
  }
  TORCH_CHECK(grad_output.dim() == 2, op, ": grad_output must be 2-D, got ", grad_output.sizes());
  const int64_t out_dim = grad_output.size(1);
  const BagLayout l =
      make_layout(op, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, dims, out_dim);
  const at::Tensor go = checked_grad(op, grad_output, l.batch);
  const int64_t T = static_cast<int64_t>(dims.size());
  const RowGroups g = group_rows(op, l, rows.data_ptr<int64_t>(), T, out_dim, nullptr);

  std::vector<at::Tensor> unique_rows, grads;
  std::vector<float*> grad_ptr;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t U = g.unique_base[t + 1] - g.unique_base[t];
    auto ur = at::empty({U}, at::kLong);
    int64_t* urp = ur.data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) urp[u] = g.rows[t][g.seg[t][u]];
    unique_rows.push_back(ur);
    grads.push_back(at::empty({U, dims[t]}, at::kFloat));
    grad_ptr.push_back(grads.back().data_ptr<float>());
  }
  reduce_rows(
      l, g, dims, go.data_ptr<float>(), out_dim,
      [&](int64_t t, int64_t u, int64_t, const float* acc, auto) {
        std::copy(acc, acc + dims[t], grad_ptr[t] + u * dims[t]);
      },
      [](int64_t, int64_t) {});
  return {unique_rows, grads};
}

// One optimizer step on row r of a table with its summed gradient g (scratch). Rows of 16-bit
// elements are widened, updated in float32 and rounded back (to nearest even).
template <int kD>
inline void apply_update(hashtable::HashTable& table, int64_t r, float* g, const OptimParams& p, float step_size) {
  const int64_t D = kD > 0 ? kD : table.dim();
  if (table.row_type() == hashtable::RowType::kF32) {
    hashtable::update_row<kD>(table.mutable_row(r), table.mutable_state(r), g, D, p, step_size);
    return;
  }
  float fixed[kD > 0 ? kD : 1];
  thread_local std::vector<float> any;
  float* w = fixed;
  if constexpr (kD == 0) {
    any.resize(static_cast<size_t>(D));
    w = any.data();
  }
  table.read_row(r, w);
  hashtable::update_row<kD>(w, table.mutable_state(r), g, D, p, step_size);
  hashtable::store_elements(table.mutable_row_bytes(r), table.row_type(), w, D);
}

void check_state_dim(const char* op, const hashtable::HashTable& table, const OptimParams& p, int64_t t) {
  const int64_t need = hashtable::optimizer_state_dim(p.type, table.dim());
  TORCH_CHECK(table.state_dim() == need, op, ": table ", t, " holds ", table.state_dim(),
              " optimizer-state floats per row, but optimizer code ", static_cast<int>(p.type), " needs ", need,
              " (create the table with the optimizer it is trained with)");
}

void sparse_update_cpu(int64_t handle, const at::Tensor& rows, const at::Tensor& grads, int64_t optimizer,
                       at::ArrayRef<double> hyperparameters, int64_t weight_decay_mode, int64_t step) {
  const char* op = "recis::sparse_update";
  const auto entry = get_table(handle, op);
  auto& table = entry->table;
  const OptimParams p = make_optim_params(op, optimizer, hyperparameters, weight_decay_mode, step);
  check_state_dim(op, table, p, 0);
  check_cpu_1d(rows, op, "rows", at::kLong);
  const int64_t n = rows.numel(), D = table.dim();
  TORCH_CHECK(grads.device().is_cpu() && grads.scalar_type() == at::kFloat && grads.dim() == 2 &&
                  grads.size(0) == n && grads.size(1) == D,
              op, ": grads must be a float32 CPU tensor of shape (", n, ", ", D, "), got ", grads.scalar_type(), " ",
              grads.sizes());
  if (n == 0) return;
  const auto rows_c = rows.contiguous();
  const auto grads_c = grads.contiguous();
  const int64_t* r = rows_c.data_ptr<int64_t>();
  const float* gp = grads_c.data_ptr<float>();
  TableLocks lock({entry}, /*exclusive=*/true);
  const int64_t num_rows = table.row_limit();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < num_rows, op, ": rows[", i, "] = ", r[i], " is not a row of the table (",
                num_rows, " rows)");
    TORCH_CHECK(i == 0 || r[i] > r[i - 1], op,
                ": rows must be unique and sorted ascending (as pooled_backward returns them); rows[", i, "] = ",
                r[i], " follows ", r[i - 1]);
  }
  const float step_size = p.adam_step_size();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    std::vector<float> g(static_cast<size_t>(D));
    for (int64_t i = b; i < e; ++i) {
      std::copy(gp + i * D, gp + (i + 1) * D, g.begin());
      dispatch_dim(D, [&](auto kd) { apply_update<decltype(kd)::value>(table, r[i], g.data(), p, step_size); });
      table.mark_updated(r[i], step);
    }
  });
}

void pooled_backward_update_cpu(at::IntArrayRef handles, const at::Tensor& grad_output, const at::Tensor& rows,
                                const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
                                at::IntArrayRef feature_table, at::IntArrayRef feature_mode,
                                at::IntArrayRef feature_col, int64_t optimizer, at::ArrayRef<double> hyperparameters,
                                int64_t weight_decay_mode, at::IntArrayRef steps) {
  const char* op = "recis::pooled_backward_update";
  std::vector<int64_t> dims;
  const auto tables = resolve_tables(handles, op, &dims);
  const int64_t T = static_cast<int64_t>(tables.size());
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == T, op, ": steps must hold one update count per table (", T,
              "), got ", steps.size());
  std::vector<OptimParams> params;
  std::vector<float> step_size;
  for (int64_t t = 0; t < T; ++t) {
    params.push_back(make_optim_params(op, optimizer, hyperparameters, weight_decay_mode, steps[t]));
    step_size.push_back(params.back().adam_step_size());
    check_state_dim(op, tables[t]->table, params.back(), t);
  }
  TORCH_CHECK(grad_output.dim() == 2, op, ": grad_output must be 2-D, got ", grad_output.sizes());
  const int64_t out_dim = grad_output.size(1);
  const BagLayout l =
      make_layout(op, rows, offsets, per_sample_weights, feature_table, feature_mode, feature_col, dims, out_dim);
  const at::Tensor go = checked_grad(op, grad_output, l.batch);
  // A table listed twice in `handles` would get two racing updates per row.
  for (int64_t a = 0; a < T; ++a) {
    for (int64_t b = a + 1; b < T; ++b) {
      TORCH_CHECK(tables[a] != tables[b], op, ": tables ", a, " and ", b, " are the same table; list it once");
    }
  }

  TableLocks locks(tables, /*exclusive=*/true);
  std::vector<int64_t> sizes;
  for (const auto& t : tables) sizes.push_back(t->table.row_limit());
  const RowGroups g = group_rows(op, l, rows.data_ptr<int64_t>(), T, out_dim, &sizes);
  std::vector<int64_t> row_bytes;
  for (int64_t t = 0; t < T; ++t) row_bytes.push_back(tables[t]->table.blocks().stride_bytes());
  reduce_rows(
      l, g, dims, go.data_ptr<float>(), out_dim,
      [&](int64_t t, int64_t, int64_t r, float* acc, auto kd) {
        auto& table = tables[t]->table;
        apply_update<decltype(kd)::value>(table, r, acc, params[t], step_size[t]);
        table.mark_updated(r, steps[t]);
      },
      [&](int64_t t, int64_t r) { prefetch_bytes(tables[t]->table.row_bytes(r), row_bytes[t]); });
}

at::Tensor pooled_weight_grad_cpu(at::IntArrayRef handles, const at::Tensor& grad_output, const at::Tensor& ids,
                                  const at::Tensor& rows, const at::Tensor& offsets, at::IntArrayRef feature_table,
                                  at::IntArrayRef feature_mode, at::IntArrayRef feature_col) {
  const char* op = "recis::pooled_weight_grad";
  std::vector<int64_t> dims;
  const auto tables = resolve_tables(handles, op, &dims);
  TORCH_CHECK(grad_output.dim() == 2, op, ": grad_output must be 2-D, got ", grad_output.sizes());
  const int64_t out_dim = grad_output.size(1);
  const BagLayout l = make_layout(op, rows, offsets, std::nullopt, feature_table, feature_mode, feature_col, dims,
                                  out_dim);
  check_cpu_1d(ids, op, "ids", at::kLong);
  TORCH_CHECK(ids.numel() == l.num_values, op, ": ", ids.numel(), " ids for ", l.num_values, " rows");
  const at::Tensor go = checked_grad(op, grad_output, l.batch);
  const auto ids_c = ids.contiguous();
  const int64_t* key = ids_c.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  const float* g = go.data_ptr<float>();
  at::Tensor out = at::zeros({l.num_values}, at::kFloat);
  float* w = out.data_ptr<float>();
  TableLocks locks(tables, /*exclusive=*/false);
  const int64_t max_dim = dims.empty() ? 0 : *std::max_element(dims.begin(), dims.end());
  const int64_t B = l.batch;
  at::parallel_for(0, l.num_features * B, 64, [&](int64_t qb, int64_t qe) {
    std::vector<float> init(static_cast<size_t>(max_dim));
    for (int64_t q = qb; q < qe; ++q) {
      const int64_t f = q / B, b = q % B, t = l.table[f];
      if (t < 0) continue;
      const auto& table = tables[t]->table;
      const int64_t D = dims[t], limit = table.row_limit();
      const int64_t s = l.bag_begin(q), e = l.bag_end(q);
      const float scale = l.mode[f] == kMean && e > s ? 1.0f / static_cast<float>(e - s) : 1.0f;
      const float* gb = g + b * out_dim + l.col[f];
      for (int64_t i = s; i < e; ++i) {
        const int64_t r = row[i];
        TORCH_CHECK(r < limit, op, ": rows[", i, "] = ", r, " is not a row of table ", t);
        const float* v;
        if (r < 0) {
          table.initial_row(key[i], init.data());
          v = init.data();
        } else if (table.row_type() == hashtable::RowType::kF32) {
          v = table.row(r);
        } else {
          table.read_row(r, init.data());
          v = init.data();
        }
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += gb[d] * v[d];
        w[i] = acc * scale;
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor segment_sum_rows_cpu(const at::Tensor& grads, const at::Tensor& inverse, int64_t num_unique) {
  const char* op = "recis::segment_sum_rows";
  TORCH_CHECK(grads.device().is_cpu() && grads.dim() == 2 && grads.scalar_type() == at::kFloat, op,
              ": grads must be a 2-D float32 CPU tensor, got ", grads.sizes(), " ", grads.scalar_type());
  check_cpu_1d(inverse, op, "inverse", at::kLong);
  TORCH_CHECK(inverse.numel() == grads.size(0), op, ": ", inverse.numel(), " indices for ", grads.size(0), " rows");
  TORCH_CHECK(num_unique >= 0, op, ": num_unique must be >= 0, got ", num_unique);
  const int64_t n = grads.size(0), dim = grads.size(1);
  const auto g = grads.contiguous();
  const auto inv_c = inverse.contiguous();
  const float* src = g.data_ptr<float>();
  const int64_t* inv = inv_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(inv[i] >= 0 && inv[i] < num_unique, op, ": inverse[", i, "] = ", inv[i], " is not in [0, ",
                num_unique, ")");
  }
  at::Tensor out = at::zeros({num_unique, dim}, at::kFloat);
  float* dst = out.data_ptr<float>();
  // Each thread owns a range of output rows and adds the gradient rows that
  // map into it, in input order (so results do not depend on the thread count).
  at::parallel_for(0, num_unique, 1024, [&](int64_t ub, int64_t ue) {
    dispatch_dim(dim, [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t u = inv[i];
        if (u < ub || u >= ue) continue;
        axpy<kD>(dst + u * dim, src + i * dim, 1.0f, dim);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(recis, CPU, m) {
  m.impl("segment_sum_rows", &segment_sum_rows_cpu);
  m.impl("pooled_forward", &pooled_forward_cpu);
  m.impl("lookup_pooled_forward", &lookup_pooled_forward_cpu);
  m.impl("pooled_backward", &pooled_backward_cpu);
  m.impl("sparse_update", &sparse_update_cpu);
  m.impl("pooled_backward_update", &pooled_backward_update_cpu);
  m.impl("pooled_weight_grad", &pooled_weight_grad_cpu);
  m.impl("serving_index", &serving_index_cpu);
  m.impl("serving_pooled", &serving_pooled_cpu);
}

}  // namespace recis
