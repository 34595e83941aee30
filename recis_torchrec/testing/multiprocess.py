# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Run a function on several spawned ranks (gloo on CPU), with a hard timeout.

As TorchRec's MultiProcessTestBase does, each rank is a real process with its
own process group; a rank that raises fails the run with its traceback, and
ranks that hang are killed when the timeout expires, so no test can hang CI.
"""

import datetime
import gc
import os
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], errors, threads: int, backend: str
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
        )
        fn(rank, world_size, *args)
    except BaseException:  # noqa: B902 - report everything, then fail the rank
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        # Free what the rank built (modules, DDP reducers, exception tracebacks holding them) while
        # the process group is alive: freed during interpreter shutdown instead, gloo's objects
        # can be destroyed after the runtime they need, and the rank aborts
        # ("terminate called without an active exception").
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, world_size: int = 2, args: Sequence[Any] = (), timeout: float = 300.0, backend: str = "gloo"
) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Raises AssertionError with every failing rank's traceback, or TimeoutError
    (after killing the ranks) if they do not finish in ``timeout`` seconds.
    ``fn`` must be importable (a module-level function). With ``backend="nccl"``
    each rank first selects GPU ``rank % device_count``.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors, threads, backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures)))
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout:.0f} s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with non-zero codes: {bad}")
