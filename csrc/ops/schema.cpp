// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The schema of every recis op, defined once. Implementations register per
// dispatch key in *_cpu.cpp (and *_cuda.cu); fake kernels live next to the
// Python wrappers in recis_torchrec/ops/.
//
// Tables are named by int64 handles from recis_torchrec's HashTable. Lists of
// features follow TorchRec's KJT layout: feature k owns bags
// offsets[k*B .. (k+1)*B], where B = (offsets.numel() - 1) / num_features.
// feature_table[k] indexes `tables` (or table_dims), -1 to skip the feature;
// feature_mode[k] is 0 (sum) or 1 (mean); feature_col[k] is the first output
// column of the feature in the (B, out_dim) pooled output.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(recis, m) {
  // rows[i] = row of ids[i] in tables[s], where segment s holds
  // ids[segment_offsets[s] : segment_offsets[s+1]]; -1 if absent or skipped.
  m.def("find(int[] tables, Tensor ids, Tensor segment_offsets) -> Tensor");
  // As find, but absent ids get a new row with their deterministic initial
  // value, as admission and the capacity cap allow (refused ids: -1).
  // `clock` is the tables' update count: the lookup marks rows with it (for
  // TTL, LRU and LFU eviction). Mutates the tables.
  m.def("find_or_insert(int[] tables, Tensor ids, Tensor segment_offsets, int clock=0) -> Tensor");
  // Pooled lookup: (B, out_dim). Bags with a row of -1 read that id's
  // initial value (what find_or_insert would give it) without inserting it.
  m.def(
      "pooled_forward(int[] tables, Tensor ids, Tensor rows, Tensor offsets, Tensor? per_sample_weights, "
      "int[] feature_table, int[] feature_mode, int[] feature_col, int out_dim) -> Tensor");
  // find (or, with insert, find_or_insert) fused with pooled_forward:
  // returns (pooled (B, out_dim), rows (N,)). Ids are looked up tile by tile
  // as their bags are pooled; absent ids pool their initial value and, with
  // insert, get their rows afterwards.
  m.def(
      "lookup_pooled_forward(int[] tables, Tensor ids, Tensor offsets, Tensor? per_sample_weights, "
      "int[] feature_table, int[] feature_mode, int[] feature_col, int out_dim, bool insert, int clock=0) -> "
      "(Tensor, Tensor)");
  // Gradient of pooled_forward w.r.t. the rows: per table, the unique rows
  // touched (sorted ascending) and their summed gradients (U, dim).
  m.def(
      "pooled_backward(int[] table_dims, Tensor grad_output, Tensor rows, Tensor offsets, "
      "Tensor? per_sample_weights, int[] feature_table, int[] feature_mode, int[] feature_col) "
      "-> (Tensor[], Tensor[])");
  // Applies one optimizer step to the given unique rows (sorted ascending) of
  // a table, in place. Optimizer state lives in the table rows.
  m.def(
      "sparse_update(int table, Tensor rows, Tensor grads, int optimizer, float[] hyperparameters, "
      "int weight_decay_mode, int step) -> ()");
  // segment_sum_rows: out[u] = sum of grads[i] over i with inverse[i] == u,
  // (num_unique, D) float32; parallel over ranges of u, no atomics. The
  // gradient grouping of the unpooled (sequence) lookup.
  m.def("segment_sum_rows(Tensor grads, Tensor inverse, int num_unique) -> Tensor");
  // The gradient of the pooled output w.r.t. the per-sample weights: for value
  // i in bag b of feature f, dot(grad_output[b, col_f:col_f + dim], v_i),
  // divided by the bag length for mean pooling, with v_i the value the forward
  // pooled (the row, or the id's initial value where rows[i] is -1). (N,)
  // float32; 0 for features no table reads. Call it before the update.
  m.def(
      "pooled_weight_grad(int[] tables, Tensor grad_output, Tensor ids, Tensor rows, Tensor offsets, "
      "int[] feature_table, int[] feature_mode, int[] feature_col) -> Tensor");
  // pooled_backward followed by sparse_update on every table, fused: the
  // per-row gradient never leaves the cache. steps[t] is table t's update
  // count (Adam's bias correction).
  m.def(
      "pooled_backward_update(int[] tables, Tensor grad_output, Tensor rows, Tensor offsets, "
      "Tensor? per_sample_weights, int[] feature_table, int[] feature_mode, int[] feature_col, "
      "int optimizer, float[] hyperparameters, int weight_decay_mode, int[] steps) -> ()");
  // The rank that owns each id among world_size ranks (a salted mixing hash,
  // even for sequential ids). Training, checkpoints and resharding all use it.
  m.def("owner_of(Tensor ids, int world_size) -> Tensor");
  // The input side of the hash-sharded all-to-all. Given a KJT's ids and its
  // bag offsets (num_bags + 1,), returns
  //   unique_ids (U,): per owner rank, the distinct ids in first-occurrence order;
  //   unique_counts (world_size,): U per owner;
  //   inverse (N,) int32: for the values in owner-major order, the index of
  //     each among its owner's unique ids;
  //   value_counts (world_size,): values per owner;
  //   value_perm (N,): owner-major position -> original value index;
  //   bag_lengths (world_size, num_bags) int32: values of each bag per owner.
  m.def(
      "bucketize_dedup(Tensor ids, Tensor offsets, int world_size) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // XXH64 (seed `seed`, read as int64) of every string in Arrow's layout:
  // string i is data[offsets[i] : offsets[i+1]]. The project's one string hash.
  m.def("hash_strings(Tensor data, Tensor offsets, int seed=0) -> Tensor");
  // Read-only serving tables (plain tensors, no handle). serving_index: the
  // open-addressing index (keys (C,) int64, rows (C,) int32, -1 empty) over
  // distinct ids. serving_pooled: bags of ids (offsets (B + 1,)) pooled from
  // rows (n, dim) of row_format 0 f32 / 1 f16 / 2 bf16, or 3: (n, dim + 8)
  // uint8 row-wise INT8 (FBGEMM's fused layout: bytes, float scale, float
  // bias); mode 0 sum / 1 mean; unseen ids read zeros (init_kind -1) or their
  // deterministic initial row (init kind, a, b, seed). Returns (B, dim) f32.
  m.def("serving_index(Tensor ids) -> (Tensor, Tensor)");
  m.def("serving_pooled(Tensor index_keys, Tensor index_rows, Tensor rows, int row_format, Tensor ids, "
        "Tensor offsets, Tensor? per_sample_weights, int mode, int init_kind, float init_a, float init_b, "
        "int init_seed) -> Tensor");
  // write_file: a file of `header` then each tensor's bytes in order (contiguous
  // CPU tensors, row-major), fsync'd when `durable`, busy at most `share` of one
  // core's time (it sleeps between staged writes); returns the file's XXH64 (seed 0).
  m.def("write_file(str path, Tensor header, Tensor[] tensors, bool durable, float share=1.0) -> int");
  // parse_id_lists: each string (rows of Arrow-style data/offsets; nulls: rows
  // that are null) split by `delimiter` (empty: the whole string is one item)
  // into its non-empty items; each item an id (a canonical decimal int64 is that
  // integer, any other text its XXH64 with `seed`) and, with a non-empty
  // weight_delimiter, "id<weight_delimiter>weight" a weight (default 1).
  // Returns (items per row, ids, weights or None). `column` names the errors.
  m.def("parse_id_lists(Tensor data, Tensor offsets, Tensor? nulls, str delimiter, str weight_delimiter, int seed, "
        "str column) -> (Tensor, Tensor, Tensor?)");
  // Arrow columns -> tensors, one pass each. Column c has values[c] (its
  // value buffer from its first row on), validity[c] (its validity bitmap,
  // empty if it has no nulls) and bit_offsets[c] (the bitmap's first bit).
  // arrow_scalar_ids: integer id columns -> (values, lengths (C*B,)) of a KJT
  // with one key per column: a valid id is a bag of one, a null an empty bag.
  m.def(
      "arrow_scalar_ids(Tensor[] values, Tensor[] validity, int[] bit_offsets, int num_rows) -> (Tensor, Tensor)");
  // arrow_dense: numeric columns -> (B, C) float32, nulls -> defaults[c].
  m.def(
      "arrow_dense(Tensor[] values, Tensor[] validity, int[] bit_offsets, float[] defaults, int num_rows) -> Tensor");
  // The live rows of a table written after update `since` (-1: all), in row
  // order: (ids (n,), weights (n, dim), state (n, state_dim),
  // meta (n, 3) = (last_seen, last_update, freq)).
  m.def("table_export(int table, int since=-1) -> (Tensor, Tensor, Tensor, Tensor)");
  // Writes rows for distinct ids, inserting absent ones (bypassing admission
  // and the cap). A None weights, state or meta keeps the current value (the
  // initial one for new rows).
  m.def("table_import(int table, Tensor ids, Tensor? weights, Tensor? state, Tensor? meta=None) -> ()");

  // Fused feature ops. Each transforms a group of features of a KJT-layout
  // input (values (N,) int64, lengths (num_features * B,) int64, optional
  // weights (N,) float32) in one call and returns the transformed features,
  // in the order listed, as (values, lengths, weights) in the same layout.
  // Ids are read as unsigned 64-bit; a modulus of 0 means none.
  //   feature_hash: XXH64 (seed salts[g]) of each id's 8 little-endian bytes,
  //     then % moduli[g].
  m.def(
      "feature_hash(Tensor values, Tensor lengths, Tensor? weights, int num_features, int[] features, "
      "int[] salts, int[] moduli) -> (Tensor, Tensor, Tensor?)");
  //   feature_mod: id % moduli[g] (moduli > 0).
  m.def(
      "feature_mod(Tensor values, Tensor lengths, Tensor? weights, int num_features, int[] features, "
      "int[] moduli) -> (Tensor, Tensor, Tensor?)");
  //   feature_multi_hash: num_hashes outputs per listed feature (feature g's
  //     hash r is output g * num_hashes + r), hash r seeded salts[g] + r * 0x9E3779B97F4A7C15.
  m.def(
      "feature_multi_hash(Tensor values, Tensor lengths, Tensor? weights, int num_features, int[] features, "
      "int[] salts, int[] moduli, int num_hashes) -> (Tensor, Tensor, Tensor?)");
  //   feature_truncate: the first (from_end 0) or last (1) max_lengths[g] ids of every bag.
  m.def(
      "feature_truncate(Tensor values, Tensor lengths, Tensor? weights, int num_features, int[] features, "
      "int[] max_lengths, int[] from_end) -> (Tensor, Tensor, Tensor?)");
  //   feature_cross: per sample, every (a, b) of bags left[p] x right[p] (a outer)
  //     -> XXH64 (seed salts[p]) of a's then b's 8 bytes, % moduli[p]; weights multiply.
  m.def(
      "feature_cross(Tensor values, Tensor lengths, Tensor? weights, int num_features, int[] left, int[] right, "
      "int[] salts, int[] moduli) -> (Tensor, Tensor, Tensor?)");
  // feature_bucketize: dense (B, D) float32 -> (values, lengths) of one id per
  // sample and column: the number of boundaries <= x (boundaries of column g
  // are boundaries[boundary_offsets[g] : boundary_offsets[g+1]], non-decreasing);
  // NaN gets its own bucket, the column's boundary count + 1.
  m.def(
      "feature_bucketize(Tensor dense, int[] columns, Tensor boundaries, int[] boundary_offsets) "
      "-> (Tensor, Tensor)");
  // feature_concat: a KJT-layout output assembled from features of several
  // KJT-layout buffers: output key k is feature features[k] of buffer
  // buffers[k] (weights: one per buffer, or none).
  m.def(
      "feature_concat(Tensor[] values, Tensor[] lengths, Tensor[] weights, int batch, int[] buffers, "
      "int[] features) -> (Tensor, Tensor, Tensor?)");
  // feature_program: a whole feature plan in one pass, each output feature
  // computed from the input and written once (CPU). program = [K, then per
  // output: source, a, b, c, d, T, T x (max_length, side), S, S x (step, seed,
  // modulus)]. source 0: input feature a; 1: the cross of input features a and
  // b (a outer, salt c, modulus d, weights multiply); 2: dense column a
  // bucketized against boundaries[b:c] (weight 1). Then the truncations in
  // order (side 1 keeps the last max_length ids), then the per-id steps in
  // order: step 0 hashes (seed) then takes the modulus (0: none), step 1
  // takes the modulus (> 0).
  m.def(
      "feature_program(Tensor values, Tensor lengths, Tensor? weights, int num_features, Tensor? dense, "
      "Tensor boundaries, int[] program) -> (Tensor, Tensor, Tensor?)");
}
