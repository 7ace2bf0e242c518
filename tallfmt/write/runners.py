"""Where the per-shard work runs: in this process or on a Dask cluster. Both are interchangeable
objects with ``map(phase, fn, calls, on_done)`` → results in call order, ``workers()`` and
``close()``; the files written are the same bytes either way."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tallfmt.errors import InputError


class Runner(Protocol):
    remote: bool

    def map(self, phase: str, fn: Callable[..., Any], calls: list[tuple],
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]: ...

    def workers(self) -> int: ...

    def close(self) -> None: ...


class LocalRunner:
    """Runs each shard's work in this process, one after the other."""

    remote = False

    def map(self, phase: str, fn: Callable[..., Any], calls: list[tuple],
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        out = []
        for i, args in enumerate(calls):
            out.append(fn(*args))
            if on_done is not None:
                on_done(i, out[-1])
        return out

    def workers(self) -> int:
        return 1

    def close(self) -> None:
        pass


class DaskRunner:
    """Submits each shard's work to a Dask cluster; a failed task is retried ``retries`` times (a task
    whose worker dies is rescheduled by the scheduler itself)."""

    remote = True

    def __init__(self, scheduler: Any, retries: int, run: str) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise InputError("scheduler= needs Dask: pip install 'tallfmt[dask]'") from None
        if isinstance(scheduler, str):
            try:
                self.client, self.owned = Client(scheduler, set_as_default=False), True
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
        elif isinstance(scheduler, Client):
            self.client, self.owned = scheduler, False
        else:
            raise InputError(f"scheduler must be a dask.distributed.Client or a scheduler address, "
                             f"got {type(scheduler).__name__}")
        self.retries, self.run = retries, run

    def map(self, phase: str, fn: Callable[..., Any], calls: list[tuple],
            on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, key=f"tallfmt-{phase}-{i:05d}-{self.run}",
                                      retries=self.retries, pure=False) for i, args in enumerate(calls)]
        where = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        try:
            for fut in as_completed(futures):
                i = where[fut.key]
                out[i] = fut.result()
                if on_done is not None:
                    on_done(i, out[i])
        except BaseException:
            self.client.cancel(futures)
            raise
        return out

    def workers(self) -> int:
        """Threads in the cluster (the default number of shards)."""
        return max(1, sum(self.client.nthreads().values()))

    def close(self) -> None:
        if self.owned:
            self.client.close()


def runner_for(scheduler: Any, retries: int, run: str) -> Runner:
    """LocalRunner without a scheduler, else a DaskRunner on it."""
    return DaskRunner(scheduler, retries, run) if scheduler is not None else LocalRunner()


def portable_source(src: Any, what: str, remote: bool) -> Any:
    """A checkpoint source as a worker can open it: paths absolute (workers may run elsewhere), an
    in-memory mapping refused for a cluster."""
    if isinstance(src, Mapping):
        if remote:
            raise InputError(f"{what}: an in-memory {{name: tensor}} mapping cannot be sent to a Dask cluster; "
                             f"save it (e.g. safetensors) where every worker can read it and pass the path")
        return src
    if isinstance(src, (str, os.PathLike)):
        return str(Path(src).absolute()) if remote else src
    return src  # open_checkpoint names what is wrong with it
