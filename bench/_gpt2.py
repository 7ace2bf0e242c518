"""The GPT-2-small zoo of the serving benches (bench_serving.py, bench_serving_gpu.py): θ0 from a
transformers ``GPT2Config()`` with random weights (124M parameters, ``lm_head.weight`` tied to
``transformer.wte.weight``), T fine-tunes with sparse deltas, and their archive.

Everything is cached under ``bench/_cache/gpt2-<hash>/`` (the hash covers the settings): θ0 and each
task as a .safetensors file (``lm_head.weight`` written as a copy, so ``load_state_dict`` of the file
is strict), and the archive, encoded from the files with the tie restored (role ``alias``) and
``ln_f`` stored per task (``per_task=("*ln_f*",)``), so a switch meets every role.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import _common as C

TIED = ("lm_head.weight", "transformer.wte.weight")
PER_TASK = ("*ln_f*",)
#: ``small=True``: a tiny GPT-2 for smoke tests (0.2M parameters).
SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 128, "bos_token_id": 0,
         "eos_token_id": 0}


@dataclass
class Gpt2Zoo:
    folder: Path
    base: Path
    tasks: list[Path]
    archive: Path
    dtype: torch.dtype
    config: dict

    @property
    def task_names(self) -> list[str]:
        return [p.stem for p in self.tasks]

    def model(self) -> torch.nn.Module:
        """A GPT2LMHeadModel of the zoo's shape and dtype (random weights; lm_head tied to wte)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        with torch.device("meta"):
            m = GPT2LMHeadModel(GPT2Config(**self.config))
        m = m.to_empty(device="cpu").to(self.dtype)
        m.tie_weights()
        return m.eval()


def memory_table(model_bytes: int, resident: int, grown: int, tasks: int, grown_what: str) -> str:
    """The switcher-memory table both serving benches print: resident bytes against the target
    (2 + T/32) × model + 10 %."""
    limit = (2 + tasks / 32) * 1.1
    verdict = "met" if resident / model_bytes <= limit else "**missed**"
    return C.md_table(["switcher memory", "bytes", "× model"], [
        ["model (distinct tensors)", f"{model_bytes / 1e6:.1f} MB", "1.00×"],
        ["switcher.resident_bytes (θ0, θ1, masks, per-task copies)", f"{resident / 1e6:.1f} MB",
         f"{resident / model_bytes:.3f}× ({verdict}: ≤ (2 + {tasks}/32) × 1.1 = {limit:.3f}×)"],
        [grown_what, f"{grown / 1e6:.1f} MB", f"{grown / model_bytes:.3f}×"],
    ])


def _delta(shape: tuple[int, ...], seed: int, density: float, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < density
    return torch.randn(shape, generator=g) * sigma * keep


def _open_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd[TIED[0]] = sd[TIED[1]]  # the tie the file format cannot store: encoded as role alias
    return sd


def gpt2_zoo(tasks: int = 4, dtype: torch.dtype = torch.float32, density: float = 0.1, sigma: float = 1e-3,
             codec: str = "auto", small: bool = False, log: Callable[[str], None] | None = print) -> Gpt2Zoo:
    """θ0, ``tasks`` fine-tunes (each moving a random ``density`` of every float tensor's elements by
    N(0, σ²)) and their archive; built once, then reused. ``small``: the tiny config :data:`SMALL`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import tallfmt
    from tallfmt.checkpoints import SafetensorsWriter
    from tallfmt.compute.tensors import from_torch

    config = SMALL if small else {}
    desc = {"model": "gpt2-small", "tasks": tasks, "dtype": str(dtype), "density": density, "sigma": sigma, "v": 1,
            **({"config": config} if config else {})}
    tag = hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:10]
    folder = C.CACHE / f"gpt2-{tag}"
    base, paths = folder / "base.safetensors", [folder / f"task{t}.safetensors" for t in range(tasks)]
    archive = folder / f"zoo-{codec}.tall"
    zoo = Gpt2Zoo(folder, base, paths, archive, dtype, config)
    if not (folder / "done.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        sd = {k: v.to(dtype) for k, v in GPT2LMHeadModel(GPT2Config(**config)).state_dict().items()}
        entries = [(k, from_torch(v.dtype).name, tuple(v.shape)) for k, v in sd.items()]
        for t in range(-1, tasks):
            with SafetensorsWriter(base if t < 0 else paths[t], entries) as w:
                for i, (k, v) in enumerate(sd.items()):
                    if t >= 0 and k != TIED[0]:
                        v = (v.float() + _delta(tuple(v.shape), 1000 * i + t, density, sigma)).to(dtype)
                        if k == TIED[1]:
                            tied = v
                    elif t >= 0:
                        v = tied
                    w.write(k, v)
            if log:
                log(f"  wrote {(base if t < 0 else paths[t]).name} ({time.perf_counter() - t0:.0f} s)")
        (folder / "done.json").write_text(json.dumps(desc))
    if not archive.exists():
        t0 = time.perf_counter()
        rep = tallfmt.encode(_open_dict(base), {p.stem: _open_dict(p) for p in paths}, archive, codec=codec,
                             per_task=PER_TASK, threads=1)
        if log:
            log(f"  encoded {archive.name}: {rep.archive_bytes / 1e6:.0f} MB, roles {rep.roles} "
                f"({time.perf_counter() - t0:.0f} s)")
    return zoo
