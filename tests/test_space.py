"""Issue 16: the scaled space (whole task vectors expressible), the baselines as the search's
first trials, and the convex space of automerge-mk 0.1 kept for its runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ConfigSpace import Configuration
from conftest import short_search_arguments
from test_engine import _assert_bit_identical, _stock

from automerge_mk import space
from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.rundir import RunRecord
from automerge_mk.search import MergeObjective
from automerge_mk.segment import segment_model
from automerge_mk.settings import SearchSettings
from automerge_mk.types import BlockChoice, MergePlan

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-fingerprints"
NAMES = ("a", "b")


def _blocks(family):
    return segment_model(family["base"], "layers:2")


def _uniform(family, method, weights, densities=None) -> MergePlan:
    blocks = _blocks(family)
    return space.uniform_plan(method, weights, densities, blocks,
                              (str(family["a"]), str(family["b"])), str(family["base"]),
                              "float32", seed=3)  # fmt: skip


def _round_trip(plan: MergePlan, settings: SearchSettings) -> MergePlan:
    space_ = space.build_space(plan.blocks, NAMES, settings)
    config = space.config_from_plan(plan, space_, NAMES, settings)
    assert config is not None, plan.choices[0]
    return space.plan_from_config(dict(config), plan.blocks, plan.sources, NAMES, plan.base,
                                  settings, plan.dtype)  # fmt: skip


@pytest.mark.parametrize(
    "method, weights",
    [("task_arithmetic", (1.0, 1.0)), ("task_arithmetic", (1.2, 0.3)),
     ("dare_ties", (0.2, 0.9)), ("linear", (0.3, 0.7)), ("ties", (0.6, 0.4))],
)  # fmt: skip
def test_the_scaled_space_expresses_each_weight_pair_and_gives_it_back(family, method, weights):
    densities = (0.5, 0.5) if method in ("dare_ties", "ties") else None
    plan = _uniform(family, method, weights, densities)
    back = _round_trip(plan, SearchSettings())
    assert all(c.method == method for c in back.choices)
    for choice in back.choices:
        assert choice.weights == pytest.approx(weights, abs=1e-12)
        assert choice.densities == densities


def test_whole_task_vectors_are_outside_the_convex_space_and_inside_the_scaled_one(family):
    plan = _uniform(family, "task_arithmetic", (1.0, 1.0))
    for weighting, expressible in (("convex", False), ("scaled", True)):
        settings = SearchSettings(weighting=weighting)
        space_ = space.build_space(plan.blocks, NAMES, settings)
        assert (space.config_from_plan(plan, space_, NAMES, settings) is not None) is expressible
    assert SearchSettings().weight_range == (0.0, 1.5)
    assert SearchSettings(weighting="convex").weight_range == (0.0, 1.0)
    # The normalising methods get a mix only: no scale for linear or ties to waste trials on.
    settings = SearchSettings(methods=("linear", "ties"))
    names = list(space.build_space(plan.blocks, NAMES, settings))
    assert not [n for n in names if n.endswith(":scale")] and [n for n in names if ":mix" in n]


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "dare_linear"])
def test_a_plan_at_weights_one_one_equals_stock_mergekit_on_its_recipe(family, tmp_path, method):
    densities = None if method == "task_arithmetic" else (0.7, 0.4)
    blocks = segment_model(family["base"], "layers:2+components")
    choices = tuple(
        BlockChoice(method=method if i % 2 else "linear",
                    weights=(1.0, 1.0) if i % 2 else (0.5, 0.5),
                    densities=densities if i % 2 else None)
        for i in range(len(blocks))
    )  # fmt: skip
    plan = MergePlan(sources=(str(family["a"]), str(family["b"])), base=str(family["base"]),
                     blocks=blocks, choices=choices, seed=3)  # fmt: skip
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"])
    ours = engine.merge(plan)
    _assert_bit_identical(_stock(plan, tmp_path), ours)
    # Both task vectors whole: not the average that weights summing to 1 would give.
    average = engine.merge(plan.model_copy(update={"choices": tuple(
        c.model_copy(update={"weights": (0.5, 0.5)}) for c in choices)}))  # fmt: skip
    name = blocks[1].tensors[0]
    assert not ours[name].equal(average[name])


def test_the_baselines_are_the_first_trials_and_are_not_scored_again(
    demo_models, tmp_path, monkeypatch
):
    calls = []
    original = MergeObjective.evaluate_plan

    def counted(self, plan, trial, config, budget=None):
        calls.append(trial)
        return original(self, plan, trial, config, budget)

    monkeypatch.setattr(MergeObjective, "evaluate_plan", counted)
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, 8)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)

    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    baselines = json.loads((out / "baselines.json").read_text())
    labels = list(baselines)
    assert labels[:2] == ["linear w=0.5", "task_arithmetic w=0.5"]
    assert "task_arithmetic w=1" in labels and "dare_ties w=1 d=0.5" in labels
    record = RunRecord.read(out)
    plans = space.baseline_plans(record.blocks, tuple(str(m.path) for m in record.models),
                                 str(record.base.path), record.dtype, 0)  # fmt: skip
    for index, (label, scored) in enumerate(baselines.items()):
        assert scored["trial"] == index  # trial k is the k-th baseline ...
        assert scored["harmonic_mean"] == trials[index]["harmonic_mean"]
        # ... and that trial merged exactly the baseline's plan.
        _same_choices(space.plan_from_record(record, trials[index]["config"]), plans[label])
    # Every evaluation was a trial: none for the baselines after the search.
    assert calls == list(range(8))
    best = max(t["harmonic_mean"] for t in trials)
    assert best >= max(b["harmonic_mean"] for b in baselines.values())
    summary = (out / "summary.md").read_text()
    assert "7 of the 7 baselines were its first trials" in summary


def _same_choices(plan: MergePlan, expected: MergePlan) -> bool:
    for got, want in zip(plan.choices, expected.choices):
        assert got.method == want.method
        assert got.weights == pytest.approx(want.weights, abs=1e-12)
        assert got.densities == want.densities
    return True


def test_every_trial_of_an_old_run_is_a_point_of_its_recorded_convex_space():
    """A run of automerge-mk 0.1 (no weighting recorded) keeps its space: its trials are
    configurations of that space, not of the new default one."""
    text = (FIXTURE / "settings.json").read_text().replace("{MODELS}", "/nonexistent")
    record = RunRecord.model_validate_json(text)
    assert record.settings.weighting == "convex" and not record.settings.baselines_first
    assert record.settings.weight_range == (0.0, 1.0)
    old = space.build_space(record.blocks, record.names, record.settings)
    new = space.build_space(record.blocks, record.names, SearchSettings())
    for line in (FIXTURE / "trials.jsonl").read_text().splitlines():
        config = json.loads(line)["config"]
        Configuration(old, values=config)  # raises when the space changed under it
        with pytest.raises(ValueError):
            Configuration(new, values=config)


def test_an_old_run_warm_starts_a_scaled_search_as_the_same_merges(
    demo_models, tmp_path, monkeypatch
):
    """The run of automerge-mk 0.1 in tests/fixtures (convex space, no weighting recorded)
    warm-starts a search of today's default space: its trials are told as the same merges."""
    convex = tmp_path / "convex"
    convex.mkdir()
    settings = (FIXTURE / "settings.json").read_text()
    (convex / "settings.json").write_text(
        settings.replace("{MODELS}", str(demo_models.base.parent))
    )
    (convex / "trials.jsonl").write_text((FIXTURE / "trials.jsonl").read_text())
    old_trials = [json.loads(line) for line in (convex / "trials.jsonl").read_text().splitlines()]
    assert all(":weight" in "".join(t["config"]) for t in old_trials)

    told = []
    from automerge_mk.search import optimizer

    original = optimizer.tell_recorded

    def spy(opt, result, *rest):
        told.append(result)
        return original(opt, result, *rest)

    monkeypatch.setattr(optimizer, "tell_recorded", spy)
    scaled = tmp_path / "scaled"
    arguments = short_search_arguments(demo_models, scaled, 8) + ["--warm-start", str(convex)]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "2 of its 2 trials are told as the same merges" in result.output
    old_record, new_record = RunRecord.read(convex), RunRecord.read(scaled)
    assert [t.harmonic_mean for t in told] == [t["harmonic_mean"] for t in old_trials]
    for old, new in zip(old_trials, told):
        assert ":mix" in "".join(new.config)
        _same_choices(space.plan_from_record(new_record, new.config),
                      space.plan_from_record(old_record, old["config"]))  # fmt: skip
