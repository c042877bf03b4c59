"""Model references: local folders and Hub ids resolved from an offline cache, pinned."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest

from automerge_mk.errors import ModelReferenceError
from automerge_mk.recipe import recipe_text
from automerge_mk.segment import segment_model
from automerge_mk.sources import resolve_model
from automerge_mk.types import BlockChoice, MergePlan

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tiny_llama, tmp_path, monkeypatch):
    """An HF cache holding org/tiny at commit SHA, as huggingface_hub lays it out."""
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_llama, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo


def test_local_folder_resolves_to_its_absolute_path(tiny_llama):
    model = resolve_model(str(tiny_llama))
    assert model.path == tiny_llama.resolve() and model.pinned == str(tiny_llama.resolve())


def test_hub_id_resolves_offline_from_the_cache_and_pins_the_commit(offline_cache):
    model = resolve_model("org/tiny")
    assert model.path == offline_cache / "snapshots" / SHA
    assert model.revision == SHA and model.name == "tiny"
    assert model.pinned == f"org/tiny@{SHA}"


def test_recipe_names_hub_models_by_pinned_id(offline_cache):
    model = resolve_model("org/tiny")
    blocks = segment_model(model.path, "trace")
    plan = MergePlan(
        sources=(str(model.path), str(model.path)),
        base=None,
        blocks=blocks,
        choices=(BlockChoice(method="linear", weights=(0.5, 0.5)),) * len(blocks),
    )
    text = recipe_text(plan, {str(model.path): model.pinned})
    assert f"org/tiny@{SHA}" in text and str(model.path) not in text


def test_unknown_hub_id_offline_says_what_to_do(offline_cache):
    with pytest.raises(ModelReferenceError, match="HF_HUB_OFFLINE"):
        resolve_model("org/absent")


def test_reference_that_is_neither_folder_nor_hub_id_is_rejected(tmp_path):
    with pytest.raises(ModelReferenceError, match="neither an existing folder nor a Hub id"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"))


def test_models_needing_remote_code_are_refused_by_default(tiny_llama, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama, folder)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(
        config.replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1)
    )
    with pytest.raises(ModelReferenceError, match="--trust-remote-code"):
        resolve_model(str(folder))


def test_pinned_hub_id_resolves_offline_from_the_cache(offline_cache):
    model = resolve_model(f"org/tiny@{SHA}")
    assert model.revision == SHA and model.path == offline_cache / "snapshots" / SHA
