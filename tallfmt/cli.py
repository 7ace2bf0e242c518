"""The ``tallfmt`` command line: encode, info, decode, merge, verify, stats and demo.

    tallfmt encode base.safetensors sst2.safetensors mnli.safetensors -o zoo.tall
    tallfmt info zoo.tall [--json]
    tallfmt decode zoo.tall sst2 -o sst2.safetensors
    tallfmt decode zoo.tall sst2 mnli qqp -o models/          # models/sst2/, models/mnli/, models/qqp/
    tallfmt merge zoo.tall --merge consensus --k 2 --alpha 0.4 -o merged.safetensors
    tallfmt verify zoo.tall
    tallfmt stats zoo.tall --plot agreement.png
    tallfmt demo

Errors that tallfmt raises on purpose (``TallError``) and OS errors print one line,
``tallfmt: error: ...``, on stderr and exit with code 1; usage errors exit with 2 (click's
convention); Ctrl-C exits with 130 (outputs are written whole or not at all). tallfmt's own warnings
(``TallWarning``) print one line each, ``tallfmt: warning: ...``; other libraries' warnings are shown
only with ``--debug``, which also adds the traceback of an error. ``--quiet`` and ``--debug`` go
before or after the command's name.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tallfmt import __version__
from tallfmt.errors import TallError, TallWarning
from tallfmt.format import codecs
from tallfmt.format.header import MASK_METHODS, MERGE_METHODS, TAU_DTYPES
from tallfmt.format.jsonio import is_text
from tallfmt.format.outputs import MAX_SHARD_SIZE
from tallfmt.read.merges import DEFAULT_MERGE, DEFAULT_PER_TASK, MERGES, PER_TASK_POLICIES
from tallfmt.summary import (agreement_table, check_plot_path, format_summary, human_bytes, pct, plot_agreement,
                             plural, summary, text_table)
from tallfmt.write.options import CAST_DTYPES, DEFAULTS, MISMATCH, SCOPES, TIES_AGGS

if TYPE_CHECKING:
    from tallfmt.read.archive import Archive

#: Entry-point groups whose objects are registered before a command runs (codecs, merge methods).
PLUGIN_GROUPS = ("tallfmt.codecs", "tallfmt.merges")
# File names that say nothing about the task: the folder they sit in names it instead.
GENERIC_STEMS = {"model", "pytorch_model", "adapter_model", "diffusion_pytorch_model"}


# ----------------------------------------------------------------------------------------------
# Errors, output and progress


def echo(text: str, err: bool = False) -> None:
    """click.echo that never fails on text that is not Unicode (a path whose bytes are not UTF-8 comes
    in as lone surrogates): those are shown as backslash escapes."""
    click.echo(text.encode("utf-8", "backslashreplace").decode("utf-8"), err=err)


class CommandError(click.ClickException):
    """A failure reported as one line, ``tallfmt: error: ...``, exit code 1."""

    def show(self, file: Any = None) -> None:
        echo(f"tallfmt: error: {self.format_message()}", err=True)


def load_plugins() -> None:
    """Register the codecs and merge methods that installed packages declare as entry points
    (groups ``tallfmt.codecs`` and ``tallfmt.merges``), once."""
    if getattr(load_plugins, "done", False):
        return
    load_plugins.done = True  # type: ignore[attr-defined]
    from importlib.metadata import entry_points

    from tallfmt.read.merges import register_merge

    register = {"tallfmt.codecs": codecs.register_codec, "tallfmt.merges": register_merge}
    for group in PLUGIN_GROUPS:
        for ep in entry_points(group=group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break every command
                echo(f"tallfmt: warning: plugin {ep.name!r} ({ep.value}) failed to load: {exc}", err=True)
                continue
            known = codecs.CODECS if group == "tallfmt.codecs" else MERGES
            if getattr(obj, "codec_id", getattr(obj, "name", None)) not in known:
                register[group](obj)


class _Group(click.Group):
    """Turns TallError and OSError raised by any command into one line on stderr (exit 1), and builds
    the registry-driven commands (merge) once plugins are loaded."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "merge"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "merge":
            load_plugins()
            return merge_command()
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _warnings_as_lines(ctx):
                return super().invoke(ctx)
        except BrokenPipeError:
            # `tallfmt info zoo.tall | head`: the reader left; say nothing more (Python's recommended way).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            # outputs are written whole or not at all: an interrupted command leaves nothing half written
            click.echo("\ntallfmt: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except (TallError, OSError) as exc:
            if getattr(ctx.obj, "debug", False):
                traceback.print_exc()
            msg = str(exc) if isinstance(exc, TallError) else f"{type(exc).__name__}: {exc}"
            raise CommandError(msg or type(exc).__name__) from exc


@contextmanager
def _warnings_as_lines(ctx: click.Context) -> Iterator[None]:
    """tallfmt's warnings as ``tallfmt: warning: ...`` lines on stderr, as they happen; other
    libraries' warnings (torch's, when it loads a file) only with --debug."""
    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if issubclass(category, TallWarning):
            click.echo(f"tallfmt: warning: {message}", err=True)
        elif getattr(ctx.obj, "debug", False):
            click.echo(f"tallfmt: warning from {filename}:{lineno}: {category.__name__}: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def warn(msg: str) -> None:
    """One warning line, as tallfmt's own warnings print."""
    click.echo(f"tallfmt: warning: {msg}", err=True)


class RegistryChoice(click.Choice):
    """A choice whose values come from a registry when they are needed (after plugins are loaded)."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> list[str]:
        load_plugins()
        return self._names()

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


@dataclass
class _Settings:
    quiet: bool
    debug: bool
    max_tensor_bytes: int | None = None


def _settings() -> _Settings:
    return click.get_current_context().find_object(_Settings) or _Settings(False, False)


def _set_flag(name: str) -> Callable[[click.Context, click.Parameter, bool], bool]:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        settings = ctx.find_object(_Settings)
        if value and settings is not None:
            setattr(settings, name, True)
        return value
    return callback


def common_params() -> list[click.Option]:
    """``--quiet`` and ``--debug`` for every command, so they also work after its name."""
    return [click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_flag("quiet"),
                         help="No progress bars, no informational messages."),
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_flag("debug"),
                         help="Show the traceback of an error, and other libraries' warnings.")]


def _say(msg: str = "") -> None:
    """Informational output that --quiet silences (info/stats tables are not silenced)."""
    if not _settings().quiet:
        echo(msg)


@contextmanager
def progress(total: int | None, desc: str) -> Iterator[Callable[[int, int | None], None]]:
    """A tqdm bar of bytes on stderr when it is a terminal and not --quiet; yields
    ``update(advance, total=None)`` (a total given later replaces the first)."""
    show = not _settings().quiet and sys.stderr.isatty()
    if not show:
        yield lambda n, total=None: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        def update(n: int, total: int | None = None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(n)
        yield update


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



def _open(path: str | Path, base: str | None = None) -> Archive:
    from tallfmt.read.archive import open as open_archive

    return open_archive(path, max_tensor_bytes=_settings().max_tensor_bytes, base=base)


BASE_HELP = ("θ0 for an archive encoded with --no-store-base: a .safetensors file, a folder or a .bin/.pt file "
             "(each tensor checked against the archive's checksums).")


# ----------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no informational messages.")
@click.option("--max-tensor-bytes", default=None, metavar="SIZE",
              help="Decode memory budget: the most one stored part of a tensor may decode to, e.g. 32GB "
                   "(default: a quarter of this machine's memory, at least 1 GiB).")
@click.version_option(__version__, prog_name="tallfmt")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, max_tensor_bytes: str | None) -> None:
    """tallfmt: one compressed .tall archive for many fine-tunes of one base model (TALL-masks).

    ARCHIVE is a .tall file, or the folder (or tall.index.json) of a sharded archive.
    """
    budget = parse_size(max_tensor_bytes) if max_tensor_bytes is not None else None
    ctx.obj = _Settings(quiet=quiet, debug=debug, max_tensor_bytes=budget)
    load_plugins()


def task_name_of(source: str) -> str:
    """A task's default name: the file's stem, or the folder's name (also for model.safetensors); a
    Hugging Face cache snapshot (``models--org--name/snapshots/<hash>``) is named ``name``.

        >>> task_name_of("hub/models--textattack--bert-base-uncased-SST-2/snapshots/5f1a3c")
        'bert-base-uncased-SST-2'
    """
    p = Path(os.path.abspath(source))  # lexical: a cache snapshot's files are links into blobs/
    if not p.is_dir():
        stem = p.name.split(".")[0] if p.name.endswith(".safetensors") else p.stem
        if stem not in GENERIC_STEMS:
            return stem
        p = p.parent
    if len(p.parts) >= 3 and p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1]
    return p.name or p.resolve().name


def _check_task_names(tasks: list[str], finetunes: tuple[str, ...]) -> None:
    repeats = {t: [f for f, n in zip(finetunes, tasks) if n == t] for t in dict.fromkeys(tasks) if tasks.count(t) > 1}
    if not repeats:
        return
    said = "; ".join(f"{t!r} for {', '.join(srcs)}" for t, srcs in repeats.items())
    why = (" (Trainer checkpoint-N folders of different runs share their names)"
           if any(re.fullmatch(r"checkpoint-\d+", t) for t in repeats) else "")
    raise click.UsageError(f"task names repeat: {said}{why}; name the tasks with --name, once per FT in order")


def _parse_lambdas(values: tuple[str, ...], tasks: list[str]) -> float | dict[str, float]:
    return _parse_per_task(values, tasks, DEFAULTS.lambdas, "--lambda", "0.4", "sst2=0.3")


def _parse_per_task(values: tuple[str, ...], tasks: list[str], fallback: Any, hint: str, one: str = "0.5",
                    named: str = "sst2=2") -> Any:
    """Repeated X / TASK=X options: one plain number for every task (default ``fallback``) and/or
    task=number; the plain value, or {task: value} when some task is named."""
    default: float | None = None
    per_task: dict[str, float] = {}
    for v in values:
        key, sep, num = v.rpartition("=")
        try:
            x = float(num)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected a number ({one}) or task=number ({named})",
                                     param_hint=hint) from None
        if not sep:
            if default is not None:
                raise click.BadParameter("give one plain number at most; name tasks as task=number", param_hint=hint)
            default = x
        elif key not in tasks:
            raise click.BadParameter(f"no task {key!r}; tasks are {', '.join(tasks)}", param_hint=hint)
        else:
            per_task[key] = x
    if default is None:
        default = fallback
    if not per_task:
        return default
    return {t: per_task.get(t, default if default is not None else 0.0) for t in tasks}


def _parse_metadata(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{v!r}: expected key=value", param_hint="--metadata")
        if not is_text(v):
            raise click.BadParameter(f"{v!r} is not valid UTF-8", param_hint="--metadata")
        out[k] = val
    return out


def _parse_prefix_map(values: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for v in values:
        old, sep, new = v.partition("=")
        if not sep:
            raise click.BadParameter(f"{v!r}: expected OLD=NEW, e.g. =bert. (prefix every name of the base) or "
                                     f"model.= (strip model.)", param_hint="--prefix-map")
        out[old] = new
    return out or None


D = DEFAULTS  # encode's defaults, defined once (tallfmt.write.options)


@cli.command(short_help="Encode θ0 and its fine-tunes into one archive.")
@click.argument("base")
@click.argument("finetunes", nargs=-1, required=True, metavar="FT [FT ...]")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The .tall file to write (a folder with --shards/--max-shard-size).")
@click.option("--name", "names", multiple=True,
              help="Task name, once per FT in order (default: each file's stem or folder's name).")
@click.option("--merge", type=click.Choice(MERGE_METHODS), default=D.merge, show_default=True,
              help="The merge that makes τ_MTL.")
@click.option("--ties-density", type=float, default=D.ties_density, show_default=True,
              help="TIES: fraction kept per task.")
@click.option("--ties-agg", type=click.Choice(TIES_AGGS), default=D.ties_agg, show_default=True,
              help="TIES: disjoint sum (the paper's masks) or mean.")
@click.option("--ties-scope", type=click.Choice(SCOPES), default=D.ties_scope, show_default=True,
              help="TIES: trim over all parameters (paper) or per tensor (mergekit).")
@click.option("--lambda", "lambdas", multiple=True, metavar="X | TASK=X",
              help=f"TALL mask λ: one number for every task (default {D.lambdas}) and/or task=number, repeatable.")
@click.option("--mask", "mask_method", type=click.Choice(MASK_METHODS), default=D.mask_method,
              show_default=True, help="Mask rule: TALL (eq. 5) or the paper's magnitude baseline.")
@click.option("--mask-density", type=float, default=D.mask_density, show_default=True,
              help="Magnitude masks: fraction of |τ_t| kept per task.")
@click.option("--codec", type=RegistryChoice(codecs.choices), default=D.codec, show_default=True,
              help="Segment codec (auto: byteplane-zstd for floats, zstd for masks).")
@click.option("--mask-codec", type=RegistryChoice(codecs.mask_choices), default=D.mask_codec, show_default=True,
              help="Codec of the masks (auto: as --codec; tau-rans: ~20% smaller masks from τ_MTL's magnitudes, "
                   "slower to decode; FORMAT.md §5.1).")
@click.option("--device", default=None, help="torch device for the mask math, e.g. cuda:0 (default cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="At most this many tensors encoded at once (default: one per core; threads never spin).")
@click.option("--dtype", type=click.Choice([d.lower() for d in CAST_DTYPES], case_sensitive=False),
              default=D.dtype, help="Cast every float tensor of every input to this storage dtype first (the "
                                    "math stays float32), e.g. for bf16 bases with fp32 fine-tunes.")
@click.option("--prefix-map", "prefix_map", multiple=True, metavar="OLD=NEW",
              help="Rename the base's tensors starting with OLD to start with NEW, repeatable: =bert. prefixes "
                   "every name, model.= strips model.")
@click.option("--mismatch", type=click.Choice(MISMATCH), default=D.mismatch, show_default=True,
              help="Tensors whose presence/dtype/shape differ between checkpoints: refuse, or store per task.")
@click.option("--per-task", "per_task", multiple=True, metavar="GLOB",
              help="Float tensors named like GLOB are stored verbatim per task when they differ, repeatable "
                   f"(default: {' '.join(D.per_task)}; --per-task '' for none).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Free metadata, repeatable.")
@click.option("--files/--no-files", "files", default=D.files, show_default=True,
              help="Store the folders' non-weight files (config.json, tokenizer, model card) for decode/merge.")
@click.option("--residual", "residual", multiple=True, metavar="BITS | TASK=BITS",
              help=f"A per-task sparse residual of this many bits per masked parameter (default: "
                   f"{D.residual or 'none'}): one number for every task and/or task=number, repeatable.")
@click.option("--tau-dtype", "tau_dtype", type=click.Choice([d.lower() for d in TAU_DTYPES], case_sensitive=False),
              default=D.tau_dtype.lower(), show_default=True,
              help="Store τ_MTL in this dtype: f32 is lossless, bf16 halves it (lossy; masks follow the rounded τ).")
@click.option("--store-base/--no-store-base", "store_base", default=D.store_base, show_default=True,
              help="Store θ0 (--no-store-base: only its tensor table and checksums; decode then needs --base).")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Write a sharded archive: OUTPUT becomes a folder of N shard files + tall.index.json.")
@click.option("--max-shard-size", default=None, help="Sharded archive: shards of at most this size, e.g. 2GB.")
@click.option("--dask-scheduler", "--scheduler", "scheduler", default=None,
              help="Sharded archive: a Dask scheduler address to run the shards on.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def encode(base: str, finetunes: tuple[str, ...], output: str, names: tuple[str, ...], merge: str,
           ties_density: float, ties_agg: str, ties_scope: str, lambdas: tuple[str, ...], mask_method: str,
           mask_density: float, codec: str, mask_codec: str, device: str | None, threads: int | None, dtype: str | None,
           prefix_map: tuple[str, ...], mismatch: str, per_task: tuple[str, ...], metadata: tuple[str, ...],
           files: bool, residual: tuple[str, ...], tau_dtype: str, store_base: bool, shards: int | None,
           max_shard_size: str | None, scheduler: str | None, force: bool) -> None:
    """Encode BASE (θ0) and its fine-tunes FT ... into one .tall archive.

    Each of BASE and FT is a .safetensors file, a folder with model.safetensors or a sharded
    model.safetensors.index.json (a Hugging Face folder or cache snapshot), or a .bin/.pt file.
    The folders' config, tokenizer and model card are stored too (--no-files: not).
    """
    if names and len(names) != len(finetunes):
        raise click.BadParameter(f"got {len(names)} names for {len(finetunes)} fine-tunes", param_hint="--name")
    tasks = list(names) if names else [task_name_of(f) for f in finetunes]
    for t, f in zip(tasks, finetunes):
        if not is_text(t):
            if names:
                raise CommandError(f"--name {t!r} is not valid UTF-8")
            raise CommandError(f"{f!r}: its file or folder name, {t!r}, is not valid UTF-8, so it cannot name the "
                               f"task; name the task with --name")
    _check_task_names(tasks, finetunes)
    out = Path(output)
    lam = _parse_lambdas(lambdas, tasks)
    budgets = _parse_per_task(residual, tasks, D.residual, "--residual")
    meta = _parse_metadata(metadata)
    shard_size = parse_size(max_shard_size) if max_shard_size is not None else None
    from tallfmt.write.pipeline import encode as encode_archive

    patterns = tuple(p for p in per_task if p) if per_task else DEFAULTS.per_task
    with progress(None, "encode") as update:
        report = encode_archive(base, dict(zip(tasks, finetunes)), out, merge=merge, lambdas=lam,
                                ties_density=ties_density, ties_agg=ties_agg, ties_scope=ties_scope,
                                mask_method=mask_method, mask_density=mask_density, codec=codec,
                                mask_codec=mask_codec,
                                device=device, threads=threads, dtype=dtype, prefix_map=_parse_prefix_map(prefix_map),
                                mismatch=mismatch, per_task=patterns, metadata=meta, files=files,
                                tau_dtype=tau_dtype, store_base=store_base, overwrite=force,
                                progress=update, shards=shards, max_shard_size=shard_size, scheduler=scheduler,
                                residual=budgets)
    roles = ", ".join(f"{n} {r}" for r, n in report.roles.items())
    _say(f"{report.path}: {plural(len(report.tasks), 'task')} ({', '.join(report.tasks)}), {roles} tensors")
    if report.files is not None:
        _say(f"files stored: {', '.join(report.file_names)} ({len(report.files.blobs)} distinct, "
             f"{human_bytes(report.files.content_bytes)})")
    _say(f"{human_bytes(report.input_bytes)} of checkpoints → {human_bytes(report.archive_bytes)} "
         f"({report.ratio:.2f}× smaller) in {report.seconds:.1f} s")
    for w in report.warnings:
        warn(w)
    _say(f"see `tallfmt info {out}` for the breakdown")


@cli.command(short_help="Tasks, roles, sizes and ratios of an archive.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(archive: str, as_json: bool) -> None:
    """Tasks, tensor roles, bytes per part and compression ratios of ARCHIVE."""
    with _open(archive) as zoo:
        s = summary(zoo)
    echo(json.dumps(s, indent=2, ensure_ascii=False) if as_json else format_summary(s))
    if not as_json:
        for w in s["warnings"]:
            warn(w)


def _check_model_output(out: Path, force: bool, max_shard_size: str | None) -> int | None:
    """decode/merge: refuse a model output that exists (without --force) or that names another kind
    of file, and a --max-shard-size for a one-file output, before the archive is read; the shard size."""
    from tallfmt.format.outputs import check_model_output

    kind = check_model_output(out, force)
    if max_shard_size is None:
        return None
    if kind == "file":
        raise click.BadParameter(f"applies to a folder output; {out} is one .safetensors file",
                                 param_hint="--max-shard-size")
    return parse_size(max_shard_size)


SHARD_HELP = f"Folder output: largest weight file before it is sharded (default {MAX_SHARD_SIZE // 2**30}GiB)."


@contextmanager
def _counting(zoo: Archive, method: str, desc: str, total: int) -> Iterator[None]:
    """A progress bar over the bytes of the tensors ``zoo.<method>`` yields (decode_to/merge_to stream
    through it); ``total``: the output's bytes."""
    with progress(total, desc) as update:
        inner = getattr(zoo, method)

        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for name, t in inner(*args, **kwargs):
                update(t.numel() * t.element_size())
                yield name, t

        setattr(zoo, method, counted)
        try:
            yield
        finally:
            delattr(zoo, method)


def _written(files: list[Path]) -> str:
    size = sum(f.stat().st_size for f in files)
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
    return f"{where} ({human_bytes(size)})"


@cli.command(short_help="Write task models.")
@click.argument("archive", type=click.Path(exists=False))
@click.argument("tasks", nargs=-1, required=True, metavar="TASK [TASK ...]")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="One task: a .safetensors file, or a folder (HF-style, sharded above --max-shard-size). "
                   "Several: a folder that gets one such folder per task, named after it.")
@click.option("--max-shard-size", default=None, help=SHARD_HELP)
@click.option("--residual/--no-residual", "residual", default=True, show_default=True,
              help="Add each task's residual where the archive stores one (FORMAT.md §11); --no-residual: "
                   "the mask-only model.")
@click.option("--base", "base", default=None, metavar="PATH", help=BASE_HELP)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def decode(archive: str, tasks: tuple[str, ...], output: str, max_shard_size: str | None, residual: bool,
           base: str | None,
           force: bool) -> None:
    """Write each TASK's model, θ0 + m_t ∘ τ_MTL, from ARCHIVE to OUTPUT.

    A folder OUTPUT also gets the task's stored files (config.json, tokenizer, …), so that
    transformers' from_pretrained(OUTPUT) loads it. Several tasks are decoded from one open archive:
    θ0 and τ_MTL are decompressed once (the archive's cache), each later task reads only its masks.
    """
    out = Path(output)
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise click.UsageError(f"tasks repeat: {', '.join(dupes)}")
    if len(tasks) > 1 and out.name.endswith(".safetensors"):
        raise click.UsageError("several tasks go to a folder (one per task), not to one .safetensors file")
    outs = {t: out if len(tasks) == 1 else out / t for t in tasks}
    with _open(archive, base) as zoo:
        for task in tasks:  # an unknown task, or one that cannot name a folder, fails before anything is written
            zoo.task_info(task)
            if len(tasks) > 1 and (task in (".", "..") or any(c in task for c in "/\\\0")):
                raise CommandError(f"task {task!r} cannot name a folder in {out}; decode it on its own")
        shard = None
        for o in outs.values():
            shard = _check_model_output(o, force, max_shard_size)
        for task, o in outs.items():
            with _counting(zoo, "iter_decode", f"decode {task}", _output_bytes(zoo, zoo.task_index(task))):
                files = zoo.decode_to(task, o, max_shard_size=shard, overwrite=force, residual=residual)
            skipped = zoo.file_names(task) if o.name.endswith(".safetensors") else []
            _say(f"{task}: wrote {_written(files)}")
            if skipped:
                names = ", ".join(skipped[:3]) + ("…" if len(skipped) > 3 else "")
                _say(f"({plural(len(skipped), 'stored file')} not written, {names}: decode to a folder to get them)")


def _output_bytes(zoo: Archive, task: int | None) -> int:
    """Bytes of the model a decode (of task index ``task``) or a merge (None) writes."""
    from tallfmt.format.dtypes import by_name

    return sum(math.prod(shape) * by_name(dt).itemsize for _, dt, shape in zoo.model_entries(task))


def merge_command() -> click.Command:
    """``tallfmt merge``, built from the merge registry: one ``--merge`` choice per registered method
    and one option per parameter any method declares, with each method's default in its help."""
    declared: dict[str, list[tuple[str, Any]]] = {}
    kinds: dict[str, Any] = {}
    for m in MERGES.values():
        for p in m.params:
            declared.setdefault(p.name, []).append((m.name, p))
            kinds[p.name] = p
    options = []
    for name, users in declared.items():
        p = kinds[name]
        defaults = {str(q.default) for _, q in users}
        said = (f"{', '.join(m for m, _ in users)}; default {defaults.pop()}" if len(defaults) == 1
                else "; ".join(f"{m}: default {q.default}" for m, q in users))
        at_least = f", ≥ {p.minimum:g}" if p.minimum is not None else ""
        options.append(click.Option([f"--{name.replace('_', '-')}", name], type=p.type, default=None,
                                    metavar="N" if p.type is int else "X",
                                    help=f"{p.help[0].upper()}{p.help[1:]}{at_least} ({said})."))
    methods = "; ".join(f"{m.name}: {m.help}" for m in MERGES.values())

    def run(archive: str, merge: str, method_alias: str | None, per_task: str, output: str,
            max_shard_size: str | None, base: str | None, force: bool, **given: Any) -> None:
        method = method_alias or merge
        params = {k: v for k, v in given.items() if v is not None}
        takes = {p.name for p in MERGES[method].params}
        for k in params:
            if k not in takes:
                raise click.BadParameter(f"--{k.replace('_', '-')} does not apply to --merge {method} "
                                         f"(it takes {', '.join(f'--{t}' for t in sorted(takes)) or 'no parameters'})",
                                         param_hint=f"--{k.replace('_', '-')}")
        out = Path(output)
        shard = _check_model_output(out, force, max_shard_size)
        with _open(archive, base) as zoo:
            with _counting(zoo, "iter_merge", f"merge {method}", _output_bytes(zoo, None)):
                files = zoo.merge_to(out, method, per_task=per_task, max_shard_size=shard, overwrite=force, **params)
        desc = ", ".join(f"{key}={v}" for key, v in params.items())
        _say(f"{method}{f' ({desc})' if desc else ''}: wrote {_written(files)}")

    return click.Command(
        "merge", callback=run, short_help="Write one merged multi-task model.",
        help="Write one merged multi-task model from ARCHIVE to OUTPUT (a folder also gets the base's stored "
             "files: config.json, tokenizer, …).",
        params=[click.Argument(["archive"], type=click.Path(exists=False)),
                click.Option(["--merge"], type=RegistryChoice(lambda: list(MERGES)), default=DEFAULT_MERGE,
                             show_default=True, help=f"{methods}."),
                # the name this option had before it matched encode's --merge
                click.Option(["--method", "method_alias"], type=RegistryChoice(lambda: list(MERGES)), default=None,
                             hidden=True),
                *options,
                click.Option(["--per-task", "per_task"], type=click.Choice(PER_TASK_POLICIES), default=DEFAULT_PER_TASK,
                             show_default=True,
                             help="Tensors stored per task (heads, adapters, batch-norm statistics) cannot be merged: "
                                  "take θ0's copy, drop them, or refuse; a warning names them."),
                click.Option(["-o", "--output"], required=True, type=click.Path(),
                             help="A .safetensors file or a folder."),
                click.Option(["--max-shard-size"], default=None, help=SHARD_HELP),
                click.Option(["--base"], default=None, metavar="PATH", help=BASE_HELP),
                click.Option(["--force"], is_flag=True, help="Overwrite an existing output."),
                *common_params()])


def _counted_read(read: Callable[..., Any], update: Callable[[int], None], seen: set[int]) -> Callable[..., Any]:
    def counted(seg: Any, itemsize: int, *args: Any, **kwargs: Any) -> Any:
        out = read(seg, itemsize, *args, **kwargs)
        if id(seg) not in seen:  # masks are read twice (checksum, then padding): count their bytes once
            seen.add(id(seg))
            update(seg.length)
        return out
    return counted


@cli.command(short_help="Check every checksum and mask of an archive.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--base", "base", default=None, metavar="PATH", help="Also check this θ0 against an archive encoded "
              "with --no-store-base (every tensor's checksum).")
def verify(archive: str, base: str | None) -> None:
    """Check ARCHIVE's header, every segment's checksum and contents, every mask and every stored
    file; exit 1 if damaged."""
    with _open(archive, base) as zoo:
        segments = [s for e in zoo.header.tensors for s in e.segments()]
        stored = sum(s.length for s in segments)
        seen: set[int] = set()
        # Archive.verify has no progress hook: counting each shard's segment reads drives the bar.
        with progress(stored, "verify") as update:
            for shard in zoo.shards:
                shard.read = _counted_read(shard.read, update, seen)
            try:
                zoo.verify()
            finally:
                for shard in zoo.shards:
                    del shard.read
        files = zoo.header.files
    said = f", {plural(len(files.blobs), 'stored file')}" if files is not None else ""
    if zoo.external_base:
        said += f", θ0 from {base} checked" if base is not None else ", θ0 external (not checked: give --base)"
    _say(f"{archive}: OK — header, {len(segments):,} segments ({human_bytes(stored)}){said} and "
         f"{plural(len(zoo.tasks), 'task')}' masks checked")


@cli.command(short_help="Mask agreement histogram (paper eq. 7), optionally as a PNG.")
@click.argument("archive", type=click.Path(exists=False))
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw the agreement histogram and per-task mask density into this image, of the kind its "
                   "suffix names (.png, .svg, .pdf, …; PNG without one; needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot image.")
def stats(archive: str, plot: str | None, as_json: bool, force: bool) -> None:
    """Mask agreement of ARCHIVE: parameters kept by exactly n of the T task masks (paper eq. 7, Fig. 3).

    n = 0 catastrophic, n = 1 selfish, 2..T-1 general, n = T universal. Consensus merging with
    threshold k keeps the parameters with n ≥ k.
    """
    plot_format = check_plot_path(Path(plot), force) if plot is not None else None
    with _open(archive) as zoo:
        counts = [int(c) for c in zoo.agreement().tolist()]
        tasks = summary(zoo)["tasks"]
        name = zoo.path.parent.name if zoo.index is not None else zoo.path.name  # a sharded archive's folder
    rows = agreement_table(counts)
    T = len(counts) - 1
    if plot is not None:
        plot_agreement(Path(plot), f"{name}: {plural(T, 'task')}, {sum(counts):,} masked parameters", rows, tasks,
                       plot_format, force)
    if as_json:
        echo(json.dumps({"num_tasks": T, "masked_params": sum(counts), "agreement": rows,
                               "mask_density": {t["name"]: t["mask_density"] for t in tasks}}, indent=2))
        return
    lines = [f"{archive}: {sum(counts):,} masked parameters, {plural(T, 'task')}", ""]
    table = [["n", "kind", "parameters", "fraction", "kept by consensus k=n"]]
    table += [[str(r["n"]), r["kind"], f"{r['params']:,}", pct(r["fraction"]), pct(r["kept_by_consensus_k"])]
              for r in rows]
    lines += text_table(table, "rlrrr")
    lines.append("")
    lines += text_table([["task", "mask density"]] + [[t["name"], pct(t["mask_density"])] for t in tasks], "lr")
    if plot is not None:
        lines += ["", f"plot: {plot}"]
    echo("\n".join(lines))


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


for _command in cli.commands.values():
    _command.params.extend(common_params())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tallfmt`` console script."""
    cli.main(args=argv, prog_name="tallfmt")


if __name__ == "__main__":
    main()
