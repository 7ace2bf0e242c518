"""What opening a .tall file costs when its header is large or hostile (issue 15, defect 15): wall time
and peak memory of ``ContainerReader(path)`` against ``json.loads`` of the same header bytes (the part no
Python reader can avoid), each in a fresh process.

    .venv/bin/python bench/bench_open.py                 # headers of 20 MiB
    .venv/bin/python bench/bench_open.py --mib 100       # at the 100 MiB header limit

Headers (all of about the same size):

- ``masked rows``: a genuine shape, masked BF16 rows with 8 tasks (10 segments a row);
- ``metadata keys``: one metadata object of short string keys (valid: metadata is free);
- ``stats keys``: one task's ``stats`` with as many short keys as fit (refused: at most 256 keys).

Each case runs in its own interpreter (tallfmt imported first), timed around the open (or the
json.loads); peak memory is that process's VmHWM minus its VmHWM before. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_note, md_table  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import _tallcraft as tc  # noqa: E402

_PROBE = """
import json, resource, struct, sys, time
from pathlib import Path
import tallfmt
from tallfmt.format.container import ContainerReader
path, how = sys.argv[1], sys.argv[2]
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
raw = Path(path).read_bytes() if how == "json" else None
if raw is not None:
    h_off, h_len = struct.unpack_from("<QQ", raw, 16)
    raw = raw[h_off:h_off + h_len]
before = hwm()
t = time.perf_counter()
outcome = "opened"
try:
    if how == "json":
        json.loads(raw)
    else:
        ContainerReader(path).close()
except tallfmt.TallError as exc:
    outcome = type(exc).__name__
print(json.dumps({"seconds": time.perf_counter() - t, "peak": hwm() - before, "outcome": outcome}))
"""


def _header_with(parts: tc.Parts, key: bytes, fill: bytes, size: int) -> bytes:
    """The header with ``fill`` repeated after the first ``key`` until the header is about ``size`` bytes."""
    i = parts.header.index(key) + len(key)
    n = max(0, (size - len(parts.header)) // len(fill % (size // 8)))
    body = b"".join(fill % k for k in range(n))
    return parts.header[:i] + body + parts.header[i:]


def masked_rows(size: int) -> tuple[bytes, int]:
    """(header, data section bytes): masked BF16 [512, 512] rows with 8 tasks whose segments are 64
    stored bytes each, one after the other (a valid layout; the checksums are only checked on read)."""
    xxh3 = "0" * 16
    pos = 64

    def seg(decoded: int, codec: str = "byteplane-zstd") -> dict:
        nonlocal pos
        pos += 64
        return {"offset": pos - 64, "length": 64, "decoded_length": decoded, "codec": codec, "xxh3": xxh3}

    def row(i: int) -> dict:
        return {"name": f"model.layers.{i}.self_attn.q_proj.weight", "role": "masked", "dtype": "BF16",
                "shape": [512, 512], "base": seg(2 * 512 * 512), "tau": seg(4 * 512 * 512),
                "masks": [seg(512 * 512 // 8, "zstd") for _ in range(8)]}
    pos = 10**10  # a row as long as the last ones (long offsets), so the header stays within `size`
    n = size // len(json.dumps(row(10**6), separators=(",", ":")))
    pos = 64
    h = {"format": "tallfmt", "version": [1, 0], "tasks": [{"name": f"t{i}", "lambda": 0.4, "stats": {}} for i in range(8)],
         "encoding": {"merge": {"method": "task_arithmetic"}, "mask": {"method": "tall"}, "compute_dtype": "F32",
                      "bit_order": "little"}, "tensors": [row(i) for i in range(n)], "metadata": {}}
    return json.dumps(h, separators=(",", ":")).encode(), pos - 64


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=20, help="header size in MiB (default 20; the limit is 100)")
    args = ap.parse_args(argv)
    size = int(args.mib * 2**20) - 4096
    rows = []
    with tempfile.TemporaryDirectory(prefix="tallfmt-open-") as tmp:
        parts = tc.split(tc.build(Path(tmp) / "x.tall"))
        rows_header, data = masked_rows(size)
        cases = {"masked rows": (rows_header, bytes(data)),
                 "metadata keys": (_header_with(parts, b'"metadata":{', b'"%x":"",', size), parts.data),
                 "stats keys": (_header_with(parts, b'"stats":{', b'"%x":0,', size), parts.data)}
        for name, (header, section) in cases.items():
            p = tc.write(Path(tmp) / "h.tall", tc.assemble(parts, header=header, data=section,
                                                             header_offset=64 + len(section)))
            del header, section
            got = {}
            for how in ("json", "open"):
                out = subprocess.run([sys.executable, "-c", _PROBE, str(p), how], capture_output=True, text=True,
                                     check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
                got[how] = json.loads(out.stdout.strip().splitlines()[-1])
            j, o = got["json"], got["open"]
            rows.append([name, f"{tc.split(p).header_length / 2**20:.1f} MiB", o["outcome"], f"{o['seconds']:.2f} s",
                         f"{o['seconds'] / j['seconds']:.2f}×", f"{o['peak'] / 2**20:.0f} MiB",
                         f"{o['peak'] / max(j['peak'], 1):.2f}×"])
    print(machine_note())
    print(md_table(["header", "size", "open", "open time", "vs json.loads", "open peak memory",
                    "vs json.loads"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
