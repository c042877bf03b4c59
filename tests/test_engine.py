"""The resident engine: mergekit's results tensor for tensor, no leak, sources untouched."""

from __future__ import annotations

import gc
import random
from dataclasses import fields

import psutil
import pytest
import torch
from click.testing import CliRunner
from conftest import decoder_config, perturbed_family, save_model
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registry
from mergekit.options import MergeOptions
from mergekit.scripts.multimerge import main as mergekit_multi
from mergekit.sparsify import magnitude
from safetensors.torch import load_file

import automerge_mk.engine as engine_module
from automerge_mk.engine import MergeEngine, RankedMagnitudeMerge
from automerge_mk.recipe import load_recipe, plan_documents, recipe_text
from automerge_mk.segment import segment_model
from automerge_mk.types import BlockChoice, MergePlan

FIVE = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
SPARSE = {"ties", "dare_linear", "dare_ties"}


def _choice(method: str, rng: random.Random) -> BlockChoice:
    weight = rng.uniform(0.05, 0.95)
    densities = (rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)) if method in SPARSE else None
    return BlockChoice(method=method, weights=(weight, 1 - weight), densities=densities)


def _plan(
    family, methods: list[str], strategy: str = "layers:2+components", seed=3, base=True
) -> MergePlan:
    rng = random.Random(seed)
    blocks = segment_model(family["base"], strategy)
    return MergePlan(
        sources=(str(family["a"]), str(family["b"])),
        base=str(family["base"]) if base else None,
        blocks=blocks,
        choices=tuple(_choice(methods[i % len(methods)], rng) for i in range(len(blocks))),
        seed=seed,
    )


def _stock(plan: MergePlan, tmp_path) -> dict[str, torch.Tensor]:
    """What stock mergekit (run_merge / mergekit-multi, in this process) writes for the plan."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(plan))
    out = tmp_path / "stock"
    documents = load_recipe(recipe.read_text())
    if len(documents) == 1:
        options = MergeOptions(random_seed=plan.seed, quiet=True, write_model_card=False)
        run_merge(MergeConfiguration.model_validate(documents[0]), str(out), options)
    else:
        arguments = [str(recipe), "--out-path", str(out), "--random-seed", str(plan.seed)]
        arguments += ["--intermediate-dir", str(tmp_path / "parts"), "--no-write-model-card"]
        result = CliRunner().invoke(mergekit_multi, arguments + ["--quiet"])
        assert result.exit_code == 0, result.output
    return load_file(str(out / "model.safetensors"))


def _assert_bit_identical(stock: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]):
    assert set(stock) == set(ours)
    for name, tensor in stock.items():
        assert ours[name].dtype == tensor.dtype, name
        # Same bits, not just equal values (-0.0 vs 0.0 would pass torch.equal).
        assert torch.equal(ours[name].view(torch.int32), tensor.view(torch.int32)), name


@pytest.mark.parametrize("rank_cache", ["device", "off"], ids=["order-cached", "order-sorted"])
@pytest.mark.parametrize("method", FIVE)
def test_each_method_with_per_block_values_equals_stock_mergekit(
    family, tmp_path, method, rank_cache
):
    plan = _plan(family, [method])
    assert len(plan_documents(plan)) == 1
    sources = [family["a"], family["b"]]
    engine = MergeEngine(sources, family["base"], family["base"], rank_cache=rank_cache)
    _assert_bit_identical(_stock(plan, tmp_path), engine.merge(plan))


MORE = ["slerp", "nuslerp", "multislerp", "karcher", "model_stock"]


@pytest.mark.parametrize("method", MORE)
def test_methods_beyond_the_five_equal_stock_mergekit(family, tmp_path, method):
    plan = _plan(family, [method])
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"])
    ours = engine.merge(plan)
    _assert_bit_identical(_stock(plan, tmp_path), ours)
    a = load_file(str(family["a"] / "model.safetensors"))
    name = plan.blocks[1].tensors[0]
    assert not torch.equal(ours[name], a[name])  # a real merge, not a copy of a source


def test_mixed_config_of_the_other_methods_with_and_without_a_base_equals_stock_mergekit(
    family, tmp_path
):
    plan = _plan(family, MORE + ["ties"], "layers:4+components")
    assert set(plan.methods) == set(MORE + ["ties"])
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"])
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    _assert_bit_identical(_stock(plan, tmp_path / "with"), engine.merge(plan))
    without = ["slerp", "nuslerp", "multislerp", "karcher", "linear"]
    plan = _plan(family, without, "layers:4+components", base=False)
    engine = MergeEngine([family["a"], family["b"]], None, family["a"])
    _assert_bit_identical(_stock(plan, tmp_path / "without"), engine.merge(plan))


def test_mixed_per_block_config_of_all_five_methods_equals_stock_mergekit(family, tmp_path):
    plan = _plan(family, FIVE)
    assert set(plan.methods) == set(FIVE) and len(plan_documents(plan)) == 6
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"])
    _assert_bit_identical(_stock(plan, tmp_path), engine.merge(plan))


@pytest.mark.parametrize("lean", [True, False], ids=["merge-dtype-sort", "float32-sort"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.93])
def test_the_magnitude_mask_equals_mergekits_ties_included(monkeypatch, lean, density):
    # bfloat16 task vectors tie often: the kept elements among equal magnitudes at the k-th
    # value are whichever the sort puts first, so only the same order gives the same mask.
    monkeypatch.setattr(engine_module, "_sorts_alike", lambda dtype: lean)
    delta = (torch.randn(3_000_000, generator=torch.Generator().manual_seed(1)) * 1e-3).to(
        torch.bfloat16
    )
    ties = int(delta.abs().unique(return_counts=True)[1].max())
    assert ties > 1000
    ties = registry.get("ties")
    method = RankedMagnitudeMerge(**{f.name: getattr(ties, f.name) for f in fields(ties)})
    ours = method._sparsify("w", 0, delta, density, rescale=False)
    assert torch.equal(ours.view(torch.int16), magnitude(delta, density).view(torch.int16))


def test_this_torch_sorts_bfloat16_magnitudes_as_their_float32_copy():
    # Else the lean sort is off: merges stay exact, but a TIES trial of the memory-mapped tier
    # holds 4 more bytes an element than scripts/results/bench_scale.md measured.
    engine_module._sorts_alike.cache_clear()
    assert engine_module._sorts_alike(torch.bfloat16)


def test_repeated_trials_give_the_same_merge_and_write_it_into_the_live_model(family):
    plan = _plan(family, ["ties", "dare_ties", "linear"])
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"])
    first = engine.merge(plan)
    engine.merge(_plan(family, ["ties", "task_arithmetic"], seed=9))  # another trial between
    model = engine.merge_into_model(plan)
    parameters = dict(model.named_parameters())
    for name, tensor in first.items():
        assert torch.equal(parameters[name], tensor), name


@pytest.fixture(scope="module")
def wider_family(tmp_path_factory):
    """Models large enough (4.5 M parameters) for a leaked copy to show in the RSS."""
    root = tmp_path_factory.mktemp("wider")
    config = decoder_config(hidden_size=256, intermediate_size=768, vocab_size=2048)
    return perturbed_family(save_model(config, root / "base"), root)


def test_trials_do_not_leak_memory_or_touch_the_resident_sources(wider_family):
    engine = MergeEngine(
        [wider_family["a"], wider_family["b"]], wider_family["base"], wider_family["base"]
    )
    before = {f: {n: t.clone() for n, t in ts.items()} for f, ts in engine.resident.items()}
    process = psutil.Process()

    def trial(index: int) -> None:
        engine.merge_into_model(_plan(wider_family, FIVE, seed=index))

    for index in range(2):
        trial(index)
    gc.collect()
    after_two = process.memory_info().rss
    for index in range(2, 20):
        trial(index)
    gc.collect()
    after_twenty = process.memory_info().rss
    assert after_twenty <= after_two * 1.05, (after_two, after_twenty)
    for folder, tensors in engine.resident.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, before[folder][name]), (folder, name)
