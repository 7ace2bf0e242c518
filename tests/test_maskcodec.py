"""The ``tau-rans`` mask codec (FORMAT.md §5.1): round trips, a second decoder written from FORMAT.md's
text alone, hostile segments (always a FormatError, never a crash or a hang), and archives that use it
(single and sharded, both encode paths, decode, masks, agreement, switcher, verify, version 1.2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import _tallcraft as tc
import tallfmt
from tallfmt.errors import FormatError, InputError
from tallfmt.format import codecs
from tallfmt.format.maskcodec import decode_mask, encode_mask

DENSITIES = [0.0, 1.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.7, 0.99]


def _tau(rng: np.random.Generator, n: int, zero_frac: float = 0.05) -> np.ndarray:
    tau = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, -2, n)).astype(np.float32)
    tau[rng.random(n) < zero_frac] = 0.0
    tau[rng.random(n) < zero_frac / 5] = -0.0
    return tau


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(bits, bool), bitorder="little")


def _roundtrip(bits: np.ndarray, tau: np.ndarray, **kw: int) -> bytes:
    pk = _pack(bits)
    stored = encode_mask(pk, tau, **kw)
    out = np.full(pk.size, 0xAA, np.uint8)
    decode_mask(stored, tau, out)
    assert np.array_equal(out, pk)
    return stored


# --- a second decoder, written from FORMAT.md §5.1 alone (plain Python, slow) -----------------------
def reference_decode(stored: bytes, n: int, tau: np.ndarray) -> bytes:
    if len(stored) < 2 or stored[0] != 0xA1:
        raise ValueError("magic")
    nb = (n + 7) // 8
    if stored[1] == 0:
        if len(stored) != 2 + nb or (n % 8 and stored[-1] >> (n % 8)):
            raise ValueError("raw")
        return bytes(stored[2:])
    if stored[1] != 1 or n < 1 or len(stored) < 5:
        raise ValueError("mode/header")
    K, R = stored[2], stored[3] | stored[4] << 8
    if not 1 <= K <= 16 or R > 511:
        raise ValueError("K/R")
    body = len(stored) - 5 - 8 * K
    if body < 0 or body % 4 or body // 4 > n:
        raise ValueError("body")
    x = [int.from_bytes(stored[5 + 8 * k:13 + 8 * k], "little") for k in range(K)]
    if any(v < 1 << 32 for v in x):
        raise ValueError("state")
    o = 5 + 8 * K
    words = [int.from_bytes(stored[o + 4 * i:o + 4 * i + 4], "little") for i in range(body // 4)]
    c = 64 * -(-(-(-n // 64)) // K)
    au = [int(v) & 0x7FFFFFFF for v in np.asarray(tau, np.float32).view(np.uint32)]
    P = [[32768] * 160 for _ in range(K)]
    T = [[1] * 160 for _ in range(K)]
    bits = [0] * n
    w = 0
    for j in range(c):
        for k in range(K):
            i = k * c + j
            if i >= n:
                continue
            a = au[i]
            q = 0 if a == 0 else min(max((a >> 22) - R + 8, 1), 15)
            prev = [bits[i - d] if j - d >= 0 else 0 for d in range(1, 9)]
            m = sum(prev)
            level = 0 if m == 0 else 1 if m <= 2 else 2 if m <= 5 else 3 if m <= 7 else 4
            ctx = q + 16 * (5 * prev[0] + level)
            p, t = P[k][ctx], T[k][ctx]
            Q, r = x[k] >> 16, x[k] & 0xFFFF
            if r < p:
                b, x[k] = 1, p * Q + r
            else:
                b, x[k] = 0, (65536 - p) * Q + r - p
            if x[k] < 1 << 32:
                if w == len(words):
                    raise ValueError("stream ends early")
                x[k] = (x[k] << 32) + words[w]
                w += 1
            P[k][ctx] = p + (((65505 if b else 31) - p) >> t.bit_length())
            T[k][ctx] = min(t + 1, 32)
            bits[i] = b
    if w != len(words) or any(v != 1 << 32 for v in x):
        raise ValueError("termination")
    return _pack(np.array(bits, dtype=bool)).tobytes()


# --- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dens", DENSITIES)
def test_every_length_0_to_300(dens: float) -> None:
    rng = np.random.default_rng(int(dens * 1000) + 7)
    for n in range(301):
        _roundtrip(rng.random(n) < dens, _tau(rng, n))


def test_every_lane_count() -> None:
    rng = np.random.default_rng(3)
    for K in range(1, 17):
        for n in (1, 63, 64, 65, 129, 1000, 5000):
            for dens in (0.0, 0.3, 1.0):
                stored = _roundtrip(rng.random(n) < dens, _tau(rng, n), lanes=K)
                assert stored[1] == 0 or stored[2] == K


@pytest.mark.parametrize("n", [16384, 16384 + 64 * 3 + 5, 3 * 4096 * 64 + 1, (1 << 20) + 17])
def test_large(n: int) -> None:
    """The 4-lane kernel: fast and checked blocks, the last lane partial or exact, several densities."""
    rng = np.random.default_rng(n)
    tau = _tau(rng, n)
    for dens in (0.0, 0.001, 0.4, 1.0):
        stored = _roundtrip(rng.random(n) < dens, tau)
        assert (stored[1], stored[2]) == (1, 4) or dens == 0.4  # random bits at 0.4: raw may be shorter


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.floats(0, 1), st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 2, 3, 4, 7, 16]))
def test_round_trip_property(n: int, dens: float, seed: int, lanes: int | None) -> None:
    rng = np.random.default_rng(seed)
    _roundtrip(rng.random(n) < dens, _tau(rng, n, zero_frac=float(rng.random())), lanes=lanes)


def test_structured_masks_like_the_real_zoo() -> None:
    """Row-constant masks (embedding rows a task never saw), masks that are a function of |τ|, and a
    column pattern the model has no context for (costs about a bit each, still exact)."""
    rng = np.random.default_rng(5)
    rows, cols = 700, 384
    n = rows * cols
    tau = _tau(rng, n).reshape(rows, cols)
    row_on = rng.random((rows, 1)) < 0.3
    col_on = rng.random((1, cols)) < 0.4
    for m, limit in ((row_on & np.ones((1, cols), bool), 0.05), (np.abs(tau) > np.median(np.abs(tau)), 0.1),
                     ((np.arange(n) % 3 == 0).reshape(rows, cols), 0.1),
                     (col_on & np.ones((rows, 1), bool), 1.0), (row_on ^ col_on, 1.0)):
        stored = _roundtrip(m.reshape(-1), tau.reshape(-1))
        assert len(stored) <= limit * n / 8 + 2


def test_compresses_what_zstd_cannot_see() -> None:
    rng = np.random.default_rng(9)
    n = 200_000
    tau = _tau(rng, n, zero_frac=0.0)
    m = np.abs(tau) > np.quantile(np.abs(tau), 0.6) * np.exp(rng.standard_normal(n) * 0.3)
    stored = _roundtrip(m, tau)
    assert len(stored) < 0.6 * len(codecs.zstd_compress(_pack(m)))


def test_dont_care_zeros_are_nearly_free() -> None:
    rng = np.random.default_rng(10)
    n = 300_000
    tau = _tau(rng, n, zero_frac=0.0)
    tau[: n // 2] = 0.0
    m = rng.random(n) < 0.4
    m[: n // 2] = False
    stored = _roundtrip(m, tau)
    assert 8 * len(stored) / n < 0.5 * 0.98 + 0.01


def test_never_longer_than_raw_plus_two() -> None:
    rng = np.random.default_rng(13)
    for n in (1, 7, 8, 100, 1000):
        tau = _tau(rng, n)
        stored = encode_mask(_pack(rng.random(n) < 0.5), tau)
        assert len(stored) <= (n + 7) // 8 + 2


def test_reference_decoder_agrees() -> None:
    rng = np.random.default_rng(11)
    for n, dens, K in [(n, d, K) for n in (1, 5, 64, 65, 200, 777) for d in (0.0, 0.05, 0.5, 1.0) for K in (1, 3, 4)]:
        tau = _tau(rng, n)
        pk = _pack(rng.random(n) < dens)
        assert reference_decode(encode_mask(pk, tau, lanes=K), n, tau) == pk.tobytes()


def test_reference_decoder_agrees_on_the_4_lane_fast_path() -> None:
    rng = np.random.default_rng(12)
    n = 20_000
    tau = _tau(rng, n)
    pk = _pack(rng.random(n) < np.linspace(0, 1, n))
    stored = encode_mask(pk, tau)
    assert stored[1] == 1 and stored[2] == 4
    assert reference_decode(stored, n, tau) == pk.tobytes()


def test_tau_as_byte_planes_decodes_the_same() -> None:
    """The reader hands a byteplane-zstd τ_MTL over as its 4 planes, unmerged: same bits, every path."""
    rng = np.random.default_rng(14)
    for n, K in ((1000, 1), (3000, 3), (40_000, None)):
        tau = _tau(rng, n)
        pk = _pack(rng.random(n) < 0.2)
        stored = encode_mask(pk, tau, lanes=K)
        planes = np.ascontiguousarray(tau.view(np.uint8).reshape(n, 4).T)
        out = np.empty(pk.size, np.uint8)
        decode_mask(stored, planes, out)
        assert np.array_equal(out, pk)
        planes.setflags(write=False)  # as the segment cache holds them
        assert np.array_equal(codecs.decode("tau-rans", stored, pk.size, 1, context=planes), pk)
    with pytest.raises(InputError):
        encode_mask(pk, planes)  # the encoder takes float32 only


def test_deterministic() -> None:
    """Integer-only coder and model: the same bytes on every machine (the golden file pins them too)."""
    import hashlib

    rng = np.random.default_rng(1234)
    n = 50_000
    tau = _tau(rng, n)
    pk = _pack(rng.random(n) < 0.3)
    a = encode_mask(pk, tau)
    assert a == encode_mask(pk.copy(), tau.copy())
    assert hashlib.sha256(a).hexdigest()[:16] == "e8a4496c02afd916"  # the prototype's digest: same layout


# --- hostile segments --------------------------------------------------------------------------------
def _refused(stored: bytes, tau: np.ndarray) -> bool:
    n = tau.size
    out = np.empty((n + 7) // 8, np.uint8)
    try:
        decode_mask(stored, tau, out)
    except FormatError:
        return True
    if n % 8:
        assert out[-1] >> (n % 8) == 0
    return False


def test_truncation_at_every_cut_and_trailing_bytes() -> None:
    rng = np.random.default_rng(20)
    for n, K in ((3000, 1), (20_000, 4), (5000, 3)):
        tau = _tau(rng, n)
        stored = encode_mask(_pack(rng.random(n) < 0.3), tau, lanes=K)
        assert stored[1] == 1
        for cut in range(len(stored)):
            assert _refused(stored[:cut], tau), cut
        for extra in (b"\0", b"\0\0\0\0", b"\1\0\0\0"):
            assert _refused(stored + extra, tau)


def test_random_bytes_never_crash() -> None:
    rng = np.random.default_rng(21)
    tau = _tau(rng, 5000)
    accepted = 0
    for trial in range(1500):
        size = int(rng.integers(0, 200))
        junk = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if size >= 2 and trial % 2:
            junk[0], junk[1] = 0xA1, trial % 3 % 2
        if size >= 3 and trial % 4 == 1:
            junk[2] = int(rng.integers(1, 17))
        if size >= 5 and trial % 8 == 1:
            junk[3:5] = int(rng.integers(0, 512)).to_bytes(2, "little")
        accepted += not _refused(bytes(junk), tau)
    assert accepted < 15


def test_bit_flips_mostly_detected() -> None:
    rng = np.random.default_rng(22)
    n = 40_000
    tau = _tau(rng, n)
    stored = bytearray(encode_mask(_pack(rng.random(n) < 0.3), tau))
    undetected = 0
    for _ in range(300):
        pos, bit = int(rng.integers(0, len(stored))), 1 << int(rng.integers(0, 8))
        stored[pos] ^= bit
        undetected += not _refused(bytes(stored), tau)
        stored[pos] ^= bit
    assert undetected < 15


def test_random_streams_behind_a_valid_header() -> None:
    """Random states and words behind a valid 4-lane header: the unchecked blocks never run past the
    stream; everything is refused, in bounded time."""
    rng = np.random.default_rng(23)
    tau = _tau(rng, 40_000)
    for trial in range(40):
        states = rng.integers(1 << 32, 2**63, 4, dtype=np.uint64) * np.uint64(1 + trial % 2)
        words = rng.integers(0, 2**32, int(rng.integers(0, 4000)), dtype=np.uint64).astype("<u4")
        stored = bytes([0xA1, 1, 4]) + int(rng.integers(0, 512)).to_bytes(2, "little") + \
            states.astype("<u8").tobytes() + words.tobytes()
        assert _refused(stored, tau)


@pytest.mark.parametrize("stored, needle", [
    (b"", "magic"), (b"\xa2\x00", "magic"), (bytes([0xA1, 2]) + bytes(20), "mode"),
    (bytes([0xA1, 1, 0, 0, 0]) + bytes(8), "lanes"), (bytes([0xA1, 1, 17, 0, 0]), "lanes"),
    (bytes([0xA1, 1, 1, 0, 2]) + (1 << 32).to_bytes(8, "little"), "reference key"),
    (bytes([0xA1, 1, 1]), "truncated header"), (bytes([0xA1, 1, 2, 0, 0]) + bytes(8), "lane states"),
    (bytes([0xA1, 1, 1, 0, 0]) + (1 << 32).to_bytes(8, "little") + b"\0\0", "whole number"),
    (bytes([0xA1, 1, 1, 0, 0]) + ((1 << 32) - 1).to_bytes(8, "little"), r"below 2\^32"),
    (bytes([0xA1, 1, 1, 0, 0]) + (1 << 32).to_bytes(8, "little") + bytes(4 * 101), "stream words for 100"),
    (bytes([0xA1, 0]) + bytes(12), "raw mode holds 12"),
    (bytes([0xA1, 0]) + bytes(12) + b"\x10", "padding"),
    (bytes([0xA1, 1, 1, 0, 0]) + (1 << 33).to_bytes(8, "little"), "ends before the last bit"),
])
def test_hostile_headers_are_refused_with_the_field(stored: bytes, needle: str) -> None:
    tau = np.ones(100, np.float32)
    with pytest.raises(FormatError, match=needle):
        decode_mask(stored, tau, np.empty(13, np.uint8))


def test_final_state_and_unread_words_are_refused() -> None:
    tau = np.ones(4000, np.float32)
    ok = encode_mask(_pack(np.arange(4000) % 97 == 0), tau)
    assert ok[1] == 1
    with pytest.raises(FormatError, match="left unread"):
        decode_mask(ok + bytes(4), tau, np.empty(500, np.uint8))
    bad = bytearray(ok)
    bad[5] ^= 1  # the lowest bit of X_0: every bit decodes, the final state is off
    with pytest.raises(FormatError, match="final lane state|ends before|unread"):
        decode_mask(bytes(bad), tau, np.empty(500, np.uint8))
    with pytest.raises(FormatError, match="empty mask"):
        decode_mask(ok, np.ones(0, np.float32), np.empty(0, np.uint8))


def test_bad_arguments_are_input_errors() -> None:
    tau = np.zeros(100, np.float32)
    pk = np.zeros(13, np.uint8)
    stored = encode_mask(pk, tau)
    for call in (lambda: encode_mask(pk[:12], tau), lambda: encode_mask(pk, tau.astype(np.float64)),
                 lambda: encode_mask(np.array([0] * 12 + [0x10], np.uint8), tau),
                 lambda: encode_mask(pk, tau, lanes=17), lambda: encode_mask(pk, tau, lanes=True),
                 lambda: decode_mask(stored, tau, np.empty(12, np.uint8)),
                 lambda: decode_mask(stored, tau, np.empty(13, np.int8)),
                 lambda: decode_mask(stored, tau[:90], np.empty(13, np.uint8)),
                 lambda: codecs.encode_parts("tau-rans", pk, 1),
                 lambda: codecs.decode("tau-rans", stored, 13, 1),
                 lambda: codecs.get_codec("tau-rans").decode(stored, 14, 1, context=tau)):
        with pytest.raises(InputError):
            call()


def test_registry_exposes_it_for_masks_only() -> None:
    assert codecs.context_of("tau-rans") == "tau" and codecs.context_of("zstd") is None
    assert "tau-rans" in codecs.mask_choices() and "tau-rans" not in codecs.choices()
    assert codecs.minor_of("tau-rans") == 2 and codecs.minor_of("zstd") == 0
    assert codecs.choose_mask("auto", "auto") == "zstd" and codecs.choose_mask("auto", "raw") == "raw"
    assert codecs.choose_mask("tau-rans", "raw") == "tau-rans"

    class Odd:
        codec_id, context = "odd-context", "theta0"

        def encode(self, buf, itemsize): ...  # noqa: ANN001, ANN201
        def decode(self, buf, decoded_length, itemsize, out=None): ...  # noqa: ANN001, ANN201
        def get_config(self): ...  # noqa: ANN201
    with pytest.raises(InputError, match="unknown context"):
        codecs.register_codec(Odd())
    assert "odd-context" not in codecs.CODECS


# --- archives ----------------------------------------------------------------------------------------
def _zoo(seed: int = 0, tasks: str = "abc") -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(300, 70, generator=g), "b": torch.randn(77, generator=g),
            "e": torch.randn(600, 40, generator=g).bfloat16(), "z": torch.randn(0, 3, generator=g),
            "frozen": torch.randn(9, generator=g)}
    sds = {}
    for t in tasks:
        sd = {}
        for k, v in base.items():
            if k == "frozen":
                sd[k] = v.clone()
                continue
            rows = torch.rand(v.shape[0], *[1] * (v.dim() - 1), generator=g) < 0.6  # rows, as embeddings
            delta = 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.5) * rows
            sd[k] = (v.float() + delta).to(v.dtype)
        sds[t] = sd
    return base, sds


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("maskcodec")
    base, sds = _zoo()
    tallfmt.encode(base, sds, d / "zstd.tall")
    tallfmt.encode(base, sds, d / "rans.tall", mask_codec="tau-rans")
    return d / "zstd.tall", d / "rans.tall"


def _same_reads(a: tallfmt.Archive, b: tallfmt.Archive) -> None:
    for t in a.tasks:
        da, db = a.decode(t), b.decode(t)
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
        for k, role in a.roles.items():
            if role == "masked":
                assert torch.equal(a.mask(t, k), b.mask(t, k))
        assert a.task_info(t) == b.task_info(t)
    assert torch.equal(a.agreement(), b.agreement())
    ma, mb = a.merge("consensus", k=2, alpha=0.5), b.merge("consensus", k=2, alpha=0.5)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_archive_reads_equal_the_default_archive(pair: tuple[Path, Path]) -> None:
    with tallfmt.open(pair[0]) as a, tallfmt.open(pair[1]) as b:
        assert a.header.version == (1, 1) and b.header.version == (1, 2)
        codecs_used = {m.codec for e in b.header.tensors if e.role == "masked" for m in e.masks}
        assert codecs_used == {"tau-rans"}
        assert {s.codec for e in b.header.tensors if e.role == "masked" for s in (e.base, e.tau)} != {"tau-rans"}
        _same_reads(a, b)
        b.verify()
        assert pair[1].stat().st_size < pair[0].stat().st_size


def test_archive_with_mmap_and_a_cache(pair: tuple[Path, Path]) -> None:
    with tallfmt.open(pair[0]) as a, tallfmt.open(pair[1], mmap=True) as b:
        _same_reads(a, b)


def test_switcher_keeps_packed_masks(pair: tuple[Path, Path]) -> None:
    base, _ = _zoo()
    with tallfmt.open(pair[0]) as a, tallfmt.open(pair[1]) as b:
        model = {k: v.clone() for k, v in base.items()}
        sw = b.switcher(model)
        for t in ("b", "a", "c", "a"):
            sw(t)
            want = a.decode(t)
            assert all(torch.equal(model[k], want[k]) for k in model)


def test_torch_path_gives_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Path, Path]
                                          ) -> None:
    from tallfmt.write import thresholds

    base, sds = _zoo()
    monkeypatch.setattr(thresholds, "fused_on", lambda device: False)
    tallfmt.encode(base, sds, tmp_path / "torch.tall", mask_codec="tau-rans")
    assert (tmp_path / "torch.tall").read_bytes() == pair[1].read_bytes()


def test_ties_and_sharded_archives(tmp_path: Path) -> None:
    base, sds = _zoo(1, "abcd")
    tallfmt.encode(base, sds, tmp_path / "one.tall", merge="ties", mask_codec="tau-rans")
    tallfmt.encode(base, sds, tmp_path / "sh", merge="ties", mask_codec="tau-rans", shards=3)
    tallfmt.encode(base, sds, tmp_path / "ref.tall", merge="ties")
    with tallfmt.open(tmp_path / "ref.tall") as ref, tallfmt.open(tmp_path / "one.tall") as one, \
            tallfmt.open(tmp_path / "sh") as sh:
        _same_reads(ref, one)
        _same_reads(ref, sh)
        sh.verify()
        assert {r.header.version for r in sh.shards} <= {(1, 1), (1, 2)}
        assert json.loads((tmp_path / "sh" / "tall.index.json").read_text())["version"] == [1, 0]  # no segments


def test_options_and_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from tallfmt.cli import cli

    base, sds = _zoo(2, "ab")
    with pytest.raises(InputError, match="mask_codec"):
        tallfmt.encode(base, sds, tmp_path / "x.tall", mask_codec="nope")
    with pytest.raises(InputError, match="codec must be one of"):
        tallfmt.encode(base, sds, tmp_path / "x.tall", codec="tau-rans")  # θ0 and τ have no context
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "base.safetensors")
    for t, sd in sds.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / f"{t}.safetensors")
    run = CliRunner().invoke(cli, ["encode", str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors"),
                                   str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "cli.tall"),
                                   "--mask-codec", "tau-rans"])
    assert run.exit_code == 0, run.output
    with tallfmt.open(tmp_path / "cli.tall") as z:
        assert z.header.version == (1, 2)
        assert {m.codec for e in z.header.tensors if e.role == "masked" for m in e.masks} == {"tau-rans"}
    helptext = CliRunner().invoke(cli, ["encode", "--help"]).output
    assert "--mask-codec" in helptext and "tau-rans" in helptext


def test_header_only_reads_import_neither_torch_nor_numba(pair: tuple[Path, Path]) -> None:
    code = ("import sys, tallfmt\nz = tallfmt.open(sys.argv[1])\nprint(z.tasks, z.task_info('a')['lambda'])\n"
            "assert 'torch' not in sys.modules and 'numba' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(pair[1])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- hostile archives ----------------------------------------------------------------------------------
def _mask_seg(h: dict, tensor: str, task: int = 0) -> dict:
    return next(t for t in h["tensors"] if t["name"] == tensor)["masks"][task]


def test_refused_in_a_1_1_file(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    p = tc.write(tmp_path / "old.tall", pair[1].read_bytes())
    obj = tc.split(p).header_json()
    obj["version"] = [1, 1]
    tc.with_header(p, obj, minor=1)
    with pytest.raises(FormatError, match=r"old.tall.*masks\[0\].*codec.*'tau-rans' is from version 1.2"):
        tallfmt.open(p)


def test_refused_for_theta0_and_tau(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    for part in ("base", "tau"):
        p = tc.write(tmp_path / f"{part}.tall", pair[1].read_bytes())
        tc.rewrite_header(p, lambda h: next(t for t in h["tensors"] if t["name"] == "w")[part].update(codec="tau-rans"))
        with pytest.raises(FormatError, match=rf"{part}.tall.*\.{part}\.codec: codec 'tau-rans' codes masks only"):
            tallfmt.open(p)


def _damaged(tmp_path: Path, src: Path, fn) -> Path:  # noqa: ANN001
    """A copy of ``src`` whose mask 'w' of task 'a' has its stored bytes changed by fn, checksum fixed."""
    p = tc.write(tmp_path / "damaged.tall", src.read_bytes())
    parts = tc.split(p)
    obj = parts.header_json()
    seg = _mask_seg(obj, "w")
    start = seg["offset"] - 64
    stored = parts.data[start:start + seg["length"]]
    new = fn(stored)
    assert len(new) <= seg["length"]
    data = bytearray(parts.data)
    data[start:start + seg["length"]] = new + bytes(seg["length"] - len(new))
    import xxhash
    seg["length"], seg["xxh3"] = len(new), xxhash.xxh3_64_hexdigest(new)
    tc.write(p, tc.assemble(parts, data=bytes(data), header=tc.header_text(obj)))
    return p


@pytest.mark.parametrize("fn, needle", [
    (lambda s: s[:-4], "ends before the last bit|final lane state"),
    (lambda s: s[:-4] + bytes([s[-4] ^ 0x40]) + s[-3:], "final lane state|ends before|unread"),
    (lambda s: bytes([s[0], s[1], 0]) + s[3:], "lanes K"),
    (lambda s: s[:5] + bytes(8) + s[13:], "below 2\\^32"),
])
def test_damaged_streams_are_refused_on_read(tmp_path: Path, pair: tuple[Path, Path], fn, needle: str) -> None:  # noqa: ANN001
    p = _damaged(tmp_path, pair[1], fn)
    with tallfmt.open(p) as z:
        with pytest.raises(FormatError, match=rf"damaged.tall: tensors\[\d+\] \('w'\)\.masks\[0\] \(task 'a'\).*"
                                              rf"codec tau-rans: .*({needle})"):
            z.verify()
        with pytest.raises(FormatError, match=needle):
            z.decode("a")
        with pytest.raises(FormatError, match=needle):
            z.mask("a", "w")
        with pytest.raises(FormatError, match=needle):
            z.agreement()
        assert torch.equal(z.decode("b")["w"], tallfmt.open(pair[0]).decode("b")["w"])  # the other task reads


def test_golden_masks_decode_from_the_text() -> None:
    """spec/golden/tau_rans.tall by hand: struct/json for the container, τ_MTL raw, every mask through
    the reference decoder above (FORMAT.md §5.1), both modes present."""
    import struct

    from safetensors.torch import load_file

    golden = Path(__file__).resolve().parent.parent / "spec" / "golden"
    raw = (golden / "tau_rans.tall").read_bytes()
    _, major, minor, _, h_off, h_len = struct.unpack_from("<8sHHIQQ", raw)
    header = json.loads(raw[h_off:h_off + h_len])
    assert (major, minor) == (1, 2) and header["version"] == [1, 2]
    want = load_file(str(golden / "tau_rans.expected.safetensors"))
    tasks = [t["name"] for t in header["tasks"]]
    modes = set()
    for t in header["tensors"]:
        if t["role"] != "masked":
            continue
        n = int(np.prod(t["shape"]))
        assert t["tau"]["codec"] == "raw"
        tau = np.frombuffer(raw, "<f4", count=n, offset=t["tau"]["offset"])
        for name, seg in zip(tasks, t["masks"]):
            assert seg["codec"] == "tau-rans"
            stored = raw[seg["offset"]:seg["offset"] + seg["length"]]
            modes.add(stored[1])
            bits = np.unpackbits(np.frombuffer(reference_decode(stored, n, tau), np.uint8), bitorder="little")[:n]
            assert np.array_equal(bits.reshape(t["shape"]), want[f"mask/{name}/{t['name']}"].numpy()), (name, t["name"])
    assert modes == {0, 1}


def test_one_mask_reads_only_tau_and_its_own_segment(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """FORMAT.md §5: task t's mask of a tensor reads that tensor's τ_MTL and masks[t], nothing else."""
    from tallfmt.format.container import ContainerReader

    read: list = []
    real = ContainerReader.stored
    monkeypatch.setattr(ContainerReader, "stored", lambda self, seg: read.append(seg) or real(self, seg))
    with tallfmt.open(pair[1]) as z:
        e = next(t for t in z.header.tensors if t.name == "w")
        z.mask("b", "w")
        assert read == [e.tau, e.masks[1]]
