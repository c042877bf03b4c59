"""Similarity features of constructed pairs, the prior's rule, `suggest` and `--prior`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import short_search_arguments
from safetensors.torch import load_file, save_file

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.features import BlockFeatures, model_features
from automerge_mk.prior import block_choice, prior_plans
from automerge_mk.rundir import RunDir
from automerge_mk.segment import segment_model
from automerge_mk.settings import SearchSettings

BIN = Path(sys.executable).parent


def _source(base: Path, folder: Path, delta) -> Path:
    """A copy of `base` whose every tensor is moved by `delta(name, tensor)`."""
    shutil.copytree(base, folder)
    tensors = load_file(str(base / "model.safetensors"))
    moved = {k: v + delta(k, v) for k, v in tensors.items()}
    save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _task_vector(name: str, tensor: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash(name) % 2**31)
    return 0.01 * torch.randn(tensor.shape, generator=generator)


@pytest.fixture(scope="module")
def constructed(tiny_llama, tmp_path_factory):
    """The base, a source base + τ, its copy, and the opposite source base − τ."""
    root = tmp_path_factory.mktemp("constructed")
    a = _source(tiny_llama, root / "a", _task_vector)
    same = _source(tiny_llama, root / "same", _task_vector)
    opposite = _source(tiny_llama, root / "opposite", lambda k, v: -_task_vector(k, v))
    return tiny_llama, a, same, opposite


def test_identical_sources_have_cosine_one_no_conflict_and_no_distance(constructed):
    base, a, same, _ = constructed
    blocks = segment_model(base, "layers:2")
    features = model_features([a, same], base, blocks, probe=list(range(3, 40)))
    for block in features.blocks:
        assert block.cosine == pytest.approx(1.0, abs=1e-5)
        assert block.sign_conflict == 0.0 and block.norm_ratio == pytest.approx(1.0)
        assert block.activation_distance in (None, 0.0)
        assert 0.0 < block.density_90 < 1.0  # a Gaussian task vector: 90 % of mass in fewer
    assert features.kl == pytest.approx(0.0, abs=1e-6)
    assert any(b.activation_distance == 0.0 for b in features.blocks)


def test_opposite_task_vectors_have_cosine_minus_one_and_every_sign_in_conflict(constructed):
    base, a, _, opposite = constructed
    blocks = segment_model(base, "layers:2")
    features = model_features([a, opposite], base, blocks, probe=list(range(3, 40)))
    for block in features.blocks:
        assert block.cosine == pytest.approx(-1.0, abs=1e-5)
        assert block.sign_conflict == 1.0 and block.norm_ratio == pytest.approx(1.0, rel=1e-4)
        # τ is 0.01 randn against weights of about 0.02: the block moved far, not a little
        assert block.relative_norm > 0.1
    assert features.kl > 0.0
    distances = [
        b.activation_distance for b in features.blocks if b.activation_distance is not None
    ]
    assert distances and all(d > 0 for d in distances)


def _features(**values) -> BlockFeatures:
    defaults = {"block": "L0", "norms": (1.0, 1.0), "norm_ratio": 1.0, "relative_norm": 0.01,
                "cosine": 0.0, "sign_conflict": 0.5, "density_90": 0.6}  # fmt: skip
    return BlockFeatures(**defaults | values)


def test_the_rule_adds_orthogonal_vectors_whole_averages_far_ones_and_ties_conflicts():
    settings = SearchSettings()
    orthogonal = block_choice(_features(), 2, settings)
    assert orthogonal.method == "task_arithmetic" and orthogonal.weights == (1.0, 1.0)
    identical = block_choice(_features(cosine=1.0, sign_conflict=0.0), 2, settings)
    assert identical.weights == (0.5, 0.5)  # the same vector twice: its average
    far = block_choice(_features(relative_norm=0.3), 2, settings)
    assert far.method == "task_arithmetic" and far.weights == (0.5, 0.5)
    conflict = block_choice(_features(cosine=-0.5, sign_conflict=0.9, density_90=0.7), 2, settings)
    assert conflict.method == "ties" and conflict.densities == (0.7, 0.7)
    no_ties = SearchSettings(methods=("linear", "task_arithmetic"))
    assert block_choice(_features(sign_conflict=0.9), 2, no_ties).method == "task_arithmetic"


def test_suggest_writes_the_prior_as_a_recipe_stock_mergekit_builds_bit_for_bit(
    demo_models, tmp_path
):
    names = list(demo_models.specialists)
    sources = [demo_models.specialists[n] for n in names]
    recipe = tmp_path / "suggested.yaml"
    arguments = [
        "suggest",
        *map(str, sources),
        "--base",
        str(demo_models.base),
        "--out",
        str(recipe),
    ]
    arguments += [f"--data={n}={demo_models.validation[n]}" for n in names]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "sign conflict" in result.output and f"Wrote {recipe}" in result.output

    blocks = segment_model(demo_models.base, "layers:4")
    plan = prior_plans(model_features(sources, demo_models.base, blocks), blocks,
                       tuple(map(str, sources)), str(demo_models.base), SearchSettings(),
                       "float32")["prior"]  # fmt: skip
    expected = MergeEngine(sources, demo_models.base, demo_models.base).merge(plan)
    multi = "\n---\n" in recipe.read_text()
    out = tmp_path / "built"
    command = [BIN / "mergekit-multi", recipe, "--out-path", out, "--intermediate-dir",
               tmp_path / "parts"] if multi else [BIN / "mergekit-yaml", recipe, out]  # fmt: skip
    built = subprocess.run([str(c) for c in command + ["--random-seed", "0"]],
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    tensors = load_file(str(out / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    again = CliRunner().invoke(main, arguments)  # an existing recipe is not replaced
    assert again.exit_code == 1 and "OutputExistsError" in again.output


def test_a_prior_search_evaluates_the_prior_after_the_baselines_and_repeats(demo_models, tmp_path):
    runs = []
    for name in ("first", "again"):
        out = tmp_path / name
        arguments = short_search_arguments(demo_models, out, 12) + ["--prior"]
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, result.output + repr(result.exception)
        runs.append(out)
    prior = json.loads((runs[0] / "prior.json").read_text())
    baselines = json.loads((runs[0] / "baselines.json").read_text())
    first = len([b for b in baselines.values() if "trial" in b])
    trials = RunDir(runs[0]).trials()
    configs = list(prior["configs"].values())
    assert configs and [t.config for t in trials[first : first + len(configs)]] == configs
    assert all(not t.partial for t in trials[first : first + len(configs)])  # never raced
    assert "The --prior configurations were trials" in (runs[0] / "summary.md").read_text()
    assert [t.config for t in trials] == [t.config for t in RunDir(runs[1]).trials()]


def test_prior_without_a_base_is_refused_before_anything_loads(demo_models, tmp_path):
    arguments = short_search_arguments(demo_models, tmp_path / "run", 12)
    arguments += ["--prior", "--methods", "linear,slerp"]  # methods that need no base
    at = arguments.index("--base")
    del arguments[at : at + 2]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1 and "--prior reads task vectors" in result.output
    assert not (tmp_path / "run").exists()


def test_an_interrupted_prior_search_resumes_from_its_recorded_prediction(
    demo_models, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, short_search_arguments(demo_models, out, 12) + ["--prior"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    finished = RunDir(out).trials()
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    (out / "trials.jsonl").write_text("".join(lines[:8]))  # stopped inside the prior's trials
    shutil.rmtree(out / "model")
    (out / "summary.md").unlink()

    def never(*args, **kwargs):
        raise AssertionError("a resumed --prior search computed the features again")

    monkeypatch.setattr("automerge_mk.features.model_features", never)  # prior.json is read
    resumed = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert [t.config for t in RunDir(out).trials()] == [t.config for t in finished]
