"""Multi-fidelity search: Hyperband over validation tokens, results from all of the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.evaluate import load_rows, score_task, subset_task, tokenize_task
from automerge_mk.rundir import RunRecord
from automerge_mk.space import plan_from_record
from automerge_mk.types import harmonic_mean

TRIALS = 30


def _search(demo_models, out: Path, *extra: str):
    names = list(demo_models.specialists)
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet", "--seed", "0"]
    arguments += ["--trials", str(TRIALS), "--initial", "8", *extra]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    return CliRunner().invoke(main, arguments)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fidelity_run(demo_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fidelity") / "run"
    result = _search(demo_models, out, "--fidelity", "tokens")
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_most_trials_run_on_few_tokens_and_the_result_on_all_of_them(fidelity_run):
    trials = _lines(fidelity_run / "trials.jsonl")
    budgets = json.loads((fidelity_run / "budgets.json").read_text())
    low, high, full = budgets["low"], budgets["high"], budgets["full"]
    assert (high, low) == (full, full // 9)
    assert len(trials) == TRIALS  # the highest budget is all of the data: no re-evaluation
    used = sorted({t["budget"] for t in trials})
    assert used == [round(full / 9), round(full / 3), full]  # Hyperband's budgets, eta 3
    assert sum(t["budget"] == low for t in trials) > TRIALS / 2
    full_trial = max(t["computed_tokens"] for t in trials)
    assert sum(t["computed_tokens"] for t in trials) < 0.6 * TRIALS * full_trial
    best = json.loads((fidelity_run / "best.json").read_text())
    at_full = [t for t in trials if t["budget"] == full]
    assert best["budget"] == full
    assert best["harmonic_mean"] == max(t["harmonic_mean"] for t in at_full)


def test_default_budgets_give_hyperband_all_three_levels():
    """MIN = MAX/9 rounded up (3014 -> 335) made SMAC see a ratio just under 9 and drop to two
    budgets; the default must keep three for every data size."""
    from smac.intensifier.successive_halving import SuccessiveHalving

    from automerge_mk.evaluate import TaskData
    from automerge_mk.search import Fidelity

    for full in range(20, 6000, 7):
        task = TaskData(name="t", sequences=((1,) * full,), pad_id=0, indices=(0,))
        low, high, _ = Fidelity.resolve((None, None), [task])
        assert SuccessiveHalving._get_max_iterations(3, high, low) == 2, full


def test_a_low_budget_trial_is_scored_against_the_specialists_on_the_same_examples(
    demo_models, fidelity_run
):
    """Recompute one low-budget trial from scratch: its merge on its subset, and each
    specialist (loaded by transformers, not the engine) on that same subset."""
    stored = RunRecord.read(fidelity_run)
    trial = next(t for t in _lines(fidelity_run / "trials.jsonl") if t["budget"] < 200)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base))
    engine = MergeEngine([m.path for m in stored.models], stored.base.path, stored.base.path,
                         dtype=stored.dtype)  # fmt: skip
    merged = engine.merge_into_model(plan_from_record(stored, trial["config"]))
    preservation = []
    for name, path in demo_models.specialists.items():
        task = tokenize_task(name, load_rows(Path(stored.data[name])), tokenizer, 512)
        subset = subset_task(task, trial["budget"], seed=0)
        assert len(subset.sequences) < len(task.sequences)
        specialist = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        reference = score_task(specialist.eval(), subset).loss
        loss = score_task(merged, subset).loss
        assert trial["tasks"][name]["loss"] == pytest.approx(loss, rel=1e-5)
        preservation.append(reference / loss)
    assert trial["harmonic_mean"] == pytest.approx(harmonic_mean(preservation), rel=1e-5)


def test_with_max_below_all_tokens_the_best_is_evaluated_again_on_all_of_them(
    demo_models, tmp_path
):
    out = tmp_path / "run"
    result = _search(demo_models, out, "--fidelity", "tokens:40:360")
    assert result.exit_code == 0, result.output + repr(result.exception)
    trials = _lines(out / "trials.jsonl")
    full = json.loads((out / "budgets.json").read_text())["full"]
    assert len(trials) == TRIALS + 1 and full > 360
    extra, searched = trials[-1], trials[:-1]
    assert extra["budget"] == full and max(t["budget"] for t in searched) == 360
    top = max((t for t in searched if t["budget"] == 360), key=lambda t: t["harmonic_mean"])
    assert extra["config"] == top["config"]  # the incumbent of the highest budget searched
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == TRIALS and best["harmonic_mean"] == extra["harmonic_mean"]
    # The result is scored like the final model: all validation tokens of every task.
    final = json.loads((out / "final.json").read_text())
    for name, score in final["tasks"].items():
        assert extra["tasks"][name]["tokens"] == score["tokens"]


def test_resumed_multi_fidelity_search_replays_budgets_and_goes_on_identically(
    fidelity_run, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(fidelity_run, out)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    (out / "trials.jsonl").write_text("".join(lines[:11]))  # killed after 11 trials
    result = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    resumed, uninterrupted = _lines(out / "trials.jsonl"), _lines(fidelity_run / "trials.jsonl")
    assert resumed[:11] == uninterrupted[:11]
    assert [(t["config"], t["budget"]) for t in resumed] == [
        (t["config"], t["budget"]) for t in uninterrupted
    ]
    assert [t["harmonic_mean"] for t in resumed] == [t["harmonic_mean"] for t in uninterrupted]


def test_report_shows_the_budgets(fidelity_run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(fidelity_run)])
    assert result.exit_code == 0, result.output
    text = (fidelity_run / "report.md").read_text()
    budgets = json.loads((fidelity_run / "budgets.json").read_text())
    assert "Multi-fidelity: trials at" in text and "highest budget only" in text
    first = text.split("## Top trials")[1].strip().splitlines()[2]
    assert f"| {budgets['full']} |" in first  # top trials: the highest budget first


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        ("epochs", "--fidelity takes tokens or tokens:MIN:MAX"),
        ("tokens:300:100", "give 0 < MIN < MAX"),
        ("tokens:10:99999999", "MAX is more than the"),
    ],
)
def test_bad_fidelity_is_refused_before_anything_is_written(
    demo_models, tmp_path, fidelity, message
):
    out = tmp_path / "run"
    result = _search(demo_models, out, "--fidelity", fidelity)
    assert result.exit_code != 0 and message in result.output
    assert not out.exists()


def test_random_search_has_no_budgets(demo_models, tmp_path):
    result = _search(demo_models, tmp_path / "r", "--fidelity", "tokens", "--optimizer", "random")
    assert result.exit_code != 0 and "--fidelity needs --optimizer smac" in result.output
