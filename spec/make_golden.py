"""Regenerate the golden files in spec/golden/ (run from the repository root).

    python spec/make_golden.py

For each case NAME it writes:
  NAME.inputs.safetensors    the checkpoints that were encoded: "base/<tensor>" and "<task>/<tensor>"
  NAME.tall                  the archive
  NAME.expected.safetensors  what a reader must decode: "task/<task>/<tensor>" (every task model),
                             "mask/<task>/<tensor>" (U8, one byte per element, 0/1),
                             "merge/<method>/<tensor>" (zeroshot, task_arithmetic α=0.5, consensus k=2 α=0.5)
                             and "agreement" (I64, length T+1)
                             and "file/<model>/<name>" (U8: the bytes of each stored file, FORMAT.md §10;
                             <model> is "base" or a task)
The "tau_rans" case is format 1.2 (its masks use the tau-rans codec). cases.json records the encode options (and, for "files", the folders' other files: each model is
encoded from a folder holding its model.safetensors and those files). tests/test_golden.py checks
that the reader decodes every .tall to the expected tensors bit for bit and that encoding the inputs
with the recorded options reproduces the .tall byte for byte.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import tallfmt  # noqa: E402

CASES: dict[str, dict] = {
    # One F32 tensor, one task, raw segments: small enough to decode by hand from FORMAT.md.
    "minimal": {"tasks": ["only"], "options": {"codec": "raw", "lambdas": 0.4}},
    # Every role and float dtype, three tasks, per-task λ, default codecs.
    "roles": {"tasks": ["alpha", "beta", "gamma"],
              "options": {"lambdas": {"alpha": 0.3, "beta": 0.4, "gamma": 0.6}, "mismatch": "per_task",
                          "metadata": {"source": "spec/make_golden.py"}}},
    # TIES (global trim, disjoint sum), as the paper's masks.
    "ties": {"tasks": ["t1", "t2", "t3", "t4"],
             "options": {"merge": "ties", "ties_density": 0.2, "ties_agg": "sum", "ties_scope": "global",
                         "lambdas": 0.5, "codec": "zstd"}},
    # Magnitude masks (the paper's baseline), TIES per-tensor with disjoint mean.
    "magnitude": {"tasks": ["x", "y"],
                  "options": {"merge": "ties", "ties_density": 0.5, "ties_agg": "mean", "ties_scope": "per_tensor",
                              "mask_method": "magnitude", "mask_density": 0.1, "mask_scope": "per_tensor"}},
    # Format 1.2: τ_MTL stored in bfloat16 (FORMAT.md §4.2), every float dtype of θ0, byte planes.
    "bf16_tau": {"tasks": ["p", "q", "r"], "options": {"tau_dtype": "BF16", "lambdas": 0.4}},
    # Format 1.2: θ0 kept outside the archive (FORMAT.md §2.1): BASEREFs, decoded with base= (its inputs' "base/").
    "external_base": {"tasks": ["u", "v"], "options": {"store_base": False, "lambdas": 0.4}},
    # Format 1.1: model folders with their other files (FORMAT.md §10), one shared by every model.
    "files": {"tasks": ["sst2", "mnli"], "options": {"codec": "raw"},
              "folders": {
                  "base": {"config.json": '{"model_type": "bert"}\n', "vocab.txt": "[PAD]\n[UNK]\nthe\n" * 20},
                  "sst2": {"config.json": '{"model_type": "bert", "num_labels": 2}\n',
                           "vocab.txt": "[PAD]\n[UNK]\nthe\n" * 20, "1_Pooling/config.json": "{}\n"},
                  "mnli": {"config.json": '{"model_type": "bert", "num_labels": 3}\n', "README.md": "# mnli\n"}}},
    # Format 1.2: masks coded with tau-rans (FORMAT.md §5.1) from τ_MTL, everything else raw, so that
    # τ_MTL can be read by hand and the masks decoded from the text of §5.1.
    "tau_rans": {"tasks": ["p", "q", "r"], "options": {"codec": "raw", "mask_codec": "tau-rans", "lambdas": 0.4}},
    # Format 1.2: per-task residuals (FORMAT.md §11) for two of three tasks, the third without, raw segments.
    "residual": {"tasks": ["a", "b", "c"], "options": {"residual": {"a": 8.0, "b": 2.0}, "codec": "raw"}},
}


def _inputs(case: str, tasks: list[str]) -> tuple[dict, dict]:
    g = np.random.default_rng(sum(map(ord, case)))

    def randn(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.from_numpy(np.asarray(g.standard_normal(shape) * scale, dtype=np.float32))

    if case in ("minimal", "files"):
        base = {"w": randn(4, 6)}
    elif case == "tau_rans":  # the empty tensor and the one-element one take the raw mode
        base = {"enc.w": randn(32, 30), "emb": randn(40, 12).bfloat16(), "b": randn(30), "one": randn(1),
                "empty": randn(0, 4)}
    else:
        base = {"enc.w": randn(16, 12), "enc.h": randn(40).half(), "enc.b": randn(3, 5).bfloat16(),
                "scalar": randn(), "empty": randn(0, 4), "pos": torch.arange(12), "frozen": randn(7)}
        base["tied"] = base["enc.w"]
    sds = {}
    for i, t in enumerate(tasks):
        sd = {}
        for k, v in base.items():
            if k in ("pos", "frozen", "tied"):
                sd[k] = v.clone()
            else:
                keep = torch.from_numpy(np.asarray(g.random(tuple(v.shape)) < 0.5))
                if case == "tau_rans" and v.dim() == 2:  # rows a task leaves alone, as embedding rows
                    keep &= torch.from_numpy(np.asarray(g.random((v.shape[0], 1)) < 0.3))
                delta = randn(*v.shape, scale=0.01) * keep
                sd[k] = (v.float() + delta).to(v.dtype)
        if case == "roles":
            sd["tied"] = sd["enc.w"]
            sd["head"] = randn(2 + i, 12)            # per_task: a head of a different shape per task
            sd["steps"] = torch.tensor([100 * (i + 1)])  # per_task: an integer buffer that differs
        sds[t] = sd
    if case == "roles":
        base["steps"] = torch.tensor([0])
    return base, sds


def _flatten(prefix: str, sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        out[f"{prefix}/{k}"] = v.clone()  # safetensors refuses shared storage; ties are re-made on load
    return out


def load_inputs(case: str) -> tuple[dict, dict]:
    """The checked-in inputs of a case, with tied tensors tied again as in the originals."""
    flat = load_file(str(ROOT / "golden" / f"{case}.inputs.safetensors"))
    tasks = CASES[case]["tasks"]
    base = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("base/")}
    sds = {t: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"{t}/")} for t in tasks}
    for sd in (base, *sds.values()):
        if "tied" in sd:
            sd["tied"] = sd["enc.w"]
    return base, sds


def sources(case: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    """What encode is given for a case: the checked-in state dicts, or for a case with "folders" one
    folder per model in ``folder`` (its model.safetensors and the recorded files)."""
    base, tasks = load_inputs(case)
    spec = CASES[case].get("folders")
    if spec is None:
        return base, tasks
    paths = {}
    for model, sd in (("base", base), *tasks.items()):
        d = folder / model
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        for name, text in spec[model].items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(text.encode("utf-8"))
        paths[model] = d
    return paths.pop("base"), paths


def external_base(case: str) -> dict | None:
    """θ0 for a case encoded with store_base=False (the reader must be given it), else None."""
    return load_inputs(case)[0] if CASES[case]["options"].get("store_base") is False else None


def expected(path: Path, base: Any = None) -> dict:
    """What a reader decodes from the archive at ``path`` (``base``: θ0 for one that keeps it outside)."""
    out = {}
    with tallfmt.open(path, base=base) as zoo:
        for model in (None, *zoo.tasks):
            for name, data in zoo.files(model).items():
                out[f"file/{model or 'base'}/{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for t in zoo.tasks:
            for k, v in zoo.decode(t).items():
                out[f"task/{t}/{k}"] = v.clone()
            for k, role in zoo.roles.items():
                if role == "masked":
                    out[f"mask/{t}/{k}"] = zoo.mask(t, k).to(torch.uint8)
        for label, method, params in (("zeroshot", "zeroshot", {}), ("task_arithmetic", "task_arithmetic", {"alpha": 0.5}),
                                      ("consensus", "consensus", {"k": 2, "alpha": 0.5})):
            for k, v in zoo.merge(method, **params).items():
                out[f"merge/{label}/{k}"] = v.clone()
        out["agreement"] = zoo.agreement()
    return out


def main() -> None:
    out = ROOT / "golden"
    out.mkdir(exist_ok=True)
    for case, spec in CASES.items():
        base, sds = _inputs(case, spec["tasks"])
        flat = _flatten("base", base)
        for t, sd in sds.items():
            flat.update(_flatten(t, sd))
        save_file(flat, str(out / f"{case}.inputs.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            base, sds = sources(case, Path(tmp))
            tallfmt.encode(base, sds, out / f"{case}.tall", overwrite=True, **spec["options"])
        save_file(expected(out / f"{case}.tall", external_base(case)), str(out / f"{case}.expected.safetensors"))
    (out / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(CASES)} cases to {out} ({total:,} bytes)")


if __name__ == "__main__":
    main()
