// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// write_file: one file from a header and the raw bytes of tensors, in order,
// hashed (XXH64 of the whole file) on the way out. Checkpoint files go through
// it: the bytes are staged through one aligned buffer and written with
// O_DIRECT where the file system takes it, which skips the page cache's copy
// (on a 2-core machine a buffered write of a table costs a core of kernel time
// for as long as it runs, taken from training when the save runs in the
// background). Where O_DIRECT is refused, the same writes go through the page
// cache.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "../hashtable/xxhash64.h"

namespace recis {
namespace {

constexpr size_t kAlign = 4096;             // O_DIRECT: buffer, offset and length alignment
constexpr size_t kStage = size_t(8) << 20;  // bytes staged per write

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

class DirectWriter {
 public:
  // share: the largest fraction of one core's time the writer may be busy; below
  // 1 it sleeps after each staged write for as long as its share requires.
  DirectWriter(const std::string& path, double share) : path_(path), share_(share) {
    fd_.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
    if (fd_.fd < 0 && errno == EINVAL) {  // the file system has no O_DIRECT (tmpfs, some FUSE)
      direct_ = false;
      fd_.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    }
    TORCH_CHECK(fd_.fd >= 0, "recis::write_file: cannot create ", path, ": ", std::strerror(errno));
    void* p = nullptr;
    TORCH_CHECK(::posix_memalign(&p, kAlign, kStage) == 0, "recis::write_file: cannot allocate ", kStage,
                " bytes of staging for ", path);
    stage_.reset(static_cast<uint8_t*>(p));
  }

  void feed(const uint8_t* src, size_t len) {
    hash_.update(src, len);
    total_ += len;
    while (len) {
      const size_t n = std::min(len, kStage - fill_);
      std::memcpy(stage_.get() + fill_, src, n);
      fill_ += n;
      src += n;
      len -= n;
      if (fill_ == kStage) flush(kStage);
    }
  }

  // A tensor's bytes in row-major order: a contiguous one straight from its
  // memory, a strided one (a column of a wider table) copied into the staging
  // buffer row block by row block.
  void feed_tensor(const at::Tensor& t) {
    if (t.numel() == 0) return;
    if (t.is_contiguous()) {
      feed(static_cast<const uint8_t*>(t.data_ptr()), t.nbytes());
      return;
    }
    const int64_t rows = t.size(0);
    const size_t row_bytes = t.nbytes() / static_cast<size_t>(rows);
    int64_t r = 0;
    while (r < rows) {
      const int64_t fit = static_cast<int64_t>((kStage - fill_) / row_bytes);
      if (fit == 0) {  // a row straddles the end of the staging buffer
        const at::Tensor one = t.narrow(0, r, 1).contiguous();
        feed(static_cast<const uint8_t*>(one.data_ptr()), row_bytes);
        ++r;
        continue;
      }
      const int64_t k = std::min(fit, rows - r);
      const at::Tensor piece = t.narrow(0, r, k);
      // Tensors are laid out widest dtype first, so the offset suits the element type.
      at::Tensor dst = at::from_blob(stage_.get() + fill_, piece.sizes(), piece.options());
      dst.copy_(piece);
      const size_t n = static_cast<size_t>(k) * row_bytes;
      hash_.update(stage_.get() + fill_, n);
      total_ += n;
      fill_ += n;
      r += k;
      if (fill_ == kStage) flush(kStage);
    }
  }

  uint64_t finish(bool durable) {
    if (fill_) {
      // O_DIRECT writes whole blocks: pad the last one, then cut the file back to its length.
      const size_t padded = direct_ ? (fill_ + kAlign - 1) / kAlign * kAlign : fill_;
      std::memset(stage_.get() + fill_, 0, padded - fill_);
      flush(padded);
    }
    if (direct_) {
      TORCH_CHECK(::ftruncate(fd_.fd, static_cast<off_t>(total_)) == 0, "recis::write_file: ", path_,
                  ": cannot set the length to ", total_, " bytes: ", std::strerror(errno));
    }
    if (durable) {
      TORCH_CHECK(::fsync(fd_.fd) == 0, "recis::write_file: ", path_, ": fsync failed: ", std::strerror(errno));
    }
    const int fd = fd_.fd;
    fd_.fd = -1;
    TORCH_CHECK(::close(fd) == 0, "recis::write_file: ", path_, ": close failed: ", std::strerror(errno));
    return hash_.digest();
  }

 private:
  void flush(size_t len) {
    write_out(len);
    if (share_ < 1.0) {
      const auto now = Clock::now();
      const auto busy = now - resumed_;
      std::this_thread::sleep_for(std::chrono::duration_cast<Clock::duration>(busy * ((1.0 - share_) / share_)));
      resumed_ = Clock::now();
    }
  }

  void write_out(size_t len) {
    const uint8_t* p = stage_.get();
    size_t left = len;
    while (left) {
      const ssize_t w = ::write(fd_.fd, p, left);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EINVAL && direct_) {
        // Opened with O_DIRECT but a write refused it: go on through the page cache.
        const int flags = ::fcntl(fd_.fd, F_GETFL);
        TORCH_CHECK(flags >= 0 && ::fcntl(fd_.fd, F_SETFL, flags & ~O_DIRECT) == 0, "recis::write_file: ", path_,
                    ": cannot leave O_DIRECT: ", std::strerror(errno));
        direct_ = false;
        continue;
      }
      TORCH_CHECK(w > 0, "recis::write_file: ", path_, ": write failed after ", written_, " bytes: ",
                  w < 0 ? std::strerror(errno) : "no progress");
      p += w;
      left -= static_cast<size_t>(w);
      written_ += static_cast<size_t>(w);
    }
    fill_ = 0;
  }

  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };

  using Clock = std::chrono::steady_clock;

  std::string path_;
  double share_;
  Clock::time_point resumed_ = Clock::now();
  Fd fd_;
  bool direct_ = true;
  std::unique_ptr<uint8_t, Free> stage_;
  size_t fill_ = 0, total_ = 0, written_ = 0;
  hashtable::Xxh64Stream hash_{0};
};

// Writes header then each tensor's bytes (row-major); returns the file's XXH64 (seed 0) as an int64.
int64_t write_file_cpu(const std::string& path, const at::Tensor& header, at::TensorList tensors, bool durable,
                       double share) {
  TORCH_CHECK(share > 0.0 && share <= 1.0, "recis::write_file: ", path, ": share must be in (0, 1], got ", share);
  TORCH_CHECK(header.device().is_cpu() && header.dim() == 1 && header.scalar_type() == at::kByte &&
                  header.is_contiguous(),
              "recis::write_file: header must be a contiguous 1-D uint8 CPU tensor, got ", header.scalar_type(), " ",
              header.sizes());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, "recis::write_file: ", path, ": tensor ", i,
                " must be a dense CPU tensor");
    TORCH_CHECK(t.is_contiguous() || t.dim() >= 1, "recis::write_file: ", path, ": tensor ", i,
                " is a non-contiguous scalar");
  }
  DirectWriter w(path, share);
  w.feed(header.data_ptr<uint8_t>(), static_cast<size_t>(header.numel()));
  for (const at::Tensor& t : tensors) w.feed_tensor(t);
  return static_cast<int64_t>(w.finish(durable));
}

}  // namespace

TORCH_LIBRARY_IMPL(recis, CPU, m) { m.impl("write_file", &write_file_cpu); }

}  // namespace recis
