"""The ``tallfmt`` command line: encode, info, decode, merge, verify, stats and demo.

    tallfmt encode base.safetensors sst2.safetensors mnli.safetensors -o zoo.tall
    tallfmt info zoo.tall [--json]
    tallfmt decode zoo.tall sst2 -o sst2.safetensors
    tallfmt merge zoo.tall --method consensus --k 2 --alpha 0.4 -o merged.safetensors
    tallfmt verify zoo.tall
    tallfmt stats zoo.tall --plot agreement.png
    tallfmt demo

Errors that tallfmt raises on purpose (``TallError``) and OS errors print one line,
``tallfmt: error: ...``, on stderr and exit with code 1; usage errors exit with 2 (click's
convention). ``tallfmt --debug ...`` adds the traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tallfmt import __version__
from tallfmt.errors import TallError

if TYPE_CHECKING:  # torch-heavy modules load only when a command needs them
    from tallfmt.archive import Archive

CODEC_CHOICES = ("auto", "raw", "zstd", "byteplane-zstd")
MERGE_CHOICES = ("consensus", "task_arithmetic", "zeroshot")
# File names that say nothing about the task: the folder they sit in names it instead.
GENERIC_STEMS = {"model", "pytorch_model", "adapter_model", "diffusion_pytorch_model"}


# ----------------------------------------------------------------------------------------------
# Errors, output and progress


class CommandError(click.ClickException):
    """A failure reported as one line, ``tallfmt: error: ...``, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"tallfmt: error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns TallError and OSError raised by any command into one line on stderr (exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # `tallfmt info zoo.tall | head`: the reader left; say nothing more (Python's recommended way).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        except (TallError, OSError) as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            msg = str(exc) if isinstance(exc, TallError) else f"{type(exc).__name__}: {exc}"
            raise CommandError(msg or type(exc).__name__) from exc


@dataclass
class _Settings:
    quiet: bool
    debug: bool


def _settings() -> _Settings:
    return click.get_current_context().find_object(_Settings) or _Settings(False, False)


def _say(msg: str = "") -> None:
    """Informational output that --quiet silences (info/stats tables are not silenced)."""
    if not _settings().quiet:
        click.echo(msg)


@contextmanager
def progress(total: int | None, desc: str, unit: str = "tensor") -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr when it is a terminal and not --quiet; yields ``update(n)``."""
    show = not _settings().quiet and sys.stderr.isatty()
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MiB or 1000000") from None
    if unit not in _SIZE_UNITS or not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MiB or 1000000")
    return int(value * _SIZE_UNITS[unit])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def text_table(rows: list[list[str]], align: str) -> list[str]:
    """Rows of cells as aligned text lines; ``align`` has one 'l' or 'r' per column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(align))]
    return ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()
            for r in rows]


def _open(path: str | Path) -> Archive:
    import tallfmt

    return tallfmt.open(path)


# ----------------------------------------------------------------------------------------------
# The size arithmetic behind `info` (text and --json) and the demo


def summary(zoo: Archive) -> dict[str, Any]:
    """Everything `tallfmt info` shows, as plain JSON-ready data.

    Raw collection = θ0 and the T checkpoints stored as plain tensors: (T+1)·n·itemsize for masked
    and shared tensors, each per-task copy at its own size, aliases nothing (tied storage). Paper
    formula (TALL-masks appendix C, assumes 32-bit floats) = (64+T)·P' + 32·F bits, P' masked and F
    shared parameters; per-task tensors are added at their raw size on both sides.
    """
    from tallfmt import dtypes

    header = zoo.header
    T = len(zoo.tasks)
    roles = {r: {"tensors": 0, "params": 0} for r in ("masked", "shared", "per_task", "alias")}
    raw = per_task_raw = 0
    for e in header.tensors:
        roles[e.role]["tensors"] += 1
        if e.role in ("masked", "shared"):
            roles[e.role]["params"] += e.numel
            raw += (T + 1) * e.numel * dtypes.by_name(e.dtype).itemsize
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
        tasks.append({"name": t, "lambda": info.get("lambda"), "mask_density": info.get("mask_density"),
                      "rel_error": info.get("rel_error"), "cosine": info.get("cosine")})
    return {
        "path": str(zoo.path),
        "format_version": list(header.version),
        "num_tasks": T,
        "shards": len(zoo.shards) if zoo.index is not None else None,
        "tasks": tasks,
        "encoding": header.encoding,
        "roles": roles,
        "params": {"masked": p_masked, "shared": p_shared, "per_task": roles["per_task"]["params"],
                   "total": params},
        "bytes": sizes,
        "bits_per_param": 8 * total / params if params else None,
        "raw_collection": {"bytes": raw, "bits_per_param": 8 * raw / params if params else None,
                           "ratio": raw / total if total else None},
        "paper_formula": {"bytes": paper, "bits": paper_bits, "assumes": "32-bit floats",
                          "formula": "(64+T)*P' + 32*F bits, + per-task tensors raw",
                          "ratio": paper / total if total else None},
        "metadata": dict(header.metadata),
    }


_PART_LABELS = (("theta0", "θ0 (masked tensors)"), ("tau", "τ_MTL"), ("masks", "masks"),
                ("shared", "shared tensors"), ("per_task", "per-task tensors"), ("header", "header + preamble"),
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
    total = s["bytes"]["total"]
    shards = f", {s['shards']} shards" if s["shards"] else ""
    out = [f"{s['path']}: {human_bytes(total)}, tallfmt format {'.'.join(map(str, s['format_version']))}, "
           f"{T} task{'s' if T != 1 else ''}{shards}",
           f"τ_MTL: {merge}; masks: {mask}", ""]
    rows = [["task", "λ", "mask density", "rel error", "cosine"]]
    rows += [[t["name"], _num(t["lambda"], ".2f"), _pct(t["mask_density"]), _num(t["rel_error"]),
              _num(t["cosine"], ".4f")] for t in s["tasks"]]
    out += text_table(rows, "lrrrr")
    out.append("  (rel error ‖θ̂_t − θ_t‖/‖τ_t‖ and cosine(m_t∘τ_MTL, τ_t) were measured at encode time)")
    out.append("")
    rows = [["tensor role", "tensors", "parameters"]]
    rows += [[r, f"{v['tensors']:,}", f"{v['params']:,}" if r != "alias" else "(tied to their targets)"]
             for r, v in s["roles"].items()]
    out += text_table(rows, "lrr")
    out.append("")
    rows = [["stored part", "bytes", "share"]]
    rows += [[label, human_bytes(s["bytes"][k]), _pct(s["bytes"][k] / total if total else None)]
             for k, label in _PART_LABELS]
    rows.append(["total", human_bytes(total), ""])
    out += text_table(rows, "lrr")
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


def _plot(path: Path, title: str, rows: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'tallfmt[plot]'") from None
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
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no informational messages.")
@click.version_option(__version__, prog_name="tallfmt")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """tallfmt: one compressed .tall archive for many fine-tunes of one base model (TALL-masks).

    ARCHIVE is a .tall file, or the folder (or tall.index.json) of a sharded archive.
    """
    ctx.obj = _Settings(quiet=quiet, debug=debug)


def task_name_of(source: str) -> str:
    """A task's default name: the file's stem, or the folder's name (also for model.safetensors)."""
    p = Path(source)
    if p.is_dir():
        return p.resolve().name
    stem = p.name.split(".")[0] if p.name.endswith(".safetensors") else p.stem
    return p.resolve().parent.name if stem in GENERIC_STEMS else stem


def _parse_lambdas(values: tuple[str, ...], tasks: list[str]) -> float | dict[str, float]:
    default: float | None = None
    per_task: dict[str, float] = {}
    for v in values:
        key, sep, num = v.rpartition("=")
        try:
            x = float(num)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected a number (0.4) or task=number (sst2=0.3)",
                                     param_hint="--lambda") from None
        if not sep:
            if default is not None:
                raise click.BadParameter("give one plain number at most; name tasks as task=0.3",
                                         param_hint="--lambda")
            default = x
        elif key not in tasks:
            raise click.BadParameter(f"no task {key!r}; tasks are {', '.join(tasks)}", param_hint="--lambda")
        else:
            per_task[key] = x
    if not per_task:
        return 0.4 if default is None else default
    return {t: per_task.get(t, 0.4 if default is None else default) for t in tasks}


def _parse_metadata(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{v!r}: expected key=value", param_hint="--metadata")
        out[k] = val
    return out


def _count_tensors(source: str) -> int | None:
    try:
        from tallfmt.checkpoints import open_checkpoint

        with open_checkpoint(source) as ck:
            return len(ck.names())
    except TallError:
        return None  # encode itself reports the problem


@cli.command(short_help="Encode θ0 and its fine-tunes into one archive.")
@click.argument("base")
@click.argument("finetunes", nargs=-1, required=True, metavar="FT [FT ...]")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The .tall file to write (a folder with --shards/--max-shard-size).")
@click.option("--name", "names", multiple=True,
              help="Task name, once per FT in order (default: each file's stem or folder's name).")
@click.option("--merge", type=click.Choice(["task_arithmetic", "ties"]), default="task_arithmetic",
              show_default=True, help="How τ_MTL is made.")
@click.option("--ties-density", type=float, default=0.2, show_default=True, help="TIES: fraction kept per task.")
@click.option("--ties-agg", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="TIES: disjoint sum (the paper's masks) or mean.")
@click.option("--ties-scope", type=click.Choice(["global", "per_tensor"]), default="global", show_default=True,
              help="TIES: trim over all parameters (paper) or per tensor (mergekit).")
@click.option("--lambda", "lambdas", multiple=True, metavar="X | TASK=X",
              help="TALL mask λ: one number for every task (default 0.4) and/or task=number, repeatable.")
@click.option("--mask", "mask_method", type=click.Choice(["tall", "magnitude"]), default="tall",
              show_default=True, help="Mask rule: TALL (eq. 5) or the paper's magnitude baseline.")
@click.option("--mask-density", type=float, default=0.1, show_default=True,
              help="Magnitude masks: fraction of |τ_t| kept per task.")
@click.option("--codec", type=click.Choice(CODEC_CHOICES), default="auto", show_default=True,
              help="Segment codec (auto: byteplane-zstd for floats, zstd for masks).")
@click.option("--device", default=None, help="torch device for the mask math, e.g. cuda:0 (default cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads for the mask math (default: torch's; 1 is faster when the cores are busy).")
@click.option("--mismatch", type=click.Choice(["error", "per_task"]), default="error", show_default=True,
              help="Tensors whose presence/dtype/shape differ between checkpoints: refuse, or store per task.")
@click.option("--per-task", "per_task", multiple=True, metavar="GLOB",
              help="Float tensors named like GLOB are stored verbatim per task when they differ, repeatable "
                   "(default: batch-norm running statistics; --per-task '' for none).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Free metadata, repeatable.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Write a sharded archive: OUTPUT becomes a folder of N shard files + tall.index.json.")
@click.option("--max-shard-size", default=None, help="Sharded archive: shards of at most this size, e.g. 2GB.")
@click.option("--dask-scheduler", "--scheduler", "scheduler", default=None, help="Sharded archive: a Dask scheduler address to run the shards on.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def encode(base: str, finetunes: tuple[str, ...], output: str, names: tuple[str, ...], merge: str,
           ties_density: float, ties_agg: str, ties_scope: str, lambdas: tuple[str, ...], mask_method: str,
           mask_density: float, codec: str, device: str | None, threads: int | None, mismatch: str,
           per_task: tuple[str, ...],
           metadata: tuple[str, ...], shards: int | None, max_shard_size: str | None, scheduler: str | None, force: bool) -> None:
    """Encode BASE (θ0) and its fine-tunes FT ... into one .tall archive.

    Each of BASE and FT is a .safetensors file, a folder with model.safetensors or a sharded
    model.safetensors.index.json, or a .bin/.pt file.
    """
    if names and len(names) != len(finetunes):
        raise click.BadParameter(f"got {len(names)} names for {len(finetunes)} fine-tunes", param_hint="--name")
    tasks = list(names) if names else [task_name_of(f) for f in finetunes]
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise click.UsageError(f"task names repeat ({', '.join(dupes)}); name the tasks with --name, once per FT")
    out = Path(output)
    if out.exists() and not force:
        raise CommandError(f"{out} exists; pass --force to overwrite it")
    lam = _parse_lambdas(lambdas, tasks)
    meta = _parse_metadata(metadata)
    shard_size = parse_size(max_shard_size) if max_shard_size is not None else None
    import tallfmt
    from tallfmt.codec import DEFAULT_PER_TASK

    patterns = tuple(p for p in per_task if p) if per_task else DEFAULT_PER_TASK
    total = _count_tensors(base) if sys.stderr.isatty() and not _settings().quiet else None
    with progress(total, "encode") as update:
        report = tallfmt.encode(base, dict(zip(tasks, finetunes)), out, merge=merge, lambdas=lam,
                                ties_density=ties_density, ties_agg=ties_agg, ties_scope=ties_scope,
                                mask_method=mask_method, mask_density=mask_density, codec=codec,
                                device=device, threads=threads, mismatch=mismatch, per_task=patterns,
                                metadata=meta,
                                overwrite=force,
                                progress=update, shards=shards, max_shard_size=shard_size, scheduler=scheduler)
    roles = ", ".join(f"{n} {r}" for r, n in report.roles.items())
    _say(f"{report.path}: {len(report.tasks)} tasks ({', '.join(report.tasks)}), {roles} tensors")
    _say(f"{human_bytes(report.input_bytes)} of checkpoints → {human_bytes(report.archive_bytes)} "
         f"({report.ratio:.2f}× smaller) in {report.seconds:.1f} s")
    _say(f"see `tallfmt info {out}` for the breakdown")


@cli.command(short_help="Tasks, roles, sizes and ratios of an archive.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(archive: str, as_json: bool) -> None:
    """Tasks, tensor roles, bytes per part and compression ratios of ARCHIVE."""
    with _open(archive) as zoo:
        s = summary(zoo)
    click.echo(json.dumps(s, indent=2, ensure_ascii=False) if as_json else format_summary(s))


def _refuse_existing(out: Path, force: bool) -> None:
    """decode/merge outputs: refuse to replace a model file (or a folder holding one) without --force."""
    if force or not out.exists():
        return
    if out.is_dir():
        if any(out.glob("*.safetensors")) or (out / "model.safetensors.index.json").exists():
            raise CommandError(f"{out} already holds a model; pass --force to overwrite it")
        return
    raise CommandError(f"{out} exists; pass --force to overwrite it")


@contextmanager
def _counting(zoo: Archive, method: str, desc: str, total: int) -> Iterator[None]:
    """A progress bar over the tensors ``zoo.<method>`` yields (decode_to/merge_to stream through it)."""
    with progress(total, desc) as update:
        inner = getattr(zoo, method)

        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for item in inner(*args, **kwargs):
                update(1)
                yield item

        setattr(zoo, method, counted)
        try:
            yield
        finally:
            delattr(zoo, method)


def _written(files: list[Path]) -> str:
    size = sum(f.stat().st_size for f in files)
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
    return f"{where} ({human_bytes(size)})"


@cli.command(short_help="Write one task's model.")
@click.argument("archive", type=click.Path(exists=False))
@click.argument("task")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="A .safetensors file, or a folder (HF-style, sharded above --max-shard-size).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Folder output: largest shard.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def decode(archive: str, task: str, output: str, max_shard_size: str, force: bool) -> None:
    """Write TASK's model, θ0 + m_t ∘ τ_MTL, from ARCHIVE to OUTPUT."""
    out = Path(output)
    shard = parse_size(max_shard_size)
    _refuse_existing(out, force)
    with _open(archive) as zoo:
        zoo.task_info(task)  # an unknown task fails here, before anything is written
        with _counting(zoo, "iter_decode", f"decode {task}", len(zoo.header.tensors)):
            files = zoo.decode_to(task, out, max_shard_size=shard)
    _say(f"{task}: wrote {_written(files)}")


@cli.command(short_help="Write one merged multi-task model.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--method", type=click.Choice(MERGE_CHOICES), default="consensus", show_default=True,
              help="consensus: θ0 + α·(1{Σ m_t ≥ k} ∘ τ_MTL); task_arithmetic: θ0 + α·τ_MTL; zeroshot: θ0.")
@click.option("--k", type=click.IntRange(min=0), default=None, help="consensus: minimum number of masks [2].")
@click.option("--alpha", type=float, default=None, help="Scale of τ_MTL [0.4].")
@click.option("-o", "--output", required=True, type=click.Path(), help="A .safetensors file or a folder.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Folder output: largest shard.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def merge(archive: str, method: str, k: int | None, alpha: float | None, output: str, max_shard_size: str,
          force: bool) -> None:
    """Write one merged multi-task model from ARCHIVE to OUTPUT."""
    if k is not None and method != "consensus":
        raise click.BadParameter(f"--k applies to --method consensus, not {method}", param_hint="--k")
    if alpha is not None and method == "zeroshot":
        raise click.BadParameter("zeroshot (θ0) takes no --alpha", param_hint="--alpha")
    params = {key: v for key, v in (("k", k), ("alpha", alpha)) if v is not None}
    out = Path(output)
    shard = parse_size(max_shard_size)
    _refuse_existing(out, force)
    with _open(archive) as zoo:
        with _counting(zoo, "iter_merge", f"merge {method}", len(zoo.header.tensors)):
            files = zoo.merge_to(out, method, max_shard_size=shard, **params)
    desc = ", ".join(f"{key}={v}" for key, v in params.items())
    _say(f"{method}{f' ({desc})' if desc else ''}: wrote {_written(files)}")


def _counted_read(read: Callable[..., Any], update: Callable[[int], None]) -> Callable[..., Any]:
    def counted(seg: Any, itemsize: int) -> Any:
        out = read(seg, itemsize)
        update(seg.length)
        return out
    return counted


@cli.command(short_help="Check every checksum and mask of an archive.")
@click.argument("archive", type=click.Path(exists=False))
def verify(archive: str) -> None:
    """Check ARCHIVE's header, every segment's checksum and contents, and every mask; exit 1 if damaged."""
    with _open(archive) as zoo:
        segments = [s for e in zoo.header.tensors for s in e.segments()]
        stored = sum(s.length for s in segments)
        masks = sum(m.length for e in zoo.header.tensors for m in e.masks)  # read twice: checksum, padding
        # Archive.verify has no progress hook: counting each shard's segment reads drives the bar.
        with progress(stored + masks, "verify", unit="B") as update:
            for shard in zoo.shards:
                shard.read = _counted_read(shard.read, update)
            try:
                zoo.verify()
            finally:
                for shard in zoo.shards:
                    del shard.read
    _say(f"{archive}: OK — header, {len(segments):,} segments ({human_bytes(stored)}) and "
         f"{len(zoo.tasks)} tasks' masks checked")


@cli.command(short_help="Mask agreement histogram (paper eq. 7), optionally as a PNG.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG: the agreement histogram and per-task mask density (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(archive: str, plot: str | None, as_json: bool) -> None:
    """Mask agreement of ARCHIVE: parameters kept by exactly n of the T task masks (paper eq. 7, Fig. 3).

    n = 0 catastrophic, n = 1 selfish, 2..T-1 general, n = T universal. Consensus merging with
    threshold k keeps the parameters with n ≥ k.
    """
    with _open(archive) as zoo:
        counts = [int(c) for c in zoo.agreement().tolist()]
        tasks = summary(zoo)["tasks"]
        name = zoo.path.parent.name if zoo.index is not None else zoo.path.name  # a sharded archive's folder
    rows = agreement_table(counts)
    T = len(counts) - 1
    if plot is not None:
        _plot(Path(plot), f"{name}: {T} tasks, {sum(counts):,} masked parameters", rows, tasks)
    if as_json:
        click.echo(json.dumps({"num_tasks": T, "masked_params": sum(counts), "agreement": rows,
                               "mask_density": {t["name"]: t["mask_density"] for t in tasks}}, indent=2))
        return
    lines = [f"{archive}: {sum(counts):,} masked parameters, {T} tasks", ""]
    table = [["n", "kind", "parameters", "fraction", "kept by consensus k=n"]]
    table += [[str(r["n"]), r["kind"], f"{r['params']:,}", _pct(r["fraction"]), _pct(r["kept_by_consensus_k"])]
              for r in rows]
    lines += text_table(table, "rlrrr")
    lines.append("")
    lines += text_table([["task", "mask density"]] + [[t["name"], _pct(t["mask_density"])] for t in tasks], "lr")
    if plot is not None:
        lines += ["", f"plot: {plot}"]
    click.echo("\n".join(lines))


@cli.command(short_help="Build a small real zoo, then encode, decode, merge and verify it.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the zoo, the archive and the decoded models here (default: a temporary folder).")
@click.option("--quick", is_flag=True, help="Three tasks, fewer training texts and a smaller model (for tests).")
@click.option("--synthetic", is_flag=True, help="Use generated text instead of the packaged data sets.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(workdir: str | None, quick: bool, synthetic: bool, seed: int) -> None:
    """Build a small real model zoo, archive it, and get models back: encode → info → decode → merge → verify."""
    from tallfmt.demo import run_demo

    run_demo(workdir=Path(workdir) if workdir else None, quick=quick, synthetic=synthetic, seed=seed)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tallfmt`` console script."""
    cli.main(args=argv, prog_name="tallfmt")


if __name__ == "__main__":
    main()
