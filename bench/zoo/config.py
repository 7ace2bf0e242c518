"""The zoo's build configuration, its hash, and where a zoo lives by default.

Everything that changes the bytes of a built zoo is in :class:`ZooConfig` and so in its hash (the cache
folder's name); the task list is not: one folder holds any subset of the tasks built with one config, and
a later build with more tasks adds to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from .data import DATA_PACKAGES, MODEL_PACKAGE, SplitCaps

#: Bump when the meaning of the files changes (it is part of the hash, so old caches are not reused).
ZOO_FORMAT = "tallfmt-zoo/1"
MANIFEST = "zoo.json"


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    seed: int = 0
    max_train: int = 3000
    max_validation: int = 500
    max_test: int = 1000
    max_length: int = 64
    batch_size: int = 32
    epochs: int = 2
    max_steps: int | None = None  # cap on optimizer steps (None: epochs decide)
    lr: float = 5e-5
    weight_decay: float = 0.01  # AdamW, not on biases and LayerNorm weights (the BERT recipe)
    warmup_ratio: float = 0.1  # linear warmup, then linear decay to 0
    grad_clip: float = 1.0
    probe_l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    eval_batch_size: int = 128

    def caps(self) -> SplitCaps:
        return SplitCaps(max_train=self.max_train, max_validation=self.max_validation, max_test=self.max_test)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["probe_l2_grid"] = list(self.probe_l2_grid)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ZooConfig":
        d = dict(d)
        d["probe_l2_grid"] = tuple(d["probe_l2_grid"])
        return cls(**d)

    def hash(self) -> str:
        key = {
            "format": ZOO_FORMAT,
            "config": self.to_json(),
            "model": list(MODEL_PACKAGE),
            "data": DATA_PACKAGES,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tallfmt"


def default_zoo_dir(config: ZooConfig | None = None) -> Path:
    """``$TALLFMT_ZOO`` if set, else ``~/.cache/tallfmt/zoo-<config hash>`` (XDG_CACHE_HOME respected)."""
    if config is None and os.environ.get("TALLFMT_ZOO"):
        return Path(os.environ["TALLFMT_ZOO"])
    return cache_root() / f"zoo-{(config or ZooConfig()).hash()}"


def read_manifest(zoo_dir: Path) -> dict:
    path = Path(zoo_dir) / MANIFEST
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
