"""PEFT/LoRA adapters as sources: a folder (applied to --base) or mergekit's MODEL+ADAPTER."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.evaluate import load_texts
from automerge_mk.pipeline import resume_arguments
from automerge_mk.rundir import RunRecord
from automerge_mk.space import plan_from_record


def train_lora(base: Path, texts: list[str], out: Path, steps: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter of `base` trained a few steps on `texts` (peft.get_peft_model)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = tokenizer(texts[step * 8 : step * 8 + 8], padding=True, return_tensors="pt")
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(demo_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: train_lora(
            demo_models.base, load_texts(demo_models.validation[name]), root / name, seed=index
        )  # fmt: skip
        for index, name in enumerate(demo_models.specialists)
    }


def _engine_merge(run: Path) -> dict[str, torch.Tensor]:
    record = RunRecord.read(run)
    best = json.loads((run / "best.json").read_text())
    adapters = {m.path: m.adapter_of.path for m in record.models if m.adapter_of}
    engine = MergeEngine([m.path for m in record.models], record.base.path, record.base.path,
                         adapters=adapters)  # fmt: skip
    return engine.merge(plan_from_record(record, best["config"]))


def test_search_over_two_lora_adapters_is_rebuilt_by_stock_mergekit(
    demo_models, adapters, tmp_path
):
    """One adapter as a folder (applied to --base), one in mergekit's MODEL+ADAPTER form."""
    run = tmp_path / "run"
    arith, reverse = str(adapters["arith"]), f"{demo_models.base}+{adapters['reverse']}"
    arguments = ["search", arith, reverse, "--base", str(demo_models.base), "--quiet"]
    arguments += ["--out", str(run), "--trials", "3", "--initial", "3", "--seed", "0"]
    arguments += ["--methods", "task_arithmetic,ties,dare_linear", "--no-baselines-first"]
    for name in demo_models.specialists:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "is a PEFT adapter applied to base" in result.output
    recipe = (run / "recipe.yaml").read_text()
    for name in demo_models.specialists:
        assert f"{demo_models.base}+{adapters[name]}" in recipe
    assert "--lora-merge-cache" in (run / "summary.md").read_text()
    built = load_file(str(run / "model" / "model.safetensors"))
    merged = _engine_merge(run)
    assert set(merged) == set(built)
    for name, tensor in merged.items():
        assert torch.equal(built[name], tensor), name
    base = load_file(str(demo_models.base / "model.safetensors"))
    assert any(not torch.equal(base[n], t) for n, t in merged.items() if "q_proj" in n)
    final = json.loads((run / "final.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-6)
    # A resume names the adapters as the recipe does.
    request, _ = resume_arguments(run)
    assert request.models == [f"{demo_models.base}+{adapters[n]}" for n in demo_models.specialists]
    # Each adapter alone, applied to the base, is the reference of its own task.
    sources = json.loads((run / "sources.json").read_text())
    for name in demo_models.specialists:
        assert sources[name]["tasks"][name]["preservation"] == 1.0


def test_an_adapter_of_another_model_is_refused_by_name(demo_models, adapters, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for file in adapters["arith"].iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M"
    (other / "adapter_config.json").write_text(json.dumps(config))
    arguments = ["search", str(other), str(adapters["reverse"]), "--base", str(demo_models.base)]
    arguments += ["--out", str(tmp_path / "run"), "--quiet", "--trials", "2", "--initial", "2"]
    arguments += ["--data", f"other={demo_models.validation['arith']}"]
    arguments += ["--data", f"reverse={demo_models.validation['reverse']}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "adapter of HuggingFaceTB/SmolLM2-360M, not of base" in result.output
    assert not (tmp_path / "run").exists()


def test_an_adapter_without_a_model_to_apply_to_is_refused(demo_models, adapters, tmp_path):
    arguments = ["search", str(adapters["arith"]), str(adapters["reverse"]), "--quiet"]
    arguments += ["--out", str(tmp_path / "run"), "--methods", "linear"]
    for name in demo_models.specialists:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "is a PEFT adapter: give the model it applies to as --base" in result.output
