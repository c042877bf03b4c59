"""The demo models are real, loadable checkpoints whose specialists really specialise."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.demo import DemoModels, build_demo_models

SEED = 0


@pytest.fixture(scope="module")
def demo(demo_models: DemoModels) -> DemoModels:
    """The session's demo build (tests/conftest.py, seed 0)."""
    return demo_models


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def _mean_token_loss(folder: Path, data: Path) -> float:
    """Token-weighted mean next-token loss of the model in `folder` on the texts in `data`."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = tokenizer(_texts(data), padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_layout_loads_and_round_trips(demo: DemoModels) -> None:
    out = demo.base.parent
    assert set(demo.specialists) == set(demo.validation) == set(demo.test) == {"arith", "reverse"}
    manifest = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == SEED
    assert manifest["specialists"] == {"arith": "arith", "reverse": "reverse"}

    for task, folder in demo.specialists.items():
        assert folder.name == task
    for folder in (demo.base, *demo.specialists.values()):
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == 4
        assert next(model.parameters()).dtype == torch.float32

    for task in demo.specialists:
        train = set(_texts(out / "data" / f"{task}-train.jsonl"))
        validation, test = _texts(demo.validation[task]), _texts(demo.test[task])
        assert 64 <= len(validation) <= 128 and 64 <= len(test) <= 128
        assert len(set(validation)) == len(validation) and len(set(test)) == len(test)
        assert not (set(validation) & set(test)) and not ((set(validation) | set(test)) & train)

    tokenizer = AutoTokenizer.from_pretrained(demo.specialists["reverse"])
    assert tokenizer.pad_token == "<pad>"
    text = _texts(demo.validation["reverse"])[0]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_specialists_trade_tasks(demo: DemoModels) -> None:
    names = {"base": demo.base, **demo.specialists}
    loss = {
        (name, task): _mean_token_loss(folder, data)
        for name, folder in names.items()
        for task, data in demo.validation.items()
    }
    for task, other in (("arith", "reverse"), ("reverse", "arith")):
        own = loss[(task, task)]
        assert own < 0.8 * loss[("base", task)], loss
        assert own < 0.8 * loss[(other, task)], loss
        assert loss[(task, other)] > loss[(other, other)], loss


def test_rebuild_reuses_finished_build(demo: DemoModels) -> None:
    weights = [f / "model.safetensors" for f in (demo.base, *demo.specialists.values())]
    mtimes = [w.stat().st_mtime_ns for w in weights]
    start = time.perf_counter()
    again = build_demo_models(demo.base.parent, seed=SEED, progress=False)
    assert time.perf_counter() - start < 2.0
    assert again == demo
    assert [w.stat().st_mtime_ns for w in weights] == mtimes


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "demo"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        build_demo_models(blocker, progress=False)
