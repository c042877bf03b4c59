"""Raw PyTorch models (module.json + model.safetensors): built from their own code only when
trusted, checked against their state dict, and segmented where the trace changes rank."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
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


# --- searching and merging raw PyTorch models ---


def _family(root: Path) -> dict[str, Path]:
    """A base ConvFormer and two "specialists" (the base plus a task vector each), with image
    tasks: validation .npz files of random 8x8 images, labelled by the specialist itself."""
    base = _module_folder(root / "base")
    state = load_file(str(base / "model.safetensors"))
    folders = {"base": base}
    for seed, name in enumerate(("even", "odd"), 1):
        generator = torch.Generator().manual_seed(seed)
        tuned = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        folders[name] = _module_folder(root / name, state=tuned)
        images = torch.rand((24, 1, 8, 8), generator=generator)
        namespace: dict = {}
        exec(CONVFORMER, namespace)  # noqa: S102 - the test's own module source
        model = namespace["ConvFormer"]().eval()
        model.load_state_dict(tuned)
        with torch.no_grad():
            labels = model(images).argmax(dim=1)
        np.savez(root / f"{name}.npz", pixel_values=images.numpy(), labels=labels.numpy())
    return folders


def _search_arguments(root: Path, folders: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["search", str(folders["even"]), str(folders["odd"]), "--base", str(folders["base"]),
            "--data", f"even={root / 'even.npz'}", "--data", f"odd={root / 'odd.npz'}",
            "--out", str(out), "--trust-remote-code", "--quiet", "--seed", "0", *extra]  # fmt: skip


def test_a_mixed_method_plan_is_rebuilt_by_stock_mergekit_pytorch_bit_for_bit(tmp_path):
    from automerge_mk.engine import MergeEngine
    from automerge_mk.recipe import build_with_mergekit_pytorch, pytorch_recipe_texts
    from automerge_mk.types import BlockChoice, MergePlan

    folders = _family(tmp_path)
    blocks = segment_model(folders["base"], "trace", trust_remote_code=True)
    engine = MergeEngine([folders["even"], folders["odd"]], folders["base"], folders["base"],
                         trust_remote_code=True)  # fmt: skip
    # DARE's masks are drawn in mergekit-pytorch's tensor order (PYTHONHASHSEED=0), task
    # arithmetic's tensors come from the other run: the selection picks each block's.
    choices = (
        BlockChoice(method="dare_ties", weights=(0.7, 0.9), densities=(0.4, 0.6)),
        BlockChoice(method="task_arithmetic", weights=(1.1, 0.3)),
        BlockChoice(method="dare_ties", weights=(0.5, 0.5), densities=(0.8, 0.3)),
    )
    plan = MergePlan(sources=(str(folders["even"]), str(folders["odd"])), base=str(folders["base"]),
                     blocks=blocks, choices=choices, seed=5)  # fmt: skip
    merged = engine.merge(plan)
    recipe, out = tmp_path / "run" / "recipe.yaml", tmp_path / "run" / "model"
    recipe.parent.mkdir()
    texts, command = pytorch_recipe_texts(plan, recipe, out)
    assert set(texts) == {recipe, tmp_path / "run" / "recipe-dare_ties_part.yaml",
                          tmp_path / "run" / "recipe-task_arithmetic_part.yaml"}  # fmt: skip
    assert command.count("mergekit-pytorch") == 3 and "PYTHONHASHSEED=0" in command
    for file, text in texts.items():
        file.write_text(text)
    build_with_mergekit_pytorch(recipe, out, plan.seed, "cpu", folders["base"])
    stock = load_file(str(out / "model.safetensors"))
    assert set(stock) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(tensor.view(torch.int32), stock[name].view(torch.int32)), name
    assert (out / "module.json").is_file() and (out / "convformer.py").is_file()
    base = load_file(str(folders["base"] / "model.safetensors"))
    assert not torch.equal(stock["blocks.0.linear1.weight"], base["blocks.0.linear1.weight"])


def test_a_raw_pytorch_search_builds_its_best_trial_with_mergekit_pytorch(tmp_path):
    folders = _family(tmp_path)
    out = tmp_path / "run"
    arguments = _search_arguments(tmp_path, folders, out, "--trials", "5", "--initial", "3",
                                  "--methods", "linear,ties,task_arithmetic")  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    best = json.loads((out / "best.json").read_text())
    final = json.loads((out / "final.json").read_text())
    # model/ is stock mergekit-pytorch's build of the best trial's recipe: the same scores.
    for task in ("even", "odd"):
        assert final["tasks"][task]["loss"] == pytest.approx(best["tasks"][task]["loss"], 1e-6)
        accuracy = best["tasks"][task]["metrics"]["label_accuracy"]
        assert final["tasks"][task]["metrics"]["label_accuracy"] == accuracy
    sources = json.loads((out / "sources.json").read_text())
    assert sources["even"]["tasks"]["even"]["metrics"]["label_accuracy"] == 1.0  # its labels
    assert "mergekit-pytorch" in (out / "recipe.yaml").read_text()
    assert "mergekit-pytorch" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "convformer.py", "model.safetensors", "module.json"]  # fmt: skip


def test_bad_image_tasks_are_refused_before_the_run_directory_exists(tmp_path):
    folders = _family(tmp_path)
    out = tmp_path / "run"
    np.savez(tmp_path / "flat.npz", pixel_values=np.zeros((4, 64), np.float32),
             labels=np.zeros(4, np.int64))  # fmt: skip
    np.savez(tmp_path / "eleven.npz", pixel_values=np.zeros((4, 1, 8, 8), np.float32),
             labels=np.full(4, 11))  # fmt: skip
    np.savez(tmp_path / "unlabelled.npz", pixel_values=np.zeros((4, 1, 8, 8), np.float32))
    (tmp_path / "texts.jsonl").write_text('{"text": "a"}\n')
    for data, expected in (("flat.npz", "shape"), ("eleven.npz", "10 logits"),
                           ("unlabelled.npz", "lacks array"), ("texts.jsonl", ".npz")):  # fmt: skip
        arguments = _search_arguments(tmp_path, folders, out, "--trials", "5", "--initial", "3")
        arguments[arguments.index(f"even={tmp_path / 'even.npz'}")] = f"even={tmp_path / data}"
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 1 and "DataError" in result.output, result.output
        assert expected in result.output, result.output
        assert not out.exists()
    arguments = _search_arguments(tmp_path, folders, out, "--fidelity", "tokens")
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1 and "--fidelity" in result.output and not out.exists()


def test_image_scores_are_the_cross_entropy_and_top1_accuracy(tmp_path):
    from automerge_mk.classify import load_image_task
    from automerge_mk.evaluate import score_task
    from automerge_mk.modules import live_module

    folders = _family(tmp_path)
    model = live_module(folders["base"], torch.float32, "cpu", trust_remote_code=True)
    task = load_image_task("even", tmp_path / "even.npz", (1, 8, 8), examples=10, seed=1)
    assert len(task.indices) == 10 == task.tokens
    with np.load(tmp_path / "even.npz") as arrays:
        images = torch.from_numpy(arrays["pixel_values"][list(task.indices)])
        labels = torch.from_numpy(arrays["labels"][list(task.indices)])
    with torch.no_grad():
        logits = model(images)
    score = score_task(model, task, keep_examples=True)
    assert score.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    expected = (logits.argmax(1) == labels).float().mean().item()
    assert score.metrics["label_accuracy"] == pytest.approx(expected)
    assert len(score.example_losses) == 10


def test_the_whole_strategy_is_one_block_of_every_tensor(tmp_path):
    folder = _module_folder(tmp_path / "model")
    (block,) = segment_model(folder, "whole", trust_remote_code=True)
    assert block.name == "model"
    assert sorted(block.tensors) == sorted(load_file(str(folder / "model.safetensors")))


def test_suggest_writes_mergekit_pytorch_runs_for_a_raw_model(tmp_path):
    from automerge_mk.recipe import build_with_mergekit_pytorch

    folders = _family(tmp_path)
    out = tmp_path / "suggested.yaml"
    arguments = ["suggest", str(folders["even"]), str(folders["odd"]), "--base",
                 str(folders["base"]), "--data", f"even={tmp_path / 'even.npz'}", "--data",
                 f"odd={tmp_path / 'odd.npz'}", "--trust-remote-code",
                 "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "sign conflict" in result.output and "tokenizer" in result.output  # the features
    assert "mergekit-pytorch" in out.read_text()
    build_with_mergekit_pytorch(out, tmp_path / "merged", 0, "cpu", folders["base"])
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(load_file(str(folders["base"] / "model.safetensors")))


def test_a_pareto_search_of_raw_models_picks_a_front_point_built_by_mergekit_pytorch(tmp_path):
    from automerge_mk import front
    from automerge_mk.rundir import RunDir
    from automerge_mk.types import best_trial

    folders = _family(tmp_path)
    run = tmp_path / "run"
    arguments = _search_arguments(tmp_path, folders, run, "--trials", "6", "--initial", "4",
                                  "--objective", "pareto")  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Pareto front" in (run / "summary.md").read_text()
    trials = RunDir(run).trials()
    points = front.pareto_front(trials, ("even", "odd"))
    chosen = next((t for t in points if t.trial != best_trial(trials).trial), points[0])
    out = tmp_path / "picked"
    result = CliRunner().invoke(main, ["pick", str(run), "--trial", str(chosen.trial), "--out",
                                       str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    final = json.loads((out / "final.json").read_text())
    for task in ("even", "odd"):  # stock mergekit-pytorch's build scores as its trial did
        assert final["tasks"][task]["loss"] == pytest.approx(chosen.tasks[task].loss, rel=1e-6)
    assert (out / "model" / "module.json").is_file()
