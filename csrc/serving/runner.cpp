// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// recis-serve: serves an inference package (recis_torchrec.inference.export(...,
// aot_inductor=True)) from C++, without Python. It verifies the package against
// its manifest (the XXH64 of manifest.json's bytes, kept in manifest.xxh64, then
// each file's size and XXH64; JSON is read with nlohmann-json),
// loads the hash tables from their safetensors shards into the serving lookup
// library (csrc/ops/serving.h), loads the AOTInductor-compiled dense program,
// and for a batch file (recis_torchrec.inference.write_batch) looks the ids up,
// runs the dense program and prints its outputs, as the Python predictor
// computes them.
//
//   recis-serve PACKAGE BATCH [--repeat N] [--threads N]
//
// Output: for each output tensor, a line "output K dtype shape", then its
// values row by row ("%.9g", which reads back as the same float32). With
// --repeat N the batch is also served N more times and the throughput goes to
// stderr. --threads N sets ATen's intra-op threads (default: ATen's, which on a
// busy machine can run 5-10x slower than one thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../hashtable/initializer.h"
#include "../hashtable/xxhash64.h"
#include "../ops/serving.h"
#include <nlohmann/json.hpp>

namespace recis {
namespace serve {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using Json = nlohmann::json;

Json parse_json(const std::string& text, const std::string& where) {
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    throw Error(where + ": malformed JSON (" + e.what() + ")");
  }
}

// A read-only view of a parsed document (nlohmann::json) whose accessors name the place in the
// package a missing key or a wrong type is at ("table 'x': no \"dim\" entry"): nlohmann's own
// exceptions say what went wrong but not in which file or entry.
class Value {
 public:
  explicit Value(const Json* v) : v_(v) {}

  bool is_null() const { return v_->is_null(); }
  bool is_string() const { return v_->is_string(); }
  std::optional<Value> find(const std::string& key) const {
    if (!v_->is_object()) return std::nullopt;
    const auto it = v_->find(key);
    if (it == v_->end()) return std::nullopt;
    return Value(&*it);
  }
  Value at(const std::string& key, const std::string& where) const {
    if (!v_->is_object()) throw Error(where + ": expected an object, got " + v_->dump());
    const auto v = find(key);
    if (!v) throw Error(where + ": no \"" + key + "\" entry");
    return *v;
  }
  const std::string& as_string(const std::string& where) const {
    if (!v_->is_string()) throw Error(where + ": expected a string, got " + v_->dump());
    return v_->get_ref<const std::string&>();
  }
  int64_t as_int(const std::string& where) const {
    if (v_->is_number_unsigned() && v_->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw Error(where + ": integer out of range: " + v_->dump());
    }
    if (!v_->is_number_integer()) throw Error(where + ": expected an integer, got " + v_->dump());
    return v_->get<int64_t>();
  }
  // A 64-bit pattern (a seed) written as a signed or an unsigned integer: its bits.
  int64_t as_bits64(const std::string& where) const {
    if (v_->is_number_unsigned()) return static_cast<int64_t>(v_->get<uint64_t>());
    return as_int(where);
  }
  double as_double(const std::string& where) const {
    if (!v_->is_number()) throw Error(where + ": expected a number, got " + v_->dump());
    return v_->get<double>();
  }
  bool as_bool(const std::string& where) const {
    if (!v_->is_boolean()) throw Error(where + ": expected true or false, got " + v_->dump());
    return v_->get<bool>();
  }
  std::vector<Value> as_array(const std::string& where) const {
    if (!v_->is_array()) throw Error(where + ": expected an array, got " + v_->dump());
    std::vector<Value> out;
    for (const Json& item : *v_) out.emplace_back(&item);
    return out;
  }
  std::vector<std::pair<std::string, Value>> members(const std::string& where) const {
    if (!v_->is_object()) throw Error(where + ": expected an object, got " + v_->dump());
    std::vector<std::pair<std::string, Value>> out;
    for (const auto& [k, item] : v_->items()) out.emplace_back(k, Value(&item));
    return out;
  }

 private:
  const Json* v_;
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": missing or unreadable");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, h);
  return buf;
}

// A file a manifest lists: inside the package, of the size and XXH64 the entry records.
std::string verified(const std::string& dir, const Value& entry, const std::string& what) {
  const std::string& name = entry.at("file", what).as_string(what);
  if (name.empty() || name[0] == '/' || name.find("..") != std::string::npos) {
    throw Error(what + ": file entry " + name + " is outside the package");
  }
  const std::string path = dir + "/" + name;
  const std::string data = read_file(path);
  const int64_t want = entry.at("bytes", what).as_int(what);
  if (static_cast<int64_t>(data.size()) != want) {
    throw Error(path + ": " + std::to_string(data.size()) + " bytes but the manifest says " + std::to_string(want) +
                " (truncated?)");
  }
  if (const auto sum = entry.find("xxh64_file")) {
    if (hex16(hashtable::xxh64(data.data(), data.size(), 0)) != sum->as_string(what)) {
      throw Error(path + ": checksum mismatch (the file is corrupt)");
    }
  }
  return data;
}

at::ScalarType dtype_of(const std::string& name, const std::string& where) {
  static const std::map<std::string, at::ScalarType> types = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt},  {"U8", at::kByte},       {"I8", at::kChar}, {"BOOL", at::kBool}};
  const auto it = types.find(name);
  if (it == types.end()) throw Error(where + ": unsupported dtype " + name);
  return it->second;
}

// A safetensors file's tensors (copied out of `data`) and its metadata.
struct Tensors {
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> metadata;

  const at::Tensor& get(const std::string& name, const std::string& where) const {
    const auto it = tensors.find(name);
    if (it == tensors.end()) throw Error(where + ": no tensor " + name);
    return it->second;
  }
};

Tensors parse_safetensors(const std::string& data, const std::string& where) {
  if (data.size() < 8) throw Error(where + ": not a safetensors file (shorter than its header length)");
  uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  if (n > data.size() - 8) throw Error(where + ": not a safetensors file (header length " + std::to_string(n) + ")");
  const Json doc = parse_json(data.substr(8, n), where + " (header)");
  const Value header(&doc);
  const size_t base = 8 + n;
  Tensors out;
  for (const auto& [name, info] : header.members(where)) {
    if (name == "__metadata__") {
      for (const auto& [k, v] : info.members(where)) out.metadata[k] = v.as_string(where + " metadata");
      continue;
    }
    const std::string what = where + ": tensor " + name;
    const at::ScalarType dtype = dtype_of(info.at("dtype", what).as_string(what), what);
    std::vector<int64_t> shape;
    int64_t numel = 1;
    for (const Value& d : info.at("shape", what).as_array(what)) {
      shape.push_back(d.as_int(what));
      if (shape.back() < 0) throw Error(what + ": negative dimension");
      numel *= shape.back();
    }
    const auto& span = info.at("data_offsets", what).as_array(what);
    if (span.size() != 2) throw Error(what + ": data_offsets must be [begin, end]");
    const int64_t b = span[0].as_int(what), e = span[1].as_int(what);
    const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
    if (b < 0 || e < b || e - b != bytes || base + static_cast<size_t>(e) > data.size()) {
      throw Error(what + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + ") do not fit its shape" +
                  " and the file");
    }
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
    if (bytes) std::memcpy(t.data_ptr(), data.data() + base + b, static_cast<size_t>(bytes));
    out.tensors[name] = t;
  }
  return out;
}

constexpr int64_t kFormatVersion = 1;

// One served table: its index and packed rows.
struct Table {
  int64_t dim = 0;
  int64_t format = 0;
  at::Tensor index_keys, index_rows, rows;
  int64_t init_kind = -1;
  double init_a = 0, init_b = 0;
  int64_t init_seed = 0;

  at::Tensor pooled(const at::Tensor& ids, const at::Tensor& offsets, const std::optional<at::Tensor>& weights,
                    int64_t mode) const {
    return serving_pooled_cpu(index_keys, index_rows, rows, format, ids, offsets, weights, mode, init_kind, init_a,
                              init_b, init_seed);
  }
};

int64_t format_of(const std::string& q, const std::string& where) {
  if (q == "fp32") return kServingF32;
  if (q == "fp16") return kServingF16;
  if (q == "bf16") return kServingBF16;
  if (q == "int8") return kServingInt8;
  throw Error(where + ": unknown quantization " + q);
}

Table load_table(const std::string& dir, const std::string& key, const Value& entry, bool zero_default) {
  const std::string what = "table '" + key + "'";
  Table t;
  t.dim = entry.at("dim", what).as_int(what);
  t.format = format_of(entry.at("quantization", what).as_string(what), what);
  std::vector<at::Tensor> ids, rows;
  for (const Value& f : entry.at("files", what).as_array(what)) {
    const std::string file = dir + "/" + f.at("file", what).as_string(what);
    Tensors part = parse_safetensors(verified(dir, f, what), file);
    if (part.tensors.size() != 2 || !part.tensors.count("ids") || !part.tensors.count("rows")) {
      throw Error(what + ": " + file + " does not hold exactly ids and rows");
    }
    ids.push_back(part.get("ids", file));
    rows.push_back(part.get("rows", file));
  }
  if (ids.empty()) throw Error(what + ": the manifest lists no files");
  const at::Tensor all_ids = at::cat(ids), all_rows = at::cat(rows);
  const int64_t want = entry.at("rows", what).as_int(what);
  if (all_ids.numel() != want) {
    throw Error(what + ": " + std::to_string(all_ids.numel()) + " rows in its files, the manifest says " +
                std::to_string(want));
  }
  const int64_t width = t.format == kServingInt8 ? t.dim + 8 : t.dim;
  if (all_rows.dim() != 2 || all_rows.size(0) != want || all_rows.size(1) != width) {
    throw Error(what + ": rows of shape " + c10::str(all_rows.sizes()) + " for " + std::to_string(want) + " ids of dim " +
                std::to_string(t.dim));
  }
  std::tie(t.index_keys, t.index_rows) = serving_index_cpu(all_ids);
  t.rows = all_rows.contiguous();
  if (!zero_default) {
    const Value& init = entry.at("init", what);
    t.init_kind = init.at("kind", what).as_int(what);
    if (t.init_kind < static_cast<int64_t>(hashtable::InitKind::kUniform) ||
        t.init_kind > static_cast<int64_t>(hashtable::InitKind::kConstant)) {
      throw Error(what + ": unknown initializer kind " + std::to_string(t.init_kind));
    }
    t.init_a = init.at("a", what).as_double(what);
    t.init_b = init.at("b", what).as_double(what);
    t.init_seed = init.at("seed", what).as_bits64(what);
  }
  return t;
}

// The model's input KJT, split per feature as KeyedJaggedTensor.to_dict() splits it.
struct Features {
  at::Tensor values, lengths;
  std::optional<at::Tensor> weights;
  std::map<std::string, int64_t> index;
  std::vector<at::Tensor> f_values, f_lengths, f_offsets;
  std::vector<std::optional<at::Tensor>> f_weights;

  int64_t of(const std::string& feature) const {
    const auto it = index.find(feature);
    if (it == index.end()) throw Error("the batch's KeyedJaggedTensor lacks feature '" + feature + "'");
    return it->second;
  }
};

// int32 ids and lengths are taken as the training modules take them: widened to int64.
at::Tensor widened(const at::Tensor& t, const char* what) {
  if (t.dim() != 1 || (t.scalar_type() != at::kLong && t.scalar_type() != at::kInt)) {
    throw Error(std::string("the batch's KJT ") + what + " must be 1-D int64 or int32");
  }
  return t.scalar_type() == at::kLong ? t : t.to(at::kLong);
}

Features split(const std::vector<std::string>& keys, const at::Tensor& raw_values, const at::Tensor& raw_lengths,
               const std::optional<at::Tensor>& weights) {
  Features f;
  const at::Tensor values = widened(raw_values, "values");
  const at::Tensor lengths = widened(raw_lengths, "lengths").contiguous();
  f.values = values;
  f.lengths = lengths;
  f.weights = weights;
  const int64_t F = static_cast<int64_t>(keys.size());
  if (F == 0 || lengths.numel() % F != 0) {
    throw Error("the batch's KJT has " + std::to_string(lengths.numel()) + " lengths for " + std::to_string(F) +
                " features");
  }
  const int64_t B = lengths.numel() / F;
  const int64_t* len = lengths.data_ptr<int64_t>();
  int64_t pos = 0;
  for (int64_t k = 0; k < F; ++k) {
    if (!f.index.emplace(keys[k], k).second) throw Error("the batch's KJT names feature '" + keys[k] + "' twice");
    at::Tensor off = at::empty({B + 1}, at::kLong);
    int64_t* o = off.data_ptr<int64_t>();
    o[0] = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (len[k * B + b] < 0) throw Error("feature '" + keys[k] + "': negative length");
      o[b + 1] = o[b] + len[k * B + b];
    }
    if (pos + o[B] > values.numel()) throw Error("the batch's KJT lengths add up to more than its values");
    f.f_values.push_back(values.narrow(0, pos, o[B]));
    f.f_lengths.push_back(lengths.narrow(0, k * B, B));
    f.f_offsets.push_back(off);
    f.f_weights.push_back(weights ? std::optional<at::Tensor>(weights->narrow(0, pos, o[B])) : std::nullopt);
    pos += o[B];
  }
  if (pos != values.numel()) throw Error("the batch's KJT lengths add up to fewer than its values");
  return f;
}

class Runner {
 public:
  Runner(const Runner&) = delete;  // manifest_ points into doc_
  Runner& operator=(const Runner&) = delete;
  explicit Runner(const std::string& dir) : dir_(dir) {
    const std::string file = dir + "/manifest.json";
    // The checksum is of the file's bytes (manifest.xxh64, beside it), checked before they are parsed.
    const std::string data = read_file(file);
    const std::string sidecar = dir + "/manifest.xxh64";
    if (!std::ifstream(sidecar)) {
      throw Error(sidecar + ": missing (a package written before the manifest's checksum moved there, or an "
                  "incomplete copy): export it again");
    }
    std::string sum = read_file(sidecar);
    while (!sum.empty() && (sum.back() == '\n' || sum.back() == '\r' || sum.back() == ' ')) sum.pop_back();
    if (hex16(hashtable::xxh64(data.data(), data.size(), 0)) != sum) {
      throw Error(file + ": checksum mismatch (the manifest was edited or is corrupt)");
    }
    doc_ = parse_json(data, file);
    if (manifest_.at("kind", file).as_string(file) != "inference") throw Error(file + ": not an inference manifest");
    if (manifest_.at("format", file).as_int(file) != kFormatVersion) throw Error(file + ": unsupported package format");
    warn_on_torch_version(file);
    const auto aoti = manifest_.find("aoti_program");
    const auto plan = manifest_.find("serving_inputs");
    if (!aoti || !plan) {
      throw Error(dir + ": the package has no AOTInductor program (export with aot_inductor=True)");
    }
    const bool zero = manifest_.at("unseen", file).as_string(file) == "zero";
    for (const auto& [key, entry] : manifest_.at("tables", file).members(file)) {
      tables_.emplace(key, load_table(dir, key, entry, zero));
    }
    for (const Value& m : manifest_.at("modules", file).as_array(file)) {
      modules_.emplace(m.at("path", file).as_string(file), m);
    }
    plan_ = plan;
    if (const auto request = manifest_.find("request")) request_ = parse_request(*request);
    verified(dir, *aoti, "the AOTInductor program");
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        dir + "/" + aoti->at("file", file).as_string(file));
  }

  // As the Python predictor does: a package exported with another torch (major.minor) than the
  // one this runner is built with may not load, or may run differently; say so, naming both.
  void warn_on_torch_version(const std::string& file) const {
    std::string made;
    if (const auto versions = manifest_.find("versions")) {
      if (const auto t = versions->find("torch"); t && t->is_string()) made = t->as_string("versions");
    }
    const std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
    const size_t second_dot = made.find('.', made.find('.') + 1);
    const std::string made_minor = made.substr(0, second_dot);
    if (made_minor != here) {
      std::fprintf(stderr,
                   "recis-serve: warning: %s: the package was exported with torch %s, this runner is built with "
                   "torch %s; its AOTInductor program may not load or may run differently\n",
                   file.c_str(), made.empty() ? "(unknown)" : made.c_str(), here.c_str());
    }
  }

  // The dense program's flat inputs for a batch, in the order the manifest's plan gives.
  std::vector<at::Tensor> inputs(const std::vector<at::Tensor>& args, const Features& kjt) const {
    const std::string where = "the manifest's serving_inputs";
    std::vector<at::Tensor> out;
    for (const Value& in : plan_->as_array(where)) {
      const std::string& src = in.at("src", where).as_string(where);
      if (src == "arg") {
        const int64_t i = in.at("arg", where).as_int(where);
        if (i < 0 || i >= static_cast<int64_t>(args.size()) || !args[i].defined()) {
          throw Error("the batch has no tensor argument " + std::to_string(i));
        }
        out.push_back(args[i]);
      } else if (src == "kjt") {
        const std::string& field = in.at("field", where).as_string(where);
        if (field == "values") {
          out.push_back(kjt.values);
        } else if (field == "lengths") {
          out.push_back(kjt.lengths);
        } else if (field == "weights") {
          if (!kjt.weights) throw Error("the batch's KJT has no weights, which the model reads");
          out.push_back(*kjt.weights);
        } else {
          throw Error(where + ": unknown KJT field " + field);
        }
      } else if (src == "ebc") {
        out.push_back(ebc(in.at("module", where).as_string(where), kjt));
      } else if (src == "ec") {
        out.push_back(ec(in.at("module", where).as_string(where), in.at("embedding", where).as_string(where),
                         in.at("field", where).as_string(where), kjt));
      } else {
        throw Error(where + ": unknown source " + src);
      }
    }
    return out;
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& args, const Features& kjt) {
    check_request(args, kjt);
    return loader_->run(inputs(args, kjt));
  }

  // One tensor argument of a request as the export saw it (the manifest's request spec).
  struct InputSpec {
    int64_t index;
    std::string name, dtype_name;
    at::ScalarType dtype;
    std::vector<int64_t> shape;  // past the batch dimension
    bool batch;                  // the first dimension is the batch
  };

  // Read once at load: each request only compares its tensors with it.
  static std::vector<InputSpec> parse_request(const Value& request) {
    const std::string where = "the manifest's request";
    static const std::map<std::string, at::ScalarType> dtypes = {
        {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
        {"int64", at::kLong},    {"int32", at::kInt},      {"uint8", at::kByte},  {"bool", at::kBool}};
    std::vector<InputSpec> out;
    for (const auto& [name, want] : request.at("tensors", where).members(where)) {
      InputSpec in{std::stoll(name), name, want.at("dtype", where).as_string(where), at::kFloat, {},
                   want.at("batch", where).as_bool(where)};
      const auto it = dtypes.find(in.dtype_name);
      if (it == dtypes.end()) throw Error(where + ": input " + name + " has an unknown dtype " + in.dtype_name);
      in.dtype = it->second;
      for (const Value& d : want.at("shape", where).as_array(where)) in.shape.push_back(d.as_int(where));
      out.push_back(std::move(in));
    }
    return out;
  }

  // The batch's tensor arguments against the request spec (their dtype, their shape past the batch
  // dimension, and a batch size equal to the KJT's): a compiled program given another shape or dtype
  // reads memory as if it had the exported one.
  void check_request(const std::vector<at::Tensor>& args, const Features& kjt) const {
    const int64_t F = static_cast<int64_t>(kjt.index.size());
    const int64_t B = F ? kjt.lengths.numel() / F : 0;
    for (const InputSpec& want : request_) {
      const std::string arg = "input " + want.name;
      if (want.index >= static_cast<int64_t>(args.size()) || !args[want.index].defined()) {
        throw Error(arg + ": the model takes a tensor there");
      }
      const at::Tensor& a = args[want.index];
      const bool same_shape = a.dim() == static_cast<int64_t>(want.shape.size()) + 1 &&
                              std::equal(want.shape.begin(), want.shape.end(), a.sizes().begin() + 1);
      if (a.scalar_type() != want.dtype || !same_shape) {
        std::string dims;
        for (const int64_t d : want.shape) dims += ", " + std::to_string(d);
        throw Error(arg + ": the model takes " + want.dtype_name + " of shape (batch" + dims + "), got " +
                    c10::toString(a.scalar_type()) + " of shape " + c10::str(a.sizes()));
      }
      if (want.batch && a.size(0) != B) {
        throw Error(arg + " has " + std::to_string(a.size(0)) + " rows but the KeyedJaggedTensor a batch of " +
                    std::to_string(B) + ": every input of a request must have the same batch size");
      }
    }
  }

 private:
  Value module(const std::string& path) const {
    const auto it = modules_.find(path);
    if (it == modules_.end()) throw Error("the manifest has no module '" + path + "'");
    return it->second;
  }
  const Table& table(const std::string& key) const {
    const auto it = tables_.find(key);
    if (it == tables_.end()) throw Error("the manifest has no table '" + key + "'");
    return it->second;
  }

  // An EmbeddingBagCollection's output values: every feature's pooled bags, side by side.
  at::Tensor ebc(const std::string& path, const Features& kjt) const {
    const Value m = module(path);
    const std::string where = "module '" + path + "'";
    const bool weighted = m.at("weighted", where).as_bool(where);
    std::vector<at::Tensor> cols;
    for (const Value& f : m.at("features", where).as_array(where)) {
      const auto& v = f.as_array(where);  // feature, table key, pooling mode, dim
      const std::string& feature = v.at(0).as_string(where);
      const int64_t k = kjt.of(feature);
      if (weighted && !kjt.f_weights[k]) throw Error(where + ": feature '" + feature + "' needs per-id weights");
      cols.push_back(table(v.at(1).as_string(where))
                         .pooled(kjt.f_values[k], kjt.f_offsets[k], weighted ? kjt.f_weights[k] : std::nullopt,
                                 v.at(2).as_int(where)));
    }
    return cols.size() == 1 ? cols[0] : at::cat(cols, 1);
  }

  // A field of an EmbeddingCollection's JaggedTensor for one embedding name.
  at::Tensor ec(const std::string& path, const std::string& emb, const std::string& field, const Features& kjt) const {
    const Value m = module(path);
    const std::string where = "module '" + path + "'";
    for (const Value& f : m.at("features", where).as_array(where)) {
      const auto& v = f.as_array(where);  // feature, embedding name, table key, dim
      if (v.at(1).as_string(where) != emb) continue;
      const int64_t k = kjt.of(v.at(0).as_string(where));
      if (field == "values") {
        const int64_t n = kjt.f_values[k].numel();
        return table(v.at(2).as_string(where)).pooled(kjt.f_values[k], at::arange(n + 1, at::kLong), std::nullopt, 0);
      }
      if (field == "lengths") return kjt.f_lengths[k];
      if (field == "weights") return kjt.f_values[k];  // need_indices: the ids ride as weights
      throw Error(where + ": unknown field " + field);
    }
    throw Error(where + ": no embedding '" + emb + "'");
  }

  std::string dir_;
  Json doc_;
  Value manifest_{&doc_};
  std::optional<Value> plan_;
  std::vector<InputSpec> request_;  // empty for a package from before the spec was written
  std::map<std::string, Table> tables_;
  std::map<std::string, Value> modules_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

// A batch file (recis_torchrec.inference.write_batch): the model's positional arguments.
struct Batch {
  std::vector<at::Tensor> args;  // undefined where the argument is the KJT
  std::vector<std::string> keys;
  at::Tensor values, lengths;
  std::optional<at::Tensor> weights;
  int64_t batch_size = 0;
};

Batch read_batch(const std::string& path) {
  Tensors t = parse_safetensors(read_file(path), path);
  const auto it = t.metadata.find("recis_inputs");
  if (it == t.metadata.end()) throw Error(path + ": not a batch file (no recis_inputs metadata)");
  const Json doc = parse_json(it->second, path + " (recis_inputs)");
  const Value inputs(&doc);
  Batch b;
  bool have_kjt = false;
  for (const Value& in : inputs.as_array(path)) {
    const std::string& kind = in.at("kind", path).as_string(path);
    if (kind == "tensor") {
      b.args.push_back(t.get(in.at("name", path).as_string(path), path));
    } else if (kind == "kjt") {
      if (have_kjt) throw Error(path + ": more than one KeyedJaggedTensor");
      have_kjt = true;
      for (const Value& k : in.at("keys", path).as_array(path)) b.keys.push_back(k.as_string(path));
      b.values = t.get(in.at("values", path).as_string(path), path);
      b.lengths = t.get(in.at("lengths", path).as_string(path), path);
      const Value& w = in.at("weights", path);
      if (!w.is_null()) b.weights = t.get(w.as_string(path), path);
      b.args.emplace_back();
    } else {
      throw Error(path + ": unknown input kind " + kind);
    }
  }
  if (!have_kjt) throw Error(path + ": no KeyedJaggedTensor");
  b.batch_size = b.keys.empty() ? 0 : b.lengths.numel() / static_cast<int64_t>(b.keys.size());
  return b;
}

void print(const std::vector<at::Tensor>& outputs) {
  for (size_t k = 0; k < outputs.size(); ++k) {
    const at::Tensor t = outputs[k].contiguous();
    std::printf("output %zu %s %s\n", k, c10::toString(t.scalar_type()), c10::str(t.sizes()).c_str());
    const at::Tensor f = t.to(at::kDouble);
    const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    const int64_t cols = rows ? t.numel() / rows : 0;
    const double* p = f.data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) std::printf(c ? " %.9g" : "%.9g", p[r * cols + c]);
      std::printf("\n");
    }
  }
}

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  int64_t repeat = 0;
  int64_t threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--repeat" && i + 1 < argc) {
      char* end = nullptr;
      repeat = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || repeat < 0) throw Error("--repeat needs a count >= 0, got " + std::string(argv[i]));
    } else if (a == "--threads" && i + 1 < argc) {
      char* end = nullptr;
      threads = std::strtoll(argv[++i], &end, 10);
      if (*end != '\0' || threads < 1) throw Error("--threads needs a count >= 1, got " + std::string(argv[i]));
    } else if (a == "-h" || a == "--help") {
      std::printf("usage: recis-serve PACKAGE BATCH [--repeat N] [--threads N]\n");
      return 0;
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) throw Error("usage: recis-serve PACKAGE BATCH [--repeat N] [--threads N]");
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  Runner runner(pos[0]);
  const Batch batch = read_batch(pos[1]);
  auto serve = [&]() {
    return runner.run(batch.args, split(batch.keys, batch.values, batch.lengths, batch.weights));
  };
  print(serve());
  if (repeat > 0) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < repeat; ++i) serve();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "recis-serve: %" PRId64 " batches of %" PRId64 " in %.3f s: %.1f samples/s, %.3f ms/batch\n",
                 repeat, batch.batch_size, s, repeat * batch.batch_size / s, 1e3 * s / repeat);
  }
  return 0;
}

}  // namespace serve
}  // namespace recis

int main(int argc, char** argv) {
  try {
    return recis::serve::main(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "recis-serve: error: %s\n", e.what_without_backtrace());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "recis-serve: error: %s\n", e.what());
    return 2;
  }
}
