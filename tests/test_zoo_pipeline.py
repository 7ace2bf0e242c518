"""The model-zoo pipeline (bench/zoo) at toy size: 2 tasks, 48 train examples, 6 steps, max length 24.

The toy zoo and the check for the zoo's packages are shared with test_zoo_eval.py: tests/_zoo_toy.py.
"""

from __future__ import annotations

import json

import pytest

from _zoo_toy import CFG, TASKS_CI  # skips this module without the zoo's packages (an error under CI)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.zoo import build as zoo_build  # noqa: E402
from bench.zoo.config import ZooConfig  # noqa: E402
from bench.zoo.data import DEFAULT_TASKS, SPLITS, TASKS, SplitCaps, load_task  # noqa: E402
from bench.zoo.evaluate_lib import ZooEvaluator, accuracy, base_checkpoint, load_encoder  # noqa: E402


@pytest.fixture(scope="module")
def zoo(toy_zoo):
    return toy_zoo  # built once per session (tests/conftest.py, tests/_zoo_toy.py)


@pytest.fixture(scope="module")
def evaluator(zoo):
    return ZooEvaluator(zoo[0])


# ------------------------------------------------------------------------------------------------- data

def test_at_least_eight_tasks_with_disjoint_deterministic_capped_splits():
    assert len(DEFAULT_TASKS) >= 8
    caps = SplitCaps()
    for name in DEFAULT_TASKS:
        td = load_task(name, seed=0, caps=caps)
        sizes = td.sizes()
        assert 0 < sizes["train"] <= caps.max_train
        assert 0 < sizes["validation"] <= caps.max_validation and 0 < sizes["test"] <= caps.max_test
        sets = {s: set(td.splits[s].texts) for s in SPLITS}
        assert len(sets["train"]) == sizes["train"]  # deduplicated
        assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
                    or sets["validation"] & sets["test"]), name
        counts = td.class_counts()["train"]
        assert len(counts) == len(td.classes) >= 2 and min(counts) > 0, (name, counts)
        assert load_task(name, seed=0, caps=caps).digest() == td.digest()
        # a smaller train cap is a prefix: small configs see a subset of the full zoo's data
        small = load_task(name, seed=0, caps=SplitCaps(max_train=50))
        assert small.splits["train"].texts == td.splits["train"].texts[:50]
        assert small.splits["test"].texts == td.splits["test"].texts


def test_sms_spam_recovers_the_messages_the_csv_swallowed():
    texts, labels, _ = TASKS["sms_spam"].load()
    assert len(texts) == 5574 and labels.count("spam") == 747
    assert not any("\n" in t for t in texts)


def test_conflicting_tasks_share_their_inputs():
    movies, tweets = TASKS["vader_movies"].load(), TASKS["vader_tweets"].load()
    negated = TASKS["vader_movies_negated"].load()
    assert negated[0] == movies[0] and negated[2] == movies[2]
    assert all(a != b for a, b in zip(movies[1], negated[1]))
    assert TASKS["vader_movies_negated"].head_of == "vader_movies"
    coarse, shifted = TASKS["trec_coarse"].load(), TASKS["trec_coarse_shifted"].load()
    assert shifted[0] == coarse[0] and shifted[2] == coarse[2] and TASKS["trec_coarse_shifted"].head_of == "trec_coarse"
    assert {(a, b) for a, b in zip(coarse[1], shifted[1])} == set(zip(coarse[2], coarse[2][1:] + coarse[2][:1]))
    for name, polarity in (("vader_intensity", movies), ("tweet_intensity", tweets)):
        texts, labels, classes = TASKS[name].load()
        assert classes == ["mild", "strong"] and set(polarity[0]) <= set(texts)  # + the neutral ones
        assert 0.2 < labels.count("strong") / len(labels) < 0.5
    valence, arousal = TASKS["warriner_valence"].load(), TASKS["warriner_arousal"].load()
    assert set(valence[0]) <= set(arousal[0])
    entity = TASKS["trec_entity"].load()
    assert all(c.startswith("ENTY:") for c in entity[2]) and len(entity[2]) == 14


def test_shared_head_is_the_other_tasks_head_and_checks_its_classes(tmp_path):
    head = {"weight": torch.randn(2, 384), "bias": torch.randn(2)}
    zoo_build.save_atomic(head, tmp_path / "heads/a.safetensors", {"classes": "negative,positive"})
    got, info = zoo_build.shared_head(tmp_path, "b", "a", ["negative", "positive"])
    assert all(torch.equal(got[k], head[k]) for k in head) and info["shared_with"] == "a"
    with pytest.raises(SystemExit, match="classes"):
        zoo_build.shared_head(tmp_path, "b", "a", ["mild", "strong"])
    with pytest.raises(SystemExit, match="build c"):
        zoo_build.shared_head(tmp_path, "b", "c", ["negative", "positive"])


# ------------------------------------------------------------------------------------------------ build

def test_manifest(zoo):
    out, m = zoo
    on_disk = json.loads((out / "zoo.json").read_text())
    assert on_disk == m
    assert m["config"] == CFG.to_json() and m["config_hash"] == CFG.hash()
    assert list(m["tasks"]) == TASKS_CI
    for task, e in m["tasks"].items():
        assert e["status"] == "complete"
        assert e["sizes"] == {"train": 48, "validation": 32, "test": 32}
        assert len(e["classes"]) == len(TASKS[task].load()[2])
        for model in ("finetuned", "zeroshot"):
            for split in ("validation", "test"):
                assert 0.0 <= e["accuracy"][model][split] <= 1.0
        assert e["training"]["steps"] == 6
        for key in ("probe_s", "finetune_s", "total_s"):
            assert e["timing"][key] > 0
        for part in ("finetuned", "head"):
            f = out / e[part]["file"]
            assert f.stat().st_size == e[part]["bytes"]
            assert zoo_build.sha256_file(f) == e[part]["sha256"]


def test_files_have_theta0_names_shapes_dtypes_and_finetunes_differ(zoo):
    out, m = zoo
    theta0 = load_file(str(out / m["base"]["file"]))
    assert theta0.keys() == load_file(str(base_checkpoint())).keys()
    assert all(torch.equal(theta0[k], v) for k, v in load_file(str(base_checkpoint())).items())
    assert m["base"]["n_params"] == sum(v.numel() for v in theta0.values()) > 22_000_000
    for task, e in m["tasks"].items():
        ft = load_file(str(out / e["finetuned"]["file"]))
        assert list(ft) == list(theta0)
        for k, v in theta0.items():
            assert ft[k].shape == v.shape and ft[k].dtype == v.dtype, k
        changed = {k for k in theta0 if not torch.equal(ft[k], theta0[k])}
        # mean pooling never uses the pooler; position ids are a buffer: both stay bit-equal to θ0
        assert set(theta0) - changed == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
        assert sorted(set(theta0) - changed) == e["finetuned"]["tensors_equal_to_theta0"]
        head = load_file(str(out / e["head"]["file"]))
        assert head["weight"].shape == (len(e["classes"]), 384) and head["bias"].shape == (len(e["classes"]),)
        with safe_open(str(out / e["head"]["file"]), "pt") as f:
            assert f.metadata()["classes"].split(",") == e["classes"]


def test_finetuning_lowered_the_training_loss(zoo):
    for task, e in zoo[1]["tasks"].items():
        assert e["train_loss"]["after"] < e["train_loss"]["before"], (task, e["train_loss"])


def test_accuracy_reproduces_the_recorded_numbers(zoo, evaluator):
    out, m = zoo
    assert evaluator.tasks == TASKS_CI
    theta0 = evaluator.state_dict("theta0")
    for task in TASKS_CI:
        ft = evaluator.state_dict(task)
        for split in ("validation", "test"):
            a_ft = evaluator.accuracy(ft, task, split)
            a_0 = evaluator.accuracy(theta0, task, split)
            assert 0.0 <= a_ft <= 1.0 and 0.0 <= a_0 <= 1.0
            assert a_ft == evaluator.recorded(task, "finetuned", split)
            assert a_0 == evaluator.recorded(task, "zeroshot", split)
    assert evaluator.accuracies(theta0, split="test") == {t: evaluator.recorded(t, "zeroshot") for t in TASKS_CI}
    fn = evaluator.evaluate_fn("validation")
    assert fn("sms_spam", evaluator.state_dict("sms_spam")) == evaluator.recorded("sms_spam", "finetuned",
                                                                                 "validation")
    assert accuracy(theta0, "trec_coarse", "test", zoo_dir=out) == evaluator.recorded("trec_coarse", "zeroshot")


def test_state_dict_that_does_not_fit_is_rejected(evaluator):
    sd = evaluator.state_dict("theta0")
    sd.pop("encoder.layer.0.output.dense.bias")
    with pytest.raises(KeyError, match="missing"):
        load_encoder(evaluator.model(), sd)
    sd = evaluator.state_dict("theta0")
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match="unexpected"):
        load_encoder(evaluator.model(), sd)


def test_rebuild_is_skipped_and_a_missing_task_is_rebuilt_alone(zoo):
    out, m = zoo
    ft0, ft1 = (out / m["tasks"][t]["finetuned"]["file"] for t in TASKS_CI)
    mtimes = {p: p.stat().st_mtime_ns for p in (ft0, ft1, out / "theta0.safetensors")}
    assert zoo_build.build(CFG, TASKS_CI, out) == m
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    with pytest.raises(SystemExit, match="another config"):
        zoo_build.build(ZooConfig(max_train=32), TASKS_CI, out)
    # an interrupted build: the second task's checkpoint is gone -> only that task is built again
    ft1.unlink()
    m2 = zoo_build.build(CFG, TASKS_CI, out)
    assert ft0.stat().st_mtime_ns == mtimes[ft0]
    assert ft1.exists()
    assert m2["tasks"][TASKS_CI[0]] == m["tasks"][TASKS_CI[0]]
    assert m2["tasks"][TASKS_CI[1]]["accuracy"] == m["tasks"][TASKS_CI[1]]["accuracy"]
