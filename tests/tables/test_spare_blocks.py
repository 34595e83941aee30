# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Spare row blocks: a growing CPU table keeps blocks prepared off the inserting thread
(``csrc/hashtable/embedding_blocks.h``). They change where pages are faulted in, never a row, and
they count in ``memory_bytes``."""

import multiprocessing
import os
import subprocess
import sys
import time

import torch

import recis_torchrec as rt
from recis_torchrec.tables.hash_table import HashTable


def _table(name: str, spares: bool, monkeypatch) -> HashTable:
    monkeypatch.setenv("RECIS_SPARE_BLOCKS", "1" if spares else "0")  # read when the table is created
    return HashTable(name, 16, 1, rt.HashTableOptions(initial_capacity=64, block_rows=64, seed=7),
                     num_embeddings=64)


def _wait_for(pred, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def test_rows_are_the_same_with_and_without_spare_blocks_and_spares_count_in_memory(monkeypatch):
    on, off = _table("t", True, monkeypatch), _table("t", False, monkeypatch)  # one name: one seed
    gen = torch.Generator().manual_seed(0)
    for step in range(12):  # growth in steps of several blocks, with repeats of earlier ids
        ids = torch.randint(-(2**40), 2**40, (300 + 50 * step,), generator=gen)
        ids = torch.cat([ids, ids[:40]])
        assert torch.equal(on.find_or_insert(ids), off.find_or_insert(ids))
    a, b = on.export(), off.export()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert len(on) == len(off)
    on_info, off_info = on.info(), off.info()
    assert on_info["num_blocks"] == off_info["num_blocks"]
    # The spares are reserved memory beyond the blocks in use: prepared in the background, then counted.
    block = 64 * (on_info["row_bytes"] + 8 + 16)
    assert _wait_for(lambda: on.memory_bytes() > off.memory_bytes())
    assert (on.memory_bytes() - off.memory_bytes()) % block == 0
    assert on.info()["memory"]["spare_blocks"] == on.memory_bytes() - off.memory_bytes() > 0
    assert off.info()["memory"]["spare_blocks"] == 0
    assert on.info()["memory"]["block_slack"] == off.info()["memory"]["block_slack"]


def test_a_table_freed_while_its_spares_are_prepared_and_a_table_that_never_grows(monkeypatch):
    monkeypatch.setenv("RECIS_SPARE_BLOCKS", "1")
    for i in range(30):  # each grows (starting a worker) and is freed at once
        t = HashTable(f"t{i}", 64, 1, rt.HashTableOptions(initial_capacity=64, block_rows=1024), num_embeddings=64)
        t.find_or_insert(torch.arange(5000))
        del t
    small = HashTable("small", 8, 0, rt.HashTableOptions(initial_capacity=64, block_rows=1024), num_embeddings=64)
    small.find_or_insert(torch.arange(7 * 1024))  # grows to 7 blocks: below 8, no spares
    assert small.info()["memory"]["spare_blocks"] == 0
    fixed = HashTable("fixed", 8, 0, rt.HashTableOptions(initial_capacity=4096, block_rows=1024), num_embeddings=64)
    reserved = fixed.memory_bytes()
    fixed.find_or_insert(torch.arange(4000))  # within the first reservation: no spares
    time.sleep(0.1)
    assert fixed.memory_bytes() == reserved


def _grow_in_child(table: HashTable, queue) -> None:
    torch.set_num_threads(1)  # libgomp's pool does not survive fork(): any parallel torch op would hang
    rows = table.find_or_insert(torch.arange(100_000, 160_000))
    queue.put((len(table), int(rows.min()), table.memory_bytes() > 0))


def test_a_forked_child_grows_a_table_whose_spares_were_being_prepared(monkeypatch):
    """fork() copies the table without the thread preparing its spare blocks: the child must not wait
    for that thread or take its lock (it keeps a pool of its own)."""
    table = _table("forked", True, monkeypatch)
    for k in range(20):  # keep a worker busy around the fork
        table.find_or_insert(torch.arange(k * 2000, (k + 1) * 2000))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_grow_in_child, args=(table, queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or failed"
    size, first_row, counted = queue.get(timeout=5)
    assert size == 40_000 + 60_000 and first_row >= 40_000 and counted
    assert len(table) == 40_000  # the parent's table is its own


def test_spare_blocks_off_by_environment_in_a_fresh_process():
    code = ("import torch, time, recis_torchrec as rt\n"
            "from recis_torchrec.tables.hash_table import HashTable\n"
            "t = HashTable('t', 8, 0, rt.HashTableOptions(initial_capacity=64, block_rows=64), num_embeddings=64)\n"
            "t.find_or_insert(torch.arange(5000)); time.sleep(0.2)\n"
            "i = t.info(); print(i['memory_bytes'] - i['num_blocks'] * 64 * (i['row_bytes'] + 24))\n")
    out = {}
    for env in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RECIS_SPARE_BLOCKS=env),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[env] = int(r.stdout.split()[-1])
    assert out["1"] > out["0"]


def test_a_spare_blocks_setting_other_than_0_or_1_raises_naming_it(monkeypatch):
    """RECIS_SPARE_BLOCKS=false must not leave spares on without a word."""
    import pytest

    for bad in ("false", "off", ""):
        monkeypatch.setenv("RECIS_SPARE_BLOCKS", bad)
        with pytest.raises(ValueError, match="RECIS_SPARE_BLOCKS must be 0 \\(off\\) or 1 \\(on\\)"):
            HashTable("bad", 8, 0, rt.HashTableOptions(initial_capacity=64, block_rows=64), num_embeddings=64)
