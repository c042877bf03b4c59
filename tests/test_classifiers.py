"""Transformers sequence classifiers (BERT): searched on labelled texts, merged in memory
exactly as stock mergekit-yaml / mergekit-multi merges their recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from automerge_mk.cli import main

LABELS = ("negative", "positive", "animal", "plant")
WORDS = ["good", "bad", "great", "awful", "cat", "dog", "tree", "rose", "the", "a", "film", "is"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *WORDS]) + "\n")  # fmt: skip
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def _classifiers(root: Path) -> dict[str, Path]:
    """A tiny BERT classifier as base and two "specialists" (base + a task vector each)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)})  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    folders = {}
    for seed, name in enumerate(("base", "sentiment", "nature")):
        model = BertForSequenceClassification(config).eval()
        model.load_state_dict(base.state_dict())
        if seed:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        folders[name] = root / name
        model.save_pretrained(folders[name])
        _tokenizer(folders[name]).save_pretrained(folders[name])
    rows = {"sentiment": [("the film is good", "positive"), ("a bad film", "negative"),
                          ("great", "positive"), ("awful film", "negative")] * 3,
            "nature": [("a cat", "animal"), ("the rose", "plant"), ("dog", "animal"),
                       ("a tree", "plant")] * 3}  # fmt: skip
    for task, examples in rows.items():
        lines = [json.dumps({"text": t, "label": label}) for t, label in examples]
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return folders


def _arguments(root: Path, folders: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["search", str(folders["sentiment"]), str(folders["nature"]), "--base",
            str(folders["base"]), "--data", f"sentiment={root / 'sentiment.jsonl'}", "--data",
            f"nature={root / 'nature.jsonl'}", "--out", str(out), "--quiet", "--seed", "0",
            *extra]  # fmt: skip


def test_a_classifier_plan_is_merged_exactly_as_stock_mergekit_merges_its_recipe(tmp_path):
    from automerge_mk.engine import MergeEngine
    from automerge_mk.recipe import build_with_mergekit, recipe_text
    from automerge_mk.segment import segment_model
    from automerge_mk.types import BlockChoice, MergePlan

    folders = _classifiers(tmp_path)
    blocks = segment_model(folders["base"], "layers:2")
    assert [b.name for b in blocks][-1] != blocks[0].name and len(blocks) >= 3
    assert any("classifier.weight" in b.tensors for b in blocks)
    engine = MergeEngine([folders["sentiment"], folders["nature"]], folders["base"],
                         folders["base"])  # fmt: skip
    methods = ("dare_ties", "task_arithmetic", "ties")
    choices = tuple(
        BlockChoice(method=methods[i % 3], weights=(0.8, 0.6),
                    densities=(0.5, 0.7) if methods[i % 3] != "task_arithmetic" else None)
        for i in range(len(blocks))
    )  # fmt: skip
    plan = MergePlan(sources=(str(folders["sentiment"]), str(folders["nature"])),
                     base=str(folders["base"]), blocks=blocks, choices=choices, seed=2)  # fmt: skip
    merged = engine.merge(plan)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(plan))
    build_with_mergekit(recipe, tmp_path / "model", plan.seed)
    stock = load_file(str(tmp_path / "model" / "model.safetensors"))
    for name, tensor in merged.items():
        assert torch.equal(tensor.view(torch.int32), stock[name].view(torch.int32)), name
    assert "classifier.weight" in merged and "bert.embeddings.word_embeddings.weight" in merged


def test_a_classifier_search_scores_labels_and_builds_its_best_trial(tmp_path):
    folders = _classifiers(tmp_path)
    out = tmp_path / "run"
    arguments = _arguments(tmp_path, folders, out, "--trials", "5", "--initial", "3",
                           "--methods", "linear,ties,task_arithmetic")  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    best = json.loads((out / "best.json").read_text())
    final = json.loads((out / "final.json").read_text())
    for task in ("sentiment", "nature"):  # model/ is mergekit's build of the best trial's recipe
        assert final["tasks"][task]["loss"] == pytest.approx(best["tasks"][task]["loss"], 1e-6)
        assert final["tasks"][task]["tokens"] == 12  # examples, each scored once
        assert final["tasks"][task]["rate_metric"] == "label_accuracy"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_classifier_data_with_unknown_labels_or_no_text_is_refused_early(tmp_path):
    folders = _classifiers(tmp_path)
    out = tmp_path / "run"
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "a cat", "label": "fish"}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a", "label": "plant"}) + "\n")
    for data, expected in (("odd.jsonl", "not a class of the model"), ("prompts.jsonl", "text")):
        arguments = _arguments(tmp_path, folders, out, "--trials", "5", "--initial", "3")
        arguments[arguments.index(f"nature={tmp_path / 'nature.jsonl'}")] = (
            f"nature={tmp_path / data}"
        )
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 1 and "DataError" in result.output, result.output
        assert expected in result.output and not out.exists()
    result = CliRunner().invoke(main, _arguments(tmp_path, folders, out, "--fidelity", "tokens"))
    assert result.exit_code == 1 and "--fidelity" in result.output and not out.exists()
