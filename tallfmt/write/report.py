"""What encode() returns: where the archive went, how big it is, what each tensor became and what each
task loses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tallfmt.format.header import TensorEntry


@dataclass
class RoleSummary:
    """Per role: how many tensors, their stored bytes and (masked, shared) their elements."""

    roles: dict[str, int]
    role_bytes: dict[str, int]
    params: dict[str, int]

    @classmethod
    def of(cls, entries: Iterable[TensorEntry]) -> RoleSummary:
        s = cls({}, {}, {})
        for e in entries:
            s.roles[e.role] = s.roles.get(e.role, 0) + 1
            s.role_bytes[e.role] = s.role_bytes.get(e.role, 0) + sum(seg.length for seg in e.segments())
            if e.role in ("masked", "shared"):
                s.params[e.role] = s.params.get(e.role, 0) + e.numel
        return s

    def add(self, other: RoleSummary) -> RoleSummary:
        for mine, theirs in ((self.roles, other.roles), (self.role_bytes, other.role_bytes),
                             (self.params, other.params)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        return self


@dataclass
class EncodeReport:
    """What encode() did: where, how big, what each tensor became, and what each task loses."""

    path: Path
    tasks: list[str]
    roles: dict[str, int]                  # role -> number of tensors
    role_bytes: dict[str, int]             # role -> stored bytes of its segments
    params: dict[str, int]                 # "masked" / "shared" -> elements
    input_bytes: int                       # raw bytes of base + every task checkpoint
    archive_bytes: int
    task_stats: dict[str, dict[str, Any]]
    seconds: float

    @property
    def ratio(self) -> float:
        """Raw collection bytes / archive bytes."""
        return self.input_bytes / self.archive_bytes if self.archive_bytes else float("inf")

    def __str__(self) -> str:
        n = len(self.tasks)
        return (f"{self.path}: {n} task{'s' if n != 1 else ''}, {self.input_bytes:,} → {self.archive_bytes:,} "
                f"bytes ({self.ratio:.2f}×) in {self.seconds:.1f}s; roles {self.roles}")
