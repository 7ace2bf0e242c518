"""What encode() returns: where the archive went, how big it is, what each tensor became and what each
task loses — and the warnings that say when the result is not what the user wants (compression
mostly lost, a λ that makes a task worse than θ0). Header-only: ``tallfmt info`` uses it too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tallfmt.format.dtypes import MASKABLE
from tallfmt.format.files import Files
from tallfmt.format.header import TensorEntry

#: Why a tensor is stored per task, and what to do about it (FORMAT.md §2).
PER_TASK_REASONS = {
    "dtype": ("their dtype differs between checkpoints",
              "cast every float tensor to one storage dtype: dtype='BF16' (CLI: --dtype bf16)"),
    "presence": ("they are missing from some checkpoints",
                 "heads and adapters stay per task; if names differ only by a prefix such as 'bert.', "
                 "rename θ0's: prefix_map={'': 'bert.'} (CLI: --prefix-map =bert.)"),
    "shape": ("their shape differs between checkpoints", "different heads or vocabularies cannot be masked"),
    "not float": ("their dtype is not F32, F16 or BF16",
                  "float tensors of other dtypes can be cast: dtype='BF16' (CLI: --dtype bf16)"),
    "pattern": ("their names match a per_task pattern", "per_task= (CLI: --per-task) lists them"),
}
#: Above this fraction of parameters stored per task, encode and info warn that compression is lost.
PER_TASK_WARN_FRACTION = 0.5
#: A task whose stored rel_error reaches this decodes further from its fine-tune than θ0 is.
REL_ERROR_WARN = 1.0


def per_task_reason(e: TensorEntry) -> str:
    """Why a ``per_task`` row is stored per task: a key of :data:`PER_TASK_REASONS`."""
    items = [e.base_item, *e.task_items]
    present = [it for it in items if it is not None]
    if len(present) != len(items):
        return "presence"
    if len({it.shape for it in present}) > 1:
        return "shape"
    if len({it.dtype for it in present}) > 1:
        return "dtype"
    return "not float" if present[0].dtype not in MASKABLE else "pattern"


@dataclass
class RoleSummary:
    """Per role: how many tensors, their stored bytes and (masked, shared) their elements; and the
    elements of one model's per-task tensors, by the reason they are per task."""

    roles: dict[str, int]
    role_bytes: dict[str, int]
    params: dict[str, int]
    per_task: dict[str, int] = field(default_factory=dict)  # reason -> elements (the largest copy of each)

    @classmethod
    def of(cls, entries: Iterable[TensorEntry]) -> RoleSummary:
        s = cls({}, {}, {})
        for e in entries:
            s.roles[e.role] = s.roles.get(e.role, 0) + 1
            s.role_bytes[e.role] = s.role_bytes.get(e.role, 0) + sum(seg.length for seg in e.segments())
            if e.role in ("masked", "shared"):
                s.params[e.role] = s.params.get(e.role, 0) + e.numel
            elif e.role == "per_task":
                why = per_task_reason(e)
                n = max(it.numel for it in (e.base_item, *e.task_items) if it is not None)
                s.per_task[why] = s.per_task.get(why, 0) + n
        return s

    def add(self, other: RoleSummary) -> RoleSummary:
        for mine, theirs in ((self.roles, other.roles), (self.role_bytes, other.role_bytes),
                             (self.params, other.params), (self.per_task, other.per_task)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        return self


def archive_warnings(summary: RoleSummary, task_stats: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a user must know about an archive, one sentence each: compression mostly lost because
    most parameters are stored per task (and why), and tasks whose decoded model is further from the
    fine-tune than θ0 (stored rel_error ≥ 1).

        >>> s = RoleSummary({}, {}, {"masked": 10}, {"dtype": 90})
        >>> print(archive_warnings(s, {"a": {"rel_error": 1.2}})[1])  # doctest: +ELLIPSIS
        task 'a': rel error 1.20 ≥ 1, so its decoded model is further from the fine-tune than θ0 is; ...
    """
    out = []
    per_task = sum(summary.per_task.values())
    total = per_task + summary.params.get("masked", 0) + summary.params.get("shared", 0)
    if total and per_task > PER_TASK_WARN_FRACTION * total:
        parts = [f"{100 * n / total:.0f}% because {PER_TASK_REASONS[why][0]} ({PER_TASK_REASONS[why][1]})"
                 for why, n in sorted(summary.per_task.items(), key=lambda kv: -kv[1]) if n]
        out.append(f"compression is mostly lost: {100 * per_task / total:.0f}% of the parameters are stored "
                   f"verbatim per task: {'; '.join(parts)}")
    for task, stats in task_stats.items():
        rel = stats.get("rel_error")
        if rel is not None and rel >= REL_ERROR_WARN:
            out.append(f"task {task!r}: rel error {rel:.2f} ≥ 1, so its decoded model is further from the "
                       f"fine-tune than θ0 is; pick λ per task on validation data with tallfmt.select_lambdas "
                       f"(or try merge='ties', CLI --merge ties)")
    return out


@dataclass
class EncodeReport:
    """What encode() did: where, how big, what each tensor became, and what each task loses.
    ``warnings`` says what a user should act on (see :func:`archive_warnings`)."""

    path: Path
    tasks: list[str]
    roles: dict[str, int]                  # role -> number of tensors
    role_bytes: dict[str, int]             # role -> stored bytes of its segments
    params: dict[str, int]                 # "masked" / "shared" -> elements
    input_bytes: int                       # raw bytes of base + every task checkpoint
    archive_bytes: int
    task_stats: dict[str, dict[str, Any]]
    seconds: float
    summary: RoleSummary | None = None
    files: Files | None = None             # the folders' non-weight files stored (FORMAT.md §10)

    @property
    def ratio(self) -> float:
        """Raw collection bytes / archive bytes."""
        return self.input_bytes / self.archive_bytes if self.archive_bytes else float("inf")

    @property
    def file_names(self) -> list[str]:
        """Every stored file name (of θ0 or any task), sorted."""
        if self.files is None:
            return []
        return sorted({n for m in (self.files.base, *self.files.tasks) for n in m})

    @property
    def warnings(self) -> list[str]:
        summary = self.summary or RoleSummary(self.roles, self.role_bytes, self.params)
        return archive_warnings(summary, self.task_stats)

    def __str__(self) -> str:
        n = len(self.tasks)
        text = (f"{self.path}: {n} task{'s' if n != 1 else ''}, {self.input_bytes:,} → {self.archive_bytes:,} "
                f"bytes ({self.ratio:.2f}×) in {self.seconds:.1f}s; roles {self.roles}")
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])
