"""Warm start: an earlier run's trials are told to the optimiser when the spaces match."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from click.testing import CliRunner
from ConfigSpace import ConfigurationSpace, Float

from automerge_mk.cli import main
from automerge_mk.search import make_optimizer, warm_start
from automerge_mk.types import TrialResult


def _search(demo_models, out: Path, *extra: str):
    names = list(demo_models.specialists)
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet", *extra]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    return CliRunner().invoke(main, arguments)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_told_trials_are_in_the_optimisers_history_and_the_best_is_its_incumbent():
    space = ConfigurationSpace(seed=0)
    space.add([Float("x", (0, 1))])
    optimizer = make_optimizer(space, 10, 3, 0, Path(tempfile.mkdtemp()))
    trials = [
        TrialResult(
            trial=i,
            status="ok",
            config={"x": x},
            cost=abs(x - 0.3),
            harmonic_mean=0,
            tasks={},
            seconds={},
        )  # fmt: skip
        for i, x in enumerate([0.9, 0.35, 0.6])
    ]
    warm_start(optimizer, space, trials)
    assert len(optimizer.runhistory) == 3
    assert dict(optimizer.intensifier.get_incumbent()) == {"x": 0.35}


def test_warm_started_search_does_not_repeat_the_earlier_runs_trials(
    demo_models, demo_run, tmp_path
):
    out = tmp_path / "warm"
    result = _search(demo_models, out, "--trials", "12", "--initial", "10", "--seed", "0",
                     "--warm-start", str(demo_run))  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    warm, cold = _lines(out / "trials.jsonl"), _lines(demo_run / "trials.jsonl")
    assert len(warm) == 12
    # Cold, this seed proposes the earlier run's Sobol design again (see test_resume); warm,
    # the optimiser knows those 40 results and proposes only configurations not yet tried.
    earlier = [t["config"] for t in cold]
    assert not [t["config"] for t in warm if t["config"] in earlier]
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["warm_start"] == str(demo_run.resolve())


def test_warm_start_from_another_space_is_refused_before_anything_runs(
    demo_models, demo_run, tmp_path
):
    out = tmp_path / "other"
    result = _search(demo_models, out, "--strategy", "layers:2", "--warm-start", str(demo_run))
    assert result.exit_code == 1
    assert "searched another space" in result.output and "only here" in result.output
    assert not out.exists()
