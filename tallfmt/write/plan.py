"""Plans: which role each tensor gets (FORMAT.md §2), decided from metadata first and from bytes
where metadata cannot tell. A plan is an immutable value, so the driver can ship it to workers and
take back the roles they decide."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tallfmt.compute.tensors import to_numpy
from tallfmt.errors import InputError
from tallfmt.format.dtypes import MASKABLE, by_name
from tallfmt.format.header import MAX_TENSORS, name_refusal, shape_refusal
from tallfmt.format.planner import plan_shards
from tallfmt.write.inputs import Inputs, flat

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
    plans = []
    for n in names:
        base_info = inputs.base.info(n) if n in inputs.base_names else None
        task_infos = [ck.info(n) if n in names_ else None for ck, names_ in zip(inputs.cks, inputs.task_name_sets)]
        check_tensor(n, inputs, base_info, task_infos)
        if base_info is not None and all(i == base_info for i in task_infos):
            plans.append(TensorPlan(n, COMMON, *base_info))
        else:
            plans.append(TensorPlan(n, "per_task"))
    plans = _find_aliases(plans, inputs)
    bad = [p.name for p in plans if p.role == "per_task"]
    if bad and mismatch == "error":
        raise InputError(mismatch_message(inputs, bad, len(plans)))
    return plans


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


def _infos(inputs: Inputs, name: str) -> list[tuple | None]:
    """(dtype, shape) of ``name`` in θ0 and each task, None where absent."""
    return [ck.info(name) if name in names else None
            for ck, names in zip(inputs.all, [inputs.base_names, *inputs.task_name_sets])]


def _prefix_map_hint(inputs: Inputs, only_base: list[str], only_tasks: list[str]) -> tuple[str, str] | None:
    """(OLD, NEW) such that renaming θ0's names OLD… → NEW… explains most names that only θ0 or only
    the tasks have (a ``bert.``-style prefix), or None."""
    task_names = set().union(*inputs.task_name_sets) if inputs.task_name_sets else set()
    votes: dict[tuple[str, str], int] = {}
    for names, other, add in ((only_tasks, inputs.base_names, True), (only_base, task_names, False)):
        for n in names:
            for k in range(1, len(n)):
                if n[k - 1] == "." and n[k:] in other:
                    key = ("", n[:k]) if add else (n[:k], "")
                    votes[key] = votes.get(key, 0) + 1
                    break
    if not votes:
        return None
    best, count = max(votes.items(), key=lambda kv: kv[1])
    return best if count * 2 >= max(len(only_base), len(only_tasks)) else None


def mismatch_message(inputs: Inputs, bad: list[str], total: int) -> str:
    """Why tensors cannot be planned as one model's (which kind of mismatch: dtype, shape, missing or
    extra names, a different architecture) and the option that fits."""
    kinds: dict[str, list[str]] = {"dtype": [], "shape": [], "missing": [], "extra": []}
    only_base, only_tasks = [], []
    for n in bad:
        infos = _infos(inputs, n)
        present = [i for i in infos if i is not None]
        if infos[0] is None:
            kinds["extra"].append(n)
            only_tasks.append(n)
        elif any(i is None for i in infos[1:]):
            kinds["missing"].append(n)
            if all(i is None for i in infos[1:]):
                only_base.append(n)
        elif len({i[1] for i in present}) > 1:
            kinds["shape"].append(n)
        else:
            kinds["dtype"].append(n)
    labels = {"dtype": "differ in dtype", "shape": "differ in shape", "missing": "are missing from some tasks",
              "extra": "are not in the base"}
    parts = [f"{len(ns)} {labels[k]}: {_describe(ns)}, e.g. {_mismatch_reason(ns[0], inputs)}"
             for k, ns in kinds.items() if ns]
    text = f"tensors differ between the base and the tasks: {'; '.join(parts)}"
    prefix = _prefix_map_hint(inputs, only_base, only_tasks)
    hints = []
    if prefix is not None:
        old, new = prefix
        hints.append(f"the names differ by a prefix: rename θ0's with prefix_map={{{old!r}: {new!r}}} "
                     f"(CLI: --prefix-map {old}={new})")
    elif len(bad) * 2 > total:
        hints.append(f"most tensors differ ({len(bad)} of {total}): are these fine-tunes of one base model, or "
                     f"different architectures?")
    if kinds["dtype"]:
        target = _dtype_hint(inputs)
        hints.append(f"cast every float tensor to one storage dtype with dtype={target!r} (CLI: --dtype "
                     f"{target.lower()}); storing them per task would lose their compression")
    if prefix is None and (kinds["shape"] or kinds["missing"] or kinds["extra"]):
        hints.append("store them per task with mismatch='per_task' (CLI: --mismatch per_task): heads and "
                     "adapters stay per task, the other tensors are still masked")
    return f"{text}. " + "; ".join(hints)


def _dtype_hint(inputs: Inputs) -> str:
    """The float dtype most of θ0's parameters have (F32, F16 or BF16)."""
    count: dict[str, int] = {}
    for n in inputs.base_names:
        dt, shape = inputs.base.info(n)
        if dt in MASKABLE:
            count[dt] = count.get(dt, 0) + math.prod(shape)
    return max(count, key=lambda d: count[d]) if count else "BF16"


def _mismatch_reason(name: str, inputs: Inputs) -> str:
    """Which checkpoint differs from θ0 for one tensor, e.g. "'w' is F16 [3, 5] in x.safetensors, F32 [3, 5]
    in the base"."""
    def show(info: tuple | None) -> str:
        return "missing" if info is None else f"{info[0]} {list(info[1])}"
    infos = _infos(inputs, name)
    base_info, base = infos[0], inputs.base
    for ck, info in zip(inputs.cks, infos[1:]):
        if info != base_info:
            return f"{name!r} is {show(info)} in {ck.source}, {show(base_info)} in the base {base.source}"
    return f"{name!r} is {show(base_info)} in the base {base.source}"


def _find_aliases(plans: list[TensorPlan], inputs: Inputs) -> list[TensorPlan]:
    """Tensors that share storage with an earlier one in every checkpoint become aliases (metadata
    only: storage keys), so a sharded encode keeps aliases with their targets. So does a tied copy
    that some checkpoints leave out (save_pretrained drops tied weights, torch.save keeps them): in
    every checkpoint that has it, it shares storage with the same common tensor."""
    by_key: dict[tuple, str] = {}
    first: list[dict[object, str]] = [{} for _ in inputs.all]  # per checkpoint: storage key -> first name
    out = []
    for p in plans:
        if p.role == COMMON:
            keys = tuple(ck.storage_key(p.name) for ck in inputs.all)
            for f, k in zip(first, keys):
                if k is not None:
                    f.setdefault(k, p.name)
            if all(k is not None for k in keys):
                if keys in by_key:
                    p = replace(p, role="alias", target=by_key[keys])
                else:
                    by_key[keys] = p.name
        out.append(p)
    roles = {p.name: p for p in out}
    for i, p in enumerate(out):
        if p.role == "per_task":
            target = _tied_target(p.name, inputs, first)
            if target is not None and roles[target].role in (COMMON, "alias"):
                t = roles[target]
                t = roles[t.target] if t.role == "alias" else t
                out[i] = TensorPlan(p.name, "alias", t.dtype, t.shape, target=t.name)
    return out


def _tied_target(name: str, inputs: Inputs, first: list[dict[object, str]]) -> str | None:
    """The one tensor ``name`` shares storage with in every checkpoint that holds it, or None."""
    targets = set()
    for ck, names, f in zip(inputs.all, [inputs.base_names, *inputs.task_name_sets], first):
        if name in names:
            k = ck.storage_key(name)
            t = f.get(k) if k is not None else None
            if t is None or t == name or ck.info(t) != ck.info(name):
                return None
            targets.add(t)
    return targets.pop() if len(targets) == 1 else None


def decide_role(inputs: Inputs, plan: TensorPlan, per_task_globs: Sequence[str]) -> str:
    """The role of a common tensor from its bytes: shared (equal bit for bit in θ0 and every task),
    masked (a float that differs, unless its name matches a per-task glob) or per_task."""
    b = to_numpy(flat(inputs.base, plan.name)).view(np.uint8)  # numpy: a plain memcmp, no torch threads
    same = all(np.array_equal(b, to_numpy(flat(ck, plan.name)).view(np.uint8)) for ck in inputs.cks)
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
