// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// DiskRows: rows of a table kept in fixed-size slots of a file on local disk,
// behind the in-memory cache that the owning table is. Torch-free.
//
// * One record per slot: the row's stored bytes (embedding elements, then its
//   optimizer state), record_bytes long. The id -> slot map (an IdMap), each
//   slot's id and each row's metadata (last_seen, last_update, freq) stay in
//   memory, so lookups, TTL scans and checkpoints' delta filters never read
//   the file.
// * A row lives in the cache or on disk, never both: take() moves rows from
//   disk to the caller (their slots become free) and put() moves rows from
//   the caller to disk.
// * Slots come in segments of kSegmentSlots. New rows fill the open segment
//   in order, so the rows of one write are contiguous on disk and go out in a
//   few large pwrites (rows coming back to the cache leave holes all over the
//   file, and writing into those would cost one call per row). A segment whose
//   rows have all left is reused whole; when the holes pass a quarter of the
//   live rows, compact() moves the live rows of the emptiest segments into
//   the open one (one read of each segment, contiguous writes), which frees
//   those segments. The file stays within about 1.25x the live rows plus a
//   few segments.
// * Writes go through the OS with pwrite, batched per call: the slots are
//   sorted, contiguous slots are merged into one call (up to kMaxRun bytes),
//   and the runs are spread over up to io_threads worker threads.
// * While the file is at most half the machine's memory (so that it stays in
//   the page cache), reads of records are copies out of a shared read-only
//   mapping of the file (MADV_RANDOM: no read-ahead), spread over up to
//   io_threads threads: a pread of one record cost 0.6 us (a system call and
//   a page-cache lookup) on our VMs, a copy from a page already mapped
//   0.05 us, and from one mapped at first touch 0.35 us. A larger file is
//   read with preads, as writes are: there, reads reach the device, and
//   through the mapping a table of 1e8 rows larger than memory trained 2x
//   slower than with preads (page faults, and mapped pages the kernel must
//   unmap before it can reclaim them). Linux keeps the mapping coherent with
//   the pwrites (there is one page cache). The mapping grows by doubling as
//   the file does; an older mapping stays until this object goes, since a
//   reader may still hold it. Pages of the mapping that reads touched count
//   in the process's resident memory as file pages (RssFile), which the
//   kernel reclaims like any page cache; compact() reads whole segments with
//   pread.
//   The file is opened in the given directory and unlinked at once: it lives
//   as long as this object and leaves nothing behind after a crash (the rows
//   are the checkpoint's to keep). O_DIRECT is not used: records of a few
//   hundred bytes are not aligned to the device's 512-byte sectors.
// * read(), find(), meta_of() and export_chunk() may run alongside each
//   other; every other call runs alone (the owner serialises them).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "eviction.h"  // RowMeta, is_stale
#include "hash.h"
#include "id_map.h"

namespace recis {
namespace hashtable {

// A growable array in chunks of 2^12 elements: growing never copies it (a
// std::vector of 1e8 entries would hold its old and new arrays at once,
// several GB, while it doubles), and its memory is its size rounded up to a
// chunk.
template <typename T>
class ChunkedArray {
 public:
  static constexpr int kShift = 12;
  static constexpr int64_t kChunk = int64_t{1} << kShift;

  int64_t size() const { return size_; }
  int64_t memory_bytes() const {
    return static_cast<int64_t>(chunks_.size()) * kChunk * static_cast<int64_t>(sizeof(T)) +
           static_cast<int64_t>(chunks_.capacity() * sizeof(void*));
  }
  T& operator[](int64_t i) { return chunks_[i >> kShift][i & (kChunk - 1)]; }
  const T& operator[](int64_t i) const { return chunks_[i >> kShift][i & (kChunk - 1)]; }
  void push_back(const T& v) {
    if ((size_ & (kChunk - 1)) == 0 && (size_ >> kShift) == static_cast<int64_t>(chunks_.size())) {
      chunks_.emplace_back(new T[kChunk]());
    }
    (*this)[size_++] = v;
  }

 private:
  std::vector<std::unique_ptr<T[]>> chunks_;
  int64_t size_ = 0;
};

class DiskRows {
 public:
  static constexpr int64_t kMaxRun = int64_t{1} << 20;         // bytes per pread/pwrite call at most
  static constexpr int64_t kParallelBytes = int64_t{1} << 18;  // below this a batch runs on one thread
  static constexpr int64_t kSegmentSlots = 1024;

  // map_limit_bytes: reads copy out of a mapping of the file while it is at most this large, and
  // pread beyond (-1: half the machine's physical memory).
  DiskRows(const std::string& dir, int64_t record_bytes, int io_threads, int64_t map_limit_bytes = -1)
      : record_bytes_(record_bytes),
        io_threads_(io_threads),
        map_limit_(map_limit_bytes >= 0 ? map_limit_bytes
                                        : static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) / 2 * ::sysconf(_SC_PAGESIZE)),
        map_(0, 6) {
    if (record_bytes <= 0) throw std::invalid_argument("DiskRows: record_bytes must be > 0");
    if (io_threads < 1 || io_threads > 64) throw std::invalid_argument("DiskRows: io_threads must be in [1, 64]");
    std::string tmpl = dir + "/recis-rows-XXXXXX";
    std::vector<char> name(tmpl.begin(), tmpl.end());
    name.push_back('\0');
    fd_ = ::mkstemp(name.data());
    if (fd_ < 0) {
      throw std::runtime_error("DiskRows: cannot create a rows file in " + dir + ": " + std::strerror(errno));
    }
    ::unlink(name.data());  // the open descriptor keeps the file; nothing is left behind
  }

  ~DiskRows() {
    for (const auto& [base, bytes] : maps_) ::munmap(base, static_cast<size_t>(bytes));
    if (fd_ >= 0) ::close(fd_);
  }

  DiskRows(const DiskRows&) = delete;
  DiskRows& operator=(const DiskRows&) = delete;

  int64_t size() const { return map_.size(); }
  int64_t record_bytes() const { return record_bytes_; }
  int64_t num_slots() const { return slot_id_.size(); }
  int64_t file_bytes() const { return num_slots() * record_bytes_; }
  int64_t bytes_read() const { return bytes_read_; }
  int64_t bytes_written() const { return bytes_written_; }
  // Memory held: the IdMap, the per-slot ids and metadata, and the free list.
  int64_t memory_bytes() const {
    return map_.memory_bytes() + slot_id_.memory_bytes() + meta_.memory_bytes() +
           static_cast<int64_t>(segment_live_.capacity() * sizeof(int32_t) +
                                free_segments_.capacity() * sizeof(int64_t));
  }

  // slots[i] = the slot of keys[i], or -1. Returns how many are on disk.
  int64_t find(const int64_t* keys, int64_t n, int64_t* slots) const {
    return n - map_.find_batch(keys, n, slots);
  }

  // Reads the records of the keys on disk, leaving them there: slots[i] =
  // the slot of keys[i] or -1; out + i * record_bytes = its record (left
  // as it is where absent). Returns how many are on disk. Safe alongside
  // other reads.
  int64_t read(const int64_t* keys, int64_t n, int64_t* slots, uint8_t* out) const {
    const int64_t found = find(keys, n, slots);
    std::vector<int64_t> got, pos;
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] >= 0) {
        got.push_back(slots[i]);
        pos.push_back(i);
      }
    }
    std::vector<uint8_t> buf(static_cast<size_t>(found * record_bytes_));
    read_slots(got.data(), found, buf.data());
    for (int64_t k = 0; k < found; ++k) {
      std::memcpy(out + pos[k] * record_bytes_, buf.data() + k * record_bytes_, record_bytes_);
    }
    return found;
  }

  // The metadata of a row on disk, (last_seen, last_update, freq) into meta[0..3).
  void meta_of(int64_t slot, int64_t* meta) const {
    const RowMeta& m = meta_[slot];
    meta[0] = m.last_seen;
    meta[1] = m.last_update;
    meta[2] = m.freq;
  }

  // Moves the rows of the distinct `keys` that are on disk out: their ids,
  // records and metadata (last_seen, last_update, freq) go to the first
  // `found` entries of out_ids, out_records (found x record_bytes) and
  // out_meta (found x 3), in the order of `keys`; their slots become free.
  // Returns found.
  int64_t take(const int64_t* keys, int64_t n, int64_t* out_ids, uint8_t* out_records, int64_t* out_meta) {
    std::vector<int64_t> slots(static_cast<size_t>(n));
    find(keys, n, slots.data());
    std::vector<int64_t> got;
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] >= 0) got.push_back(slots[i]);
    }
    const int64_t found = static_cast<int64_t>(got.size());
    read_slots(got.data(), found, out_records);
    for (int64_t i = 0; i < found; ++i) {
      out_ids[i] = slot_id_[got[i]];
      meta_of(got[i], out_meta + 3 * i);
      release(got[i]);
    }
    return found;
  }

  // Writes rows for distinct keys: a key on disk keeps its slot, a new key
  // takes a free slot. meta: (n, 3) = (last_seen, last_update, freq), each
  // within 32 bits. Throws, changing nothing, for a repeated key or a value
  // out of range.
  void put(const int64_t* keys, int64_t n, const uint8_t* records, const int64_t* meta) {
    std::vector<int64_t> slots(static_cast<size_t>(n));
    assign(keys, n, meta, slots.data());
    write_slots(slots.data(), n, records);
    compact();
  }

  // put() in two parts: assign() gives the keys their slots and metadata
  // (slots[i]: where keys[i]'s record goes), write_slots() writes the
  // records. Between the two the keys count as on disk, with records not
  // written yet: an owner that splits them (to do the I/O outside its lock)
  // must not read those keys until the write is done.
  void assign(const int64_t* keys, int64_t n, const int64_t* meta, int64_t* slots) {
    // Checked before anything changes.
    for (int64_t i = 0; i < 3 * n; ++i) clock32(meta[i], "row metadata");
    std::vector<int64_t> sorted(keys, keys + n);
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      throw std::invalid_argument("DiskRows::put: a key repeats");
    }
    find(keys, n, slots);
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] < 0) {
        slots[i] = claim();
        slot_id_[slots[i]] = keys[i];
        const uint64_t h = mix64(static_cast<uint64_t>(keys[i]));
        map_.reserve_in_shard(map_.shard_of(h), 1);
        bool inserted = false;
        map_.find_or_insert_reserved(keys[i], h, slots[i], &inserted);
      }
      RowMeta& m = meta_[slots[i]];
      m.last_seen = static_cast<uint32_t>(meta[3 * i]);
      m.last_update = static_cast<uint32_t>(meta[3 * i + 1]);
      m.freq = static_cast<uint32_t>(meta[3 * i + 2]);
    }
  }

  // Drops the rows of `keys` (absent keys are ignored). Returns how many were on disk.
  int64_t erase(const int64_t* keys, int64_t n) {
    int64_t dropped = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = map_.erase(keys[i], mix64(static_cast<uint64_t>(keys[i])));  // one probe: erase gives the slot
      if (s >= 0) {
        free_slot(s);
        ++dropped;
      }
    }
    return dropped;
  }

  // Drops every row unseen since clock - ttl_steps (the table's TTL rule); their ids go to *ids.
  void evict_stale(int64_t clock, int64_t ttl_steps, std::vector<int64_t>* ids) {
    for (int64_t s = 0; s < num_slots(); ++s) {
      if (meta_[s].live && is_stale(meta_[s], clock, ttl_steps)) {
        ids->push_back(slot_id_[s]);
        release(s);
      }
    }
  }

  // Drops every row; the file keeps its size (its segments are reused).
  void clear() {
    map_ = IdMap(0, 6);
    free_segments_.clear();
    for (int64_t g = 0; g < static_cast<int64_t>(segment_live_.size()); ++g) {
      segment_live_[g] = 0;
      free_segments_.push_back(g);  // ascending: already a min-heap
    }
    for (int64_t s = 0; s < num_slots(); ++s) meta_[s].live = 0;
    open_ = -1;
  }

  // Slots held by segments with rows in them, less the rows: the holes.
  int64_t holes() const {
    const int64_t used = static_cast<int64_t>(segment_live_.size() - free_segments_.size()) * kSegmentSlots;
    return used - size();
  }

  // Moves the live rows of the emptiest segments (never the open one) into the open segment while the
  // holes exceed a quarter of the live rows plus two segments; the emptied segments become free.
  // Returns the rows moved.
  int64_t compact() {
    int64_t moved = 0;
    while (holes() > size() / 4 + 2 * kSegmentSlots) {
      int64_t victim = -1;
      for (int64_t g = 0; g < static_cast<int64_t>(segment_live_.size()); ++g) {
        if (g == open_ || segment_live_[g] == 0) continue;
        if (victim < 0 || segment_live_[g] < segment_live_[victim]) victim = g;
      }
      if (victim < 0) break;
      // One read up to its last row (the slots of a segment that was filled were all written).
      int64_t last = kSegmentSlots - 1;
      while (!meta_[victim * kSegmentSlots + last].live) --last;
      std::vector<uint8_t> seg(static_cast<size_t>((last + 1) * record_bytes_));
      transfer(/*write=*/false, victim * kSegmentSlots, seg.data(), (last + 1) * record_bytes_);
      std::vector<int64_t> keys, meta, slots;
      std::vector<uint8_t> records;
      for (int64_t k = 0; k <= last; ++k) {
        const int64_t s = victim * kSegmentSlots + k;
        if (!meta_[s].live) continue;
        keys.push_back(slot_id_[s]);
        meta.resize(meta.size() + 3);
        meta_of(s, meta.data() + meta.size() - 3);
        records.insert(records.end(), seg.begin() + k * record_bytes_, seg.begin() + (k + 1) * record_bytes_);
        release(s);
      }
      const int64_t n = static_cast<int64_t>(keys.size());
      slots.resize(static_cast<size_t>(n));
      assign(keys.data(), n, meta.data(), slots.data());
      write_slots(slots.data(), n, records.data());
      moved += n;
    }
    return moved;
  }

  // Copies up to max_rows live rows with slot >= start and last_update >
  // since into the buffers (as take() lays them out). Returns (rows copied,
  // the slot to continue from); the second is num_slots() when done.
  std::pair<int64_t, int64_t> export_chunk(int64_t start, int64_t max_rows, int64_t since, int64_t* ids,
                                           uint8_t* records, int64_t* meta) const {
    std::vector<int64_t> picked;
    int64_t s = std::max<int64_t>(start, 0);
    for (; s < num_slots() && static_cast<int64_t>(picked.size()) < max_rows; ++s) {
      if (meta_[s].live && static_cast<int64_t>(meta_[s].last_update) > since) picked.push_back(s);
    }
    const int64_t n = static_cast<int64_t>(picked.size());
    read_slots(picked.data(), n, records);
    for (int64_t i = 0; i < n; ++i) {
      ids[i] = slot_id_[picked[i]];
      meta_of(picked[i], meta + 3 * i);
    }
    return {n, s};
  }

 private:
  // The next slot of the open segment (opening the lowest free segment, or a new one, when it is full).
  int64_t claim() {
    if (open_ < 0 || open_next_ == kSegmentSlots) {
      if (open_ >= 0 && segment_live_[open_] == 0) {  // every row left it while it was open
        free_segments_.push_back(open_);
        std::push_heap(free_segments_.begin(), free_segments_.end(), std::greater<int64_t>());
      }
      if (!free_segments_.empty()) {
        std::pop_heap(free_segments_.begin(), free_segments_.end(), std::greater<int64_t>());
        open_ = free_segments_.back();
        free_segments_.pop_back();
      } else {
        open_ = static_cast<int64_t>(segment_live_.size());
        segment_live_.push_back(0);
        for (int64_t k = 0; k < kSegmentSlots; ++k) {
          slot_id_.push_back(0);
          meta_.push_back(RowMeta{});
        }
      }
      open_next_ = 0;
    }
    const int64_t s = open_ * kSegmentSlots + open_next_++;
    meta_[s].live = 1;
    ++segment_live_[open_];
    return s;
  }

  void release(int64_t s) {
    map_.erase(slot_id_[s], mix64(static_cast<uint64_t>(slot_id_[s])));
    free_slot(s);
  }

  // Slot s (its id already out of the map) holds no row any more.
  void free_slot(int64_t s) {
    meta_[s].live = 0;
    const int64_t g = s / kSegmentSlots;
    if (--segment_live_[g] == 0 && g != open_) {
      free_segments_.push_back(g);
      std::push_heap(free_segments_.begin(), free_segments_.end(), std::greater<int64_t>());
    }
  }

  // A run: `count` consecutive slots from `slot`, whose records sit at
  // buffer positions pos[first .. first + count) (one position per slot).
  struct Run {
    int64_t slot, count, first;
  };

  // Sorts (slot, position) pairs by slot and merges consecutive slots into
  // runs of at most kMaxRun bytes.
  std::vector<Run> plan(const int64_t* slots, int64_t n, std::vector<int64_t>* order) const {
    order->resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) (*order)[i] = i;
    std::sort(order->begin(), order->end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
    const int64_t per_run = std::max<int64_t>(1, kMaxRun / record_bytes_);
    std::vector<Run> runs;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t s = slots[(*order)[k]];
      if (!runs.empty()) {
        Run& r = runs.back();
        if (r.slot + r.count == s && r.count < per_run) {
          ++r.count;
          continue;
        }
      }
      runs.push_back(Run{s, 1, k});
    }
    return runs;
  }

  // Runs fn(i) for i in [0, count), spread over up to io_threads threads (one when the batch, `bytes`
  // long, is small); an exception on a worker is rethrown here.
  template <typename Fn>
  void in_parallel(int64_t count, int64_t bytes, Fn&& fn) const {
    const int64_t threads = std::min<int64_t>({static_cast<int64_t>(io_threads_), count,
                                               std::max<int64_t>(1, bytes / kParallelBytes)});
    if (threads <= 1) {
      for (int64_t i = 0; i < count; ++i) fn(i);
      return;
    }
    std::vector<std::thread> pool;
    std::vector<std::string> errors(static_cast<size_t>(threads));
    for (int64_t t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        try {
          for (int64_t i = t; i < count; i += threads) fn(i);
        } catch (const std::exception& e) {
          errors[t] = e.what();
        }
      });
    }
    for (auto& th : pool) th.join();
    for (const auto& e : errors) {
      if (!e.empty()) throw std::runtime_error(e);
    }
  }

  // fn(run) for each run, in parallel.
  template <typename Fn>
  void over_runs(const std::vector<Run>& runs, int64_t bytes, Fn&& fn) const {
    in_parallel(static_cast<int64_t>(runs.size()), bytes, [&](int64_t i) { fn(runs[i]); });
  }

 public:
  // out + i * record_bytes = the record at slots[i] (live slots). Safe
  // alongside other reads and alongside writes to other slots.
  void read_slots(const int64_t* slots, int64_t n, uint8_t* out) const {
    if (n == 0) return;
    if (file_bytes() > map_limit_) {
      pread_slots(slots, n, out);
      return;
    }
    const uint8_t* base = mapping((*std::max_element(slots, slots + n) + 1) * record_bytes_);
    // A copy from a page not in the page cache waits for the device: up to io_threads of them are in
    // flight at once, as preads on io_threads threads would be.
    in_parallel(n, n * record_bytes_, [&](int64_t i) {
      std::memcpy(out + i * record_bytes_, base + slots[i] * record_bytes_, static_cast<size_t>(record_bytes_));
    });
    bytes_read_ += n * record_bytes_;
  }

  // The record at slots[i] = records + i * record_bytes (slots from
  // assign()). Safe alongside reads and writes of other slots.
  void write_slots(const int64_t* slots, int64_t n, const uint8_t* records) {
    if (n == 0) return;
    std::vector<int64_t> order;
    const std::vector<Run> runs = plan(slots, n, &order);
    over_runs(runs, n * record_bytes_, [&](const Run& r) {
      std::vector<uint8_t> buf(static_cast<size_t>(r.count * record_bytes_));
      for (int64_t k = 0; k < r.count; ++k) {
        std::memcpy(buf.data() + k * record_bytes_, records + order[r.first + k] * record_bytes_, record_bytes_);
      }
      transfer(/*write=*/true, r.slot, buf.data(), r.count * record_bytes_);
    });
    bytes_written_ += n * record_bytes_;
  }

 private:
  // One pread/pwrite of `bytes` at slot `slot`, finished across short transfers and EINTR.
  void transfer(bool write, int64_t slot, uint8_t* buf, int64_t bytes) const {
    int64_t done = 0;
    const off_t base = static_cast<off_t>(slot * record_bytes_);
    while (done < bytes) {
      const ssize_t got = write ? ::pwrite(fd_, buf + done, static_cast<size_t>(bytes - done), base + done)
                                : ::pread(fd_, buf + done, static_cast<size_t>(bytes - done), base + done);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        throw std::runtime_error(std::string("DiskRows: ") + (write ? "pwrite" : "pread") + " of " +
                                 std::to_string(bytes) + " bytes at slot " + std::to_string(slot) + " failed: " +
                                 (got < 0 ? std::strerror(errno) : "end of file"));
      }
      done += got;
    }
  }

  // read_slots with one pread per run of consecutive slots, spread over io_threads threads.
  void pread_slots(const int64_t* slots, int64_t n, uint8_t* out) const {
    std::vector<int64_t> order;
    const std::vector<Run> runs = plan(slots, n, &order);
    over_runs(runs, n * record_bytes_, [&](const Run& r) {
      std::vector<uint8_t> buf(static_cast<size_t>(r.count * record_bytes_));
      transfer(/*write=*/false, r.slot, buf.data(), r.count * record_bytes_);
      for (int64_t k = 0; k < r.count; ++k) {
        std::memcpy(out + order[r.first + k] * record_bytes_, buf.data() + k * record_bytes_, record_bytes_);
      }
    });
    bytes_read_ += n * record_bytes_;
  }

  // The file mapped read-only from offset 0 over at least `bytes` (the records
  // there were written: the mapping may run past the file's end, whose pages
  // are never touched).
  const uint8_t* mapping(int64_t bytes) const {
    std::lock_guard<std::mutex> lock(map_mutex_);
    if (maps_.empty() || maps_.back().second < bytes) {
      const int64_t page = ::sysconf(_SC_PAGESIZE);
      int64_t want = std::max<int64_t>({bytes, maps_.empty() ? 0 : 2 * maps_.back().second, int64_t{64} << 20});
      want = (want + page - 1) / page * page;
      void* p = ::mmap(nullptr, static_cast<size_t>(want), PROT_READ, MAP_SHARED, fd_, 0);
      if (p == MAP_FAILED) {
        throw std::runtime_error("DiskRows: mapping " + std::to_string(want) + " bytes of the rows file failed: " +
                                 std::strerror(errno));
      }
      // Reads are scattered records: without this, a fault on a page not in the page cache reads ahead
      // (a window of pages around it), which made a table larger than memory 20x slower than preads.
      ::madvise(p, static_cast<size_t>(want), MADV_RANDOM);
      maps_.emplace_back(static_cast<uint8_t*>(p), want);
    }
    return maps_.back().first;
  }

  int64_t record_bytes_;
  int io_threads_;
  int64_t map_limit_;  // bytes of file up to which reads go through the mapping
  int fd_ = -1;
  mutable std::mutex map_mutex_;
  mutable std::vector<std::pair<uint8_t*, int64_t>> maps_;  // every mapping made, the newest (largest) last
  IdMap map_;                    // id -> slot
  ChunkedArray<int64_t> slot_id_;  // slot -> id
  ChunkedArray<RowMeta> meta_;     // slot -> metadata (live: the slot holds a row)
  std::vector<int32_t> segment_live_;   // segment -> rows in it
  std::vector<int64_t> free_segments_;  // segments without rows (not the open one), a min-heap
  int64_t open_ = -1;                   // the segment new rows go to, or -1
  int64_t open_next_ = 0;               // its next slot
  mutable std::atomic<int64_t> bytes_read_{0};
  std::atomic<int64_t> bytes_written_{0};
};

}  // namespace hashtable
}  // namespace recis
