// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// A small JSON reader for the C++ runner: manifests and safetensors headers.
// Numbers and strings keep the text they were written as, so canonical()
// can rebuild the exact bytes Python's json.dumps(sort_keys=True,
// separators=(",", ":")) gives for a document json.dump wrote (the manifest's
// checksum covers those bytes).
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace recis {
namespace json {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Value {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  std::string raw;  // numbers, true/false/null: their text; strings: with quotes and escapes as written
  std::string str;  // strings: decoded (UTF-8)
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;  // in document order
  std::string key_raw;  // for an object member: its key as written (with quotes)

  bool is_null() const { return kind == Kind::kNull; }
  const Value* find(const std::string& key) const {
    for (const auto& m : members) {
      if (m.first == key) return &m.second;
    }
    return nullptr;
  }
  // The member `key` of an object; `where` names the document in the error.
  const Value& at(const std::string& key, const std::string& where) const {
    const Value* v = kind == Kind::kObject ? find(key) : nullptr;
    if (v == nullptr) throw Error(where + ": no \"" + key + "\" entry");
    return *v;
  }
  const std::string& as_string(const std::string& where) const {
    if (kind != Kind::kString) throw Error(where + ": expected a string, got " + raw_text());
    return str;
  }
  int64_t as_int(const std::string& where) const {
    if (kind != Kind::kNumber || raw.find_first_of(".eE") != std::string::npos) {
      throw Error(where + ": expected an integer, got " + raw_text());
    }
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(raw.c_str(), &end, 10);
    if (errno == ERANGE) {
      // Seeds are unsigned 64-bit: keep their bits.
      errno = 0;
      const unsigned long long u = std::strtoull(raw.c_str(), &end, 10);
      if (errno == ERANGE || raw[0] == '-') throw Error(where + ": integer out of range: " + raw);
      return static_cast<int64_t>(u);
    }
    return static_cast<int64_t>(v);
  }
  double as_double(const std::string& where) const {
    if (kind != Kind::kNumber) throw Error(where + ": expected a number, got " + raw_text());
    return std::strtod(raw.c_str(), nullptr);
  }
  bool as_bool(const std::string& where) const {
    if (kind != Kind::kBool) throw Error(where + ": expected true or false, got " + raw_text());
    return raw == "true";
  }
  const std::vector<Value>& as_array(const std::string& where) const {
    if (kind != Kind::kArray) throw Error(where + ": expected an array, got " + raw_text());
    return items;
  }

  // The document with sorted keys and no whitespace; `skip` leaves out that top-level key.
  std::string canonical(const std::string& skip = std::string()) const {
    std::string out;
    write(out, skip);
    return out;
  }

 private:
  std::string raw_text() const {
    switch (kind) {
      case Kind::kArray:
        return "an array";
      case Kind::kObject:
        return "an object";
      default:
        return raw;
    }
  }
  void write(std::string& out, const std::string& skip) const {
    switch (kind) {
      case Kind::kArray:
        out += '[';
        for (size_t i = 0; i < items.size(); ++i) {
          if (i) out += ',';
          items[i].write(out, std::string());
        }
        out += ']';
        return;
      case Kind::kObject: {
        std::vector<const std::pair<std::string, Value>*> sorted;
        for (const auto& m : members) {
          if (skip.empty() || m.first != skip) sorted.push_back(&m);
        }
        std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->first < b->first; });
        out += '{';
        for (size_t i = 0; i < sorted.size(); ++i) {
          if (i) out += ',';
          out += sorted[i]->second.key_raw;
          out += ':';
          sorted[i]->second.write(out, std::string());
        }
        out += '}';
        return;
      }
      default:
        out += raw;
    }
  }
};

namespace detail {

class Parser {
 public:
  Parser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  Value document() {
    Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the document");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(where_ + ": malformed JSON at byte " + std::to_string(i_) + ": " + what);
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool literal(const char* word) {
    const size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  static void utf8(std::string& out, uint32_t c) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t c = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      c <<= 4;
      if (h >= '0' && h <= '9') c |= h - '0';
      else if (h >= 'a' && h <= 'f') c |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') c |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return c;
  }
  Value string() {
    Value v;
    v.kind = Value::Kind::kString;
    const size_t start = i_++;  // the opening quote
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        v.str += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated string");
      const char e = s_[i_++];
      switch (e) {
        case '"': v.str += '"'; break;
        case '\\': v.str += '\\'; break;
        case '/': v.str += '/'; break;
        case 'b': v.str += '\b'; break;
        case 'f': v.str += '\f'; break;
        case 'n': v.str += '\n'; break;
        case 'r': v.str += '\r'; break;
        case 't': v.str += '\t'; break;
        case 'u': {
          uint32_t c1 = hex4();
          if (c1 >= 0xD800 && c1 < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            const uint32_t c2 = hex4();
            if (c2 < 0xDC00 || c2 >= 0xE000) fail("bad surrogate pair");
            c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
          }
          utf8(v.str, c1);
          break;
        }
        default:
          fail(std::string("bad escape \\") + e);
      }
    }
    v.raw = s_.substr(start, i_ - start);
    return v;
  }
  Value value(int depth) {
    if (depth > 64) fail("nested too deeply");
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    const char c = s_[i_];
    if (c == '{') {
      v.kind = Value::Kind::kObject;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == '}') {
        ++i_;
        return v;
      }
      while (true) {
        skip_ws();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
        Value key = string();
        skip_ws();
        if (i_ >= s_.size() || s_[i_] != ':') fail("expected ':'");
        ++i_;
        Value member = value(depth + 1);
        member.key_raw = key.raw;
        v.members.emplace_back(key.str, std::move(member));
        skip_ws();
        if (i_ < s_.size() && s_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < s_.size() && s_[i_] == '}') {
          ++i_;
          return v;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::kArray;
      ++i_;
      skip_ws();
      if (i_ < s_.size() && s_[i_] == ']') {
        ++i_;
        return v;
      }
      while (true) {
        v.items.push_back(value(depth + 1));
        skip_ws();
        if (i_ < s_.size() && s_[i_] == ',') {
          ++i_;
          continue;
        }
        if (i_ < s_.size() && s_[i_] == ']') {
          ++i_;
          return v;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') return string();
    const size_t start = i_;
    if (literal("true") || literal("false")) {
      v.kind = Value::Kind::kBool;
    } else if (literal("null")) {
      v.kind = Value::Kind::kNull;
    } else if (literal("NaN") || literal("Infinity") || literal("-Infinity")) {
      v.kind = Value::Kind::kNumber;
    } else {
      if (i_ < s_.size() && s_[i_] == '-') ++i_;
      const size_t digits = i_;
      while (i_ < s_.size() && ((s_[i_] >= '0' && s_[i_] <= '9') || s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E' ||
                                s_[i_] == '+' || s_[i_] == '-')) {
        ++i_;
      }
      if (i_ == digits) fail("unexpected character");
      v.kind = Value::Kind::kNumber;
    }
    v.raw = s_.substr(start, i_ - start);
    return v;
  }

  const std::string& s_;
  std::string where_;
  size_t i_ = 0;
};

}  // namespace detail

// Parses `text`; errors name `where` (a file) and the byte.
inline Value parse(const std::string& text, const std::string& where) { return detail::Parser(text, where).document(); }

}  // namespace json
}  // namespace recis
