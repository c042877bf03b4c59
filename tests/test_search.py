"""End to end: `search` on the demo specialists, and what its run directory holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_TRIALS as TRIALS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.evaluate import load_texts, score_model, tokenize_task, with_preservation
from automerge_mk.recipe import load_recipe
from automerge_mk.segment import segment_model
from automerge_mk.space import BASELINES, HAND_GRID, uniform_plan


@pytest.fixture(scope="module")
def run(demo_run) -> Path:
    return demo_run


@pytest.fixture(scope="module")
def measured(demo_models, tmp_path_factory):
    """Harmonic-mean AP of each source alone and of a plain linear 0.5/0.5 merge, measured here."""
    names = list(demo_models.specialists)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base))
    tasks = [tokenize_task(n, load_texts(demo_models.validation[n]), tokenizer, 512) for n in names]
    sources = [demo_models.specialists[n] for n in names]
    engine = MergeEngine(sources, demo_models.base, demo_models.base)
    per_source = {
        n: score_model(engine.load_source(demo_models.specialists[n]), tasks) for n in names
    }
    reference = {n: per_source[n][n] for n in names}
    linear = uniform_plan(
        "linear",
        (0.5, 0.5),
        None,
        segment_model(demo_models.base, "trace"),
        tuple(str(demo_models.specialists[n]) for n in names),
        None,
        "float32",
    )
    linear_scores = score_model(engine.merge_into_model(linear), tasks)
    return {
        "tasks": tasks,
        "reference": reference,
        "sources": {n: with_preservation(s, reference)[1] for n, s in per_source.items()},
        "linear": with_preservation(linear_scores, reference)[1],
    }


def test_run_directory_holds_trials_best_recipe_model_and_summary(run):
    for name in ["trials.jsonl", "best.json", "recipe.yaml", "summary.md", "model/config.json"]:
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert [t["trial"] for t in lines] == list(range(TRIALS))
    first = lines[0]
    assert set(first["tasks"]) == {"arith", "reverse"}
    assert {"loss", "accuracy", "preservation"} <= set(first["tasks"]["arith"])
    assert all({"ask", "merge", "evaluate", "record"} <= set(t["seconds"]) for t in lines)
    subset = json.loads((run / "eval_subset.json").read_text())
    assert set(subset) == {"arith", "reverse"} and all(s["texts"] for s in subset.values())
    assert any(key.endswith(":method") for key in first["config"])
    best = json.loads((run / "best.json").read_text())
    assert best["harmonic_mean"] == max(t["harmonic_mean"] for t in lines)


def test_recipe_is_valid_pinned_and_records_the_seed(run, demo_models):
    text = (run / "recipe.yaml").read_text()
    load_recipe(text)
    assert str(demo_models.specialists["arith"].resolve()) in text
    assert "--random-seed 0" in text


def test_best_merge_beats_each_source_and_a_plain_linear_merge(run, measured):
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    scores, harmonic = with_preservation(
        score_model(model, measured["tasks"]), measured["reference"]
    )
    for name, source_harmonic in measured["sources"].items():
        assert harmonic >= source_harmonic, name
    assert harmonic >= measured["linear"]


def test_stock_model_scores_as_the_search_trial_did(run):
    best = json.loads((run / "best.json").read_text())
    final = json.loads((run / "final.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-5)


def test_summary_shows_search_and_final_scores_and_how_to_rebuild(run):
    summary = (run / "summary.md").read_text()
    assert "search (best trial)" in summary and "model/ (stock mergekit)" in summary
    assert "mergekit-" in summary and str(run / "recipe.yaml") in summary


def _as_bfloat16(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    tensors = load_file(str(folder / "model.safetensors"))
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(bf16, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_bf16_mixed_recipe_built_by_stock_mergekit_scores_exactly_as_its_trial(
    demo_models, tmp_path
):
    names = list(demo_models.specialists)
    base = _as_bfloat16(demo_models.base, tmp_path / "base")
    sources = [_as_bfloat16(demo_models.specialists[n], tmp_path / n) for n in names]
    arguments = ["search", *(str(s) for s in sources), "--base", str(base), "--quiet"]
    arguments += ["--out", str(tmp_path / "run"), "--trials", "6", "--initial", "4"]
    arguments += ["--methods", "ties,dare_ties,task_arithmetic", "--seed", "1"]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["harmonic_mean"] == best["harmonic_mean"]
    for name in names:
        assert final["tasks"][name]["loss"] == best["tasks"][name]["loss"]


def test_search_over_slerp_and_the_other_interpolations_is_rebuilt_by_stock_mergekit(
    demo_models, tmp_path
):
    names = list(demo_models.specialists)
    methods = ["slerp", "nuslerp", "multislerp", "karcher", "model_stock"]
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names), "--quiet"]
    arguments += ["--base", str(demo_models.base), "--out", str(tmp_path / "run")]
    arguments += ["--trials", "8", "--initial", "6", "--methods", ",".join(methods)]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().split()]
    chosen = {v for t in trials for k, v in t["config"].items() if k.endswith(":method")}
    assert len(chosen) >= 4
    for trial in trials:  # weights are searched only where the block's method takes them
        for key, method in trial["config"].items():
            block = key.removesuffix(":method")
            if key.endswith(":method"):
                has_weight = f"{block}:mix" in trial["config"]  # two sources: a mix
                assert has_weight == (method in {"slerp", "nuslerp", "multislerp"}), trial
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-5)


def test_progress_plot_is_a_png_linked_from_the_summary(run):
    assert (run / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](progress.png)" in (run / "summary.md").read_text()


def test_baselines_command_scores_the_usual_merges_and_the_hand_grid_like_trials(
    demo_models, measured, tmp_path
):
    names = list(demo_models.specialists)
    arguments = ["baselines", *(str(demo_models.specialists[n]) for n in names)]
    # float32 as `measured` scores (auto times bfloat16 against float32 on this machine, and
    # under load that timing can choose either).
    arguments += ["--base", str(demo_models.base), "--out", str(tmp_path / "b"), "--grid",
                  "--eval-dtype", "float32"]  # fmt: skip
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads((tmp_path / "b" / "baselines.json").read_text())
    assert list(saved) == [b.label(2) for b in BASELINES + HAND_GRID]
    assert list(saved)[:7] == ["linear w=0.5", "task_arithmetic w=0.5", "ties w=0.5 d=0.5",
                               "dare_linear w=0.5 d=0.5", "dare_ties w=0.5 d=0.5",
                               "task_arithmetic w=1", "dare_ties w=1 d=0.5"]  # fmt: skip
    assert "slerp t=0.5" in saved and "task_arithmetic w=0.3" in saved
    # Scored exactly as the independent linear 0.5/0.5 measurement of this module.
    assert saved["linear w=0.5"]["harmonic_mean"] == pytest.approx(measured["linear"], rel=1e-6)
    assert "dare_ties w=0.5 d=0.5" in result.output and "ties w=0.5 d=0.7" in result.output
    values = [r["harmonic_mean"] for r in saved.values()]
    assert len(set(values)) > 10  # real, different merges


def test_summary_compares_the_best_with_the_baselines(run):
    summary = (run / "summary.md").read_text()
    assert summary.count("| baseline: ") == len(BASELINES)
    best = json.loads((run / "best.json").read_text())["harmonic_mean"]
    baselines = json.loads((run / "baselines.json").read_text())
    assert best >= max(b["harmonic_mean"] for b in baselines.values())
