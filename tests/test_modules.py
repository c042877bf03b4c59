"""Raw PyTorch models (module.json + model.safetensors): built from their own code only when
trusted, checked against their state dict, and segmented where the trace changes rank."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import short_search_arguments
from safetensors.torch import load_file, save_file

from automerge_mk.cli import main
from automerge_mk.errors import ArchitectureMismatchError, ModelReferenceError
from automerge_mk.segment import module_trace, segment_model

# A conv tokenizer (4-D activations) feeding a stack of transformer layers (3-D), pooled and
# classified: the shape of the paper's CCT, small.
CONVFORMER = textwrap.dedent("""
    import torch
    from torch import nn


    class ConvFormer(nn.Module):
        def __init__(self, channels=1, dim=16, layers=2, classes=10):
            super().__init__()
            self.tokenizer = nn.Sequential(nn.Conv2d(channels, dim, 3, padding=1), nn.ReLU(),
                                           nn.MaxPool2d(2))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
                for _ in range(layers)
            )
            self.head = nn.Linear(dim, classes)

        def forward(self, pixel_values):
            tokens = self.tokenizer(pixel_values).flatten(2).transpose(1, 2)
            for block in self.blocks:
                tokens = block(tokens)
            return self.head(tokens.mean(1))
""")


# Two layer stacks (convolutions, then transformer layers): blocks are named per stack.
TWO_STACKS = CONVFORMER.replace("class ConvFormer", "class _One") + textwrap.dedent("""

    class TwoStacks(_One):
        def __init__(self, dim=16):
            super().__init__(dim=dim)
            self.convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(2))

        def forward(self, pixel_values):
            images = self.tokenizer(pixel_values)
            for conv in self.convs:
                images = conv(images)
            tokens = images.flatten(2).transpose(1, 2)
            for block in self.blocks:
                tokens = block(tokens)
            return self.head(tokens.mean(1))
""")


def _module_folder(folder: Path, kwargs: dict | None = None, state: dict | None = None,
                   code: str = CONVFORMER, cls: str = "ConvFormer") -> Path:  # fmt: skip
    """A raw PyTorch model folder: the module's code, module.json, its state dict."""
    folder.mkdir(parents=True)
    (folder / "convformer.py").write_text(code)
    spec = {"module": f"convformer:{cls}", "kwargs": kwargs or {}, "input_shape": [1, 8, 8]}
    (folder / "module.json").write_text(json.dumps(spec))
    if state is None:
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 - the test's own module source
        torch.manual_seed(0)
        state = namespace[cls](**(kwargs or {})).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_trace_segmentation_splits_a_conv_transformer_at_the_4d_to_3d_transition(tmp_path):
    folder = _module_folder(tmp_path / "model")
    trace = dict(module_trace(folder, trust_remote_code=True))
    assert trace["tokenizer"][0] == 4  # (batch, channels, h, w)
    assert trace["blocks.0"][0] == trace["blocks.1"][0] == 3  # (batch, tokens, dim)
    blocks = segment_model(folder, "trace", trust_remote_code=True)
    assert [b.name for b in blocks] == ["tokenizer", "L0-1", "head"]
    conv, transformer, head = blocks
    assert all(t.startswith("tokenizer.") for t in conv.tensors) and conv.tensors
    assert all(t.startswith("blocks.") for t in transformer.tensors)
    assert transformer.layers == (0, 2) and head.tensors == ("head.weight", "head.bias")
    every = [t for b in blocks for t in b.tensors]  # every tensor of the state dict, once
    assert sorted(every) == sorted(load_file(str(folder / "model.safetensors")))
    by_layer = segment_model(folder, "layers:2", trust_remote_code=True)
    assert [b.name for b in by_layer] == ["tokenizer", "L0", "L1", "head"]


def test_segment_prints_the_trace_of_a_raw_pytorch_model(tmp_path):
    folder = _module_folder(tmp_path / "model")
    result = CliRunner().invoke(main, ["segment", str(folder), "--trust-remote-code", "--strategy",
                                       "trace"])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "tokenizer 4-D" in result.output and "blocks.0 3-D" in result.output
    assert "3 blocks" in result.output


def test_a_model_that_brings_its_own_code_runs_it_only_when_trusted(tmp_path):
    folder = _module_folder(tmp_path / "model")
    result = CliRunner().invoke(main, ["segment", str(folder)])
    assert result.exit_code == 1 and "--trust-remote-code" in result.output
    assert "ModelReferenceError" in result.output


def test_a_state_dict_that_does_not_fit_its_module_is_refused(tmp_path):
    folder = _module_folder(tmp_path / "model", state={"head.weight": torch.zeros(10, 16)})
    with pytest.raises(ArchitectureMismatchError, match="does not fit"):
        segment_model(folder, "trace", trust_remote_code=True)
    (folder / "module.json").write_text(json.dumps({"module": "convformer"}))
    with pytest.raises(ModelReferenceError, match="module.json"):
        segment_model(folder, "trace", trust_remote_code=True)


def test_search_refuses_a_raw_pytorch_model_before_anything_loads(demo_models, tmp_path):
    folder = _module_folder(tmp_path / "raw" / "arith")
    arguments = short_search_arguments(demo_models, tmp_path / "run", 12,
                                       folders={"arith": folder})  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1 and "raw PyTorch model" in result.output
    assert not (tmp_path / "run").exists()


def test_two_layer_stacks_are_named_by_stack_and_a_failing_trace_is_an_error(tmp_path):
    folder = _module_folder(tmp_path / "two", code=TWO_STACKS, cls="TwoStacks")
    blocks = segment_model(folder, "layers:4", trust_remote_code=True)
    # The tokenizer's output has the convolutions' shape: it joins the first of them.
    assert [b.name for b in blocks] == ["convs.0", "convs.1", "blocks.0", "blocks.1", "head"]
    assert any(t.startswith("tokenizer.") for t in blocks[0].tensors)
    spec = json.loads((folder / "module.json").read_text())
    (folder / "module.json").write_text(json.dumps(spec | {"input_shape": [8, 8]}))  # no channel
    with pytest.raises(ModelReferenceError, match="forward pass of TwoStacks"):
        segment_model(folder, "trace", trust_remote_code=True)
    for wrong in ({"module": "../elsewhere:Net"}, {"input_dtype": "nonsense"}):
        (folder / "module.json").write_text(json.dumps(spec | wrong))
        with pytest.raises(ModelReferenceError, match="module.json"):
            segment_model(folder, "trace", trust_remote_code=True)
