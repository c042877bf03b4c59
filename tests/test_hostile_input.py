"""Hostile input: YAML that builds objects, remote code, pickled weights, paths that escape,
and random or malformed recipe and run-settings files."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import short_search_arguments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from automerge_mk.cli import main
from automerge_mk.errors import ModelReferenceError, RecipeError
from automerge_mk.recipe import load_recipe
from automerge_mk.sources import resolve_model


def _run_python(marker: Path) -> str:
    """Python source that proves it ran by writing `marker`."""
    return f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"


# --- safe YAML ---------------------------------------------------------------------------


def test_a_recipe_with_python_tags_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    recipe = f"merge_method: !!python/object/apply:exec [{json.dumps(_run_python(marker))}]\n"
    assert "python/object" in recipe
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(recipe)
    assert not marker.exists()


def test_a_set_value_with_a_python_tag_is_refused_and_runs_nothing(demo_models, tmp_path):
    marker = tmp_path / "ran"
    arguments = short_search_arguments(demo_models, tmp_path / "run", 2)
    arguments += ["--set", f"lambda=!!python/object/apply:exec [{json.dumps(_run_python(marker))}]"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "is not a plain YAML value" in result.output
    assert not marker.exists() and not (tmp_path / "run").exists()


# --- remote code -------------------------------------------------------------------------


@pytest.fixture
def remote_code_models(demo_models, tmp_path) -> tuple[dict[str, Path], Path, Path]:
    """The demo base and specialists with model code of their own (auto_map) that writes a
    marker file when it is imported; returns the specialists, the base and the marker."""
    marker = tmp_path / "code-ran"
    folders = {}
    for name, folder in {"demo-base": demo_models.base, **demo_models.specialists}.items():
        copy = shutil.copytree(folder, tmp_path / "remote" / name)
        config = json.loads((copy / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_marked.MarkedLlama"}
        (copy / "config.json").write_text(json.dumps(config))
        (copy / "modeling_marked.py").write_text(
            f"{_run_python(marker)}\nfrom transformers import LlamaForCausalLM\n\n\n"
            "class MarkedLlama(LlamaForCausalLM):\n    pass\n"
        )
        folders[name] = copy
    base = folders.pop("demo-base")
    return folders, base, marker


def test_remote_code_is_refused_and_never_run_without_the_flag(demo_models, remote_code_models):
    folders, base, marker = remote_code_models
    out = base.parent / "run"
    arguments = short_search_arguments(demo_models, out, 2, folders=folders, base=base)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1
    assert (
        "needs code from its repository" in result.output and "--trust-remote-code" in result.output
    )
    assert not marker.exists() and not out.exists()


def test_remote_code_runs_only_with_the_flag_and_ships_with_the_model(
    demo_models, remote_code_models
):
    folders, base, marker = remote_code_models
    out = base.parent / "run"
    arguments = short_search_arguments(demo_models, out, 2, folders=folders, base=base)
    result = CliRunner().invoke(main, [*arguments, "--trust-remote-code"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert marker.exists()  # the model's own class was used
    assert (out / "model" / "modeling_marked.py").is_file()  # the built model loads with it
    final = json.loads((out / "final.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], abs=1e-5)


# --- pickled weights ---------------------------------------------------------------------


def _pickled_copy(folder: Path, into: Path, extra: dict | None = None) -> Path:
    """`folder` with its safetensors replaced by a pickled pytorch_model.bin."""
    copy = shutil.copytree(folder, into)
    tensors = load_file(str(copy / "model.safetensors"))
    torch.save({**tensors, **(extra or {})}, copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    return copy


def test_pickled_weights_are_refused_by_default(demo_models, tmp_path):
    pickled = _pickled_copy(demo_models.specialists["arith"], tmp_path / "pickled" / "arith")
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, 2, folders={"arith": pickled})
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1
    assert "has only pickled weights" in result.output
    assert "--allow-pickle-weights" in result.output
    assert not out.exists()


def test_pickled_weights_are_merged_with_the_opt_in_and_stock_mergekit_agrees(
    demo_models, tmp_path
):
    pickled = _pickled_copy(demo_models.specialists["arith"], tmp_path / "pickled" / "arith")
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, 2, folders={"arith": pickled})
    result = CliRunner().invoke(main, [*arguments, "--allow-pickle-weights"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    final = json.loads((out / "final.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], abs=1e-5)


class _RunsCode:
    """Pickles to a call of exec: what a hostile pytorch_model.bin holds."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def test_a_pickle_that_runs_code_is_refused_even_with_the_opt_in(demo_models, tmp_path):
    marker = tmp_path / "ran"
    hostile = _pickled_copy(
        demo_models.specialists["arith"],
        tmp_path / "hostile" / "arith",
        extra={"payload": _RunsCode(_run_python(marker))},
    )
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, 2, folders={"arith": hostile})
    result = CliRunner().invoke(main, [*arguments, "--allow-pickle-weights"])
    assert result.exit_code == 1
    assert "holds more than plain tensors" in result.output and "exec" in result.output
    assert not marker.exists() and not out.exists()
    torch.load(hostile / "pytorch_model.bin", weights_only=False)  # an unsafe load would run it
    assert marker.exists()


# --- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference",
    ["org/..", "../name", "org/./name", "org/name@../../../outside", "org/name@/etc/passwd"],
)
def test_hub_ids_and_revisions_cannot_name_a_path(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # refused before any download is tried
    with pytest.raises(ModelReferenceError, match="neither an existing folder|not a branch"):
        resolve_model(reference)


@pytest.mark.parametrize(
    ("shard", "message"),
    [("../outside.safetensors", "shards must be files of"), ("gone.safetensors", "missing")],
)
def test_a_shard_index_cannot_name_files_outside_or_missing(demo_models, tmp_path, shard, message):
    folder = shutil.copytree(demo_models.specialists["arith"], tmp_path / "arith")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    names = load_file(str(folder / "model.safetensors"))
    weight_map = dict.fromkeys(names, "model.safetensors") | {"extra.weight": shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelReferenceError, match=message):
        resolve_model(str(folder))


# --- random and malformed files (property-based) -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),  # fmt: skip
    max_leaves=12,
)

VALID_RECIPE = {
    "merge_method": "ties",
    "base_model": "org/base",
    "dtype": "float32",
    "parameters": {"normalize": True},
    "models": [
        {"model": "org/a", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "org/b", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]}},
    ],
}


def _paths(value, prefix=()):
    """Every path into a JSON-like value, the value itself included."""
    yield prefix
    if isinstance(value, dict | list):
        for key, inner in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _paths(inner, (*prefix, key))


def _mutated(value, path, replacement, delete: bool):
    """A deep copy of `value` with the node at `path` replaced (or deleted)."""
    if not path:
        return replacement
    copy = json.loads(json.dumps(value))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = replacement
    return copy


@st.composite
def mutations(draw, document):
    path = draw(st.sampled_from(list(_paths(document))))
    return _mutated(document, path, draw(json_values), delete=bool(path) and draw(st.booleans()))


def _loads_or_names_the_problem(text: str) -> None:
    try:
        documents = load_recipe(text)
    except RecipeError:
        return
    assert documents and all(isinstance(d, dict) for d in documents)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_recipe_loads_or_raises_recipe_error(text):
    _loads_or_names_the_problem(text)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(json_values, min_size=1, max_size=3)
    | st.lists(mutations(VALID_RECIPE), min_size=1, max_size=3)
)
def test_any_yaml_documents_as_a_recipe_load_or_raise_recipe_error(documents):
    _loads_or_names_the_problem(yaml.safe_dump_all(documents))


@pytest.fixture(scope="module")
def stored_settings(demo_run) -> dict:
    """A real run's settings.json, with the model and data paths pointing nowhere, so a
    mutation that stays valid still ends before anything is loaded."""
    stored = json.loads((demo_run / "settings.json").read_text())
    for model in [*stored["models"], stored["base"]]:
        model["path"] = model["reference"] = f"/nonexistent/{model['name']}"
    stored["data"] = {name: f"/nonexistent/{name}.jsonl" for name in stored["data"]}
    return stored


@st.composite
def run_files(draw, stored):
    """settings.json (random bytes, random JSON, or a real one mutated) and trials.jsonl."""
    settings_json = draw(
        st.binary(max_size=200)
        | json_values.map(lambda v: json.dumps(v).encode())
        | mutations(stored).map(lambda v: json.dumps(v).encode())
        | mutations(stored["settings"]).map(
            lambda v: json.dumps({**stored, "settings": v}).encode()
        )
    )
    return settings_json, draw(st.binary(max_size=200))


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_run_settings_to_resume_fail_with_a_named_error(stored_settings, data):
    settings_json, trials = data.draw(run_files(stored_settings))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "settings.json").write_bytes(settings_json)
        (Path(folder) / "trials.jsonl").write_bytes(trials)
        result = CliRunner().invoke(main, ["search", "--resume", folder, "--quiet"])
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    assert result.output.startswith(("Error: ", "Usage: ")), result.output
