"""Kill an encode at chosen points (issue 6, item 3); run by tests/test_hostile.py as

    python tests/_kill_worker.py SPEC.json

This process imports tallfmt and torch once (and runs one encode to warm up), then forks one child per job; a child encodes a small zoo
to SPEC["target"]. For each variant (a previous archive at the target, or none) a first child runs to the
end and lists its write-path events (each write of the container file, fsync, chmod, rename, and
"after_replace"); then children are killed by SIGKILL, either by themselves just before their k-th event
(seeded choice of k) or by this process after a seeded random delay. Before each job the folder is reset;
after it, its state is recorded. Prints one JSON report on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _zoo(scale: int) -> tuple[dict, dict]:
    import torch

    g = torch.Generator().manual_seed(scale)
    emb = torch.randn(16 * scale, 8, generator=g)
    base = {"emb": emb, "head": emb, "w": torch.randn(8 * scale, 16, generator=g).bfloat16(),
            "frozen": torch.arange(10.0), "buf": torch.arange(4)}
    tasks = {}
    for i, t in enumerate(("a", "b", "c")):
        e = emb + 0.01 * torch.randn(emb.shape, generator=g)
        tasks[t] = {"emb": e, "head": e, "w": (base["w"].float() + 0.01 * torch.randn(base["w"].shape, generator=g)
                                              ).bfloat16(), "frozen": torch.arange(10.0), "buf": torch.arange(4) + i}
    return base, tasks


def killer(kill_at: int | None, after: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """(events, hooked): ``hooked(name, fn)`` wraps fn so that each call records the event ``name``
    (and, once fn returned, ``after[name]`` if given); the process kills itself with SIGKILL just
    before its ``kill_at``-th event."""
    events: list[str] = []

    def hit(name: str) -> None:
        events.append(name)
        if kill_at is not None and len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def hooked(name: str, fn):  # type: ignore[no-untyped-def]
        def call(*a, **k):  # type: ignore[no-untyped-def]
            hit(name)
            out = fn(*a, **k)
            if after and name in after:
                hit(after[name])
            return out
        return call
    return events, hooked


def _child(job: dict, spec: dict) -> None:
    import torch

    import tallfmt
    from tallfmt.format import container

    torch.set_num_threads(1)
    base, tasks = _zoo(spec["scale"])
    events, hooked = killer(job.get("kill_at"), after={"replace": "after_replace"})
    container.ContainerWriter._write = hooked("write", container.ContainerWriter._write)
    for name in ("fsync", "chmod", "replace"):
        setattr(os, name, hooked(name, getattr(os, name)))
    Path(job["go"]).write_text("go")  # the encode starts now
    tallfmt.encode(base, tasks, spec["target"], overwrite=True)
    if job.get("events"):
        Path(job["events"]).write_text(json.dumps(events))


def _state(target: Path) -> dict:
    folder = target.parent
    return {"target": hashlib.sha256(target.read_bytes()).hexdigest() if target.exists() else None,
            "others": sorted(p.name for p in folder.iterdir() if p != target)}


def _run(job: dict, spec: dict, old: bytes | None) -> dict:
    """Reset the folder, fork a child for `job`, wait for it (killing it after job["delay"] seconds)."""
    target, go = Path(spec["target"]), Path(spec["go"])
    for p in target.parent.iterdir():
        p.unlink()
    if old is not None:
        target.write_bytes(old)
    job = dict(job, go=str(go))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child(job, spec)
            code = 0
        finally:
            os._exit(code)
    started = None
    while started is None:
        if go.exists():
            started = time.perf_counter()
            go.unlink()
        elif os.waitpid(pid, os.WNOHANG)[0]:
            raise SystemExit(f"job {job} died before encoding")
        else:
            time.sleep(0.001)
    if "delay" in job:
        time.sleep(job["delay"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return {"job": job, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": time.perf_counter() - started, **_state(target)}


def kill_points(events: list[str], rng: random.Random, n_random: int) -> list[int]:
    """1-based event numbers to die before: the first writes, the last (the preamble), around the rename,
    and `n_random` drawn at random."""
    replace_at = events.index("replace") + 1
    last_write = len(events) - events[::-1].index("write")
    fixed = {1, 2, last_write - 1, last_write, replace_at - 2, replace_at - 1, replace_at, replace_at + 1}
    return sorted(fixed | set(rng.sample(range(1, len(events) + 1), n_random)))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    import tempfile

    import torch

    import tallfmt

    torch.set_num_threads(1)  # no intra-op thread pool in this process: forking it is safe
    with tempfile.TemporaryDirectory() as tmp:  # warm up: kernels loaded, lazy imports done, before forking
        base, tasks = _zoo(1)
        tallfmt.encode(base, tasks, Path(tmp) / "warm.tall")

    report = []
    for i, old_path in enumerate(spec["variants"]):
        old = Path(old_path).read_bytes() if old_path else None
        events_file = Path(spec["go"] + ".events")
        dry = _run({"events": str(events_file)}, spec, old)
        events = json.loads(events_file.read_text())
        snapshot = Path(spec["go"] + f".new{i}")
        snapshot.write_bytes(Path(spec["target"]).read_bytes())
        rng = random.Random(spec["seed"] + i)
        jobs = [{"kill_at": k} for k in kill_points(events, rng, spec["random_points"])]
        jobs += [{"delay": rng.uniform(0, dry["seconds"] * 1.2)} for _ in range(spec["random_delays"])]
        report.append({"old": old_path, "dry": dry, "events": events, "new": str(snapshot),
                       "results": [_run(job, spec, old) for job in jobs]})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
