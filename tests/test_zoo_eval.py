"""The zoo evaluation (bench/zoo/evaluate.py) end to end on the 2-task toy zoo, with tiny grids.

Checks the report, not the paper's claims: a toy zoo of 8 fine-tuning steps says nothing about them. The
full zoo runs from the bench command only (`python -m bench.zoo.evaluate`).
"""

from __future__ import annotations

import json

import pytest

import _zoo_toy  # skips this module without the zoo's packages (an error under CI)

from bench.zoo import evaluate as zoo_eval  # noqa: E402

OTHERS = "# Benchmark results\n\n## Codec throughput\n\nsomeone else's section\n"


def _args(zoo_dir, out, results, plot):
    return ["--zoo", str(zoo_dir), "--out", str(out), "--quick", "--lambda-grid", "0.2", "0.5",
            "--alpha-grid", "0.5", "1.0", "--lambda-val-max", "24", "--alpha-val-max", "24",
            "--results", str(results), "--plot", str(plot)]


@pytest.fixture(scope="module")
def evaluated(toy_zoo, tmp_path_factory):
    zoo_dir, _ = toy_zoo
    tmp = tmp_path_factory.mktemp("zoo_eval")
    out, results, plot = tmp / "out", tmp / "RESULTS.md", tmp / "agreement.png"
    results.write_text(OTHERS, encoding="utf-8")
    zoo_eval.main(_args(zoo_dir, out, results, plot))
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return zoo_dir, out, results, plot, res


def test_every_method_has_accuracies_in_range(evaluated):
    *_, res = evaluated
    tasks = res["tasks"]
    assert tasks == _zoo_toy.TASKS_CI
    assert set(res["accuracy"]) == {m.key for m in zoo_eval.METHODS}
    for method, accs in res["accuracy"].items():
        assert set(accs) == set(tasks), method
        assert all(0.0 <= a <= 1.0 for a in accs.values()), (method, accs)
    met = zoo_eval.metrics(res["accuracy"], tasks)
    assert met["finetuned"]["mean_norm"] == 1.0
    assert all(v == 1.0 for v in met["finetuned"]["norm"].values())
    # the reference accuracies are the build's, and one of them was measured again
    assert res["recorded_check"]["equal"]
    # λ from the grid for every task, α from the grid for every merge
    for name in ("lambda_tall_ta", "lambda_tall_ties"):
        assert set(res["selection"][name]["lambdas"].values()) <= {0.2, 0.5}
    for m in ("ta", "ties", "cta_k1", "cta_k2", "cties_k1", "cties_k2"):
        assert res["selection"][f"alpha_{m}"]["alpha"] in (0.5, 1.0)


def test_report_rows_and_sections(evaluated):
    _, out, results, _, res = evaluated
    text = results.read_text(encoding="utf-8")
    assert text.startswith(OTHERS)  # other sections kept
    section = text[len(OTHERS):].lstrip("\n")
    assert section == (out / "report.md").read_text(encoding="utf-8")
    assert section.startswith("## Real model zoo (all-MiniLM-L6-v2, 2 tasks)")
    for m in zoo_eval.METHODS:
        assert section.count(f"| {m.label} |") >= 4, m.label  # Table 2 and the three per-task tables
    for heading in ("### Accuracy on the test split", "### Selection on validation", "### Storage",
                    "### Mask agreement", "| target | measured |"):
        assert heading in section
    assert "`.venv/bin/python -m bench.zoo.evaluate --zoo " in section


def test_storage_numbers_are_consistent(evaluated):
    *_, res = evaluated
    st = res["storage"]
    raw = st["raw_collection_files"]
    T = len(res["tasks"])
    p1, f = st["params"]["masked"], st["params"]["shared"]
    assert p1 + f == st["params"]["total"] > 22_000_000
    assert st["paper_formula_bits"] == (64 + T) * p1 + 32 * f
    sizes = {name: a["sizes"]["total"] for name, a in st["archives"].items()}
    for name, n in sizes.items():
        assert 0 < n < raw, name
    # codec raw stores what the formula counts, plus a header and the int64 position ids
    assert 0 <= sizes["tall_ta_raw"] - st["paper_formula"] < 0.01 * st["paper_formula"]
    assert sizes["tall_ta"] < sizes["tall_ta_zstd"] < sizes["tall_ta_raw"]
    assert st["checkpoints_byteplane-zstd"] < st["checkpoints_zstd"] < raw
    assert st["paper_single_model"] < st["paper_formula"] < raw
    assert st["paper_finetuned"] == 4 * (T * p1 + f)  # appendix C: T models, no θ0
    counts = res["agreement"]["tall_ta"]["counts"]
    assert len(counts) == T + 1 and sum(counts) == p1


def test_plot_is_a_png(evaluated):
    *_, plot, _ = evaluated
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_the_cache_and_replaces_the_section(evaluated, capsys):
    zoo_dir, out, results, plot, res = evaluated
    capsys.readouterr()
    zoo_eval.main(_args(zoo_dir, out, results, plot))
    log = capsys.readouterr().out
    assert "merge_cties_k2: cached" in log and "archive tall_ta: reused" in log
    text = results.read_text(encoding="utf-8")
    assert text.count("## Real model zoo (all-MiniLM-L6-v2") == 1 and text.startswith(OTHERS)
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert again["accuracy"] == res["accuracy"]


def test_replace_section_keeps_the_sections_around_it(tmp_path):
    p = tmp_path / "R.md"
    p.write_text("# R\n\n## A\n\na\n\n## Real model zoo (all-MiniLM-L6-v2, 9 tasks)\n\nold\n\n## B\n\nb\n")
    zoo_eval.replace_section(p, "## Real model zoo (all-MiniLM-L6-v2, 2 tasks)\n\nnew\n")
    assert p.read_text() == ("# R\n\n## A\n\na\n\n## Real model zoo (all-MiniLM-L6-v2, 2 tasks)\n\nnew\n"
                             "\n## B\n\nb\n")


def test_metrics():
    acc = {"finetuned": {"a": 0.9, "b": 0.8}, "zeroshot": {"a": 0.7, "b": 0.8}, "x": {"a": 0.8, "b": 0.6}}
    m = zoo_eval.metrics(acc, ["a", "b"])["x"]
    assert m["mean_acc"] == pytest.approx(0.7)
    assert m["norm"] == pytest.approx({"a": 0.8 / 0.9, "b": 0.75})
    assert m["gain"]["a"] == pytest.approx(0.5) and m["gain"]["b"] is None  # fine-tuning gained nothing on b
    assert m["mean_gain"] == pytest.approx(0.5)
    assert m["pooled_gain"] == pytest.approx((0.1 - 0.2) / 0.2)
