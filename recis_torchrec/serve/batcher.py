# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Dynamic batching: requests that arrive within ``max_delay_ms`` of the first one waiting run as
one batch of at most ``max_batch`` rows, and each gets its own rows of the outputs back.

The queue is bounded (``max_queue`` requests): a request that finds it full is refused at once
(:class:`Overloaded`) instead of waiting without bound. A request whose deadline passes before its
batch runs is answered with :class:`DeadlineExceeded` and not run."""

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

from recis_torchrec.inference.package import InferenceError
from recis_torchrec.serve.request import Request, merge, mergeable, split


class Overloaded(InferenceError):
    """The request queue is full (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(InferenceError):
    """The request's deadline passed before it ran (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


class Batcher:
    """Runs ``run(*args)`` on merged batches of submitted requests in ``workers`` threads. ``run``
    returns ``(outputs, tag)``: each request's future gets ``(its rows of the outputs, tag)`` (the
    server's tag is the model version that computed them).

    ``batch_args`` says, per positional argument, whether its first dimension is the batch (the
    package's request spec); other tensor arguments must be equal for requests to share a batch.
    ``on_batch(num_requests, rows, seconds)`` is called after each batch (metrics)."""

    def __init__(self, run: Callable[..., Any], batch_args: Dict[int, bool], max_batch: int = 512,
                 max_delay_ms: float = 2.0, max_queue: int = 1024, workers: int = 1,
                 on_batch: Optional[Callable[[int, int, float], None]] = None) -> None:
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1), ("workers", workers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Batcher: {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(max_delay_ms, (int, float)) or isinstance(max_delay_ms, bool) or max_delay_ms < 0:
            raise ValueError(f"Batcher: max_delay_ms must be a number >= 0, got {max_delay_ms!r}")
        self.run = run
        self.batch_args = batch_args
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.on_batch = on_batch
        self._queue: "queue.Queue[Optional[Request]]" = queue.Queue(maxsize=max_queue)
        self._carry: List[Request] = []
        self._take = threading.Lock()  # one worker gathers a batch at a time
        self._closing = threading.Lock()  # a submit and close() do not interleave
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"recis-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, request: Request) -> Future:
        """Queues a request; its future gets ``(its outputs as a list of tensors, tag)`` or an error."""
        request.future = Future()
        request.received = time.monotonic()
        with self._closing:
            if self._closed:
                raise Overloaded("the server is shutting down")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise Overloaded(f"the request queue is full ({self._queue.maxsize} requests waiting): retry "
                                 "later") from None
        return request.future

    def queued(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """Stops the workers after the requests already queued (no request is queued after this
        starts: submit refuses)."""
        with self._closing:
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)  # workers keep taking from the queue, so a full one drains
        for t in self._threads:
            t.join()

    # -- worker -----------------------------------------------------------------------

    def _gather(self) -> Optional[List[Request]]:
        with self._take:
            first = self._carry.pop(0) if self._carry else self._queue.get()
            if first is None:
                return None
            batch, rows = [first], first.batch_size
            end = time.monotonic() + self.max_delay
            while rows < self.max_batch:
                wait = end - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._carry.append(None)  # another worker's stop: first in line, never a blocking put
                    break
                if rows + nxt.batch_size > self.max_batch or not mergeable(first, nxt, self.batch_args):
                    self._carry.append(nxt)  # the next batch starts with it
                    break
                batch.append(nxt)
                rows += nxt.batch_size
            return batch

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                self._serve(batch)
            except Exception as e:  # noqa: BLE001 - a worker never dies with requests unanswered
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _serve(self, batch: List[Request]) -> None:
        now = time.monotonic()
        live = []
        for r in batch:
            if r.deadline is not None and now > r.received + r.deadline / 1000.0:
                r.future.set_exception(DeadlineExceeded(
                    f"the request waited {1000 * (now - r.received):.1f} ms, past its deadline of "
                    f"{r.deadline:g} ms"))
            else:
                live.append(r)
        if not live:
            return
        t0 = time.perf_counter()
        try:
            out, tag = self.run(*merge(live, self.batch_args))
            parts = split(out, [r.batch_size for r in live])
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
            if len(live) > 1:
                # One bad request must not fail the others: run each alone to find it.
                for r in live:
                    self._run_alone(r)
            else:
                live[0].future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        for r, p in zip(live, parts):
            r.future.set_result((p, tag))
        if self.on_batch is not None:
            self.on_batch(len(live), sum(r.batch_size for r in live), seconds)

    def _run_alone(self, r: Request) -> None:
        t0 = time.perf_counter()
        try:
            out, tag = self.run(*r.args)
            r.future.set_result((split(out, [r.batch_size])[0], tag))
        except Exception as e:  # noqa: BLE001 - the request's own error
            r.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(1, r.batch_size, time.perf_counter() - t0)
