"""Corruption fuzzing (issue 6, item 1): damaged copies of real archives either raise FormatError or read
back exactly as the undamaged archive does. The mutations and the oracle are in tests/_fuzz_worker.py;
batches run in subprocesses so that a segfault or a hang in native code fails the test with its seed and
case. `python bench/fuzz.py --cases N --seed S` runs many more cases.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

import _fuzz_worker as fw
import tallfmt

CI_CASES = int(os.environ.get("TALLFMT_FUZZ_CASES", "4000"))
CI_SEED = 20240601


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return fw.build_archives(tmp_path_factory.mktemp("fuzz-corpus"))


def _explain(failures: list[dict]) -> str:
    lines = [f"{len(failures)} failing case(s); rerun one with bench/fuzz.py --seed S --start CASE --cases 1"]
    for f in failures[:10]:
        lines.append(f"seed {f['seed']} case {f['case']} on {f['archive']}: {f['mutation']}")
        lines += ["    " + p.replace("\n", "\n    ") for p in f["problems"][:3]]
    return "\n".join(lines)


def test_corpus_covers_every_role_and_dtype_path(archives: list[Path]) -> None:
    roles, masked_dtypes, codecs, tasks = Counter(), set(), set(), set()
    for p in archives:
        if p.is_dir():  # the sharded archive
            assert (p / "tall.index.json").is_file() and len(list(p.glob("*.tall"))) == 3
            continue
        with tallfmt.open(p) as zoo:
            tasks.add(len(zoo.tasks))
            for t in zoo.header.tensors:
                roles[t.role] += 1
                if t.role == "masked":
                    masked_dtypes.add(t.dtype)
                codecs.update(s.codec for s in t.segments())
            zoo.verify()
    assert set(roles) == {"masked", "shared", "per_task", "alias"}
    assert masked_dtypes == {"F32", "F16", "BF16"}
    assert codecs == {"raw", "zstd", "byteplane-zstd", "tau-rans"}  # tau-rans: spec/golden/tau_rans.tall
    assert {1, 2, 3} <= tasks
    assert all(p.stat().st_size < 20_000 for p in archives if p.is_file())
    assert sum(p.is_dir() for p in archives) == 1


def test_fuzz_corruption(archives: list[Path], tmp_path: Path) -> None:
    report = fw.run_parallel(archives, CI_SEED, CI_CASES, workdir=tmp_path, jobs=2,
                             batch=-(-CI_CASES // 2), stall=60)
    assert report["failures"] == [], _explain(report["failures"])
    assert report["cases"] == CI_CASES
    out = Counter(report["outcomes"])
    # the fuzzer reaches every stage: refused on open, refused on read, forged files that open
    for kind in ("flip", "truncate", "append", "preamble", "json", "text", "segment", "shard", "index"):
        assert out[f"{kind}:open-refused"] + out[f"{kind}:opened"] > 0, kind
    assert out["opened, some ops refused"] > CI_CASES // 20
    assert out["opened forged"] > CI_CASES // 20
    assert out["json:opened"] > 0 and out["text:opened"] > 0 and out["index:opened"] > 0


def test_mutations_are_seeded(archives: list[Path]) -> None:
    corpus = fw.Corpus(archives[0])
    a = [fw.mutate(fw.case_rng(7, i), corpus) for i in range(50)]
    b = [fw.mutate(fw.case_rng(7, i), corpus) for i in range(50)]
    assert a == b
    assert len({m[0] for m in a}) > 40


def test_oracle_rejects_undetected_damage_and_wrong_output(archives: list[Path], tmp_path: Path) -> None:
    ref, header = fw.run_file(archives[0])
    assert fw.judge(ref, header, ref, header, forged=False) == []
    assert fw.judge(ref, header, ref, header, forged=False, damaged=True) == [
        "damage went undetected: open and verify both passed"]
    wrong = dict(ref, **{"decode[0]": ("ok", [])})
    assert any("differs" in p for p in fw.judge(wrong, header, ref, header, forged=False))
    crashed = dict(ref, **{"agreement": ("crash", "Traceback ... IndexError")})
    assert any("crashed" in p for p in fw.judge(crashed, header, ref, header, forged=True))
    refused = dict(ref, **{"decode[1]": ("E", "ChecksumError")})
    assert any("verify passed" in p for p in fw.judge(refused, header, ref, header, forged=False))
    unnamed = dict(ref, **{"verify": ("E", "FormatError (message lacks the path)")})
    assert fw.judge(unnamed, header, ref, header, forged=False)


def test_harness_reports_segfault_hang_and_wrong_output(archives: list[Path], tmp_path: Path) -> None:
    report = fw.run_parallel(archives[:2], 3, 9, workdir=tmp_path, jobs=3, batch=3, stall=5,
                             selftests=["segfault", "hang", "wrong"])
    failures = {f["problems"][0].split(";")[0].split(":")[0]: f for f in report["failures"]}
    died = [f for f in report["failures"] if "return code -11" in f["problems"][0]]
    hung = [f for f in report["failures"] if "hung" in f["problems"][0]]
    wrong = [f for f in report["failures"] if any("differs" in p for p in f["problems"])]
    assert len(died) == 1 and died[0]["case"] == 1 and died[0]["seed"] == 3, failures
    assert len(hung) == 1 and hung[0]["case"] == 4, failures
    assert wrong and all(3 <= f["case"] < 9 for f in wrong)
