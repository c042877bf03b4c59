"""Specialists whose vocabularies differ: added tokens, padded embeddings, --tokenizer-source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.rundir import RunRecord
from automerge_mk.space import plan_from_record

ADDED = ("<|im_start|>", "<|im_end|>")
CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def with_added_tokens(source: Path, out: Path, tokens=ADDED, seed: int = 0) -> Path:
    """`source` with tokens added as a chat tune adds them: `add_tokens`, then
    `resize_token_embeddings`, and the new rows given values of their own."""
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    tokenizer.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(str(source))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            rows = matrix[-len(tokens) :]
            rows.copy_(0.02 * torch.randn(rows.shape, generator=generator))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_arith(demo_models, tmp_path_factory) -> Path:
    """The arith specialist with two chat tokens added (embeddings 2 rows longer)."""
    folder = tmp_path_factory.mktemp("chat") / "arith"
    return with_added_tokens(demo_models.specialists["arith"], folder)


def _search(demo_models, arith: Path, out: Path, *options: str):
    arguments = ["search", str(arith), str(demo_models.specialists["reverse"])]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet", "--seed", "0"]
    arguments += ["--data", f"arith={demo_models.validation['arith']}"]
    arguments += ["--data", f"reverse={demo_models.validation['reverse']}", *options]
    return CliRunner().invoke(main, arguments)


def _engine_merge(run: Path) -> dict[str, torch.Tensor]:
    """The best trial's plan merged by a fresh engine, as the search merged it in memory."""
    record = RunRecord.read(run)
    best = json.loads((run / "best.json").read_text())
    plan = plan_from_record(record, best["config"])
    engine = MergeEngine([m.path for m in record.models], record.base.path, record.base.path)
    return engine.merge(plan)


@pytest.mark.parametrize("choice", ["base", "union", "arith"])
def test_search_over_a_specialist_with_added_tokens_is_rebuilt_bit_for_bit(
    demo_models, chat_arith, tmp_path, choice
):
    run = tmp_path / "run"
    result = _search(demo_models, chat_arith, run, "--tokenizer-source", choice,
                     "--trials", "3", "--initial", "3", "--no-baselines-first",
                     "--methods", "linear,task_arithmetic,ties")  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "tokenizer: --tokenizer-source" in result.output
    recipe = (run / "recipe.yaml").read_text()
    assert "tokenizer_source:" in recipe
    built = load_file(str(run / "model" / "model.safetensors"))
    merged = _engine_merge(run)
    assert set(merged) == set(built)
    for name, tensor in merged.items():
        assert built[name].dtype == tensor.dtype, name
        assert torch.equal(built[name], tensor), name
    base_rows = len(AutoTokenizer.from_pretrained(str(demo_models.base)))
    rows = built["model.embed_tokens.weight"].shape[0]
    assert rows == (base_rows if choice == "base" else base_rows + len(ADDED))
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    assert all((t in tokenizer.get_vocab()) == (choice != "base") for t in ADDED)
    # The chosen tokenizer's chat template; under union the base's, else the first source's
    # that has one, written in the recipe (mergekit's own pick would follow a set's order).
    assert tokenizer.chat_template == (None if choice == "base" else CHAT)
    assert ("chat_template:" in recipe) == (choice == "union")
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["vocab_size"] == rows
    final = json.loads((run / "final.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], rel=1e-6)


def test_added_tokens_without_a_choice_are_refused_naming_them(demo_models, chat_arith, tmp_path):
    result = _search(demo_models, chat_arith, tmp_path / "run", "--trials", "2", "--initial", "2")
    assert result.exit_code != 0
    assert "TokenizerMismatchError" in result.output or "vocabularies differ" in result.output
    for token in ADDED:
        assert repr(token) in result.output
    assert "--tokenizer-source" in result.output and "union" in result.output
    assert not (tmp_path / "run").exists()


def test_padded_embeddings_with_another_tokenizer_are_refused_by_name(demo_models, tmp_path):
    """Both models have the same number of rows, so shapes agree; the tokens do not."""
    base = tmp_path / "base"
    shutil.copytree(demo_models.base, base)
    padded = AutoModelForCausalLM.from_pretrained(str(base))
    padded.resize_token_embeddings(padded.config.vocab_size + len(ADDED), mean_resizing=False)
    padded.save_pretrained(base)  # the base pads its embeddings, its tokenizer stays
    arith = with_added_tokens(demo_models.specialists["arith"], tmp_path / "arith")
    reverse = tmp_path / "reverse"
    shutil.copytree(demo_models.specialists["reverse"], reverse)
    model = AutoModelForCausalLM.from_pretrained(str(reverse))
    model.resize_token_embeddings(model.config.vocab_size + len(ADDED), mean_resizing=False)
    model.save_pretrained(reverse)
    arguments = ["search", str(arith), str(reverse), "--base", str(base), "--quiet"]
    arguments += ["--out", str(tmp_path / "run"), "--trials", "2", "--initial", "2"]
    arguments += ["--data", f"arith={demo_models.validation['arith']}"]
    arguments += ["--data", f"reverse={demo_models.validation['reverse']}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "source arith has 2 tokens that the base lacks" in result.output
    assert "'<|im_start|>'" in result.output and "--tokenizer-source" in result.output
    assert "do not share a base" not in result.output
