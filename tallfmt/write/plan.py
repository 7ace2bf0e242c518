"""Plans: which role each tensor gets (FORMAT.md §2), decided from metadata first and from bytes
where metadata cannot tell. A plan is an immutable value, so the driver can ship it to workers and
take back the roles they decide."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from tallfmt.errors import InputError
from tallfmt.format.dtypes import MASKABLE, by_name
from tallfmt.format.header import MAX_TENSORS, name_refusal, shape_refusal
from tallfmt.format.planner import plan_shards
from tallfmt.write.inputs import Inputs

#: A tensor name safetensors keeps for its metadata: refused at encode (FORMAT.md §2).
RESERVED_NAME = "__metadata__"
#: Roles a plan can hold: the four of the format, and ``common`` — same dtype and shape everywhere,
#: not tied: masked, shared or per_task once its bytes have been compared.
COMMON = "common"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor: its name, role, and (unless per_task) the dtype and shape all checkpoints share."""

    name: str
    role: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    target: str | None = None             # alias: the tensor it is tied to

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    def with_role(self, role: str) -> TensorPlan:
        return replace(self, role=role)


def _describe(names: list[str]) -> str:
    head = ", ".join(repr(n) for n in names[:5])
    return f"{head}{f' and {len(names) - 5} more' if len(names) > 5 else ''} ({len(names)} in all)"


def plan_metadata(inputs: Inputs, mismatch: str) -> list[TensorPlan]:
    """Roles that follow from names, dtypes, shapes and tied storage alone, in archive order (θ0's
    tensors, then new names in task order): alias, per_task (mismatched), or common."""
    names: list[str] = list(inputs.base.names())
    seen = set(names)
    for ck in inputs.cks:
        for n in ck.names():
            if n not in seen:
                seen.add(n)
                names.append(n)
    if len(names) > MAX_TENSORS:
        raise InputError(f"{inputs.base.source}: {len(names)} tensors (in θ0 and the tasks together), over the "
                         f"archive's limit of {MAX_TENSORS}")
    plans, bad, why = [], [], []
    for n in names:
        base_info = inputs.base.info(n) if n in inputs.base_names else None
        task_infos = [ck.info(n) if n in names_ else None for ck, names_ in zip(inputs.cks, inputs.task_name_sets)]
        check_tensor(n, inputs, base_info, task_infos)
        if base_info is not None and all(i == base_info for i in task_infos):
            plans.append(TensorPlan(n, COMMON, *base_info))
        else:
            bad.append(n)
            plans.append(TensorPlan(n, "per_task"))
            if len(why) < 5:
                why.append(_mismatch_reason(n, inputs, base_info, task_infos))
    if bad and mismatch == "error":
        raise InputError(
            f"tensors differ in presence, dtype or shape between the base and the tasks: {_describe(bad)}: "
            f"{'; '.join(why)}{'; …' if len(bad) > len(why) else ''}. Pass mismatch='per_task' "
            f"(CLI: --mismatch per_task) to store them per task")
    return _find_aliases(plans, inputs)


def check_tensor(name: str, inputs: Inputs, base_info: tuple | None, task_infos: list[tuple | None]) -> None:
    """Refuse, before anything is written, a tensor the archive's readers would refuse (the format's
    own rules, :func:`tallfmt.format.header.name_refusal` and ``shape_refusal``) or that no decoded
    safetensors file can hold (the name ``__metadata__``): InputError naming the checkpoint and tensor."""
    holders = [(ck, info) for ck, info in zip(inputs.all, [base_info, *task_infos]) if info is not None]
    where = f"{holders[0][0].source}: tensor {name[:80]!r}"
    r = name_refusal(name)
    if r is not None:
        raise InputError(f"{where}: {r.message}")
    if name == RESERVED_NAME:
        raise InputError(f"{where}: {RESERVED_NAME} is reserved by safetensors (a decoded model could not hold "
                         f"it); rename the tensor")
    for ck, (dt, shape) in holders:
        r = shape_refusal(shape, by_name(dt).itemsize)
        if r is not None:
            raise InputError(f"{ck.source}: tensor {name[:80]!r}: shape {list(shape)[:40]}: {r.message}")


def _mismatch_reason(name: str, inputs: Inputs, base_info: tuple | None, task_infos: list[tuple | None]) -> str:
    """Which checkpoint differs from θ0 for one tensor, e.g. "'w' is F16 [3, 5] in x.safetensors, F32 [3, 5]
    in the base"."""
    def show(info: tuple | None) -> str:
        return "missing" if info is None else f"{info[0]} {list(info[1])}"
    base = inputs.base
    for ck, info in zip(inputs.cks, task_infos):
        if info != base_info:
            return f"{name!r} is {show(info)} in {ck.source}, {show(base_info)} in the base {base.source}"
    return f"{name!r} is {show(base_info)} in the base {base.source}"


def _find_aliases(plans: list[TensorPlan], inputs: Inputs) -> list[TensorPlan]:
    """Common tensors that share storage with an earlier one in every checkpoint become aliases
    (metadata only: storage keys), so a sharded encode keeps aliases with their targets."""
    by_key: dict[tuple, str] = {}
    out = []
    for p in plans:
        if p.role == COMMON:
            keys = tuple(ck.storage_key(p.name) for ck in inputs.all)
            if all(k is not None for k in keys):
                if keys in by_key:
                    p = replace(p, role="alias", target=by_key[keys])
                else:
                    by_key[keys] = p.name
        out.append(p)
    return out


def _equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.numel() == 0:
        return b.numel() == 0
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def decide_role(inputs: Inputs, plan: TensorPlan, per_task_globs: Sequence[str]) -> str:
    """The role of a common tensor from its bytes: shared (equal bit for bit in θ0 and every task),
    masked (a float that differs, unless its name matches a per-task glob) or per_task."""
    b = inputs.base.get(plan.name)
    same = all(_equal_bytes(b, ck.get(plan.name)) for ck in inputs.cks)
    del b
    inputs.release(plan.name)
    if same:
        return "shared"
    if plan.dtype in MASKABLE and not any(fnmatch.fnmatchcase(plan.name, g) for g in per_task_globs):
        return "masked"
    return "per_task"


def stored_bytes(inputs: Inputs, plan: TensorPlan) -> int:
    """Bytes a tensor may take before compression (its weight when shards are balanced), from metadata:
    a differing float counts as masked (θ0 + F32 τ + one bit per task), other tensors as one copy
    (per_task: every copy), aliases as nothing."""
    if plan.role == "alias":
        return 0
    if plan.role == "per_task":
        return sum(math.prod(ck.info(plan.name)[1]) * by_name(ck.info(plan.name)[0]).itemsize
                   for ck in inputs.holders(plan.name))
    n = plan.numel
    own = n * by_name(plan.dtype).itemsize
    return own + 4 * n + len(inputs.cks) * ((n + 7) // 8) if plan.dtype in MASKABLE else own


def group_into_shards(plans: Sequence[TensorPlan], sizes: Sequence[int], *, shards: int | None = None,
                      max_shard_size: int | None = None) -> list[list[TensorPlan]]:
    """Contiguous runs of the archive order (the one planner, :func:`tallfmt.format.planner.plan_shards`)
    in which each alias travels with its target; inside a shard tensors keep their archive order.

        >>> ps = [TensorPlan(n, "masked") for n in "abcd"]
        >>> [[p.name for p in s] for s in group_into_shards(ps, [4, 1, 1, 4], shards=2)]
        [['a', 'b'], ['c', 'd']]
    """
    groups: list[list[int]] = []
    group_of: dict[str, int] = {}
    for i, p in enumerate(plans):
        if p.role == "alias" and p.target in group_of:
            groups[group_of[p.target]].append(i)
        else:
            group_of[p.name] = len(groups)
            groups.append([i])
    runs = plan_shards([sum(sizes[i] for i in g) for g in groups], shards=shards, max_shard_size=max_shard_size)
    return [[plans[i] for i in sorted(i for g in groups[r.start:r.stop] for i in g)] for r in runs]
