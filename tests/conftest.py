"""Shared fixtures: small real models built once per test run, no network.

The suite runs in pytest-xdist workers (pyproject's addopts: `-n auto`), one torch thread
each: two cores shared by two processes of two threads each ran up to 7x slower here (the
threads spin-wait for each other). The demo models and the demo search are built once per
run, by whichever worker asks first, under a file lock (filelock, huggingface_hub's
dependency); the others read them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from automerge_mk.demo import DemoModels, build_demo_models

# The timing --eval-dtype auto keeps per machine (evaluate.timed_eval_dtype): per test process,
# not in the user's cache.
os.environ["AUTOMERGE_MK_CACHE"] = tempfile.mkdtemp(prefix="automerge-mk-cache-")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses tests start (mergekit-yaml, Dask)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], str]) -> str:
    """`build(folder)` once per test run, shared by every xdist worker; returns what it
    returned (a JSON string), read back from `folder`'s `.built` file by later callers."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, marker = root / name, root / name / ".built"
    with FileLock(str(root / f"{name}.lock")):
        if not marker.exists():
            if folder.exists():
                shutil.rmtree(folder)  # a build that failed half-way
            folder.mkdir(parents=True)
            marker.write_text(build(folder))
    return marker.read_text()


def save_model(config, folder: Path, seed: int = 0) -> Path:
    """Build a randomly initialised model from `config` and save it as safetensors."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def decoder_config(config_class=LlamaConfig, architecture="LlamaForCausalLM", **overrides):
    """A 4-layer, 32-wide config of a llama-like family (llama, mistral, qwen2 …)."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        tie_word_embeddings=False,
        architectures=[architecture],
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return config_class(**values)


def llama_config(**overrides) -> LlamaConfig:
    return decoder_config(**overrides)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_model(llama_config(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    config = GPT2Config(
        n_embd=32,
        n_layer=4,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        architectures=["GPT2LMHeadModel"],
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_model(config, tmp_path_factory.mktemp("gpt2"))


def perturbed_family(base: Path, root: Path, scale: float = 0.05) -> dict[str, Path]:
    """A base and two 'fine-tunes' of it: the base plus different random perturbations."""
    folders = {"base": base}
    tensors = load_file(str(base / "model.safetensors"))
    for index, name in enumerate(["a", "b"]):
        folder = root / name
        shutil.copytree(base, folder)
        generator = torch.Generator().manual_seed(index)
        changed = {
            k: v + scale * torch.randn(v.shape, generator=generator) for k, v in tensors.items()
        }
        save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def family(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    return perturbed_family(tiny_llama, tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> DemoModels:
    """The demo's base and two trained specialists (about 20 s on 2 cores, once per run)."""

    def build(folder: Path) -> str:
        return build_demo_models(folder, seed=0, progress=False).model_dump_json()

    return DemoModels.model_validate_json(built_once(tmp_path_factory, "demo", build))


DEMO_TRIALS = 40


def demo_search_arguments(demo_models: DemoModels, out: Path) -> list[str]:
    """`automerge-mk search` arguments of the demo run: 40 trials, 10 initial, seed 0."""
    names = list(demo_models.specialists)
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet"]
    arguments += ["--trials", str(DEMO_TRIALS), "--initial", "10", "--seed", "0"]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    return arguments


def short_search_arguments(
    demo_models: DemoModels,
    out: Path,
    trials: int,
    folders: dict[str, Path] | None = None,
    base: Path | None = None,
) -> list[str]:
    """`automerge-mk search` arguments of a short demo search (seed 0); `folders` replace
    specialists' folders by copies of the same name, `base` the base's."""
    names = list(demo_models.specialists)
    sources = {**demo_models.specialists, **(folders or {})}
    arguments = ["search", *(str(sources[n]) for n in names)]
    arguments += ["--base", str(base or demo_models.base), "--out", str(out), "--quiet"]
    arguments += ["--trials", str(trials), "--initial", str(min(trials, 4)), "--seed", "0"]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    return arguments


@pytest.fixture(scope="session")
def demo_run(demo_models, tmp_path_factory) -> Path:
    """A finished `search` run on the demo specialists (40 trials, seed 0), once per run:
    tests read it (or copy it before writing)."""
    from click.testing import CliRunner

    from automerge_mk.cli import main

    def build(folder: Path) -> str:
        out = folder / "run"
        result = CliRunner().invoke(main, demo_search_arguments(demo_models, out))
        assert result.exit_code == 0, result.output + repr(result.exception)
        return json.dumps(str(out))

    return Path(json.loads(built_once(tmp_path_factory, "search", build)))
