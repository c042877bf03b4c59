"""Segmentation: trace blocks, layer groups, components, and exact tensor coverage."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import decoder_config, save_model
from transformers import MistralConfig, Qwen2Config

from automerge_mk.cli import main
from automerge_mk.errors import SettingsError
from automerge_mk.segment import load_config, merge_tensor_names, segment_model


def _covered_once(blocks, folder) -> bool:
    names = merge_tensor_names(folder, load_config(folder))
    counts = Counter(t for b in blocks for t in b.tensors)
    return set(counts) == set(names) and all(c == 1 for c in counts.values())


def _filters_select_exactly_their_block(blocks, folder) -> bool:
    names = merge_tensor_names(folder, load_config(folder))
    for block in blocks:
        selected = {n for n in names if any(f in n for f in block.filters)}
        if selected != set(block.tensors):
            return False
    return True


@pytest.mark.parametrize("strategy", ["trace", "layers:2", "components", "layers:3+components"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_every_tensor_is_in_exactly_one_block(model, strategy, request):
    folder = request.getfixturevalue(model)
    blocks = segment_model(folder, strategy)
    assert _covered_once(blocks, folder)
    assert _filters_select_exactly_their_block(blocks, folder)


def test_trace_separates_the_untied_head_whose_output_shape_differs(tiny_llama):
    blocks = segment_model(tiny_llama, "trace")
    assert [b.name for b in blocks] == ["L0-3", "lm_head"]
    assert blocks[1].tensors == ("lm_head.weight",)


def test_trace_gives_one_block_for_gpt2_with_tied_head(tiny_gpt2):
    blocks = segment_model(tiny_gpt2, "trace")
    assert len(blocks) == 1
    assert "lm_head.weight" not in blocks[0].tensors  # tied: absent from the checkpoint


def test_layer_groups_are_contiguous_with_embeddings_first_and_norm_last(tiny_llama):
    blocks = segment_model(tiny_llama, "layers:2")
    assert [b.layers for b in blocks] == [(0, 2), (2, 4), None]
    assert "model.embed_tokens.weight" in blocks[0].tensors
    assert "model.norm.weight" in blocks[1].tensors


def test_components_split_attention_from_the_rest(tiny_llama):
    blocks = segment_model(tiny_llama, "layers:4+components")
    assert len(blocks) == 4 * 2 + 1
    attention = [b for b in blocks if b.component == "attention"]
    assert all("self_attn" in t for b in attention for t in b.tensors)
    rest = [t for b in blocks if b.component == "mlp" for t in b.tensors]
    assert not any("self_attn" in t for t in rest)
    assert "model.layers.0.post_attention_layernorm.weight" in rest


def test_more_groups_than_layers_gives_one_block_per_layer(tiny_gpt2):
    blocks = segment_model(tiny_gpt2, "layers:10")
    assert [b.layers for b in blocks] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_unknown_strategy_is_rejected(tiny_llama):
    with pytest.raises(SettingsError, match="layerz:2"):
        segment_model(tiny_llama, "layerz:2")


def test_segment_command_prints_a_table_with_parameter_counts(tiny_llama):
    result = CliRunner().invoke(main, ["segment", str(tiny_llama), "--strategy", "layers:2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["block", "layers", "component", "filters", "tensors", "parameters"]
    assert lines[1].startswith("L0-1")
    assert lines[-2].startswith("3 blocks, 39 tensors")
    assert lines[-1] == "tokenizer: none (128 embedding rows)"


def test_segment_names_the_tokenizer_and_the_adapter(demo_models, tmp_path):
    from test_adapters import train_lora
    from test_vocabularies import with_added_tokens
    from transformers import AutoTokenizer

    from automerge_mk.evaluate import load_texts

    chat = with_added_tokens(demo_models.specialists["arith"], tmp_path / "chat")
    result = CliRunner().invoke(main, ["segment", str(chat)])
    assert result.exit_code == 0, result.output
    ids = AutoTokenizer.from_pretrained(chat).convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    rows = ids[1] + 1
    assert f"'<|im_start|>' (id {ids[0]}), '<|im_end|>' (id {ids[1]})); {rows} embedding rows" in (
        result.output
    )
    texts = load_texts(demo_models.validation["arith"])
    adapter = train_lora(demo_models.base, texts, tmp_path / "lora", steps=1)
    result = CliRunner().invoke(main, ["segment", f"{demo_models.base}+{adapter}"])
    assert result.exit_code == 0, result.output
    assert f"adapter: lora (PEFT) applied to base; merges read it as {demo_models.base}+" in (
        result.output
    )


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama_like_families_segment_into_layer_groups(family, tmp_path):
    config_class = {"mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    architecture = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    config = decoder_config(config_class, architecture)
    folder = save_model(config, tmp_path / family)
    blocks = segment_model(folder, "layers:2+components")
    assert [b.name for b in blocks] == ["L0-1_attn", "L0-1_mlp", "L2-3_attn", "L2-3_mlp", "lm_head"]
    assert _covered_once(blocks, folder)
    assert _filters_select_exactly_their_block(blocks, folder)
