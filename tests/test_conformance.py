"""The conformance suite in spec/conformance/ (written from FORMAT.md without tallfmt, by
spec/conformance/make_conformance.py), run against this library:

- every accept case opens and decodes every task, mask, merge and the agreement counts bit for bit
  equal to its .expected.safetensors;
- every refuse case raises exactly the listed error class (FormatError, ChecksumError or LimitError)
  on open, or (``"on": "read"``) opens and then raises it from verify() and from reading everything;
- regenerating the suite (with tallfmt and torch made unimportable) gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import tallfmt

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "spec" / "conformance"
GENERATOR = SUITE / "make_conformance.py"
MANIFEST = json.loads((SUITE / "cases.json").read_text(encoding="utf-8"))
CASES = MANIFEST["cases"]
ACCEPT = [c for c in CASES if c["expect"] == "accept"]
REFUSE = [c for c in CASES if c["expect"] == "refuse"]
ERRORS = {"FormatError": tallfmt.FormatError, "ChecksumError": tallfmt.ChecksumError, "LimitError": tallfmt.LimitError}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _merge(zoo: Any, label: str) -> dict[str, torch.Tensor]:
    kind, *p = label.split("@")
    if kind == "zeroshot":
        return zoo.merge("zeroshot")
    if kind == "task_arithmetic":
        return zoo.merge("task_arithmetic", alpha=float(p[0]))
    assert kind == "consensus", label
    return zoo.merge("consensus", k=int(p[0]), alpha=float(p[1]))


def read_everything(zoo: Any, merges: list[str]) -> dict[str, torch.Tensor]:
    """What the suite's expected files hold, as this library produces it."""
    out: dict[str, torch.Tensor] = {}
    for task in zoo.tasks:
        for name, t in zoo.decode(task).items():
            out[f"task/{task}/{name}"] = t
        for name, role in zoo.roles.items():
            if role == "masked":
                out[f"mask/{task}/{name}"] = zoo.mask(task, name).to(torch.uint8)
    for label in merges:
        for name, t in _merge(zoo, label).items():
            out[f"merge/{label}/{name}"] = t
    out["agreement"] = zoo.agreement()
    return out


def test_manifest_is_well_formed() -> None:
    assert MANIFEST["format"] == "tallfmt-conformance" and MANIFEST["format_version"] == [1, 0]
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert (SUITE / c["path"]).exists() or (SUITE / c["path"]).is_symlink(), c["path"]
        assert c["section"] and c["description"]
        if c["expect"] == "accept":
            assert (SUITE / c["expected"]).is_file() and isinstance(c["merges"], list)
        else:
            assert c["expect"] == "refuse" and c["error"] in ERRORS and c["on"] in ("open", "read") and c["field"]


def test_suite_is_small() -> None:
    files = [SUITE / "cases.json", *(SUITE / "accept").rglob("*"), *(SUITE / "refuse").rglob("*")]
    sizes = [p.stat().st_size for p in files if p.is_file() and not p.is_symlink()]
    assert max(sizes) < 300_000
    assert sum(sizes) < 2_000_000


@pytest.mark.parametrize("case", ACCEPT, ids=[c["id"] for c in ACCEPT])
def test_accept(case: dict) -> None:
    want = load_file(str(SUITE / case["expected"]))
    with tallfmt.open(SUITE / case["path"]) as zoo:
        zoo.verify()
        got = read_everything(zoo, case["merges"])
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:10]
    bad = []
    for key, w in want.items():
        g = got[key]
        if g.dtype != w.dtype or tuple(g.shape) != tuple(w.shape) or _bytes(g) != _bytes(w):
            bad.append(f"{key!r}: got {g.dtype} {tuple(g.shape)} {_bytes(g)[:16].hex()}…, "
                       f"want {w.dtype} {tuple(w.shape)} {_bytes(w)[:16].hex()}…")
    assert not bad, f"{len(bad)} of {len(want)} outputs differ:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("case", REFUSE, ids=[c["id"] for c in REFUSE])
def test_refuse(case: dict) -> None:
    cls = ERRORS[case["error"]]
    path = SUITE / case["path"]

    def check(exc: BaseException, when: str) -> None:
        assert type(exc) is cls, (f"{case['id']} ({when}): expected {cls.__name__} for {case['field']}, got "
                                  f"{type(exc).__name__}: {exc}")

    try:
        zoo = tallfmt.open(path)
    except Exception as exc:  # noqa: BLE001 - the class is what is checked
        if case["on"] != "open":
            pytest.fail(f"{case['id']}: refused on open ({type(exc).__name__}: {exc}); expected to open and "
                        f"raise {cls.__name__} on read")
        check(exc, "open")
        return
    with zoo:
        if case["on"] == "open":
            pytest.fail(f"{case['id']}: opened; expected {cls.__name__} on open ({case['field']})")
        with pytest.raises(Exception) as info:
            zoo.verify()
        check(info.value, "verify")
        with pytest.raises(Exception) as info:
            read_everything(zoo, ["zeroshot", "task_arithmetic@0.5", "consensus@1@0.5"])
        check(info.value, "read")


_BLOCKER = """
import runpy, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tallfmt', 'torch'):
            raise ImportError(f'the conformance generator must not import {name}')
        return None
sys.meta_path.insert(0, _Block())
sys.argv = [sys.argv[1], '--out', sys.argv[2]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _tree(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / n
            rel = p.relative_to(folder).as_posix()
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()
    return out


def test_generator_reproduces_the_suite(tmp_path: Path) -> None:
    """The committed suite is exactly what the generator writes, without tallfmt or torch importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", _BLOCKER, str(GENERATOR), str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {k: v for k, v in _tree(SUITE).items() if k.split("/")[0] in ("accept", "refuse") or k == "cases.json"}
    got = _tree(tmp_path)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:10]
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"regenerated files differ: {differ[:10]}"


def _json_of(path: Path) -> tuple[str, Any]:
    """("index", object) for an index file or a sharded folder, else ("header", the .tall header object)."""
    if path.is_dir() or path.name.endswith(".json"):
        return "index", json.loads((path / "tall.index.json" if path.is_dir() else path).read_bytes())
    raw = path.read_bytes()
    h_off, h_len = int.from_bytes(raw[16:24], "little"), int.from_bytes(raw[24:32], "little")
    return "header", json.loads(raw[h_off:h_off + h_len])


def test_json_schemas_accept_every_valid_file_and_refuse_schema_rules() -> None:
    """spec/header.schema.json and spec/index.schema.json (format 1.0) accept the header and index of
    every accept case of version 1.0, and refuse the cases whose broken rule a schema can state."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {k: json.loads((ROOT / "spec" / f"{k}.schema.json").read_text()) for k in ("header", "index")}
    validators = {k: jsonschema.Draft202012Validator(s) for k, s in schemas.items()}
    for s in schemas.values():
        jsonschema.Draft202012Validator.check_schema(s)
    checked = 0
    for case in ACCEPT:
        path = SUITE / case["path"]
        kind, obj = _json_of(path)
        objs = [(kind, obj)]
        if kind == "index":
            folder = path if path.is_dir() else path.parent
            objs += [_json_of(folder / s["file"]) for s in obj["shards"]]
        for k, o in objs:
            if o["version"] == [1, 0]:
                errors = [e.message[:200] for e in validators[k].iter_errors(o)]
                assert not errors, (case["id"], k, errors[:3])
                checked += 1
    assert checked > 30
    for name in ("lambda_zero", "lambda_negative_zero", "lambda_negative", "lambda_float32_overflow",
                 "lambda_float32_overflow_tie", "lambda_with_magnitude", "lambda_with_magnitude_one",
                 "per_task_all_null", "dimension_over_2_48", "offset_2_64", "version_length_3", "ndim_33",
                 "index_lambda_with_magnitude", "thresholds_without_global_step", "thresholds_missing_with_global",
                 "index_missing_thresholds", "shard_file_dotdot", "weight_map_empty_name"):
        case = next(c for c in REFUSE if c["id"] == f"refuse/{name}")
        kind, obj = _json_of(SUITE / case["path"])
        assert not validators[kind].is_valid(obj), name
