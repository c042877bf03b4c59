"""Recipes: stock mergekit on recipe.yaml reproduces the in-memory merge of a trial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automerge_mk.engine import MergeEngine
from automerge_mk.errors import RecipeError
from automerge_mk.recipe import load_recipe, plan_documents, recipe_text
from automerge_mk.segment import segment_model
from automerge_mk.types import BlockChoice, MergePlan

BIN = Path(sys.executable).parent


def _plan(family, strategy: str, methods: list[str], dtype: str = "float32") -> MergePlan:
    blocks = segment_model(family["base"], strategy)
    choices = []
    for index in range(len(blocks)):
        method = methods[index % len(methods)]
        weight = 0.2 + 0.15 * index
        densities = (
            (0.4 + 0.05 * index, 0.7) if method in {"ties", "dare_ties", "dare_linear"} else None
        )
        choices.append(
            BlockChoice(method=method, weights=(weight, 1 - weight), densities=densities)
        )
    return MergePlan(
        sources=(str(family["a"]), str(family["b"])),
        base=str(family["base"]),
        blocks=blocks,
        choices=tuple(choices),
        dtype=dtype,
        seed=7,
    )


def _engine(family) -> MergeEngine:
    return MergeEngine([family["a"], family["b"]], family["base"], family["base"])


def _stock(
    recipe: Path, out: Path, multi: bool, seed: int | None = None
) -> dict[str, torch.Tensor]:
    seed_args = ["--random-seed", str(seed)] if seed is not None else []
    if multi:
        command = [BIN / "mergekit-multi", recipe, "--out-path", out, "--intermediate-dir"]
        command += [out.parent / (out.name + "-intermediate")]
    else:
        command = [BIN / "mergekit-yaml", recipe, out]
    result = subprocess.run([str(c) for c in command + seed_args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


def _assert_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_mixed_method_recipe_is_a_mergekit_multi_set_reproducing_the_engine_bit_for_bit(
    family, tmp_path
):
    # ties early, task_arithmetic late, attention and MLP of one layer group differing
    plan = _plan(family, "layers:2+components", ["ties", "task_arithmetic", "linear"])
    assert plan.choices[0].method != plan.choices[1].method  # L0-1 attention vs MLP
    documents = plan_documents(plan)
    assert [d.get("name") for d in documents] == [
        "ties_part",
        "task_arithmetic_part",
        "linear_part",
        None,
    ]
    engine_tensors = _engine(family).merge(plan)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(plan))
    _assert_identical(engine_tensors, _stock(recipe, tmp_path / "model", multi=True))


def test_single_method_recipe_is_one_mergekit_yaml_document_with_per_block_filters(
    family, tmp_path
):
    plan = _plan(family, "layers:4", ["ties"])
    documents = plan_documents(plan)
    assert len(documents) == 1 and "name" not in documents[0]
    weights = documents[0]["models"][0]["parameters"]["weight"]
    assert len({w["value"] for w in weights}) == len(plan.blocks)  # one value per block
    engine_tensors = _engine(family).merge(plan)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(plan))
    _assert_identical(engine_tensors, _stock(recipe, tmp_path / "model", multi=False))


def test_per_block_values_change_the_merge(family, tmp_path):
    plan = _plan(family, "layers:2", ["linear"])
    engine = _engine(family)
    first = engine.merge(plan)
    flipped = plan.model_copy(
        update={"choices": (BlockChoice(method="linear", weights=(0.9, 0.1)),) + plan.choices[1:]}
    )
    second = engine.merge(flipped)
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], second["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        first["model.layers.3.mlp.up_proj.weight"], second["model.layers.3.mlp.up_proj.weight"]
    )


def test_dare_recipe_reproduces_with_the_recorded_seed(family, tmp_path):
    plan = _plan(family, "layers:2", ["dare_ties", "task_arithmetic"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(plan))
    assert f"--random-seed {plan.seed}" in recipe.read_text()
    first = _stock(recipe, tmp_path / "one", multi=True, seed=plan.seed)
    second = _stock(recipe, tmp_path / "two", multi=True, seed=plan.seed)
    _assert_identical(first, second)
    engine_tensors = _engine(family).merge(plan)
    _assert_identical(first, engine_tensors)
    other_seed = _stock(recipe, tmp_path / "three", multi=True, seed=plan.seed + 1)
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], other_seed["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize("method, random", [("della", True), ("dare_linear", True),
                                              ("ties", False), ("breadcrumbs", False)])  # fmt: skip
def test_the_recipe_says_the_seed_matters_exactly_for_methods_the_engine_seeds(
    family, method, random
):
    """One method table: the recipe's header and the engine agree on which methods draw."""
    from automerge_mk.methods import is_random

    blocks = segment_model(family["base"], "layers:2")
    choice = BlockChoice(method=method, weights=(0.5, 0.5), densities=(0.5, 0.5))
    plan = MergePlan(sources=(str(family["a"]), str(family["b"])), base=str(family["base"]),
                     blocks=blocks, choices=(choice,) * len(blocks), seed=3)  # fmt: skip
    assert is_random(method) is random
    assert ("draws depend on it" in recipe_text(plan)) is random


def test_recipes_pin_references(family):
    plan = _plan(family, "layers:2", ["ties"])
    text = recipe_text(plan, references={str(family["a"]): "org/a@0123abc"})
    assert "org/a@0123abc" in text and str(family["a"]) not in text


def test_recipe_loader_rejects_a_parameter_mergekit_would_ignore(family):
    text = recipe_text(_plan(family, "layers:2", ["ties"])).replace("density:", "densty:", 1)
    with pytest.raises(RecipeError, match="densty"):
        load_recipe(text)
