"""Three source models end to end: a weight per model, H over three tasks, a recipe for three."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from automerge_mk.cli import main
from automerge_mk.recipe import load_recipe
from automerge_mk.types import harmonic_mean


@pytest.fixture(scope="module")
def three_run(demo_models, tmp_path_factory):
    """The two demo specialists and a third: the arith specialist, nudged, with its own task."""
    root = tmp_path_factory.mktemp("three")
    third = root / "third"
    shutil.copytree(demo_models.specialists["arith"], third)
    tensors = load_file(str(third / "model.safetensors"))
    generator = torch.Generator().manual_seed(3)
    nudged = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(nudged, str(third / "model.safetensors"), metadata={"format": "pt"})
    out = root / "run"
    arguments = ["search", str(demo_models.specialists["arith"])]
    arguments += [str(demo_models.specialists["reverse"]), str(third)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet"]
    arguments += ["--trials", "8", "--initial", "5"]
    arguments += [f"--data={n}={demo_models.validation[n]}" for n in ("arith", "reverse")]
    arguments += [f"--data=third={demo_models.test['arith']}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_every_trial_scores_three_tasks_and_their_harmonic_mean(three_run):
    lines = [json.loads(line) for line in (three_run / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for trial in lines:
        assert set(trial["tasks"]) == {"arith", "reverse", "third"}
        aps = [score["preservation"] for score in trial["tasks"].values()]
        assert trial["harmonic_mean"] == pytest.approx(harmonic_mean(aps))
        weights = [v for k, v in trial["config"].items() if ":weight:" in k]
        assert len(weights) == 3 * 5  # a weight per model for each of the five blocks


def test_recipe_merges_three_models_and_stock_mergekit_reproduces_the_trial(three_run):
    documents = load_recipe((three_run / "recipe.yaml").read_text())
    parts = [d for d in documents if d.get("name")] or documents
    for document in parts:
        assert len(document["models"]) == 3
    best = json.loads((three_run / "best.json").read_text())
    final = json.loads((three_run / "final.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-5)
    baselines = json.loads((three_run / "baselines.json").read_text())
    assert "linear w=0.33" in baselines and "task_arithmetic w=1" in baselines
    assert len(baselines) == 7


def test_front_of_three_tasks_is_drawn_as_parallel_coordinates(three_run, tmp_path):
    from automerge_mk import front
    from automerge_mk.pipeline import run_front
    from automerge_mk.rundir import RunDir

    text = run_front(three_run, tmp_path).read_text()
    trials = RunDir(three_run).trials()
    points = front.pareto_front(trials, ["arith", "reverse", "third"])
    assert f"**{len(points)}** of them {'is' if len(points) == 1 else 'are'} on the" in text
    assert "| trial | arith AP | reverse AP | third AP | H (AP) |" in text
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
