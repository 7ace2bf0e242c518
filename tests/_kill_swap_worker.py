"""Kill a folder write at every step (issue 15, defects 9-11); run by tests/test_faults.py as

    python tests/_kill_swap_worker.py SPEC.json

SPEC["action"] is "decode" (Archive.decode_to of task SPEC["task"] into the folder SPEC["target"], which
holds an earlier decode) or "encode" (a sharded re-encode of SPEC["zoo"] with λ = SPEC["lam"] into the
folder SPEC["target"], which holds an earlier archive). This process imports tallfmt and torch once, then
forks one child per job. A first child runs to the end and lists its write-path events (each file write,
fsync, rename, replace, exchange, unlink, mkdir, link); then a child per event number k is killed by
SIGKILL just before its k-th event. Before each job the target's parent folder is reset to a copy of
SPEC["old"]; after it, its files are recorded (name → sha256) and what the target holds is read back
(a digest of its tensors, or the error). Prints one JSON report on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kill_worker import killer  # noqa: E402


def _act(spec: dict) -> None:
    import tallfmt

    if spec["action"] == "decode":
        with tallfmt.open(spec["archive"]) as zoo:
            zoo.decode_to(spec["task"], spec["target"], max_shard_size=spec.get("max_shard_size", 5 * 2**30),
                          overwrite=True)
    else:
        base, tasks = spec["zoo"]
        tallfmt.encode(base, tasks, spec["target"], lambdas=spec["lam"], shards=spec["shards"], overwrite=True)


def _child(spec: dict, kill_at: int | None, events_file: str | None) -> None:
    import torch

    from tallfmt.format import atomic

    torch.set_num_threads(1)
    events, hooked = killer(kill_at)
    atomic.AtomicFile.write = hooked("write", atomic.AtomicFile.write)
    atomic.exchange = hooked("exchange", atomic.exchange)
    for name in ("fsync", "rename", "replace", "unlink", "mkdir", "link", "rmdir"):
        setattr(os, name, hooked(name, getattr(os, name)))
    _act(spec)
    if events_file:
        Path(events_file).write_text(json.dumps(events))


def state(folder: Path) -> dict[str, str]:
    """name → sha256 of every file below the folder's parent (the target and what lies beside it)."""
    out = {}
    for p in sorted(folder.parent.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder.parent))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def loaded(spec: dict) -> str:
    """What the target holds now, as a digest of its tensors (every task's for an archive), or the
    error that reading it raised."""
    import torch

    import tallfmt
    from tallfmt.checkpoints import open_checkpoint

    h = hashlib.sha256()

    def add(sd: dict) -> None:
        for name in sorted(sd):
            t = sd[name].contiguous()
            h.update(name.encode() + str(t.dtype).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    try:
        if spec["action"] == "decode":
            with open_checkpoint(spec["target"]) as ck:
                add({n: ck.get(n) for n in ck.names()})
        else:
            with tallfmt.open(spec["target"]) as zoo:
                zoo.verify()
                for t in zoo.tasks:
                    add(zoo.decode(t))
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        return f"error: {type(exc).__name__}: {exc}"
    return h.hexdigest()


def _run(spec: dict, kill_at: int | None, events_file: str | None = None) -> dict:
    target = Path(spec["target"])
    parent = target.parent
    shutil.rmtree(parent, ignore_errors=True)
    shutil.copytree(spec["old"], parent)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child(spec, kill_at, events_file)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {"kill_at": kill_at, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "files": state(target),
            "loaded": loaded(spec)}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    import torch

    import tallfmt  # noqa: F401 - imported before forking

    torch.set_num_threads(1)  # no intra-op thread pool in this process: forking it is safe
    events_file = argv[1] + ".events"
    shutil.rmtree(Path(spec["target"]).parent, ignore_errors=True)
    shutil.copytree(spec["old"], Path(spec["target"]).parent)
    before = loaded(spec)
    dry = _run(spec, None, events_file)
    events = json.loads(Path(events_file).read_text())
    results = [_run(spec, k) for k in range(1, len(events) + 1)]
    print(json.dumps({"before": before, "dry": dry, "events": events, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
