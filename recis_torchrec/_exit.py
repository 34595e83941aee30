# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Clean interpreter exits.

Once the interpreter starts finalizing, a thread that asks for the GIL is ended with
``pthread_exit``. Its forced unwind through a C++ destructor that must not throw (pybind11's
``gil_scoped_release``, a tensor's release of its Python object) calls ``std::terminate``: the
process aborts with "terminate called without an active exception" and SIGABRT after the script
has finished (pybind/pybind11#2215, pytorch/pytorch#38228). Two kinds of thread do that here:

- our own background threads (a background checkpoint save, the data loader's prefetch thread)
  when they are inside a torch or pyarrow call at exit. At exit a pending save is finished (so it
  is not lost) and the loaders are stopped and joined.
- gloo's work threads (``pt_gloo_runloop``). After a collective completes, the thread that ran it
  drops its work object, and with it the references to the caller's tensors, which takes the GIL.
  A script that exits right after a collective (``dist.all_reduce(t); sys.exit(0)``) races that
  release; ``destroy_process_group`` does not stop those threads while anything (TorchRec's
  ``DistributedModelParallel`` among others) still holds the process group. TorchRec's own sharder
  shows the same abort on the same script. At exit, while those threads exist, the GIL is let go
  for a moment so that every release waiting for it runs before finalization.

This module imports only the standard library: every layer may register with it.
"""

import atexit
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, List

# Objects whose close() stops and joins their thread (held weakly: a loader that is gone needs
# nothing), and functions that finish work that must not be lost (held strongly).
_closers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_finishers: List[Callable[[], None]] = []
_lock = threading.Lock()

# How long the GIL is let go at exit while gloo's threads exist. A completed collective's release
# takes microseconds once the thread holds the GIL; this leaves room for a busy machine.
GLOO_QUIESCE_SECONDS = 0.05


def close_at_exit(obj: Any) -> None:
    """Calls ``obj.close()`` at interpreter exit if `obj` is still alive then."""
    with _lock:
        _closers.add(obj)


def finish_at_exit(fn: Callable[[], None]) -> None:
    """Calls ``fn()`` once at interpreter exit (before the loaders are closed)."""
    with _lock:
        if fn not in _finishers:
            _finishers.append(fn)


def gloo_threads() -> int:
    """How many of gloo's work threads this process has (0 where /proc cannot tell)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    n = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "pt_gloo_runloop"
        except OSError:
            continue
    return n


def _at_exit() -> None:
    with _lock:
        finishers, closers = list(_finishers), list(_closers)
    for fn in finishers:
        try:
            fn()
        except BaseException as e:  # noqa: B902 - an exit hook must not stop the others
            print(f"recis_torchrec: at exit: {e}", file=sys.stderr, flush=True)
    for obj in closers:
        try:
            obj.close()
        except BaseException as e:  # noqa: B902
            print(f"recis_torchrec: at exit: closing {type(obj).__name__}: {e}", file=sys.stderr, flush=True)
    if gloo_threads():
        time.sleep(GLOO_QUIESCE_SECONDS)  # lets the GIL go: see the module's docstring


atexit.register(_at_exit)
