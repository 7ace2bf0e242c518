"""Hostile input and faults, second round (issue 15): one regression test (or more) per defect.

The format rules themselves (error classes, 401-digit literals, λ, BOOL bytes, zstd frames, thresholds,
symlinked shards, …) are covered by the conformance suite (tests/test_conformance.py); here are the
library's side of them: what encode refuses before writing, non-regular files, the decode memory
budget, whole-folder replacement under SIGKILL, sharded re-encodes under concurrent readers and kills,
stale temporary files, truncation while reading, the cost of verify and of hostile headers, NaN
rounding of merges, and the merge α.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _tallcraft as tc
import tallfmt
from tallfmt import kernels
from tallfmt.compute import rounding
from tallfmt.errors import FormatError, InputError, LimitError, WriteError
from tallfmt.format import atomic, container
from tallfmt.format.container import ContainerReader, ContainerWriter
from tallfmt.format.header import MAX_STATS, Header, TaskEntry, TensorEntry
from tallfmt.format.index import INDEX_NAME

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zoo(n: int = 64, tasks: tuple[str, ...] = ("a", "b"), seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 4, generator=g)
    base = {"w": w, "tied": w, "h": torch.randn(n, generator=g).bfloat16(), "ids": torch.arange(3)}
    out = {}
    for i, t in enumerate(tasks):
        wt = w + 0.1 * torch.randn(w.shape, generator=g)
        out[t] = {"w": wt, "tied": wt, "h": (base["h"].float() + 0.1 * torch.randn(n, generator=g)).bfloat16(),
                  "ids": torch.arange(3) + i}
    return base, out


def _digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout importable; a hang fails by timeout."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------------------------
# Defects 3, 4, 13: encode refuses before writing what readers refuse, and names that are not text


@pytest.mark.parametrize("what, tensor, needle", [
    ("33 dimensions", torch.zeros([1] * 33), "33 dimensions, the limit is 32"),
    ("a dimension over 2**48", torch.zeros(2**49, 0, dtype=torch.uint8), "dimension 0 is 562949953421312, over"),
])
def test_encode_refuses_shapes_readers_refuse(tmp_path: Path, what: str, tensor: torch.Tensor, needle: str) -> None:
    base, tasks = _zoo()
    base["x"], tasks["a"]["x"], tasks["b"]["x"] = tensor, tensor.clone(), tensor.clone()
    with pytest.raises(InputError, match=needle) as info:
        tallfmt.encode(base, tasks, tmp_path / "z.tall")
    assert "<dict 'base'>" in str(info.value) and "'x'" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("lam", [0.0, -1.0, 1e39])
def test_the_container_writer_refuses_a_header_readers_refuse(tmp_path: Path, lam: float) -> None:
    p = tmp_path / "x.tall"
    with ContainerWriter(p) as w, pytest.raises(InputError, match=r"readers would refuse .*tasks\[0\]\.lambda"):
        seg = w.write_segment(bytes(8), "raw", 8)
        w.finish(Header((TaskEntry("a", lam),), tc.ENCODING, (TensorEntry("x", "shared", "I64", (1,), data=seg),)))
    assert list(tmp_path.iterdir()) == []


def test_zero_size_tensor_with_a_2_48_dimension_round_trips(tmp_path: Path) -> None:
    base, tasks = _zoo()
    base["x"] = torch.zeros(2**48, 0)
    for t in tasks.values():
        t["x"] = torch.zeros(2**48, 0)
    tallfmt.encode(base, tasks, tmp_path / "z.tall")
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert zoo.roles["x"] == "shared" and tuple(zoo.decode("a")["x"].shape) == (2**48, 0)
        zoo.verify()


def test_encode_refuses_the_safetensors_metadata_name(tmp_path: Path) -> None:
    base, tasks = {"__metadata__": torch.zeros(3)}, {"a": {"__metadata__": torch.ones(3)}}
    with pytest.raises(InputError, match="'__metadata__'.*reserved by safetensors"):
        tallfmt.encode(base, tasks, tmp_path / "z.tall")
    assert list(tmp_path.iterdir()) == []


def test_decode_to_names_the_file_for_a_reserved_name(tmp_path: Path) -> None:
    from tallfmt.checkpoints import save_state_dict

    with pytest.raises(InputError, match=r"m\.safetensors: tensor name '__metadata__'"):
        save_state_dict({"__metadata__": torch.zeros(1)}, tmp_path / "m.safetensors")


@pytest.mark.parametrize("where", ["task name", "tensor name in a dict", "metadata key", "metadata value",
                                  "safetensors key", "bin key"])
def test_names_that_are_not_unicode_text(tmp_path: Path, where: str) -> None:
    base, tasks = _zoo()
    kw: dict[str, Any] = {}
    bad = "t\udcff"  # how Python hands over the bytes b"t\xff" of a file name or an argument
    if where == "task name":
        tasks = {bad: tasks["a"]}
    elif where == "tensor name in a dict":
        base[bad], tasks["a"][bad], tasks["b"][bad] = torch.zeros(2), torch.ones(2), torch.ones(2)
    elif where.startswith("metadata"):
        kw["metadata"] = {bad: "v"} if where == "metadata key" else {"k": bad}
    elif where == "safetensors key":
        p = tmp_path / "b.safetensors"
        save_file({"w": torch.zeros(2)}, str(p))
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = raw[8:8 + n].replace(b'"w"', b'"\\udcff"')
        p.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
        base = str(p)
    else:
        p = tmp_path / "b.bin"
        torch.save({bad: torch.zeros(2)}, str(p))
        base = str(p)
    with pytest.raises(InputError) as info:
        tallfmt.encode(base, tasks, tmp_path / "z.tall", **kw)
    assert "surrogate" in str(info.value) or "Unicode" in str(info.value), info.value
    assert not (tmp_path / "z.tall").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [os.fsencode(a) for a in args]
    return subprocess.run([PY, "-m", "tallfmt.cli", *argv], capture_output=True, cwd=cwd, env=env, timeout=300)


def test_cli_non_utf8_names_are_one_line_errors(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.ones(4)}, str(tmp_path / "b.safetensors"))
    bad_file = os.fsdecode(b"caf\xe9.safetensors")
    save_file({"w": torch.ones(4) * 2}, str(tmp_path / bad_file))
    for args in (("base.safetensors", bad_file),
                 ("base.safetensors", "b.safetensors", "--name", os.fsdecode(b"t\xff")),
                 ("base.safetensors", "b.safetensors", "--metadata", os.fsdecode(b"k=\xff"))):
        r = _cli("encode", *args, "-o", "z.tall", cwd=tmp_path)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode in (1, 2) and "Traceback" not in err and "UTF-8" in err, err
        assert not (tmp_path / "z.tall").exists()
    # a path that is not UTF-8 still works, and is shown escaped
    r = _cli("encode", "base.safetensors", bad_file, "--name", "cafe", "-o", os.fsdecode(b"z\xe9.tall"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("info", os.fsdecode(b"z\xe9.tall"), cwd=tmp_path)
    assert r.returncode == 0 and b"z\\udce9.tall" in r.stdout, r.stderr


def test_bool_bytes_other_than_0_1_refused_at_encode(tmp_path: Path) -> None:
    base, tasks = _zoo()
    flags = torch.tensor([0, 1, 2, 1], dtype=torch.uint8).view(torch.bool)
    base["flags"], tasks["a"]["flags"], tasks["b"]["flags"] = flags, flags.clone(), flags.clone()
    with pytest.raises(InputError, match="'flags' is BOOL but holds bytes other than 0 and 1"):
        tallfmt.encode(base, tasks, tmp_path / "z.tall")


# ----------------------------------------------------------------------------------------------
# Defect 6: a stride-0 tensor in a .bin


def test_stride0_bin_is_refused_before_materialising(tmp_path: Path) -> None:
    p = tmp_path / "bomb.bin"
    torch.save({"w": torch.zeros(1).expand(2**36)}, str(p))  # 256 GiB of float32 over 4 bytes of storage
    assert p.stat().st_size < 4096
    torch.save({"w": torch.ones(4)}, str(tmp_path / "ok.bin"))
    tracemalloc.start()
    with pytest.raises(InputError, match=r"bomb\.bin: tensor 'w' .* needs 274,877,906,944 bytes but its storage holds 4"):
        tallfmt.encode(str(p), {"a": str(tmp_path / "ok.bin")}, tmp_path / "z.tall")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


# ----------------------------------------------------------------------------------------------
# Defect 7: FIFOs, devices and links to /dev/zero are refused up front


_NON_REGULAR = """
import os, sys, tallfmt, torch
from pathlib import Path
tmp, kind, suffix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
p = tmp / ("x" + suffix) if suffix != "hf" else tmp / "hf" / "model.safetensors.index.json"
p.parent.mkdir(exist_ok=True)
if kind == "fifo":
    os.mkfifo(p)
else:
    os.symlink("/dev/zero", p)
try:
    if suffix == ".tall" or suffix == ".json":
        tallfmt.open(p)
    else:
        src = str(p.parent) if suffix == "hf" else str(p)
        tallfmt.encode(src, {"a": {"w": torch.ones(2)}}, tmp / "z.tall")
except tallfmt.TallError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin", "hf", ".json", ".tall"])
def test_non_regular_files_refused_without_waiting(tmp_path: Path, kind: str, suffix: str) -> None:
    r = subprocess.run([PY, "-c", _NON_REGULAR, str(tmp_path), kind.split()[0], suffix], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not a regular file" in r.stdout and ("InputError" in r.stdout or "FormatError" in r.stdout), r.stdout


# ----------------------------------------------------------------------------------------------
# Defect 8: the decode memory budget, and aliases planning far more output than the archive holds


def _rle_frame(n: int) -> bytes:
    """A valid zstd frame of n zero bytes made of RLE blocks (4 stored bytes per 128 KiB), content size
    stated, 128 KiB window."""
    block = 1 << 17
    out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0xC0, 7 << 3]) + n.to_bytes(8, "little"))
    left = n
    while left:
        size = min(block, left)
        left -= size
        out += (int(left == 0) | 1 << 1 | size << 3).to_bytes(3, "little") + b"\0"
    return bytes(out)


def _bomb(path: Path, n: int) -> Path:
    """A valid archive: one shared U8 tensor of n bytes stored as a tiny zstd frame."""
    with ContainerWriter(path) as w:
        seg = w.write_stored(_rle_frame(n), n, "zstd")
        w.finish(Header((TaskEntry("a", 0.4),), tc.ENCODING, (TensorEntry("x", "shared", "U8", (n,), data=seg),)))
    return path


def test_decode_budget_refuses_before_allocating(tmp_path: Path) -> None:
    p = _bomb(tmp_path / "b.tall", 64 << 20)
    assert p.stat().st_size < 4096
    with tallfmt.open(p, max_tensor_bytes=64 << 20) as zoo:  # within the budget: decodes
        assert int(zoo.decode("a")["x"].sum()) == 0
    for op in ("decode", "verify", "merge"):
        with tallfmt.open(p, max_tensor_bytes=1 << 20) as zoo:
            tracemalloc.start()
            with pytest.raises(LimitError, match=r"'x'.*67,108,864 bytes, over this reader's memory budget of "
                                                 r"1,048,576") as info:
                getattr(zoo, op)(*(["a"] if op == "decode" else []))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert str(p) in str(info.value) and peak < 4 << 20
    with pytest.raises(InputError, match="max_tensor_bytes"):
        tallfmt.open(p, max_tensor_bytes=0)
    r = _cli("--max-tensor-bytes", "1MB", "verify", str(p), cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1 and "memory budget of 1,000,000" in err and "--max-tensor-bytes" in err, err
    assert _cli("--max-tensor-bytes", "64MiB", "verify", str(p), cwd=tmp_path).returncode == 0


def test_default_budget_is_a_quarter_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (8 << 30) // 4096}  # an 8 GiB machine
    monkeypatch.setattr(container.os, "sysconf", lambda name: pages[name])
    assert container.default_max_tensor_bytes() == 2 << 30
    p = _bomb(tmp_path / "b.tall", (2 << 30) + 1)  # a 64 KiB archive asking for 2 GiB + 1 byte
    assert p.stat().st_size < 100_000
    with tallfmt.open(p) as zoo, pytest.raises(LimitError, match="memory budget of 2,147,483,648"):
        zoo.verify()
    pages["SC_PHYS_PAGES"] = (1 << 30) // 4096  # at least 1 GiB, however small the machine
    assert container.default_max_tensor_bytes() == 1 << 30


def test_aliases_planning_more_than_the_disk_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(1 << 16)  # 256 KiB, tied 2000 times: ~500 MiB of output from a small archive
    base = {"w": w, **{f"t{i}": w for i in range(2000)}}
    wa = w + 1
    tasks = {"a": {k: wa for k in base}}
    tallfmt.encode(base, tasks, tmp_path / "z.tall")
    assert (tmp_path / "z.tall").stat().st_size < 1 << 20
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100 << 20))
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert len(zoo.decode("a")) == 2001  # in memory: one tensor, 2001 names
        for out in (tmp_path / "m.safetensors", tmp_path / "m"):
            with pytest.raises(WriteError) as info:
                zoo.decode_to("a", out)
            assert info.value.errno == errno.ENOSPC and str(out) in str(info.value)
            assert "524,550,144 bytes" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.tall"]


# ----------------------------------------------------------------------------------------------
# Defects 9 and 11: folder outputs replaced whole, under SIGKILL, on full and read-only disks


def _kill_report(tmp_path: Path, spec: dict) -> dict:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([PY, str(HERE / "_kill_swap_worker.py"), str(path)], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _is_temporary(name: str) -> bool:
    return atomic._TMP.fullmatch(name.split("/")[0]) is not None


@pytest.mark.parametrize("shards", [1, 2], ids=["model.safetensors", "sharded folder"])
def test_sigkill_during_decode_to_a_folder_leaves_the_old_or_the_new_model(tmp_path: Path, shards: int) -> None:
    base, tasks = _zoo(256)
    archive = tallfmt.encode(base, tasks, tmp_path / "z.tall").path
    old = tmp_path / "old"
    size = 5 * 2**30 if shards == 1 else 2048
    with tallfmt.open(archive) as zoo:
        zoo.decode_to("a", old / "out", max_shard_size=size)
    (old / "out" / "config.json").write_text("{}")  # the user's file beside the model: carried over
    r = _kill_report(tmp_path, {"action": "decode", "archive": str(archive), "task": "b", "old": str(old),
                                "target": str(tmp_path / "work" / "out"), "max_shard_size": size})
    before, new = r["before"], r["dry"]["loaded"]
    assert r["dry"]["exit"] == 0 and before != new and not before.startswith("error") and not new.startswith("error")
    files = {n.removeprefix("out/") for n in r["dry"]["files"]}
    if shards == 1:
        assert files == {"config.json", "model.safetensors"}
    else:
        assert "config.json" in files and "model.safetensors.index.json" in files and len(files) >= 4
    assert "exchange" in r["events"] and len(r["results"]) == len(r["events"]) > 10
    swapped = r["events"].index("exchange") + 1
    for res in r["results"]:
        what = f"killed before event {res['kill_at']} ({r['events'][res['kill_at'] - 1]})"
        assert res["signal"] == 9, what
        assert res["loaded"] == (new if res["kill_at"] > swapped else before), what  # never a mix
        assert "out/config.json" in res["files"], what
        assert all(n.startswith("out/") or _is_temporary(n) for n in res["files"]), (what, sorted(res["files"]))


def test_stale_temporary_folders_of_dead_writers_are_removed(tmp_path: Path) -> None:
    base, tasks = _zoo()
    archive = tallfmt.encode(base, tasks, tmp_path / "z.tall").path
    out = tmp_path / "out"
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f".out.{dead}-0123456789ab.tmp", tmp_path / f".out.{dead}-0123456789ac.old"]
    alive = tmp_path / f".out.{os.getppid()}-0123456789ab.tmp"   # a live process: kept
    for d in (*stale, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    with tallfmt.open(archive) as zoo:
        zoo.decode_to("a", out)
    # the .old of a dead writer goes once the target exists (until then it is the only copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out", "z.tall"])


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_folder_output_write_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    base, tasks = _zoo()
    archive = tallfmt.encode(base, tasks, tmp_path / "z.tall").path
    out = tmp_path / "out"
    with tallfmt.open(archive) as zoo:
        zoo.decode_to("a", out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        if fault == "disk full":
            def write(self: Any, data: Any) -> int:
                raise atomic.write_error(self.path, "cannot write", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            monkeypatch.setattr(atomic.AtomicFile, "write", write)
        else:
            def mkdir(*a: Any, **k: Any) -> None:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            monkeypatch.setattr(atomic.os, "mkdir", mkdir)
        with pytest.raises(WriteError) as info:
            zoo.decode_to("b", out, overwrite=True)
        monkeypatch.undo()
    assert info.value.errno == (errno.ENOSPC if fault == "disk full" else errno.EROFS)
    assert str(out) in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "z.tall"]


# ----------------------------------------------------------------------------------------------
# Defects 10 and 11: sharded re-encodes under kills and concurrent readers


def _zoo_files(tmp_path: Path, n: int = 512) -> tuple[str, dict[str, str]]:
    base, tasks = _zoo(n, ("a", "b", "c"))
    del base["tied"]
    for t in tasks.values():
        del t["tied"]
    save_file(base, str(tmp_path / "base.safetensors"))
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    return str(tmp_path / "base.safetensors"), {t: str(tmp_path / f"{t}.safetensors") for t in tasks}


def test_sigkill_during_sharded_reencode_leaves_the_old_or_the_new_archive(tmp_path: Path) -> None:
    zoo = _zoo_files(tmp_path)
    old = tmp_path / "old"
    tallfmt.encode(*zoo, old / "zoo", lambdas=0.4, shards=3)
    r = _kill_report(tmp_path, {"action": "encode", "zoo": zoo, "lam": 0.3, "shards": 2, "old": str(old),
                                "target": str(tmp_path / "work" / "zoo")})
    before, new = r["before"], r["dry"]["loaded"]
    assert before != new and not new.startswith("error") and r["dry"]["exit"] == 0
    assert len(r["results"]) == len(r["events"]) > 10
    commit = max(i for i, e in enumerate(r["events"], 1) if e == "replace")  # the index's rename
    for res in r["results"]:
        what = f"killed before event {res['kill_at']} ({r['events'][res['kill_at'] - 1]})"
        assert res["loaded"] == (new if res["kill_at"] > commit else before), what
        assert all(f.startswith("zoo/") for f in res["files"]), what
    # what a killed encode leaves (new shards not yet in an index, temporary files) goes with the next one
    work = tmp_path / "work"
    shutil.rmtree(work)
    shutil.copytree(old, work)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (work / "zoo" / f".model-00001-of-00002.tall.{dead}-0123456789ab.tmp").write_bytes(b"half")
    (work / "zoo" / f".tall.index.json.{dead}-0123456789ab.tmp").write_bytes(b"half")
    (work / "zoo" / "model-00002-of-00002-0123456789abcdef.tall").write_bytes(b"orphan")
    tallfmt.encode(*zoo, work / "zoo", lambdas=0.3, shards=2, overwrite=True)
    listed = [s["file"] for s in json.loads((work / "zoo" / INDEX_NAME).read_bytes())["shards"]]
    assert sorted(p.name for p in (work / "zoo").iterdir()) == sorted([INDEX_NAME, *listed])


def test_symlinked_shards_inside_the_folder_only(tmp_path: Path) -> None:
    zoo = _zoo_files(tmp_path, 64)
    folder = tmp_path / "zoo"
    tallfmt.encode(*zoo, folder, shards=2)
    first = json.loads((folder / INDEX_NAME).read_bytes())["shards"][0]["file"]
    (folder / "store").mkdir()
    (folder / first).rename(folder / "store" / first)
    (folder / first).symlink_to(Path("store") / first)  # inside the folder: read
    with tallfmt.open(folder) as z:
        z.verify()
    outside = tmp_path / "elsewhere.tall"
    (folder / "store" / first).rename(outside)
    for target in (outside, Path("..") / outside.name):  # absolute, and relative out of the folder
        (folder / first).unlink()
        (folder / first).symlink_to(target)
        with pytest.raises(FormatError, match=r"shards\[0\]\.file: .* is a link to .*outside the archive's folder"):
            tallfmt.open(folder)


_READER = """
import hashlib, sys, time, torch, tallfmt
torch.set_num_threads(1)
folder, until = sys.argv[1], float(sys.argv[2])
seen = {}
while time.time() < until:
    try:
        with tallfmt.open(folder) as zoo:
            h = hashlib.sha256()
            for name, t in sorted(zoo.decode("a").items()):
                h.update(name.encode() + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            key = h.hexdigest()
    except Exception as exc:
        key = f"{type(exc).__name__}: {exc}"
    seen[key] = seen.get(key, 0) + 1
print(repr(seen))
"""


def test_readers_see_the_old_or_the_new_archive_during_reencodes(tmp_path: Path) -> None:
    zoo = _zoo_files(tmp_path)
    folder = tmp_path / "zoo"
    digests = {}
    for lam in (0.3, 0.5):
        tallfmt.encode(*zoo, folder, lambdas=lam, shards=3, overwrite=True)
        with tallfmt.open(folder) as z:
            h = hashlib.sha256()
            for name, t in sorted(z.decode("a").items()):
                h.update(name.encode() + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digests[lam] = h.hexdigest()
    until = time.time() + 25
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    readers = [subprocess.Popen([PY, "-c", _READER, str(folder), str(until)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    encodes = 0
    while time.time() < until - 2:
        tallfmt.encode(*zoo, folder, lambdas=(0.3, 0.5)[encodes % 2], shards=(3, 2)[encodes % 2], overwrite=True)
        encodes += 1
    seen: dict[str, int] = {}
    for p in readers:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        for k, v in eval(out.strip().splitlines()[-1]).items():  # noqa: S307 - our own repr of a dict
            seen[k] = seen.get(k, 0) + v
    assert encodes >= 3
    assert set(seen) <= set(digests.values()), {k: v for k, v in seen.items() if k not in digests.values()}
    assert sum(seen.values()) >= 10


# ----------------------------------------------------------------------------------------------
# Defect 12: an archive truncated in place while it is read


def test_truncation_while_reading_is_a_format_error_not_sigbus(tmp_path: Path) -> None:
    base, tasks = _zoo(1 << 16)
    p = tallfmt.encode(base, tasks, tmp_path / "z.tall", codec="raw").path
    r = _py(f"""
        import os, tallfmt
        zoo = tallfmt.open({str(p)!r})
        os.truncate({str(p)!r}, os.path.getsize({str(p)!r}) // 3)   # as `cp` over the file would
        try:
            zoo.decode("a")
        except tallfmt.FormatError as exc:
            print("FormatError", exc)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7 would be SIGBUS
    assert "FormatError" in r.stdout and "truncated" in r.stdout, r.stdout


# ----------------------------------------------------------------------------------------------
# Defect 15: verify is linear in the number of tasks; hostile headers are bounded


def test_verify_reads_each_segment_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"w": torch.zeros(100)}
    tasks = {f"t{i}": {"w": torch.randn(100)} for i in range(64)}
    p = tallfmt.encode(base, tasks, tmp_path / "z.tall", codec="byteplane-zstd").path
    reads: list[int] = []
    real = ContainerReader.read
    monkeypatch.setattr(ContainerReader, "read", lambda self, seg, *a, **k: reads.append(seg.offset) or real(
        self, seg, *a, **k))
    with tallfmt.open(p) as zoo:
        zoo.verify()
        n_segments = sum(1 for e in zoo.header.tensors for _ in e.segments())
    assert n_segments == 2 + 64 and sorted(reads) == sorted(set(reads)) and len(reads) == n_segments


def test_stats_objects_are_bounded(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")

    def keys(n: int) -> None:
        tc.rewrite_header(p, lambda h: h["tasks"][0].update(stats={f"k{i}": 0 for i in range(n)}))
    keys(MAX_STATS)
    ContainerReader(p).close()
    keys(MAX_STATS + 1)
    with pytest.raises(LimitError, match=r"tasks\[0\]\.stats: 257 keys, the limit is 256"):
        ContainerReader(p)


def test_hostile_header_of_many_stats_keys_is_refused_quickly(tmp_path: Path) -> None:
    # 1M keys in one task's stats (9 MB of header): a LimitError once parsed, no per-key checks
    parts = tc.split(tc.build(tmp_path / "x.tall"))
    i = parts.header.index(b'"stats":{') + len(b'"stats":{')
    keys = b"".join(b'"%x":0,' % k for k in range(1_000_000))
    p = tc.write(tmp_path / "big.tall", tc.assemble(parts, header=parts.header[:i] + keys + parts.header[i:]))
    with pytest.raises(LimitError, match="1000001 keys"):
        ContainerReader(p)


# ----------------------------------------------------------------------------------------------
# NaN rounding (FORMAT.md §4.4): the torch merge path and the numba decode agree on every bit pattern


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_merge_rounding_agrees_with_the_decode_kernel(dtype: str) -> None:
    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFFFFFFF, 0x7F7FFFFF, 0x477FF000],
                                    dtype=np.uint32)])
    tau = bits.view(np.float32)
    storage = np.uint16 if dtype == "BF16" else np.float16
    base = np.zeros(len(bits), dtype=storage)
    keep_all = np.packbits(np.ones(len(bits), dtype=bool), bitorder="little")
    want = kernels.decode_masked(base, tau, keep_all, dtype=dtype).view(np.uint16)
    t = torch.from_numpy(tau.copy())
    got = rounding.narrow(torch.zeros_like(t) + t, getattr(torch, {"BF16": "bfloat16", "F16": "float16"}[dtype]))
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_is_exact_for_every_bit_pattern(dtype: torch.dtype) -> None:
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    wide = rounding.widen(h.view(dtype))
    back = rounding.round_merged(wide.clone(), h.view(dtype), wide)  # a merge that changed nothing
    assert torch.equal(back.view(torch.int16), h)  # θ0 bit for bit, signalling NaNs included
    finite = ~torch.isnan(h.view(dtype))
    assert torch.equal(wide[finite], h.view(dtype)[finite].to(torch.float32))


# ----------------------------------------------------------------------------------------------
# The merge α: any finite float32 value, negative included, in the API and the CLI alike


def test_merge_alpha_api_and_cli_agree(tmp_path: Path) -> None:
    base, tasks = _zoo()
    p = tallfmt.encode(base, tasks, tmp_path / "z.tall").path
    with tallfmt.open(p) as zoo:
        api = zoo.merge("task_arithmetic", alpha=-0.5)
        for bad in (float("nan"), 1e39, 10**400):
            with pytest.raises(InputError, match="alpha"):
                zoo.merge("task_arithmetic", alpha=bad)
    r = _cli("merge", str(p), "--method", "task_arithmetic", "--alpha", "-0.5", "-o", "m.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    assert _digest(load_file(str(tmp_path / "m.safetensors"))) == _digest(api)
    for bad in ("nan", "1e39"):
        r = _cli("merge", str(p), "--alpha", bad, "-o", "n.safetensors", cwd=tmp_path)
        err = r.stderr.decode()
        assert r.returncode == 1 and "alpha" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
