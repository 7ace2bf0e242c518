"""Summaries and tables of an archive, shared by the CLI, the demo and the benchmarks: sizes per part,
ratios against the raw collection and the paper's storage formula, the mask agreement histogram and
its plot. Header-only: nothing here imports torch."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tallfmt.errors import InputError
from tallfmt.format.atomic import write_atomic
from tallfmt.format.dtypes import by_name
from tallfmt.write.report import RoleSummary, archive_warnings

if TYPE_CHECKING:
    from tallfmt.read.archive import Archive


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")



def plural(n: int, word: str) -> str:
    """'1 task', '3 tasks'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def text_table(rows: list[list[str]], align: str) -> list[str]:
    """Rows of cells as aligned text lines; ``align`` has one 'l' or 'r' per column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(align))]
    return ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()
            for r in rows]



# ----------------------------------------------------------------------------------------------
# The size arithmetic behind `info` (text and --json) and the demo


def summary(zoo: Archive) -> dict[str, Any]:
    """Everything `tallfmt info` shows, as plain JSON-ready data.

    Raw collection = θ0 and the T checkpoints stored as plain tensors: (T+1)·n·itemsize for masked
    and shared tensors, each per-task copy at its own size, aliases nothing (tied storage). Paper
    formula (TALL-masks appendix C, assumes 32-bit floats) = (64+T)·P' + 32·F bits, P' masked and F
    shared parameters; per-task tensors are added at their raw size on both sides.
    """
    header = zoo.header
    T = len(zoo.tasks)
    roles = {r: {"tensors": 0, "params": 0} for r in ("masked", "shared", "per_task", "alias")}
    raw = per_task_raw = 0
    for e in header.tensors:
        roles[e.role]["tensors"] += 1
        if e.role in ("masked", "shared"):
            roles[e.role]["params"] += e.numel
            raw += (T + 1) * e.numel * by_name(e.dtype).itemsize
        elif e.role == "per_task":
            # θ0's copy counts as the model's parameters; every copy counts in the raw collection.
            roles["per_task"]["params"] += e.base_item.numel if e.base_item is not None else 0
            per_task_raw += sum(it.data.decoded_length for it in (e.base_item, *e.task_items) if it is not None)
    raw += per_task_raw
    p_masked, p_shared = roles["masked"]["params"], roles["shared"]["params"]
    params = p_masked + p_shared + roles["per_task"]["params"]
    paper_bits = (64 + T) * p_masked + 32 * p_shared
    paper = math.ceil(paper_bits / 8) + per_task_raw
    sizes = zoo.sizes()
    total = sizes["total"]
    tasks = []
    for t in zoo.tasks:
        info = zoo.task_info(t)
        res = zoo.residual_info(t)
        tasks.append({"name": t, "lambda": info.get("lambda"), "mask_density": info.get("mask_density"),
                      "rel_error": info.get("rel_error"), "cosine": info.get("cosine"),
                      "rel_error_mask": info.get("rel_error_mask", info.get("rel_error")),
                      "residual_entries": res["entries"], "residual_bytes": res["bytes"]})
    files = header.files
    return {
        "path": str(zoo.path),
        "format_version": list(header.version),
        "num_tasks": T,
        "shards": len(zoo.shards) if zoo.index is not None else None,
        "tasks": tasks,
        "encoding": header.encoding,
        "external_base": None if not header.external_base else {
            "tensors": sum(1 for e in header.tensors for _ in e.base_refs()),
            "bytes": sum(r.decoded_length for e in header.tensors for r, _, _ in e.base_refs())},
        "roles": roles,
        "params": {"masked": p_masked, "shared": p_shared, "per_task": roles["per_task"]["params"],
                   "total": params},
        "bytes": sizes,
        "codecs": part_codecs(zoo),
        "bits_per_param": 8 * total / params if params else None,
        "raw_collection": {"bytes": raw, "bits_per_param": 8 * raw / params if params else None,
                           "ratio": raw / total if total else None},
        "paper_formula": {"bytes": paper, "bits": paper_bits, "assumes": "32-bit floats",
                          "formula": "(64+T)*P' + 32*F bits, + per-task tensors raw",
                          "ratio": paper / total if total else None},
        "metadata": dict(header.metadata),
        "files": None if files is None else {
            "distinct": len(files.blobs), "bytes": files.content_bytes, "stored_bytes": files.stored_bytes,
            "base": files.names(None), "tasks": {t: files.names(i) for i, t in enumerate(zoo.tasks)}},
        "warnings": archive_warnings(RoleSummary.of(header.tensors), {t["name"]: t for t in tasks}),
    }


def part_codecs(zoo: Archive) -> dict[str, list[str]]:
    """The segment codecs each stored part uses (θ0, τ_MTL, masks, shared and per-task tensors)."""
    found: dict[str, set[str]] = {k: set() for k in ("theta0", "tau", "masks", "residuals", "shared", "per_task")}
    for e in zoo.header.tensors:
        if e.role == "masked":
            found["theta0"].update(s.codec for s, kind in e.parts() if s is e.base)
            found["tau"].add(e.tau.codec)
            found["masks"].update(m.codec for m in e.masks)
            found["residuals"].update(s.codec for r in e.residuals if r is not None for s in (r.positions, r.values))
        elif e.role in ("shared", "per_task"):
            found[e.role].update(s.codec for s in e.segments())
    return {k: sorted(v) for k, v in found.items()}


_PART_LABELS = (("theta0", "θ0 (masked tensors)"), ("tau", "τ_MTL"), ("masks", "masks"),
                ("residuals", "residuals"), ("shared", "shared tensors"), ("per_task", "per-task tensors"), ("header", "header + preamble"),
                ("padding", "alignment padding"))


def format_summary(s: dict[str, Any]) -> str:
    """The text form of :func:`summary`."""
    T = s["num_tasks"]
    enc = s["encoding"]
    merge = enc["merge"]["method"] + ("" if enc["merge"]["method"] != "ties" else
                                      f" (density {enc['merge']['density']}, {enc['merge']['agg']}, "
                                      f"{enc['merge']['scope']})")
    mask = enc["mask"]["method"] + ("" if enc["mask"]["method"] != "magnitude" else
                                    f" (density {enc['mask']['density']}, {enc['mask']['scope']})")
    tau_dtype = f", stored in {enc['tau_dtype']} (lossy)" if enc.get("tau_dtype", "F32") != "F32" else ""
    total = s["bytes"]["total"]
    shards = f", {s['shards']} shards" if s["shards"] else ""
    out = [f"{s['path']}: {human_bytes(total)}, tallfmt format {'.'.join(map(str, s['format_version']))}, "
           f"{T} task{'s' if T != 1 else ''}{shards}",
           f"τ_MTL: {merge}{tau_dtype}; masks: {mask}"]
    ext = s.get("external_base")
    if ext is not None:
        out.append(f"θ0: external, not stored ({plural(ext['tensors'], 'tensor')}, {human_bytes(ext['bytes'])}; "
                   f"decode and merge need the base: tallfmt.open(path, base=...), CLI --base PATH)")
    out.append("")
    residual = any(t["residual_entries"] for t in s["tasks"])
    rows = [["task", "λ", "mask density", "rel error", "cosine"] + (
        ["residual entries", "residual bytes", "rel error without"] if residual else [])]
    rows += [[t["name"], _num(t["lambda"], ".2f"), pct(t["mask_density"]), _num(t["rel_error"]),
              _num(t["cosine"], ".4f")] + ([f"{t['residual_entries']:,}", human_bytes(t["residual_bytes"]),
                                            _num(t["rel_error_mask"])] if residual else []) for t in s["tasks"]]
    out += text_table(rows, "lrrrr" + ("rrr" if residual else ""))
    out.append("  (rel error ‖θ̂_t − θ_t‖/‖τ_t‖ and cosine(m_t∘τ_MTL, τ_t) were measured at encode time"
               + ("; rel error with the task's residual, and without it" if residual else "") + ")")
    out.append("")
    rows = [["tensor role", "tensors", "parameters"]]
    rows += [[r, f"{v['tensors']:,}", f"{v['params']:,}" if r != "alias" else "(tied to their targets)"]
             for r, v in s["roles"].items()]
    out += text_table(rows, "lrr")
    out.append("")
    rows = [["stored part", "bytes", "share", "codec"]]
    rows += [[label, human_bytes(s["bytes"][k]), pct(s["bytes"][k] / total if total else None),
              ", ".join(s["codecs"].get(k, []))] for k, label in _PART_LABELS]
    rows.append(["total", human_bytes(total), "", ""])
    out += text_table(rows, "lrrl")
    out.append("")
    raw, paper = s["raw_collection"], s["paper_formula"]
    if s["bits_per_param"] is not None:
        out.append(f"bits per parameter: {s['bits_per_param']:.2f} "
                   f"(raw collection: {raw['bits_per_param']:.2f}; {s['params']['total']:,} parameters per model)")
    out.append(f"vs the raw collection (θ0 + {T} checkpoints, {human_bytes(raw['bytes'])}): {_ratio(raw['ratio'])}")
    out.append(f"vs the paper's storage formula (64+T)·P' + 32·F bits = {human_bytes(paper['bytes'])} "
               f"(appendix C; assumes 32-bit floats): {_ratio(paper['ratio'])}")
    if s["metadata"]:
        out.append("")
        out.append("metadata: " + ", ".join(f"{k}={v}" for k, v in s["metadata"].items()))
    if s["files"]:
        f = s["files"]
        out += ["", f"files: {plural(f['distinct'], 'distinct file')}, {human_bytes(f['bytes'])} "
                    f"({human_bytes(f['stored_bytes'])} in the header), written by decode and merge to a folder"]
        groups: dict[tuple[str, ...], list[str]] = {}
        for who, names in [("θ0", f["base"]), *f["tasks"].items()]:
            groups.setdefault(tuple(names), []).append(who)
        for names, who in groups.items():
            out.append(f"  {', '.join(who)}: {', '.join(names) or '(none)'}")
    return "\n".join(out)


def _ratio(r: float | None) -> str:
    if not r:
        return "-"
    return f"{r:.2f}× smaller" if r >= 1 else f"{1 / r:.2f}× larger"


# ----------------------------------------------------------------------------------------------
# Agreement statistics (paper eq. 7, Fig. 3)


def agreement_kind(n: int, num_tasks: int) -> str:
    """The paper's name for parameters kept by exactly n of T masks."""
    if n == 0:
        return "catastrophic"
    if n == num_tasks:
        return "universal"
    return "selfish" if n == 1 else "general"


def agreement_table(counts: list[int]) -> list[dict[str, Any]]:
    """Rows n, kind, params, fraction, and the fraction kept by consensus with k = n (kept by ≥ n)."""
    T = len(counts) - 1
    total = sum(counts)
    rows, at_least = [], total
    for n, c in enumerate(counts):
        rows.append({"n": n, "kind": agreement_kind(n, T), "params": c,
                     "fraction": c / total if total else 0.0,
                     "kept_by_consensus_k": at_least / total if total else 0.0})
        at_least -= c
    return rows


def check_plot_path(path: Path, overwrite: bool) -> str:
    """The image format an agreement plot at ``path`` is written in (its suffix; PNG without one),
    after refusing, as one InputError each: no matplotlib, a format it cannot write, a missing
    folder, an existing file without ``overwrite``."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'tallfmt[plot]'") from None
    fmt = path.suffix.lower().lstrip(".") or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise InputError(f"{path}: cannot draw a {path.suffix!r} image; name a file ending in one of "
                         f"{', '.join('.' + k for k in sorted(known))}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (pass --force to replace it)")
    return fmt


def plot_agreement(path: Path, title: str, rows: list[dict[str, Any]], tasks: list[dict[str, Any]],
                   fmt: str | None = None, overwrite: bool = False) -> None:
    """Draw the agreement histogram and per-task mask density into exactly ``path`` (atomically), in
    ``fmt`` (default: :func:`check_plot_path`'s choice)."""
    fmt = fmt or check_plot_path(path, overwrite)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colors = {"catastrophic": "#c0392b", "selfish": "#e67e22", "general": "#2e86c1", "universal": "#27ae60"}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    ax1.bar([r["n"] for r in rows], [100 * r["fraction"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax1.set_xticks([r["n"] for r in rows])
    ax1.set_xlabel("n = number of task masks that keep the parameter")
    ax1.set_ylabel("% of masked parameters")
    ax1.set_title("mask agreement (TALL-masks eq. 7)")
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    ax1.legend(handles=[Patch(color=colors[k], label=k) for k in kinds], frameon=False)
    names = [t["name"] for t in tasks]
    dens = [100 * (t["mask_density"] or 0.0) for t in tasks]
    ax2.barh(range(len(names)), dens, color="#7f8c8d")
    ax2.set_yticks(range(len(names)), labels=names)
    ax2.invert_yaxis()
    ax2.set_xlabel("% of masked parameters kept")
    ax2.set_title("mask density per task")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    write_atomic(path, buf.getvalue())
