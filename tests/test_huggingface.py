"""Hugging Face models as users have them (save_pretrained folders of transformers models with random
weights and tiny configs): decoded and merged folders load with from_pretrained and no manual step,
each task keeps its own config, tied weights stay tied, mixed precisions keep their masks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import tallfmt
from tallfmt.errors import InputError, TallWarning

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: E402
                          BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel)

LABELS = {"sst2": 2, "mnli": 3, "emotion": 5}


def perturb(model: torch.nn.Module, seed: int, fraction: float = 0.3) -> None:
    """A fine-tune stand-in: a small change to a random part of every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            keep = torch.rand(p.shape, generator=g) < fraction
            p.add_(0.01 * torch.randn(p.shape, generator=g) * keep)


def same_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                      eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config())
    base.save_pretrained(root / "base")
    for i, task in enumerate(("poems", "code")):
        m = GPT2LMHeadModel(gpt2_config())
        m.load_state_dict(base.state_dict())
        perturb(m, i + 1)
        m.save_pretrained(root / task)
    tallfmt.encode(root / "base", {"poems": root / "poems", "code": root / "code"}, root / "gpt2.tall")
    return root


def test_tied_gpt2_decodes_to_a_folder_from_pretrained_loads(gpt2_zoo: Path) -> None:
    root = gpt2_zoo
    with tallfmt.open(root / "gpt2.tall") as zoo:
        assert zoo.file_names("poems") == ["config.json", "generation_config.json"]
        zoo.decode_to("poems", root / "poems-decoded")
        want = zoo.decode("poems")
    model = AutoModelForCausalLM.from_pretrained(root / "poems-decoded")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as saved
    same_weights(model, want)
    assert (root / "poems-decoded" / "generation_config.json").exists()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_merged_gpt2_folder_loads_and_notes_the_merge(gpt2_zoo: Path) -> None:
    root = gpt2_zoo
    with tallfmt.open(root / "gpt2.tall") as zoo:
        zoo.merge_to(root / "merged", "consensus", k=1, alpha=0.5)
        want = zoo.merge("consensus", k=1, alpha=0.5)
    model = AutoModelForCausalLM.from_pretrained(root / "merged")
    same_weights(model, want)
    from safetensors import safe_open

    with safe_open(str(root / "merged" / "model.safetensors"), "pt") as f:
        note = json.loads(f.metadata()["tallfmt.merge"])
    assert note == {"archive": "gpt2.tall", "method": "consensus", "params": {"k": 1, "alpha": 0.5},
                    "per_task": "base", "tasks": ["poems", "code"]}


def test_a_bin_base_with_save_pretrained_fine_tunes_stays_tied(gpt2_zoo: Path, tmp_path: Path) -> None:
    """torch.save keeps lm_head.weight (the same storage as wte), save_pretrained leaves it out: the
    archive stores it as an alias, so every decode and merge has lm_head equal to the embeddings."""
    root = gpt2_zoo
    base = GPT2LMHeadModel.from_pretrained(root / "base")
    (tmp_path / "base").mkdir()
    torch.save(base.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    (tmp_path / "base" / "config.json").write_bytes((root / "base" / "config.json").read_bytes())
    tallfmt.encode(tmp_path / "base", {"poems": root / "poems", "code": root / "code"}, tmp_path / "z.tall")
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert zoo.roles["lm_head.weight"] == "alias"
        assert zoo.header.tensors[[e.name for e in zoo.header.tensors].index("lm_head.weight")].target == \
            "transformer.wte.weight"
        for sd in (zoo.merge("task_arithmetic"), zoo.merge("consensus", k=1), zoo.decode("code")):
            assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
        zoo.merge_to(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def bert_config(**kw: int) -> BertConfig:
    return BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=50, max_position_embeddings=32, **kw)


@pytest.fixture(scope="module")
def bert_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained BertModel (names without 'bert.') and classifiers of 2, 3 and 5 labels from it."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = BertModel(bert_config())
    base.save_pretrained(root / "base")
    for i, (task, n) in enumerate(LABELS.items()):
        m = BertForSequenceClassification(bert_config(num_labels=n))
        m.bert.load_state_dict(base.state_dict())
        perturb(m.bert, i + 1)
        m.save_pretrained(root / task)
    return root


def test_bert_prefix_mismatch_says_which_kind_and_the_option(bert_zoo: Path, tmp_path: Path) -> None:
    tasks = {t: bert_zoo / t for t in LABELS}
    with pytest.raises(InputError) as info:
        tallfmt.encode(bert_zoo / "base", tasks, tmp_path / "x.tall")
    msg = str(info.value)
    assert "are not in the base" in msg and "are missing from some tasks" in msg
    assert "prefix_map={'': 'bert.'}" in msg and "--prefix-map =bert." in msg
    assert not (tmp_path / "x.tall").exists()
    # renamed, only the classifiers still differ: now the advice is mismatch='per_task'
    with pytest.raises(InputError, match=r"'classifier.bias'.*mismatch='per_task'.*--mismatch per_task"):
        tallfmt.encode(bert_zoo / "base", tasks, tmp_path / "x.tall", prefix_map={"": "bert."})


def test_bert_classifier_zoo_each_task_loads_with_its_own_config(bert_zoo: Path, tmp_path: Path) -> None:
    tasks = {t: bert_zoo / t for t in LABELS}
    report = tallfmt.encode(bert_zoo / "base", tasks, tmp_path / "bert.tall", prefix_map={"": "bert."},
                            mismatch="per_task")
    assert report.roles["per_task"] == 2 and report.warnings == []  # the heads; everything else masked
    with tallfmt.open(tmp_path / "bert.tall") as zoo:
        for task, n in LABELS.items():
            zoo.decode_to(task, tmp_path / task)
            model = AutoModelForSequenceClassification.from_pretrained(tmp_path / task)
            assert model.config.num_labels == n and model.classifier.weight.shape == (n, 16)
            same_weights(model, zoo.decode(task))
            assert json.loads((tmp_path / task / "config.json").read_text()) == \
                json.loads((bert_zoo / task / "config.json").read_text())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            zoo.merge_to(tmp_path / "merged")
        assert any(issubclass(w.category, TallWarning) and "classifier.weight" in str(w.message) for w in caught)
        with pytest.raises(InputError, match="classifier.weight"):
            zoo.merge("task_arithmetic", per_task="error")
    merged = AutoModel.from_pretrained(tmp_path / "merged")  # θ0's config: a BertModel
    assert type(merged).__name__ == "BertModel"


def test_bf16_base_with_fp32_fine_tunes_keeps_its_masks_with_dtype(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config()).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    tasks = {}
    for i, task in enumerate(("a", "b")):
        m = GPT2LMHeadModel(gpt2_config())
        m.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
        perturb(m, i + 1)
        m.save_pretrained(tmp_path / task)
        tasks[task] = tmp_path / task
    with pytest.raises(InputError) as info:
        tallfmt.encode(tmp_path / "base", tasks, tmp_path / "x.tall")
    assert "differ in dtype" in str(info.value) and "dtype='BF16' (CLI: --dtype bf16)" in str(info.value)
    # what the old advice did: every tensor verbatim per task, and now the report says so
    lost = tallfmt.encode(tmp_path / "base", tasks, tmp_path / "lost.tall", mismatch="per_task")
    assert set(lost.roles) == {"per_task"}
    [w] = lost.warnings
    assert w.startswith("compression is mostly lost: 100% of the parameters are stored verbatim per task")
    assert "dtype differs" in w and "--dtype bf16" in w
    report = tallfmt.encode(tmp_path / "base", tasks, tmp_path / "bf16.tall", dtype="bf16")
    assert set(report.roles) == {"masked"} and report.warnings == []
    assert report.archive_bytes < 0.7 * lost.archive_bytes  # θ0 bf16 + τ + masks vs θ0 + 2 fp32 copies
    with tallfmt.open(tmp_path / "bf16.tall") as zoo:
        zoo.decode_to("a", tmp_path / "a-decoded")
        sd = zoo.decode("a")
        assert {v.dtype for v in sd.values()} == {torch.bfloat16}
        # the cast is the one rounding before encoding: unmasked entries are the fine-tune's, in bf16
        original = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
        masked = zoo.mask("a", "transformer.h.0.mlp.c_fc.weight")
        w = sd["transformer.h.0.mlp.c_fc.weight"]
        assert torch.equal(w[~masked], base.state_dict()["transformer.h.0.mlp.c_fc.weight"][~masked])
        assert original["transformer.h.0.mlp.c_fc.weight"].dtype == torch.float32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a-decoded")  # the task's config says float32
    same_weights(model, {k: v.float() for k, v in sd.items()})
