"""Codecs and merge methods registered by a user's package show up in the CLI: `encode --codec`,
`info`, `merge --merge` and the merge's own options, all built from the registries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_cli import make_checkpoints, run

PLUGIN = '''
import numpy as np
from tallfmt import MergeMethod, Param
from tallfmt.format.codecs import as_bytes


class XorCodec:
    """Stored bytes are the decoded bytes XOR 0x5A (a stand-in for a real codec)."""
    codec_id = "xor5a"

    def encode(self, buf, itemsize):
        return (np.frombuffer(as_bytes(buf), dtype=np.uint8) ^ 0x5A).tobytes()

    def decode(self, buf, decoded_length, itemsize, out=None):
        got = np.frombuffer(as_bytes(buf), dtype=np.uint8) ^ 0x5A
        if out is None:
            return got
        out[:] = got
        return out

    def get_config(self):
        return {"id": self.codec_id}


CODEC = XorCodec()


def _scaled(theta0, tau, scale, **_):
    return theta0 + tau * scale


METHOD = MergeMethod("scaled_sum", "θ0 + scale·τ_MTL (a plugin)", (Param("scale", float, 0.25, "how much of τ_MTL"),),
                     frozenset({"tau"}), _scaled)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plugin")
    (root / "tallfmt_plug.py").write_text(PLUGIN, encoding="utf-8")
    info = root / "tallfmt_plug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tallfmt-plug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tallfmt.codecs]\nxor5a = tallfmt_plug:CODEC\n\n"
                                           "[tallfmt.merges]\nscaled_sum = tallfmt_plug:METHOD\n")
    # the plugin first, then the caller's entries (replacing them would import another tallfmt)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}


def test_plugins_show_up_in_help(plugin: dict[str, str], tmp_path: Path) -> None:
    assert "xor5a" in run("encode", "--help", cwd=tmp_path, env=plugin).stdout
    merge_help = " ".join(run("merge", "--help", cwd=tmp_path, env=plugin).stdout.split())
    assert "scaled_sum" in merge_help and "--scale" in merge_help and "(scaled_sum; default 0.25)" in merge_help
    assert "xor5a" not in run("encode", "--help", cwd=tmp_path).stdout  # not installed: not offered


def test_plugin_codec_and_merge_work_end_to_end(plugin: dict[str, str], tmp_path: Path) -> None:
    paths = make_checkpoints(tmp_path)
    fts = [str(p) for k, p in paths.items() if k != "base"]
    run("encode", str(paths["base"]), *fts, "-o", "zoo.tall", "--codec", "xor5a", cwd=tmp_path, env=plugin)
    info = run("info", "zoo.tall", cwd=tmp_path, env=plugin).stdout
    assert "xor5a" in info
    run("merge", "zoo.tall", "--merge", "scaled_sum", "--scale", "0.5", "-o", "m.safetensors", cwd=tmp_path, env=plugin)
    run("merge", "zoo.tall", "--method", "task_arithmetic", "--alpha", "0.5", "-o", "ta.safetensors", cwd=tmp_path,
        env=plugin)
    from safetensors.torch import load_file

    import torch
    a, b = load_file(str(tmp_path / "m.safetensors")), load_file(str(tmp_path / "ta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # θ0 + 0.5·τ either way
    bad = run("merge", "zoo.tall", "--method", "scaled_sum", "--alpha", "0.5", "-o", "x.safetensors", cwd=tmp_path,
              env=plugin, ok=False)
    assert bad.returncode == 2 and "--alpha does not apply to --merge scaled_sum" in bad.stderr
