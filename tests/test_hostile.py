"""Hostile files, bad inputs, crashes mid-write (issue 6, items 2-6).

- resource bombs are refused before memory is allocated for them;
- an encode killed (SIGKILL) at any point, or failing on a full disk, loses nothing;
- processes and threads reading one archive at once agree with a single reader, and an archive replaced
  while open keeps serving the old handle;
- bad inputs to encode and merge are InputErrors naming the file and the tensor;
- verify detects every single-bit flip of a small archive, exhaustively.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import _fuzz_worker as fw
import _tallcraft as tc
import tallfmt
from tallfmt.format import atomic
from tallfmt.format.container import ContainerReader, ContainerWriter
from tallfmt.format.header import MAX_TENSORS, Header, TaskEntry, TensorEntry
from tallfmt.errors import FormatError, InputError, LimitError, TallError, WriteError

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zoo(seed: int = 0, tasks: tuple[str, ...] = ("a", "b", "c")) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 4, generator=g)
    base = {"emb": emb, "tied": emb, "w": torch.randn(5, 3, generator=g).half(), "frozen": torch.arange(3.0),
            "ids": torch.arange(4)}
    out = {}
    for i, t in enumerate(tasks):
        e = emb + 0.1 * torch.randn(emb.shape, generator=g)
        out[t] = {"emb": e, "tied": e, "w": (base["w"].float() + 0.1 * torch.randn(5, 3, generator=g)).half(),
                  "frozen": torch.arange(3.0), "ids": torch.arange(4) + i}
    return base, out


@pytest.fixture(scope="module")
def zoo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, tasks = _zoo()
    return tallfmt.encode(base, tasks, tmp_path_factory.mktemp("zoo") / "zoo.tall").path


# ----------------------------------------------------------------------------------------------
# 2. Resource bombs: refused before allocating


def _peak_during(fn: Any) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    err = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        err = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return err, peak


@pytest.mark.parametrize("shape, dtype, exc", [
    ([2**46], "F32", LimitError),            # 256 TiB: at the tensor limit, refused by the expansion limit
    ([2**47], "F32", LimitError),            # past the 2**48-byte tensor limit
    ([2**20, 2**20, 2**20], "I8", LimitError),
    ([2**49, 0], "U8", LimitError),          # no bytes, but a dimension past 2**48
    ([2**30, 2**30, 2**30, 0], "U8", None),  # no bytes, every dimension within the limit: valid
])
def test_header_claiming_huge_shape(tmp_path: Path, shape: list[int], dtype: str, exc: type) -> None:
    p = tc.build(tmp_path / "bomb.tall")

    def fn(h: dict) -> None:
        t = h["tensors"][2]  # 'pos', shared, zstd
        n = math.prod(shape) * {"F32": 4, "I8": 1, "U8": 1}[dtype]
        t.update(shape=shape, dtype=dtype)
        t["data"]["decoded_length"] = n
    tc.rewrite_header(p, fn)
    opener = tallfmt.open  # (its module imported before measuring)
    err, peak = _peak_during(lambda: opener(p).close())
    if exc is None:
        assert err is None, err
    else:
        assert isinstance(err, exc) and str(p) in str(err) and "tensors[2]" in str(err), err
    assert peak < 2 << 20  # nothing near the claimed size was allocated


def _lying_frame(actual: int, claimed: int) -> bytes:
    """A zstd frame of `actual` zero bytes whose header states `claimed` as its content size."""
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(actual)))
    fhd = frame[4]
    fcs_size = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    pos = 5 + (0 if fhd & 0x20 else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[fhd & 3]
    assert fcs_size == 4
    frame[pos:pos + 4] = claimed.to_bytes(4, "little")
    return bytes(frame)


def _shared_file(path: Path, stored: bytes, decoded: int, codec: str = "zstd") -> Path:
    with ContainerWriter(path) as w:
        seg = w.write_stored(stored, decoded, codec)
        w.finish(Header((TaskEntry("a", 0.4),), tc.ENCODING, (TensorEntry("x", "shared", "U8", (decoded,), data=seg),)))
    return path


def test_zstd_frame_expanding_past_its_declared_size(tmp_path: Path) -> None:
    # the frame's header says 4096 bytes (as does the archive header); its blocks hold 64 MiB of zeros
    frame = _lying_frame(64 << 20, 4096)
    p = _shared_file(tmp_path / "z.tall", frame, 4096)
    with ContainerReader(p) as r:
        err, peak = _peak_during(lambda: r.read(r.header.tensors[0].data, 1))
    assert isinstance(err, FormatError) and str(p) in str(err) and "'x'" in str(err), err
    assert peak < 1 << 20


def test_zstd_frame_claiming_more_than_declared(tmp_path: Path) -> None:
    frame = _lying_frame(1 << 20, 2**31)  # claims 2 GiB for a 4 KiB tensor
    p = _shared_file(tmp_path / "z.tall", frame, 4096)
    with ContainerReader(p) as r:
        err, peak = _peak_during(r.verify)
    assert isinstance(err, FormatError) and "declares 2147483648" in str(err), err
    assert peak < 1 << 20


def test_decompression_bomb_past_the_expansion_limit(tmp_path: Path) -> None:
    # a 20-byte frame for a 1 GiB tensor: more than any zstd frame can expand (32768 x stored + 4096),
    # refused on open from the header alone
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(4096))
    p = _shared_file(tmp_path / "z.tall", frame, 4096)  # (tallfmt's writer refuses to write a bomb)
    tc.rewrite_header(p, lambda h: (h["tensors"][0].update(shape=[1 << 30]),
                                    h["tensors"][0]["data"].update(decoded_length=1 << 30)))
    err, peak = _peak_during(lambda: ContainerReader(p))
    assert isinstance(err, LimitError) and "expansion" in str(err), err
    assert peak < 4 << 20


def test_header_length_claiming_100_mib_in_a_small_file(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")
    parts = tc.split(p)
    tc.write(p, tc.assemble(parts, header_length=100 * 2**20))
    err, peak = _peak_during(lambda: ContainerReader(p))
    assert isinstance(err, FormatError) and str(p) in str(err)
    assert peak < 1 << 20  # the claimed header was never read into memory


def test_millions_of_tiny_tensors(tmp_path: Path) -> None:
    # 1,000,001 rows (aliases of one tensor, 30 MB of JSON): refused by the tensor-count cap
    parts = tc.split(tc.build(tmp_path / "x.tall"))
    head = parts.header[:-1].rsplit(b'],"metadata"', 1)
    row = b',{"name":"%d","role":"alias","target":"w"}'
    rows = b"".join(row % i for i in range(MAX_TENSORS + 1 - 5))
    text = head[0] + rows + b'],"metadata"' + head[1] + b"}"
    p = tc.write(tmp_path / "many.tall", tc.assemble(parts, header=text))
    with pytest.raises(LimitError) as info:
        ContainerReader(p)
    assert str(p) in str(info.value) and "tensors" in str(info.value) and "1000000" in str(info.value)


def test_deeply_nested_header_json(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")
    tc.with_header(p, b'{"metadata":' + b"[" * 2_000_000 + b"]" * 2_000_000 + b"}")
    err, peak = _peak_during(lambda: ContainerReader(p))
    assert isinstance(err, LimitError) and "deeper" in str(err), err
    assert peak < 16 << 20  # no parse tree was built


# ----------------------------------------------------------------------------------------------
# 3. No data loss: SIGKILL at any point of an encode, full disks, failing fsync/rename


def test_sigkill_during_encode_loses_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    old = tc.build(tmp_path / "old.tall")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"target": str(folder / "zoo.tall"), "variants": [str(old), None], "scale": 60,
                                "go": str(tmp_path / "go"), "seed": 1234, "random_points": 6, "random_delays": 4}))
    proc = subprocess.run([sys.executable, str(HERE / "_kill_worker.py"), str(spec)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in json.loads(proc.stdout.strip().splitlines()[-1]):
        old_sha = hashlib.sha256(old.read_bytes()).hexdigest() if variant["old"] else None
        dry, events = variant["dry"], variant["events"]
        assert dry["exit"] == 0 and dry["others"] == [] and dry["target"] != old_sha
        new_sha = dry["target"]
        with tallfmt.open(variant["new"]) as zoo:  # what an uninterrupted encode wrote
            zoo.verify()
        replace_at = events.index("replace") + 1  # 1-based: killing at k stops just before event k
        assert events[replace_at - 3:replace_at + 1] == ["fsync", "chmod", "replace", "after_replace"]
        assert events.count("write") > 20
        results = variant["results"]
        assert len(results) >= 14
        for r in results:
            job = r["job"]
            what = (f"kill at event {job['kill_at']} ({events[job['kill_at'] - 1]})" if "kill_at" in job else
                    f"kill after {job['delay']:.3f}s") + f", previous archive: {bool(variant['old'])}"
            assert r["target"] in (old_sha, new_sha), what  # the previous archive intact, or the new complete one
            if "kill_at" in job:
                assert r["signal"] == 9, what
                assert r["target"] == (new_sha if job["kill_at"] > replace_at else old_sha), what
            # at most the temporary file is left behind, named so that it cannot be taken for an archive
            assert len(r["others"]) <= 1 and all(n.startswith(".zoo.tall.") and n.endswith(".tmp")
                                                 for n in r["others"]), (what, r["others"])
            if r["target"] == new_sha and r["target"] != old_sha:
                assert r["others"] == [], what
        assert any(r["target"] == old_sha for r in results) and any(r["target"] == new_sha for r in results)


class FullDisk:
    """The writer's file object on a disk that fills up after `budget` bytes (a partial write, then
    ENOSPC, as write(2) does); with `close_fails`, closing fails too."""

    def __init__(self, f: Any, budget: int, close_fails: bool = False) -> None:
        self._f, self.budget, self.close_fails = f, budget, close_fails

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.budget:
            self._f.write(view[:self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(view)
        return self._f.write(view)

    def close(self) -> None:
        self._f.close()
        if self.close_fails:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _install_full_disk(monkeypatch: pytest.MonkeyPatch, budget: int, close_fails: bool = False) -> None:
    real_init = ContainerWriter.__init__

    def init(self: ContainerWriter, *a: Any, **k: Any) -> None:
        real_init(self, *a, **k)
        self._out.file = FullDisk(self._out.file, budget, close_fails)
    monkeypatch.setattr(ContainerWriter, "__init__", init)


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def encoded_size(tmp_path_factory: pytest.TempPathFactory) -> int:
    base, tasks = _zoo()
    return tallfmt.encode(base, tasks, tmp_path_factory.mktemp("size") / "z.tall").archive_bytes


@pytest.mark.parametrize("budget", [0, 1, 100, 1000, -2000, -500, -64, -1, "random"])
@pytest.mark.parametrize("with_old", [True, False], ids=["previous archive", "no previous file"])
def test_disk_full_during_encode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoded_size: int,
                                 budget: int | str, with_old: bool) -> None:
    # the budget counts bytes after the 64-byte placeholder preamble; the real preamble is rewritten at the
    # end (64 more bytes), so budget -1 fails on the very last write
    total = encoded_size  # bytes written after the placeholder: data + header + the real preamble
    n = random.Random(7).randrange(total) if budget == "random" else budget if budget >= 0 else total + budget
    target = tmp_path / "zoo.tall"
    if with_old:
        tc.build(target)
    before = _folder_state(tmp_path)
    _install_full_disk(monkeypatch, n)
    base, tasks = _zoo()
    with pytest.raises(WriteError) as info:
        tallfmt.encode(base, tasks, target, overwrite=True)
    err = info.value
    assert isinstance(err, TallError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(target) in str(err) and "No space left" in str(err)
    assert _folder_state(tmp_path) == before  # no partial file, no temporary file, the old archive intact


def test_disk_full_and_close_failing_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tc.build(tmp_path / "zoo.tall")
    before = _folder_state(tmp_path)
    _install_full_disk(monkeypatch, 500, close_fails=True)
    base, tasks = _zoo()
    with pytest.raises(WriteError, match="No space left"):
        tallfmt.encode(base, tasks, target, overwrite=True)
    assert _folder_state(tmp_path) == before


@pytest.mark.parametrize("call, err", [("fsync", errno.EIO), ("replace", errno.EXDEV), ("chmod", errno.EPERM)])
def test_failing_fsync_rename_chmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, err: int) -> None:
    target = tc.build(tmp_path / "zoo.tall")
    before = _folder_state(tmp_path)

    def fail(*a: Any, **k: Any) -> None:
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(atomic.os, call, fail)
    base, tasks = _zoo()
    with pytest.raises(WriteError) as info:
        tallfmt.encode(base, tasks, target, overwrite=True)
    monkeypatch.undo()
    assert info.value.errno == err and str(target) in str(info.value)
    assert _folder_state(tmp_path) == before


def test_cannot_create_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(atomic.os, "open", fail)
    base, tasks = _zoo()
    with pytest.raises(WriteError) as info:
        tallfmt.encode(base, tasks, tmp_path / "zoo.tall")
    assert info.value.errno == errno.EACCES and str(tmp_path / "zoo.tall") in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# 4. Concurrency


def _digest_task(path: str, task: str | None) -> list:
    """Digest of one task's decode (task None: every merge), from a fresh reader in this process."""
    torch.set_num_threads(1)
    with tallfmt.open(path) as zoo:
        if task is not None:
            return fw.state_digest(zoo.decode(task)) + [fw.tensor_digest(zoo.mask(task, "emb"))]
        return [fw.state_digest(zoo.merge(m, **p)) for m, p in fw.MERGES] + [fw.tensor_digest(zoo.agreement())]


def test_processes_decoding_at_once_agree_with_one_reader(zoo_path: Path) -> None:
    jobs = ["a", "b", "c", None, "c", "a"]
    single = {t: _digest_task(str(zoo_path), t) for t in set(jobs)}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_digest_task, [str(zoo_path)] * len(jobs), jobs))
    for t, r in zip(jobs, results):
        assert r == single[t], t
    assert len({json.dumps(single[t]) for t in ("a", "b", "c")}) == 3


def test_threads_sharing_one_archive(zoo_path: Path) -> None:
    with tallfmt.open(zoo_path) as zoo:
        single = {t: fw.state_digest(zoo.decode(t)) for t in zoo.tasks}
        merged = fw.state_digest(zoo.merge("consensus", k=2))
        barrier = threading.Barrier(4)

        def work(i: int) -> tuple:
            barrier.wait()
            t = zoo.tasks[i % 3]
            return t, fw.state_digest(zoo.decode(t)), fw.state_digest(zoo.merge("consensus", k=2))
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                for t, d, m in pool.map(work, range(4)):
                    assert d == single[t] and m == merged


def test_archive_replaced_while_open_keeps_serving_the_old_handle(tmp_path: Path) -> None:
    path = tmp_path / "zoo.tall"
    base, tasks = _zoo(1)
    tallfmt.encode(base, tasks, path)
    with tallfmt.open(path) as old:
        before = {t: fw.state_digest(old.decode(t)) for t in old.tasks}
        merged = fw.state_digest(old.merge("task_arithmetic"))
        base2, tasks2 = _zoo(2, ("x", "y"))
        tallfmt.encode(base2, tasks2, tmp_path / "other.tall")
        os.replace(tmp_path / "other.tall", path)               # replaced by rename, as encode does
        tallfmt.encode(base2, tasks2, path, overwrite=True)     # and by encode itself over the open file
        assert {t: fw.state_digest(old.decode(t)) for t in old.tasks} == before
        assert fw.state_digest(old.merge("task_arithmetic")) == merged
        old.verify()
        with tallfmt.open(path) as new:
            assert new.tasks == ["x", "y"]


# ----------------------------------------------------------------------------------------------
# 5. Input validation for encode and merge


def _save(path: Path, sd: dict) -> Path:
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    base, tasks = _zoo()
    base = {k: v for k, v in base.items() if k != "tied"}
    b = _save(tmp_path / "base.safetensors", base)
    ts = {t: _save(tmp_path / f"{t}.safetensors", {k: v for k, v in sd.items() if k != "tied"})
          for t, sd in tasks.items()}
    return b, ts


def _refused(exc: type, *needles: str, **kw: Any) -> str:
    out = Path(kw.pop("out"))
    with pytest.raises(exc) as info:
        tallfmt.encode(**kw, path=out)
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))
    return msg


def test_missing_files(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts
    out = tmp_path / "z.tall"
    _refused(InputError, str(tmp_path / "nope.safetensors"), "no such file", base=tmp_path / "nope.safetensors",
             tasks=ts, out=out)
    _refused(InputError, str(tmp_path / "gone.safetensors"), base=b,
             tasks={**ts, "d": tmp_path / "gone.safetensors"}, out=out)


def test_folder_without_weights(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _refused(InputError, str(empty), "no weights", base=b, tasks={**ts, "d": empty}, out=tmp_path / "z.tall")


def test_unknown_file_kind_and_garbage_files(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"\0" * 10)
    _refused(InputError, str(odd), base=b, tasks={"a": odd}, out=tmp_path / "z.tall")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 100)
    _refused(InputError, str(junk), base=b, tasks={"a": junk}, out=tmp_path / "z.tall")


def test_duplicate_task_names_from_cli_paths(tmp_path: Path, ckpts: tuple) -> None:
    # the API takes a dict (names cannot repeat); the CLI derives names from file stems
    b, ts = ckpts
    (tmp_path / "x").mkdir()
    dup = _save(tmp_path / "x" / "a.safetensors", {k: v for k, v in _zoo(5)[1]["a"].items() if k != "tied"})
    proc = subprocess.run([sys.executable, "-m", "tallfmt.cli", "encode", str(b), str(ts["a"]), str(dup),
                           "-o", str(tmp_path / "z.tall")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "repeat" in proc.stderr and "a" in proc.stderr, proc.stderr
    assert not (tmp_path / "z.tall").exists()


def test_zero_tasks_and_one_task(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts
    _refused(InputError, "non-empty", base=b, tasks={}, out=tmp_path / "z.tall")
    report = tallfmt.encode(b, {"a": ts["a"]}, tmp_path / "one.tall")
    with tallfmt.open(report.path) as zoo:
        assert zoo.tasks == ["a"]
        sd = zoo.decode("a")
        from safetensors.torch import load_file
        want = load_file(str(ts["a"]))
        assert sd.keys() == want.keys()
        for k in sd:
            assert sd[k].dtype == want[k].dtype and sd[k].shape == want[k].shape
            assert torch.allclose(sd[k].float(), want[k].float(), rtol=1e-3, atol=1e-3), k
        assert zoo.agreement().tolist()[0] <= zoo.agreement().sum().item()


@pytest.mark.parametrize("change, needles", [
    (lambda sd: sd.update(w=torch.zeros(3, 5, dtype=torch.float16)), ("'w'",)),             # shape
    (lambda sd: sd.update(w=sd["w"].float()), ("'w'",)),                                     # dtype
    (lambda sd: sd.pop("ids"), ("'ids'",)),                                                  # a name missing
    (lambda sd: sd.update(extra=torch.zeros(2)), ("'extra'",)),                              # a name too many
    (lambda sd: [sd.update({f"x{i}": torch.zeros(1)}) for i in range(8)], ("'x0'", "and 3 more", "8 in all")),
])
def test_mismatched_checkpoints_list_the_tensors(tmp_path: Path, ckpts: tuple, change: Any,
                                                 needles: tuple[str, ...]) -> None:
    b, ts = ckpts
    from safetensors.torch import load_file
    sd = load_file(str(ts["b"]))
    change(sd)
    bad = _save(tmp_path / "bad.safetensors", sd)
    msg = _refused(InputError, *needles, "differ", base=b, tasks={"a": ts["a"], "b": bad}, out=tmp_path / "z.tall")
    assert "mismatch" in msg  # the message tells how to store them instead


def test_mismatch_message_names_the_checkpoint(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts
    from safetensors.torch import load_file
    bad = _save(tmp_path / "bad.safetensors", dict(load_file(str(ts["b"])), w=torch.zeros(3, 5, dtype=torch.float16)))
    _refused(InputError, str(bad), "'w'", base=b, tasks={"a": ts["a"], "b": bad}, out=tmp_path / "z.tall")


@pytest.mark.parametrize("tasks, needle", [
    ({1: "x"}, "1"), ({"": "x"}, "''"), ({"é" * 2049: "x"}, "4096"), ([("a", "x")], "mapping"),
])
def test_bad_task_names(tmp_path: Path, ckpts: tuple, tasks: Any, needle: str) -> None:
    # the API takes {name: checkpoint}, so names cannot repeat; they must be 1..4096 UTF-8 bytes
    b, ts = ckpts
    if isinstance(tasks, dict):
        tasks = {k: ts["a"] for k in tasks}
    _refused(InputError, needle, base=b, tasks=tasks, out=tmp_path / "z.tall")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["task", "base", "shared"])
def test_nan_inf_name_tensor_and_checkpoint(tmp_path: Path, ckpts: tuple, value: float, where: str) -> None:
    b, ts = ckpts
    from safetensors.torch import load_file
    src = b if where == "base" else ts["c"]
    sd = load_file(str(src))
    name = "frozen" if where == "shared" else "emb"
    sd[name][1] = value
    if where == "shared":  # the same bad value everywhere: a shared tensor, still refused
        bad_b = _save(tmp_path / "base_nan.safetensors", dict(load_file(str(b)), frozen=sd[name]))
        bad = {t: _save(tmp_path / f"{t}_nan.safetensors", dict(load_file(str(p)), frozen=sd[name]))
               for t, p in ts.items()}
        _refused(InputError, "'frozen'", "NaN or Inf", base=bad_b, tasks=bad, out=tmp_path / "z.tall")
        return
    path = _save(tmp_path / f"{where}_nan.safetensors", sd)
    kw = {"base": path, "tasks": ts} if where == "base" else {"base": b, "tasks": {**ts, "c": path}}
    _refused(InputError, str(path), f"'{name}'", "NaN or Inf", **kw, out=tmp_path / "z.tall")


@pytest.mark.parametrize("lambdas, needle", [
    (0, "lambda"), (-0.1, "lambda"), (float("nan"), "nan"), (float("inf"), "inf"), (True, "True"),
    ("0.4", "'0.4'"), ({"a": 0.4, "b": 0.4}, "'c'"), ({"a": 0.4, "b": 0.4, "c": 0.4, "zz": 1}, "'zz'"),
    ({"a": 0.4, "b": -1, "c": 0.4}, "'b'"),
])
def test_bad_lambda(tmp_path: Path, ckpts: tuple, lambdas: Any, needle: str) -> None:
    b, ts = ckpts
    _refused(InputError, needle, base=b, tasks=ts, lambdas=lambdas, out=tmp_path / "z.tall")


@pytest.mark.parametrize("kw, needle", [
    ({"merge": "dare"}, "merge"), ({"mask_method": "random"}, "mask_method"), ({"codec": "lz4"}, "codec"),
    ({"ties_density": 1.5, "merge": "ties"}, "ties_density"), ({"mask_density": float("nan")}, "mask_density"),
    ({"mismatch": "ignore"}, "mismatch"), ({"ties_agg": "max", "merge": "ties"}, "ties_agg"),
    ({"metadata": {"k": 1}}, "metadata"),
])
def test_bad_encode_options(tmp_path: Path, ckpts: tuple, kw: dict, needle: str) -> None:
    b, ts = ckpts
    _refused(InputError, needle, base=b, tasks=ts, **kw, out=tmp_path / "z.tall")


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, ckpts: tuple) -> None:
    b, ts = ckpts

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    bad = tmp_path / "evil.bin"
    with bad.open("wb") as f:
        pickle.dump({"emb": Payload()}, f)
    _refused(InputError, str(bad), base=b, tasks={**ts, "c": bad}, out=tmp_path / "z.tall")
    torch.save({"emb": torch.zeros(2), "obj": Payload()}, tmp_path / "evil2.pt")
    _refused(InputError, str(tmp_path / "evil2.pt"), base=b, tasks={**ts, "c": tmp_path / "evil2.pt"},
             out=tmp_path / "z.tall")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("method, params, needle", [
    ("task_arithmetic", {"alpha": float("nan")}, "alpha"), ("task_arithmetic", {"alpha": float("inf")}, "alpha"),
    ("consensus", {"alpha": float("nan")}, "alpha"), ("consensus", {"k": -1}, "k must be"),
    ("consensus", {"k": 1.5}, "k must be"), ("consensus", {"k": True}, "k must be"),
    ("task_arithmetic", {"alpha": "0.4"}, "alpha"), ("dare", {}, "unknown merge method"),
    ("task_arithmetic", {"beta": 1}, "beta"), ("zeroshot", {"alpha": 0.4}, "alpha"),
])
def test_bad_merge_parameters(zoo_path: Path, method: str, params: dict, needle: str) -> None:
    with tallfmt.open(zoo_path) as zoo:
        with pytest.raises(InputError, match=needle):
            zoo.merge(method, **params)
        with pytest.raises(InputError, match=needle):
            next(iter(zoo.iter_merge(method, **params)))


def test_unknown_task_and_tensor_names(zoo_path: Path) -> None:
    with tallfmt.open(zoo_path) as zoo:
        for call in (lambda: zoo.decode("nope"), lambda: zoo.mask("nope", "emb"), lambda: zoo.mask("a", "nope"),
                     lambda: zoo.decode_tensor("a", "nope"), lambda: zoo.mask("a", "frozen")):
            with pytest.raises(InputError) as info:
                call()
            msg = str(info.value)
            assert str(zoo_path) in msg and ("'nope'" in msg or "'frozen'" in msg), msg


# ----------------------------------------------------------------------------------------------
# 6. verify detects every single-bit flip, exhaustively


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # every role in about 1.5 KB: masked F32 and BF16, shared, per_task, alias; zstd and byteplane-zstd
    e = torch.tensor([1.0, -2.0, 3.0])
    ea, eb = e + 0.5, e - 0.25
    base = {"w": e, "t": e, "h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
            "s": torch.tensor([7], dtype=torch.int32), "i": torch.tensor([1], dtype=torch.int8)}
    a = {"w": ea, "t": ea, "h": torch.tensor([1.5, 2.0], dtype=torch.bfloat16), "s": base["s"],
         "i": torch.tensor([2], dtype=torch.int8)}
    b = {"w": eb, "t": eb, "h": torch.tensor([1.0, 3.0], dtype=torch.bfloat16), "s": base["s"],
         "i": torch.tensor([3], dtype=torch.int8)}
    return tallfmt.encode(base, {"a": a, "b": b}, tmp_path_factory.mktemp("tiny") / "tiny.tall").path


def test_tiny_archive_has_every_role(tiny: Path) -> None:
    with tallfmt.open(tiny) as zoo:
        assert set(zoo.roles.values()) == {"masked", "shared", "per_task", "alias"}
        codecs = {s.codec for t in zoo.header.tensors for s in t.segments()}
        assert codecs == {"zstd", "byteplane-zstd"}
    assert tiny.stat().st_size < 4096


def test_verify_detects_every_single_bit_flip(tiny: Path, tmp_path: Path) -> None:
    raw = tiny.read_bytes()
    p = tmp_path / "flipped.tall"
    p.write_bytes(raw)
    undetected, other = [], []
    fd = os.open(p, os.O_RDWR)
    try:
        for bit in range(len(raw) * 8):
            i = bit // 8
            os.pwrite(fd, bytes([raw[i] ^ (1 << (bit % 8))]), i)  # flip one bit in place
            try:
                with tallfmt.open(p) as zoo:
                    zoo.verify()
                undetected.append(bit)
            except FormatError as exc:
                if str(p) not in str(exc):
                    other.append((bit, repr(exc)))
            except Exception as exc:  # noqa: BLE001
                other.append((bit, repr(exc)))
            os.pwrite(fd, raw[i:i + 1], i)
    finally:
        os.close(fd)
    assert p.read_bytes() == raw
    assert undetected == [], f"{len(undetected)} of {len(raw) * 8} flips undetected, e.g. bits {undetected[:10]}"
    assert other == [], other[:5]
