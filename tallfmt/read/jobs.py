"""A small job graph on a thread pool, for decodes that split tensors into many short jobs (one zstd
frame, one range of a kernel): a job may wait for others without holding a worker, so a pool of two
threads keeps both cores busy with whatever is ready, whichever tensor it belongs to.

    >>> with Jobs(2) as jobs:
    ...     a, b = jobs.submit(lambda: 2), jobs.submit(lambda: 3)
    ...     jobs.after([a, b], lambda: a.result() * b.result()).result()
    6
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any


class Jobs:
    """A thread pool whose jobs can depend on other jobs' futures (see :meth:`after`). Closing it
    cancels what has not started and waits for what has."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tallfmt")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def after(self, futures: Sequence[Future], fn: Callable[[], Any]) -> Future:
        """A future of ``fn()``, run in the pool once every one of ``futures`` has succeeded (the
        first failure fails it instead). When ``fn`` returns a Future, that future's outcome is the
        result, so a job can hand on to jobs it submits without waiting for them."""
        out: Future = Future()
        left = [len(futures)]
        lock = threading.Lock()

        def run() -> None:
            try:
                r = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on `out`
                out.set_exception(exc)
                return
            if isinstance(r, Future):
                r.add_done_callback(lambda f: _settle(out, f))
            else:
                out.set_result(r)

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            for f in futures:
                exc = CancelledError() if f.cancelled() else f.exception()
                if exc is not None:
                    out.set_exception(exc)
                    return
            try:
                self.pool.submit(run)
            except RuntimeError as exc:  # the pool was shut down: the decode was abandoned
                out.set_exception(exc)

        if not futures:
            futures = [done(None)]
            left[0] = 1
        for f in futures:
            f.add_done_callback(one_done)
        return out

    def gather(self, futures: Sequence[Future], value: Any = None) -> Future:
        """A future of ``value`` once every one of ``futures`` has succeeded."""
        return self.after(futures, lambda: value)

    def ranges(self, n: int, step: int, fn: Callable[[int, int], None], value: Any = None) -> Future:
        """``fn(start, stop)`` for consecutive ranges of at most ``step`` covering [0, n), each a job;
        a future of ``value`` once all are done."""
        return self.gather([self.submit(fn, a, min(n, a + step)) for a in range(0, n, step)] or [done(None)], value)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def done(value: Any) -> Future:
    """A future that already holds ``value``."""
    f: Future = Future()
    f.set_result(value)
    return f


def _settle(out: Future, f: Future) -> None:
    exc = CancelledError() if f.cancelled() else f.exception()
    if exc is None:
        out.set_result(f.result())
    else:
        out.set_exception(exc)
