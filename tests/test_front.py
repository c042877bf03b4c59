"""Trade-offs between tasks: the Pareto front of a run, its hypervolume, and a picked point
rebuilt by stock mergekit (automerge-mk front / pick)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import short_search_arguments
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from automerge_mk import front
from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.errors import SettingsError
from automerge_mk.pipeline import run_front, run_pick
from automerge_mk.rundir import RunDir, RunRecord
from automerge_mk.search import trial_value
from automerge_mk.settings import SearchSettings
from automerge_mk.space import plan_from_record
from automerge_mk.types import TaskScore, TrialResult, best_trial

TASKS = ["a", "b"]


def _trial(number: int, aps: tuple[float, ...], partial: bool = False) -> TrialResult:
    tasks = {
        f"t{i}": TaskScore(loss=1.0, accuracy=0.5, tokens=10, preservation=ap)
        for i, ap in enumerate(aps)
    }
    return TrialResult(trial=number, status="ok", config={}, cost=0.0, harmonic_mean=0.0,
                       tasks=tasks, seconds={}, partial=partial)  # fmt: skip


def _brute_force_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point is >= on every task and > on one."""
    keep = []
    for i, p in enumerate(points):
        beaten = False
        for j, q in enumerate(points):
            if j != i and all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q)):
                beaten = True
        if not beaten:
            keep.append(i)
    return keep


def _union_volume(points: list[tuple[float, ...]], reference: tuple[float, ...]) -> float:
    """The volume of the union of the boxes [reference, p], by inclusion-exclusion (another
    algorithm than front.hypervolume's slicing)."""
    boxes = [p for p in points if all(x > r for x, r in zip(p, reference))]
    volume = 0.0
    for size in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, size):
            corner = [min(values) for values in zip(*subset)]
            box = 1.0
            for x, r in zip(corner, reference):
                box *= x - r
            volume += (-1) ** (size + 1) * box
    return volume


ap = st.floats(min_value=0.0, max_value=1.5, allow_nan=False).map(lambda x: round(x, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ap, ap, ap), min_size=1, max_size=12))
def test_the_front_is_exactly_the_non_dominated_set(points):
    trials = [_trial(i, p) for i, p in enumerate(points)]
    names = ["t0", "t1", "t2"]
    assert [t.trial for t in front.pareto_front(trials, names)] == _brute_force_front(points)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(ap, ap, ap), min_size=1, max_size=7))
def test_hypervolume_is_the_volume_of_the_union_of_the_dominated_boxes(points):
    reference = (0.2, 0.1, 0.3)
    assert front.hypervolume(points, reference) == pytest.approx(
        _union_volume(points, reference), abs=1e-9
    )


def test_hypervolume_of_a_staircase():
    # (3,1), (2,2), (1,3) over (0,0): columns of heights 1, 2, 3, each 1 wide
    assert front.hypervolume([(3, 1), (2, 2), (1, 3)], (0, 0)) == pytest.approx(6.0)
    assert front.hypervolume([(1, 1)], (1, 0)) == 0.0  # not beyond the reference


def test_partial_trials_are_not_on_the_front():
    trials = [_trial(0, (0.5, 0.5)), _trial(1, (0.9, 0.9), partial=True)]
    assert [t.trial for t in front.pareto_front(trials, ["t0", "t1"])] == [0]


def test_preferences_weigh_tasks_and_refuse_what_is_not_a_task():
    trials = [_trial(0, (0.9, 0.3)), _trial(1, (0.6, 0.6)), _trial(2, (0.3, 0.9))]
    names = ["t0", "t1"]
    assert front.preferred(trials, names, front.parse_preferences([], names)).trial == 1
    assert front.preferred(trials, names, front.parse_preferences(["t0=4"], names)).trial == 0
    assert front.preferred(trials, names, front.parse_preferences(["t1=4"], names)).trial == 2
    with pytest.raises(SettingsError, match="the run's tasks are t0, t1"):
        front.parse_preferences(["code=2"], names)
    with pytest.raises(SettingsError, match="positive number"):
        front.parse_preferences(["t0=-1"], names)


# --- on a real run -----------------------------------------------------------------------


def _names(run: Path) -> list[str]:
    return list(RunRecord.read(run).names)


def test_front_of_the_demo_run_matches_a_brute_force_and_holds_the_search_result(
    demo_run, tmp_path
):
    written = run_front(demo_run, tmp_path)
    trials, names = RunDir(demo_run).trials(), _names(demo_run)
    full = front.candidates(trials, names)
    points = [front.task_point(t.tasks, names) for t in full]
    expected = [full[i].trial for i in _brute_force_front(points)]
    assert [t.trial for t in front.pareto_front(trials, names)] == expected
    text = written.read_text()
    assert f"**{len(expected)}** of them {'is' if len(expected) == 1 else 'are'} on the" in text
    for number in expected:
        assert f"\n| {number} | " in text
    assert f"| {best_trial(trials).trial} | " in text and "H pick (the search's result)" in text
    assert "Hypervolume over the sources' point" in text
    assert (tmp_path / "front.png").stat().st_size > 10_000


def test_front_works_on_a_search_that_is_still_running(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    lines = (run / "trials.jsonl").read_text().splitlines(keepends=True)
    (run / "trials.jsonl").write_text("".join(lines[:15]))
    holder = subprocess.Popen(  # another process holds the run's lock, as a search does
        [sys.executable, "-c", "import sys, time; from automerge_mk.rundir import RunDir; "
         f"RunDir.reopen(__import__('pathlib').Path({str(run)!r})); print('locked', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(run / "trials.jsonl", "a") as trials:  # the search is mid-append
            trials.write(lines[15][:40])
        result = CliRunner().invoke(main, ["front", str(run)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "of 15 trials were scored on all of the validation data" in result.output
    assert (run / "front.md").is_file() and (run / "front.png").is_file()


def test_pick_rebuilds_a_front_point_bit_for_bit_and_scores_it_like_its_trial(
    demo_run, demo_models, tmp_path
):
    trials, names = RunDir(demo_run).trials(), _names(demo_run)
    points = front.pareto_front(trials, names)
    best = best_trial(trials)
    others = [t for t in points if t.trial != best.trial]
    assert others, "the demo run's front has only its best trial"
    chosen = others[0]
    out = tmp_path / "picked"
    result = CliRunner().invoke(main, ["pick", str(demo_run), "--trial", str(chosen.trial),
                                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"automerge-mk pick: trial {chosen.trial}" in result.output

    # model/ (built by stock mergekit from recipe.yaml) is exactly the trial's in-memory merge
    record = RunRecord.read(demo_run)
    plan = plan_from_record(record, chosen.config)
    base = demo_models.base
    engine = MergeEngine([demo_models.specialists[n] for n in names], base, base,
                         dtype=plan.dtype)  # fmt: skip
    expected = engine.merge(plan)
    built = load_file(str(out / "model" / "model.safetensors"))
    assert set(built) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(built[name], tensor), name

    final = json.loads((out / "final.json").read_text())
    for task in names:  # rescored: the same AP as at search time, up to evaluation noise
        assert final["tasks"][task]["preservation"] == pytest.approx(
            chosen.tasks[task].preservation, abs=2e-3
        )
    best_json = json.loads((out / "best.json").read_text())
    assert best_json["trial"] == chosen.trial and best_json["picked_from"] == str(demo_run)
    assert RunDir(out).trials() == trials  # the run's trials came along; the run is unchanged
    assert json.loads((demo_run / "best.json").read_text())["trial"] == best.trial

    report = CliRunner().invoke(main, ["report", str(out)])  # the report shows the pick
    assert report.exit_code == 0, report.output
    text = (out / "report.md").read_text()
    assert f"picked trial {chosen.trial}" in text and "picked: this run's model" in text


def test_pick_by_preference_takes_the_front_point_with_the_best_weighted_mean(demo_run, tmp_path):
    trials, names = RunDir(demo_run).trials(), _names(demo_run)
    points = front.pareto_front(trials, names)
    weights = front.parse_preferences([f"{names[1]}=5"], names)
    expected = front.preferred(points, names, weights)
    out = run_pick(demo_run, prefer=(f"{names[1]}=5",), out=tmp_path / "preferred")
    assert json.loads((out / "best.json").read_text())["trial"] == expected.trial
    assert f"preferring {names[1]}=5" in (out / "summary.md").read_text()
    # no task weighs more: the front's best harmonic mean is the search's own result
    plain = front.preferred(points, names, front.parse_preferences([], names))
    assert plain.trial == best_trial(trials).trial


def test_pick_refuses_what_it_cannot_rebuild_before_writing(demo_run, tmp_path):
    out = tmp_path / "never"
    for arguments, message in [
        ([], "give either --trial N or --prefer TASK=WEIGHT"),
        (["--trial", "0", "--prefer", "x=1"], "give either --trial N or --prefer TASK=WEIGHT"),
        (["--trial", "9999"], "SettingsError: --trial 9999: it has no such trial"),
        (["--prefer", "nosuchtask=2"], "SettingsError: --prefer 'nosuchtask=2'"),
        (["--trial", "0", "--out", str(demo_run)], "is the run itself"),
    ]:
        result = CliRunner().invoke(main, ["pick", str(demo_run), "--out", str(out), *arguments])
        assert result.exit_code != 0 and message in result.output, (arguments, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()


def test_demo_runs_the_trials_it_is_asked_for(demo_models, tmp_path):
    shutil.copytree(demo_models.base.parent, tmp_path / "demo" / "models")
    arguments = ["demo", "--out", str(tmp_path / "demo"), "--trials", "9", "--initial", "2"]
    result = CliRunner().invoke(main, [*arguments, "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert len(RunDir(tmp_path / "demo" / "run").trials()) == 9


# --- --objective pareto ------------------------------------------------------------------


def test_a_pareto_search_tells_the_optimiser_one_cost_per_task():
    result = _trial(0, (0.75, 1.25))
    value = trial_value(result, ("t0", "t1"))
    assert value.cost == pytest.approx([0.25, -0.25])
    failed = result.model_copy(update={"status": "failed"})
    assert trial_value(failed, ("t0", "t1")).cost == [1.0, 1.0]  # the worst, like 1 - H
    assert trial_value(result).cost == result.cost  # one objective: 1 - H as before


def test_a_pareto_search_is_not_raced_writes_its_front_and_repeats_for_a_seed(
    demo_models, tmp_path
):
    runs = []
    for name in ("first", "again"):
        out = tmp_path / name
        arguments = short_search_arguments(demo_models, out, 12) + ["--objective", "pareto"]
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, result.output + repr(result.exception)
        runs.append(RunDir(out).trials())
    first = runs[0]
    assert not any(t.partial for t in first)  # racing is off: every trial on every example
    assert [t.config for t in first] == [t.config for t in runs[1]]
    summary = (tmp_path / "first" / "summary.md").read_text()
    assert "## Trade-offs between tasks (--objective pareto)" in summary
    assert (tmp_path / "first" / "front.png").is_file()
    (history,) = (tmp_path / "first" / ".smac").rglob("runhistory.json")
    costs = [entry["cost"] for entry in json.loads(history.read_text())["data"]]
    assert len(costs) == 12 and all(len(cost) == 2 for cost in costs)  # one cost per task


def test_pareto_with_multi_fidelity_is_refused():
    with pytest.raises(ValueError, match="--objective pareto runs on all of the data"):
        SearchSettings(objective="pareto", fidelity=(None, None))
