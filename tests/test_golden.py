"""The golden files in spec/golden/: the reader decodes them bit for bit, the writer reproduces them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

import tallfmt
from tallfmt.format.container import ContainerReader

SPEC = Path(__file__).resolve().parent.parent / "spec"
GOLDEN = SPEC / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())
sys.path.insert(0, str(SPEC))
import make_golden  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_goldens_are_small() -> None:
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 300_000


def test_cases_file_matches_generator() -> None:
    assert CASES == make_golden.CASES


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_decodes_golden_bit_exactly(case: str) -> None:
    want = load_file(str(GOLDEN / f"{case}.expected.safetensors"))
    got = make_golden.expected(GOLDEN / f"{case}.tall", make_golden.external_base(case))
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, key
        assert torch.equal(_bits(g), _bits(w)), f"{case}: {key} differs"


@pytest.mark.parametrize("case", sorted(CASES))
def test_writer_reproduces_golden_byte_for_byte(case: str, tmp_path: Path) -> None:
    base, tasks = make_golden.sources(case, tmp_path / "inputs")
    out = tmp_path / f"{case}.tall"
    tallfmt.encode(base, tasks, out, **CASES[case]["options"])
    assert out.read_bytes() == (GOLDEN / f"{case}.tall").read_bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_headers_match_schema(case: str) -> None:
    schema = json.loads((SPEC / "header.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    with ContainerReader(GOLDEN / f"{case}.tall") as r:
        jsonschema.validate(r.header.to_json(), schema)
        raw = (GOLDEN / f"{case}.tall").read_bytes()[r.header_offset:]
        jsonschema.validate(json.loads(raw), schema)


def test_golden_files_are_version_1_1_and_hold_their_files() -> None:
    """Version 1.1, except where a 1.2 feature is used: a BF16 τ_MTL, θ0 outside, the tau-rans codec or
    residuals (FORMAT.md §7)."""
    for case in CASES:
        opts = CASES[case]["options"]
        with ContainerReader(GOLDEN / f"{case}.tall") as r:
            newer = ("residual" in opts or "mask_codec" in opts or "tau_dtype" in opts
                     or opts.get("store_base") is False)
            assert r.header.version == ((1, 2) if newer else (1, 1)), case
            assert any(e.residuals for e in r.header.tensors) == ("residual" in opts), case
            assert (r.header.files is not None) == ("folders" in CASES[case]), case
    want = load_file(str(GOLDEN / "files.expected.safetensors"))
    for model, files in CASES["files"]["folders"].items():
        for name, text in files.items():
            assert bytes(want[f"file/{model}/{name}"].numpy()) == text.encode(), (model, name)


def test_files_golden_decodes_by_hand() -> None:
    """FORMAT.md §10 alone is enough: base64, then raw or one zstd frame, then the XXH3-64."""
    import base64
    import struct

    import xxhash
    import zstandard

    raw = (GOLDEN / "files.tall").read_bytes()
    _, _, minor, _, h_off, h_len = struct.unpack_from("<8sHHIQQ", raw)
    header = json.loads(raw[h_off:h_off + h_len])
    assert minor == 1 and header["version"] == [1, 1]
    files = header["files"]
    for model, names in [("base", files["base"]), *zip(header_task_names(header), files["tasks"])]:
        for name, i in names.items():
            blob = files["blobs"][i]
            data = base64.b64decode(blob["data"])
            if blob["codec"] == "zstd":
                data = zstandard.ZstdDecompressor().decompress(data)
            assert len(data) == blob["size"] and xxhash.xxh3_64_hexdigest(data) == blob["xxh3"]
            assert data.decode() == CASES["files"]["folders"][model][name]


def header_task_names(header: dict) -> list[str]:
    return [t["name"] for t in header["tasks"]]


def test_minimal_golden_decodes_by_hand() -> None:
    """FORMAT.md alone is enough: decode the raw-codec golden with struct/numpy, no tallfmt reader."""
    import struct

    import numpy as np

    raw = (GOLDEN / "minimal.tall").read_bytes()
    magic, major, minor, flags, h_off, h_len = struct.unpack_from("<8sHHIQQ", raw)
    assert magic == b"\x89TALL\r\n\x1a" and (major, minor, flags) == (1, 1, 0)
    header = json.loads(raw[h_off:h_off + h_len])
    (t,) = header["tensors"]
    n = int(np.prod(t["shape"]))
    seg = lambda s, dt: np.frombuffer(raw, dtype=dt, count=s["decoded_length"] // np.dtype(dt).itemsize,  # noqa: E731
                                      offset=s["offset"])
    base, tau, mask = seg(t["base"], "<f4"), seg(t["tau"], "<f4"), seg(t["masks"][0], "u1")
    bits = np.unpackbits(mask, bitorder="little")[:n].astype(bool)
    want = np.where(bits, base + tau, base).reshape(t["shape"])
    got = load_file(str(GOLDEN / "minimal.expected.safetensors"))["task/only/w"].numpy()
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))
