"""The memory plan and its tiers: an estimate that holds, tiers that merge like stock
mergekit, a plan that cannot fit refused before anything loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import decoder_config, perturbed_family, save_model, short_search_arguments
from test_engine import MORE, _plan, _stock

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.errors import MemoryPlanError
from automerge_mk.memory import MemoryPlan, measure_needs, plan_memory
from automerge_mk.segment import load_config, merge_tensor_keys
from automerge_mk.settings import SearchSettings

PROBE = Path(__file__).parent / "memory_probe.py"
ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", *MORE]
GB = 2**30


@pytest.fixture(scope="session")
def wide_family(demo_models, tmp_path_factory) -> dict[str, Path]:
    """The demo's tokenizer on a base of 27M parameters (109 MB in float32) and two perturbed
    sources: large enough that tensors, not the libraries, fill a process's memory."""
    root = tmp_path_factory.mktemp("wide")
    demo = json.loads((demo_models.base / "config.json").read_text())
    config = decoder_config(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1536, vocab_size=demo["vocab_size"], bos_token_id=demo["bos_token_id"],
        eos_token_id=demo["eos_token_id"], pad_token_id=demo.get("pad_token_id"),
    )  # fmt: skip
    base = save_model(config, root / "base")
    for file in demo_models.base.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, base / file.name)
    return perturbed_family(base, root)


def _probe(demo_models, family, out: Path, **settings) -> dict:
    """Baseline merges scored in a fresh process (tests/memory_probe.py): plan and peak."""
    spec = {
        "sources": [str(family["a"]), str(family["b"])],
        "base": str(family["base"]),
        "data": {"a": str(demo_models.validation["arith"]),
                 "b": str(demo_models.validation["reverse"])},
        "out": str(out),
        "settings": {"trials": 1, "initial": 1, "device": "cpu", **settings},
    }  # fmt: skip
    done = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _needs(family, methods=("ties",), dtype=torch.float32):
    config = load_config(family["base"])
    keys = merge_tensor_keys(family["base"], config)
    models = [family["a"], family["b"], family["base"]]
    return measure_needs(models, 2, family["base"], keys, config, dtype, torch.float32, methods,
                         (4096, 64, 1024))  # fmt: skip


def test_plan_estimate_is_within_a_quarter_of_the_measured_peak(demo_models, wide_family, tmp_path):
    found = _probe(demo_models, wide_family, tmp_path / "run")
    plan = found["plan"]
    assert (plan["tier"], plan["rank_cache"]) == ("resident", "device")
    measured = found["peak"] - found["baseline"]
    assert plan["needs"]["rank_cache"] > 0  # ties is searched: the cache is part of the peak
    assert 0.75 <= plan["device_bytes"] / measured <= 1.25, (plan, measured)


def test_mapped_tier_holds_no_more_than_the_live_model_and_one_source(
    demo_models, wide_family, tmp_path
):
    # Few tokens, as with models of billions of parameters: scoring's activations small
    # beside a source (the 27M-parameter models here are smaller than 2,000 tokens' worth).
    found = _probe(demo_models, wide_family, tmp_path / "run", tier="mmap", rank_cache="off",
                   eval_tokens=200)  # fmt: skip
    needs = found["plan"]["needs"]
    assert found["plan"]["tier"] == "mmap"
    measured = found["peak"] - found["baseline"]
    # Scoring's activations come on top of the two (CI measured 1.5 MB over them alone).
    assert measured <= needs["live"] + needs["largest_model"] + needs["activations"], (
        needs, measured)  # fmt: skip
    assert measured < needs["models"]  # the three models are not held


@pytest.fixture(scope="module")
def stock_merges(family, tmp_path_factory) -> list[tuple]:
    """Plans using every method (five at a time) and what stock mergekit writes for each."""
    found = []
    for methods in (ALL_METHODS[:5], ALL_METHODS[5:]):
        plan = _plan(family, methods, "layers:4+components")
        assert set(plan.methods) == set(methods)
        found.append((plan, _stock(plan, tmp_path_factory.mktemp("stock"))))
    return found


@pytest.mark.parametrize("rank_cache", ["device", "off"])
@pytest.mark.parametrize("tier", ["resident", "host", "mmap"])
def test_every_tier_merges_bit_identically_to_stock_mergekit(family, stock_merges, tier,
                                                             rank_cache):  # fmt: skip
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"], tier=tier,
                         rank_cache=rank_cache)  # fmt: skip
    for plan, stock in stock_merges + stock_merges[:1]:  # the last again: from cached ranks
        ours = engine.merge(plan)
        assert set(ours) == set(stock)
        for name, tensor in stock.items():
            assert torch.equal(ours[name].view(torch.int32), tensor.view(torch.int32)), name


def test_mapped_tier_casts_to_the_merge_dtype_like_mergekit(family, tmp_path):
    plan = _plan(family, ["ties", "task_arithmetic", "linear"]).model_copy(
        update={"dtype": "bfloat16"}
    )
    engine = MergeEngine([family["a"], family["b"]], family["base"], family["base"],
                         dtype="bfloat16", tier="mmap")  # fmt: skip
    ours, stock = engine.merge(plan), _stock(plan, tmp_path)
    for name, tensor in stock.items():
        assert tensor.dtype == ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name].view(torch.int16), tensor.view(torch.int16)), name


def test_auto_plan_gives_up_the_rank_cache_then_residency_as_memory_shrinks(wide_family):
    needs = _needs(wide_family)
    full = MemoryPlan("cpu", "resident", "device", needs, 0, 0).device_bytes()
    no_cache = MemoryPlan("cpu", "resident", "off", needs, 0, 0).device_bytes()
    mapped = MemoryPlan("cpu", "mmap", "off", needs, 0, 0).device_bytes()
    assert full > no_cache > mapped
    cases = [(2 * full, ("resident", "device")), (no_cache / 0.85, ("resident", "off")),
             (mapped / 0.85, ("mmap", "off"))]  # fmt: skip
    for free, expected in cases:
        plan = plan_memory(needs, "cpu", free=(int(free), int(free)))
        assert (plan.tier, plan.rank_cache) == expected, free
    with pytest.raises(MemoryPlanError, match="--eval-dtype bfloat16"):
        plan_memory(needs, "cpu", free=(mapped // 2, mapped // 2))


def test_a_tier_asked_for_that_does_not_fit_is_refused_naming_one_that_does(wide_family):
    needs = _needs(wide_family)
    mapped = MemoryPlan("cpu", "mmap", "off", needs, 0, 0).device_bytes()
    free = (int(mapped / 0.85),) * 2
    with pytest.raises(MemoryPlanError, match="--tier mmap --rank-cache off fits"):
        plan_memory(needs, "cpu", tier="resident", free=free)


def test_no_rank_cache_is_planned_for_methods_that_do_not_rank(wide_family):
    assert _needs(wide_family, methods=("linear", "dare_ties")).rank_cache == 0
    assert _needs(wide_family, methods=("linear", "ties")).rank_cache > 0


def test_impossible_plan_is_refused_before_anything_loads(demo_models, tmp_path):
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, trials=2) + ["--memory-limit", "1MB"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "does not fit" in result.output and "--eval-dtype bfloat16" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before the run directory, let alone the models


def test_memory_limit_takes_sizes_and_refuses_other_text():
    assert SearchSettings(memory_limit="20GB").memory_limit == 20 * 10**9
    assert SearchSettings(memory_limit="512MiB").memory_limit == 512 * 2**20
    with pytest.raises(ValueError, match="--memory-limit takes a size"):
        SearchSettings(memory_limit="lots")


def test_runs_that_recorded_cache_order_read_as_rank_cache():
    assert SearchSettings(cache_order=False).rank_cache == "off"
    assert SearchSettings(cache_order=True).rank_cache == "auto"
