"""Publishing a run to a Hub-protocol server on 127.0.0.1 with huggingface_hub's real client."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from click.testing import CliRunner
from hub_server import HubServer
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from automerge_mk.cli import main

TOKEN = "hf_fakeTOKENforTESTS0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hub = HubServer(tmp_path_factory.mktemp("hub")).start()
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    return server


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _push(run: Path, repo: str, *extra: str):
    return CliRunner().invoke(main, ["push", str(run), repo, *extra])


def test_pushed_repo_downloads_loads_and_equals_the_local_model(demo_run, hub_env, tmp_path):
    result = _push(demo_run, "me/demo-merge")
    assert result.exit_code == 0, result.output + repr(result.exception)
    local = snapshot_download("me/demo-merge", endpoint=hub_env.url, cache_dir=tmp_path / "c")
    local = Path(local)
    for name in ["recipe.yaml", "trials.jsonl", "progress.png", "README.md", "config.json"]:
        assert (local / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32)
    expected = load_file(str(demo_run / "model" / "model.safetensors"))
    parameters = dict(model.named_parameters())
    for name, tensor in expected.items():
        assert torch.equal(parameters[name], tensor.float()), name


def test_card_parses_and_carries_the_merge_metadata(demo_run, hub_env, tmp_path):
    assert _push(demo_run, "me/card-check").exit_code == 0
    readme = tmp_path / "README.md"
    readme.write_bytes(hub_env.files("me/card-check")["README.md"])
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert {"merge", "mergekit", "automerge-mk"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    assert data["base_model_relation"] == "merge"
    assert "mergekit-multi recipe.yaml" in card.text or "mergekit-yaml recipe.yaml" in card.text
    assert "PD = max PR - min PR" in card.text and "progress.png" in card.text
    for plot in ["report-tasks.png", "report-blocks.png", "report-front.png"]:  # uploaded
        assert f"]({plot})" in card.text
        assert hub_env.files("me/card-check")[plot][:8] == b"\x89PNG\r\n\x1a\n"


def test_a_picked_point_publishes_with_a_card_that_says_which_it_is(demo_run, hub_env, tmp_path):
    from automerge_mk import front
    from automerge_mk.pipeline import run_pick
    from automerge_mk.rundir import RunDir, RunRecord
    from automerge_mk.types import best_trial

    trials, names = RunDir(demo_run).trials(), list(RunRecord.read(demo_run).names)
    other = next(t for t in front.pareto_front(trials, names)
                 if t.trial != best_trial(trials).trial)  # fmt: skip
    picked = run_pick(demo_run, other.trial, out=tmp_path / "picked")
    assert _push(picked, "me/picked").exit_code == 0
    files = hub_env.files("me/picked")
    assert (
        f"This model is trial {other.trial} of the search's Pareto front"
        in files["README.md"].decode()
    )
    assert files["recipe.yaml"] == (picked / "recipe.yaml").read_bytes()
    assert files["model.safetensors"] == (picked / "model" / "model.safetensors").read_bytes()


def test_failed_commit_keeps_the_run_and_a_retry_succeeds(demo_run, hub_env):
    before = _digests(demo_run)
    hub_env.fail_commits = 1
    failed = _push(demo_run, "me/retry")
    assert failed.exit_code == 1
    assert "PublishError" in failed.output and f"automerge-mk push {demo_run}" in failed.output
    assert _digests(demo_run) == before
    again = _push(demo_run, "me/retry")
    assert again.exit_code == 0, again.output
    assert "README.md" in hub_env.files("me/retry")
    assert _digests(demo_run) == before


def _assert_no_token(*folders: Path, **texts: str) -> None:
    for where, text in texts.items():
        assert TOKEN not in text, where
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_the_token_never_reaches_output_logs_files_cards_or_errors(demo_run, hub_env, caplog):
    """A push fails once at a server that quotes the Authorization header back in its error (as
    a careless proxy might), then succeeds: the token is sent, and is nowhere we print, log,
    raise, store or upload."""
    caplog.set_level(logging.DEBUG)  # huggingface_hub's and httpx's debug logs included
    hub_env.echo_auth_in_errors, hub_env.fail_commits = True, 1
    try:
        failed = _push(demo_run, "me/secret-check")
    finally:
        hub_env.echo_auth_in_errors = False
    assert failed.exit_code == 1
    assert "Authorization: Bearer ***" in failed.output  # the server did quote it
    retried = _push(demo_run, "me/secret-check")
    assert retried.exit_code == 0, retried.output
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub_env.requests)
    _assert_no_token(
        demo_run,
        failed_output=failed.output,
        error=repr(failed.exception) + str(failed.exception),
        retried_output=retried.output,
        logs=caplog.text,
    )
    for name, content in hub_env.files("me/secret-check").items():  # card, recipe, model ...
        assert TOKEN.encode() not in content, name


# --- resolving Hub ids against the server ---


@pytest.fixture(scope="module")
def hub_family(server, family):
    """The perturbed llama family uploaded as org/base, org/a, org/b; their commit shas."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    shas = {}
    for name in ("base", "a", "b"):
        api.create_repo(f"org/{name}", exist_ok=True)
        info = api.upload_folder(repo_id=f"org/{name}", folder_path=str(family[name]))
        shas[name] = info.oid
    return shas


@pytest.fixture
def hub_cache(hub_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_hub_id_resolves_to_main_and_to_a_pinned_commit(hub_family, hub_cache, family):
    from automerge_mk.sources import resolve_model

    main_model = resolve_model("org/a")
    assert (
        main_model.revision == hub_family["a"] and main_model.pinned == f"org/a@{hub_family['a']}"
    )
    pinned = resolve_model(f"org/a@{hub_family['a']}")
    assert pinned.path == main_model.path
    assert (pinned.path / "model.safetensors").read_bytes() == (
        family["a"] / "model.safetensors"
    ).read_bytes()


def test_missing_repo_or_revision_is_a_clear_error(hub_family, hub_cache):
    from automerge_mk.errors import ModelReferenceError
    from automerge_mk.sources import resolve_model

    with pytest.raises(ModelReferenceError, match="RepositoryNotFoundError"):
        resolve_model("org/absent")
    with pytest.raises(ModelReferenceError, match="RevisionNotFoundError"):
        resolve_model("org/a@" + "f" * 40)


def test_mirror_refusing_repo_listing_still_resolves_by_file(hub_family, hub_cache, hub_env):
    from automerge_mk.sources import resolve_model

    hub_env.fail_next("/api/models/org/b", status=401, count=50)  # model_info, tree, paths-info
    try:
        model = resolve_model("org/b")
    finally:
        hub_env._fail_rules.clear()
    assert model.revision == hub_family["b"]
    assert (model.path / "config.json").is_file() and (model.path / "model.safetensors").is_file()


def test_a_hub_server_error_is_named_as_one_not_as_a_missing_cache(hub_family, hub_cache, hub_env):
    from automerge_mk.errors import ModelReferenceError
    from automerge_mk.sources import resolve_model

    hub_env.fail_next("/api/models/org/a", status=500, count=50)
    try:
        with pytest.raises(
            ModelReferenceError, match=r"the Hub answered HTTP 500.*try again later"
        ):
            resolve_model("org/a")
    finally:
        hub_env._fail_rules.clear()


def test_a_hostile_shard_index_cannot_fetch_outside_the_cache(family, hub_env, hub_cache, tmp_path):
    from huggingface_hub import HfApi

    from automerge_mk.errors import ModelReferenceError
    from automerge_mk.sources import resolve_model

    api = HfApi(endpoint=hub_env.url, token=TOKEN)
    api.create_repo("org/hostile", exist_ok=True)
    api.upload_folder(repo_id="org/hostile", folder_path=str(family["a"]))
    index = {"weight_map": {"model.norm.weight": "../../../../escaped.safetensors"}}
    api.upload_file(path_or_fileobj=json.dumps(index).encode(), repo_id="org/hostile",
                    path_in_repo="model.safetensors.index.json")  # fmt: skip
    hub_env.fail_next("/api/models/org/hostile", status=401, count=50)  # fetch file by file
    try:
        with pytest.raises(ModelReferenceError, match="is not a file name"):
            resolve_model("org/hostile")
    finally:
        hub_env._fail_rules.clear()
    assert not list(tmp_path.rglob("escaped*")) and not list(hub_cache.parent.rglob("escaped*"))


def test_search_on_hub_ids_pins_shas_and_publishes(server, hub_cache, demo_models, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    shas = {}
    folders = {"demo-base": demo_models.base, **demo_models.specialists}
    for name, folder in folders.items():
        api.create_repo(f"org/{name}", exist_ok=True)
        shas[name] = api.upload_folder(repo_id=f"org/{name}", folder_path=str(folder)).oid
    out = tmp_path / "run"
    arguments = ["search", "org/arith", "org/reverse", "--base", "org/demo-base", "--quiet"]
    arguments += ["--out", str(out), "--trials", "4", "--initial", "3"]
    arguments += ["--methods", "ties,task_arithmetic", "--push-to-hub", "me/hub-merge"]
    for name in ("arith", "reverse"):
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    recipe = (out / "recipe.yaml").read_text()
    for name, sha in shas.items():
        assert f"org/{name}@{sha}" in recipe
    assert "Published:" in result.output
    card = server.files("me/hub-merge")["README.md"].decode()
    assert f"org/arith@{shas['arith']}" in card.split("---")[1]  # base_model metadata
    _assert_no_token(out, hub_cache, output=result.output, card=card)


def test_push_to_a_branch_creates_it(demo_run, hub_env):
    result = _push(demo_run, "me/branched", "--branch", "dev", "--private")
    assert result.exit_code == 0, result.output
    assert "dev" in hub_env.branches("me/branched")
    assert "README.md" in hub_env.files("me/branched", revision="dev")


def test_unreachable_hub_is_a_clear_error_with_the_retry_command(demo_run, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = _digests(demo_run)
    result = _push(demo_run, "me/unreachable")
    assert result.exit_code == 1 and "PublishError" in result.output
    assert f"automerge-mk push {demo_run} me/unreachable" in result.output
    assert TOKEN not in result.output and _digests(demo_run) == before


def test_a_raw_pytorch_run_publishes_its_module_its_runs_and_a_mergekit_pytorch_rebuild(
    hub_env, tmp_path
):
    from test_modules import _family, _search_arguments

    folders = _family(tmp_path)
    run = tmp_path / "run"
    arguments = _search_arguments(tmp_path, folders, run, "--trials", "5", "--initial", "3",
                                  "--methods", "ties,task_arithmetic")  # fmt: skip
    assert CliRunner().invoke(main, arguments).exit_code == 0
    result = _push(run, "me/raw-merge")
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = hub_env.files("me/raw-merge")
    for name in ["model.safetensors", "module.json", "convformer.py", "recipe.yaml"]:
        assert name in files, name
    stages = sorted(p.name for p in run.glob("recipe-*_part.yaml"))
    assert all(files[name] == (run / name).read_bytes() for name in stages)
    assert files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    readme = tmp_path / "README.md"
    readme.write_bytes(files["README.md"])
    card = ModelCard.load(readme)
    assert card.data.to_dict()["library_name"] == "pytorch"
    assert f"mergekit-pytorch {run / 'recipe.yaml'} {run / 'model'}" in card.text
    assert "stock mergekit-pytorch built this model" in card.text
