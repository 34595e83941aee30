// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// DiskRows (csrc/hashtable/disk_rows.h) against a std::unordered_map of records: random batches of
// put, take, read, erase and TTL scans, large enough that the I/O runs on several threads; then a
// streamed export of every row, the slot reuse bound, and the errors. argv[1]: a scratch directory.
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "disk_rows.h"

using namespace recis::hashtable;

namespace {

constexpr int64_t kRecord = 20;

int fail(const std::string& what) {
  std::printf("FAIL: %s\n", what.c_str());
  return 1;
}

std::vector<uint8_t> record_of(int64_t key, int version) {
  std::vector<uint8_t> r(kRecord);
  for (int64_t j = 0; j < kRecord; ++j) r[j] = static_cast<uint8_t>(key * 31 + j * 7 + version);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return fail("usage: disk_rows_check DIR map|pread");
  // map: reads copy out of the file's mapping (a file under half the memory); pread: reads are preads
  DiskRows disk(argv[1], kRecord, 4, std::string(argv[2]) == "pread" ? 0 : -1);
  std::unordered_map<int64_t, std::pair<std::vector<uint8_t>, int64_t>> model;  // key -> (record, last_seen)
  std::mt19937_64 rng(7);
  int64_t most_live = 0;
  for (int round = 0; round < 40; ++round) {
    // put: 20k keys from a range of 60k, some already on disk (overwritten in place)
    std::vector<int64_t> keys;
    std::unordered_map<int64_t, int> chosen;
    while (keys.size() < 20000) {
      const int64_t k = static_cast<int64_t>(rng() % 60000) - 30000;
      if (chosen.emplace(k, 1).second) keys.push_back(k);
    }
    std::vector<uint8_t> recs;
    std::vector<int64_t> meta;
    for (int64_t k : keys) {
      const auto r = record_of(k, round);
      recs.insert(recs.end(), r.begin(), r.end());
      meta.insert(meta.end(), {round, round + 1, 3});
      model[k] = {r, round};
    }
    disk.put(keys.data(), static_cast<int64_t>(keys.size()), recs.data(), meta.data());
    most_live = std::max<int64_t>(most_live, static_cast<int64_t>(model.size()));
    if (disk.size() != static_cast<int64_t>(model.size())) return fail("size after put");
    // take: 5k keys, half of them absent
    std::vector<int64_t> want;
    for (int i = 0; i < 5000; ++i) want.push_back(static_cast<int64_t>(rng() % 120000) - 60000);
    std::sort(want.begin(), want.end());
    want.erase(std::unique(want.begin(), want.end()), want.end());
    std::vector<int64_t> ids(want.size()), got_meta(3 * want.size());
    std::vector<uint8_t> out(want.size() * kRecord);
    const int64_t got = disk.take(want.data(), static_cast<int64_t>(want.size()), ids.data(), out.data(),
                                  got_meta.data());
    int64_t expect = 0;
    for (int64_t k : want) expect += model.count(k);
    if (got != expect) return fail("take count");
    for (int64_t i = 0; i < got; ++i) {
      const auto it = model.find(ids[i]);
      if (it == model.end()) return fail("take returned an absent key");
      if (std::vector<uint8_t>(out.begin() + i * kRecord, out.begin() + (i + 1) * kRecord) != it->second.first) {
        return fail("take record");
      }
      if (got_meta[3 * i] != it->second.second || got_meta[3 * i + 1] != it->second.second + 1) {
        return fail("take meta");
      }
      model.erase(it);
    }
    // read leaves rows where they are
    std::vector<int64_t> slots(want.size());
    if (disk.read(want.data(), static_cast<int64_t>(want.size()), slots.data(), out.data()) != 0) {
      return fail("read found taken keys");
    }
    // erase a few; a TTL scan every 10 rounds
    std::vector<int64_t> gone = {keys[0], keys[1], 99999999};
    const int64_t erased = disk.erase(gone.data(), 3);
    int64_t expect_erased = model.count(keys[0]) + model.count(keys[1]);
    model.erase(keys[0]);
    model.erase(keys[1]);
    if (erased != expect_erased) return fail("erase count");
    if (round % 10 == 9) {
      std::vector<int64_t> stale;
      disk.evict_stale(round, 5, &stale);
      for (int64_t k : stale) {
        if (model.at(k).second >= round - 5) return fail("evicted a fresh row");
        model.erase(k);
      }
      for (const auto& kv : model) {
        if (kv.second.second < round - 5) return fail("kept a stale row");
      }
    }
    if (disk.size() != static_cast<int64_t>(model.size())) return fail("size after take/erase");
  }
  // segments: the file stays within 1.25x the rows plus a few segments (compaction), and the rows
  // compaction moved read back right (checked below by the export)
  if (disk.num_slots() > most_live + most_live / 4 + 6 * DiskRows::kSegmentSlots) {
    return fail("the file grew past 1.25x the most rows held at once");
  }
  const int64_t moved = disk.compact();  // takes and erases since the last put left holes
  if (disk.holes() > disk.size() / 4 + 2 * DiskRows::kSegmentSlots) return fail("holes after compaction");
  if (moved == 0) return fail("nothing to compact: the check does not reach compaction");
  // a streamed export sees every row once, with its record
  int64_t start = 0, seen = 0;
  for (;;) {
    std::vector<int64_t> ids(777), meta(3 * 777);
    std::vector<uint8_t> recs(777 * kRecord);
    const auto r = disk.export_chunk(start, 777, -1, ids.data(), recs.data(), meta.data());
    for (int64_t i = 0; i < r.first; ++i) {
      const auto it = model.find(ids[i]);
      if (it == model.end() ||
          std::vector<uint8_t>(recs.begin() + i * kRecord, recs.begin() + (i + 1) * kRecord) != it->second.first) {
        return fail("export record");
      }
    }
    seen += r.first;
    start = r.second;
    if (r.first < 777) break;
  }
  if (seen != static_cast<int64_t>(model.size())) return fail("export count");
  // errors: a repeated key or a metadata value past 32 bits changes nothing
  const int64_t before = disk.size();
  std::vector<int64_t> twice = {123456789, 123456789}, meta6(6, 0);
  std::vector<uint8_t> two(2 * kRecord);
  try {
    disk.put(twice.data(), 2, two.data(), meta6.data());
    return fail("a repeated key was accepted");
  } catch (const std::invalid_argument&) {
  }
  std::vector<int64_t> one = {987654321}, big = {int64_t{1} << 40, 0, 0};
  try {
    disk.put(one.data(), 1, two.data(), big.data());
    return fail("a 40-bit clock was accepted");
  } catch (const std::invalid_argument&) {
  }
  if (disk.size() != before) return fail("a refused put changed the store");
  try {
    DiskRows bad("/nonexistent-dir-for-disk-rows", kRecord, 1);
    return fail("a missing directory was accepted");
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find("/nonexistent-dir-for-disk-rows") == std::string::npos) return fail("error text");
  }
  std::printf("ok\n");
  return 0;
}
