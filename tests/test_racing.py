"""Racing: trials scored chunk by chunk against the incumbent, stopped once they cannot win."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import short_search_arguments
from transformers import AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.evaluate import TaskData, load_texts, score_task, tokenize_task
from automerge_mk.search import MergeObjective, Race
from automerge_mk.search.racing import FIRST_LOOK, Incumbent, paired_ratio, run_race
from automerge_mk.segment import segment_model
from automerge_mk.space import uniform_plan
from automerge_mk.types import TaskScore

TRIALS = 16


@pytest.fixture(scope="module")
def racing(demo_models):
    """A racing objective on the demo sources (8 examples per task between comparisons)."""
    names = list(demo_models.specialists)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base))
    tasks = [tokenize_task(n, load_texts(demo_models.validation[n]), tokenizer, 512) for n in names]
    sources = [demo_models.specialists[n] for n in names]
    engine = MergeEngine(sources, demo_models.base, demo_models.base)
    references = {
        t.name: score_task(engine.load_source(demo_models.specialists[t.name]), t) for t in tasks
    }
    blocks = segment_model(demo_models.base, "trace")

    folders = tuple(str(s) for s in sources)

    def plan(method: str, weight: float):
        weights = (weight, weight)
        return uniform_plan(
            method, weights, None, blocks, folders, str(demo_models.base), "float32"
        )

    objective = MergeObjective(engine, tasks, references, None, race=Race(8, 0.99))
    return objective, plan, tasks


def _full_tokens(tasks) -> int:
    return sum(task.computed_tokens for task in tasks)


def test_a_trial_that_cannot_win_stops_early_and_reports_an_estimate(racing):
    objective, plan, tasks = racing
    objective.incumbent = None
    good = objective.evaluate_plan(plan("linear", 0.5), 0, {"label": "linear"})
    assert not good.partial and good.computed_tokens == _full_tokens(tasks)
    objective.observe([good])
    # Weight 0 on both task vectors is the base itself: far below the linear merge.
    bad = objective.evaluate_plan(plan("task_arithmetic", 0.0), 1, {"label": "base"})
    assert bad.partial and bad.status == "ok"
    assert bad.computed_tokens < 0.5 * _full_tokens(tasks)
    seen = {name: len(score.example_losses) for name, score in bad.tasks.items()}
    # never stopped before its first FIRST_LOOK examples, stopped before the last
    assert all(FIRST_LOOK <= n < len(t.sequences) for n, t in zip(seen.values(), tasks))
    assert bad.harmonic_mean < good.harmonic_mean
    # The estimate is close to what all of the examples give.
    objective.incumbent = None
    whole = objective.evaluate_plan(plan("task_arithmetic", 0.0), 2, {"label": "base"})
    assert not whole.partial
    assert bad.harmonic_mean == pytest.approx(whole.harmonic_mean, rel=0.25)


def test_a_trial_that_wins_is_scored_on_every_example_exactly_as_without_racing(racing):
    objective, plan, tasks = racing
    objective.incumbent = None
    weak = objective.evaluate_plan(plan("task_arithmetic", 0.0), 0, {"label": "base"})
    objective.observe([weak])
    strong = objective.evaluate_plan(plan("linear", 0.5), 1, {"label": "linear"})
    assert not strong.partial and strong.computed_tokens == _full_tokens(tasks)
    assert strong.harmonic_mean > weak.harmonic_mean
    race, objective.race = objective.race, None
    try:
        plain = objective.evaluate_plan(plan("linear", 0.5), 2, {"label": "linear"})
    finally:
        objective.race = race
    assert strong.harmonic_mean == pytest.approx(plain.harmonic_mean, rel=1e-6)
    for name, score in strong.tasks.items():
        assert score.example_losses == pytest.approx(plain.tasks[name].example_losses, rel=1e-5)


def test_unraced_configurations_are_scored_on_every_example(racing):
    objective, plan, tasks = racing
    objective.incumbent = None
    good = objective.evaluate_plan(plan("linear", 0.5), 0, {"label": "linear"})
    objective.observe([good])
    objective.unraced = [{"label": "base"}]
    try:
        base = objective.evaluate_plan(plan("task_arithmetic", 0.0), 1, {"label": "base"})
    finally:
        objective.unraced = []
    assert not base.partial and base.computed_tokens == _full_tokens(tasks)


def _task(name: str, examples: int) -> TaskData:
    """A task of `examples` examples of one scored token each (all racing reads of it)."""
    return TaskData(name=name, sequences=((1, 2),) * examples, pad_id=0,
                    indices=tuple(range(examples)))  # fmt: skip


def test_the_first_look_comes_after_first_examples_in_one_part_then_a_chunk_at_a_time():
    tasks = [_task("a", 40), _task("b", 20)]
    steps = Race(8, 0.95, first=16).steps(tasks)
    assert [len(s["a"]) for s in steps] == [16, 8, 8, 8]
    assert [len(s["b"]) for s in steps] == [16, 4, 0, 0]
    for name, size in (("a", 40), ("b", 20)):  # every example once, in the race's order
        assert sorted(p for s in steps for p in s[name]) == list(range(size))
    assert [len(s["a"]) for s in Race(32, 0.95, first=16).steps(tasks)] == [32, 8]


def test_the_bound_is_one_on_the_harmonic_mean_not_one_per_task():
    """Against an incumbent with AP 1 on each task, a candidate with loss ratios r_t (standard
    errors se_t) after its first look stops exactly when z < (sum r_t - T) / sqrt(sum se_t^2),
    the harmonic mean's bound; a bound per task would stop only below (sum r_t - T) / sum se_t."""
    rng = np.random.default_rng(0)
    names, size = ("a", "b"), 40
    tasks = [_task(name, size) for name in names]
    theirs = {n: rng.uniform(1, 3, size) for n in names}
    mine = {n: theirs[n] * rng.uniform(0.4, 1.8, size) for n in names}  # 10 % worse, noisy
    references = {n: TaskScore(loss=theirs[n].mean(), accuracy=0.0, tokens=size) for n in names}
    first = Race(size // 2, 0.9, first=size // 2).steps(tasks)[0]
    found = {n: paired_ratio(mine[n][first[n]], theirs[n][first[n]], size) for n in names}
    ratios = {n: r for n, (r, _) in found.items()}
    errors = {n: se for n, (_, se) in found.items()}
    excess = sum(ratios.values()) - len(names)
    joint = excess / math.sqrt(sum(e * e for e in errors.values()))
    per_task = excess / sum(errors.values())
    assert 0.5 < per_task < joint < 5  # (a z both bounds can be tested at)

    def stopped(z: float) -> bool:
        def score_part(part):
            kept = tuple(float(mine[part.name][i]) for i in part.indices)
            return TaskScore(loss=sum(kept) / len(kept), accuracy=0.0, tokens=len(kept),
                             example_losses=kept)  # fmt: skip

        race = Race(size // 2, NormalDist().cdf(z), first=size // 2)
        raced = run_race(score_part, tasks, references, race, Incumbent(1.0, theirs))
        return not raced.complete

    assert stopped(joint - 0.01) and not stopped(joint + 0.01)


def _search(demo_models, out: Path, *extra: str):
    arguments = short_search_arguments(demo_models, out, TRIALS)
    return CliRunner().invoke(main, [*arguments, "--race-chunk", "8", *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def racing_run(demo_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("racing") / "run"
    result = _search(demo_models, out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_the_result_of_a_racing_search_is_a_trial_scored_on_every_example(racing_run):
    trials = _lines(racing_run / "trials.jsonl")
    full = max(t["computed_tokens"] for t in trials)
    partial = [t for t in trials if t["partial"]]
    assert partial and all(t["computed_tokens"] < full for t in partial)
    assert all(t["computed_tokens"] == full for t in trials if not t["partial"])
    baselines = json.loads((racing_run / "baselines.json").read_text())
    first = sorted(b["trial"] for b in baselines.values() if "trial" in b)
    assert first and not trials[first[0]]["partial"]  # nothing to race against yet
    # The other baselines race like any trial; a stopped one keeps its estimate, marked.
    stopped = [label for label, b in baselines.items() if b.get("partial")]
    assert stopped and all(trials[baselines[label]["trial"]]["partial"] for label in stopped)
    best = json.loads((racing_run / "best.json").read_text())
    assert not best["partial"]
    assert best["harmonic_mean"] == max(t["harmonic_mean"] for t in trials if not t["partial"])
    # Every stopped trial was below the best full trial before it.
    for trial in partial:
        before = [t["harmonic_mean"] for t in trials[: trial["trial"]] if not t["partial"]]
        assert trial["harmonic_mean"] < max(before)
    final = json.loads((racing_run / "final.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-6)
    summary = (racing_run / "summary.md").read_text()
    assert f"{len(partial)} stopped early by racing" in summary
    for label in stopped:
        assert f"baseline: {label} (stopped early by racing: an estimate)" in summary
    full = {k: b["harmonic_mean"] for k, b in baselines.items() if not b.get("partial")}
    assert f"The best baseline ({max(full, key=full.get)}," in summary or (
        f"It beats the best baseline ({max(full, key=full.get)}," in summary
    )
    assert f"racing stopped {len(stopped)} of them early" in summary
    assert f"{sum(t['computed_tokens'] for t in trials):,} validation tokens computed" in summary


def test_a_killed_racing_search_resumes_without_losing_a_trial(racing_run, demo_models, tmp_path):
    trials = _lines(racing_run / "trials.jsonl")
    assert any(t["partial"] for t in trials[:10])
    out = tmp_path / "run"
    shutil.copytree(racing_run, out, ignore=shutil.ignore_patterns("model*", "best.json"))
    (out / "trials.jsonl").write_text(
        "".join(json.dumps(t) + "\n" for t in trials[:10])
    )  # as a search killed after its 10th trial leaves it
    result = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    resumed = _lines(out / "trials.jsonl")
    assert resumed[:10] == trials[:10]
    # Same incumbent, same races: the remaining trials are the uninterrupted run's.
    for mine, theirs in zip(resumed[10:], trials[10:]):
        assert (mine["config"], mine["partial"]) == (theirs["config"], theirs["partial"])
        assert mine["harmonic_mean"] == pytest.approx(theirs["harmonic_mean"], rel=1e-6)


def test_a_warm_start_from_a_racing_run_tells_its_partial_trials(racing_run, demo_models, tmp_path):
    result = _search(demo_models, tmp_path / "warm", "--warm-start", str(racing_run),
                     "--trials", "6")  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    earlier = _lines(racing_run / "trials.jsonl")
    told = len(earlier)
    assert f"warm start: told the optimiser {told} trials" in result.output.replace("\n", " ")
