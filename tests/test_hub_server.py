"""The fake Hub server in tests/hub_server.py against huggingface_hub's real client code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

TOKEN = "hf_fake_test_token_123"
BEARER = f"Bearer {TOKEN}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # Legacy (non-Xet) upload path, online, and nothing from ~/.cache/huggingface.
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # NB: do not monkeypatch constants.ENDPOINT: hf_hub_url() only swaps in `endpoint=`
        # when its URL template starts with constants.ENDPOINT (fixed at import time).
        mp.setenv("HF_TOKEN", "hf_env_token_must_not_be_used")
        with HubServer(tmp_path_factory.mktemp("hub")) as hub:
            yield hub


@pytest.fixture(scope="module")
def api(server) -> HfApi:
    return HfApi(endpoint=server.url, token=TOKEN)


def make_folder(folder: Path, weights: bytes, config: str = '{"a": 1}') -> dict[str, bytes]:
    files = {
        "config.json": config.encode(),
        "model.safetensors": weights,
        "README.md": b"---\nlicense: mit\n---\n# tiny\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def read_snapshot(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def uploaded(server, api, tmp_path_factory):
    """org/tiny with one upload_folder commit; returns (first sha, files)."""
    api.create_repo("org/tiny", exist_ok=True, private=True)
    folder = tmp_path_factory.mktemp("up")
    files = make_folder(folder, os.urandom(1 << 20))
    info = api.upload_folder(repo_id="org/tiny", folder_path=folder)
    return info.oid, files


def test_upload_then_snapshot_download_round_trips(server, api, uploaded, tmp_path):
    sha, files = uploaded
    assert len(sha) == 40
    assert api.create_repo("org/tiny", exist_ok=True).endswith("/org/tiny")  # 409 → exist_ok
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo("org/tiny")

    path = snapshot_download("org/tiny", endpoint=server.url, cache_dir=tmp_path, token=TOKEN)
    assert Path(path).name == sha
    got = read_snapshot(path)
    assert got.pop(".gitattributes")  # the Hub's initial commit
    assert got == files
    assert {p: c for p, c in server.files("org/tiny").items() if p != ".gitattributes"} == files
    one = hf_hub_download(
        "org/tiny", "config.json", endpoint=server.url, cache_dir=tmp_path / "c2", token=TOKEN
    )
    assert Path(one).read_bytes() == files["config.json"]
    assert api.model_info("org/tiny").sha == sha


def test_old_revision_still_serves_old_content(server, api, tmp_path):
    api.create_repo("org/history", exist_ok=True)
    weights = os.urandom(1000)
    make_folder(tmp_path / "v1", weights, config='{"a": 1}')
    first = api.upload_folder(repo_id="org/history", folder_path=tmp_path / "v1").oid
    make_folder(tmp_path / "v2", weights, config='{"a": 2}')
    second = api.upload_folder(repo_id="org/history", folder_path=tmp_path / "v2").oid
    assert second != first
    assert server.files("org/history")["config.json"] == b'{"a": 2}'
    assert server.files("org/history", first)["config.json"] == b'{"a": 1}'

    cache = tmp_path / "cache"
    old = snapshot_download(
        "org/history", revision=first, endpoint=server.url, cache_dir=cache, token=TOKEN
    )
    assert Path(old).name == first
    assert Path(old, "config.json").read_bytes() == b'{"a": 1}'
    latest = snapshot_download("org/history", endpoint=server.url, cache_dir=cache, token=TOKEN)
    assert Path(latest).name == second
    assert Path(latest, "config.json").read_bytes() == b'{"a": 2}'
    assert Path(latest, "model.safetensors").read_bytes() == weights


def test_branches(server, api, uploaded, tmp_path):
    api.create_branch("org/tiny", branch="dev", exist_ok=True)
    info = api.upload_file(
        path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="org/tiny", revision="dev"
    )
    assert server.branches("org/tiny")["dev"] == info.oid
    assert "dev.txt" not in server.files("org/tiny", "main")
    got = hf_hub_download(
        "org/tiny", "dev.txt", revision="dev", endpoint=server.url, cache_dir=tmp_path, token=TOKEN
    )
    assert Path(got).read_bytes() == b"dev only"
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/tiny", revision="nope"
        )


def test_token_is_sent_on_every_write_and_never_stored(server, uploaded):
    writes = [r for r in server.requests if r[0] in ("POST", "PUT", "DELETE")]
    assert writes and all(auth == BEARER for _, _, auth in writes)
    assert any("/commit/" in path for _, path, _ in writes)
    for p in server.root.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes()


def test_writes_without_or_with_a_wrong_token_are_refused(server, tmp_path):
    # a server of its own, so that the anonymous requests don't mix with `server.requests`
    with HubServer(tmp_path / "hub", write_token=TOKEN) as other:
        for token in (False, "hf_wrong"):
            with pytest.raises(HfHubHTTPError, match="401"):
                HfApi(endpoint=other.url, token=token).create_repo("org/anon")
        HfApi(endpoint=other.url, token=TOKEN).create_repo("org/anon")
        assert [auth for *_, auth in other.requests] == [None, "Bearer hf_wrong", BEARER]


def test_failed_commit_raises_then_next_upload_succeeds(server, api, tmp_path):
    api.create_repo("org/retry", exist_ok=True)
    make_folder(tmp_path, b"\0" * 1000, config='{"a": 3}')
    before = server.branches("org/retry")["main"]
    server.fail_commits = 1
    with pytest.raises(HfHubHTTPError, match="500"):
        api.upload_folder(repo_id="org/retry", folder_path=tmp_path)
    assert server.fail_commits == 0
    assert server.branches("org/retry")["main"] == before
    info = api.upload_folder(repo_id="org/retry", folder_path=tmp_path)
    assert server.branches("org/retry")["main"] == info.oid != before


def test_unknown_repo_and_revision(server, api, uploaded, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", endpoint=server.url, cache_dir=tmp_path, token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):  # private repo, anonymous reader
        snapshot_download("org/tiny", endpoint=server.url, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/tiny", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(
            "org/tiny",
            revision="no-such-branch",
            endpoint=server.url,
            cache_dir=tmp_path,
            token=TOKEN,
        )
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            "org/tiny",
            "config.json",
            revision="nope",
            endpoint=server.url,
            cache_dir=tmp_path,
            token=TOKEN,
        )


def test_fail_next_injects_a_status(server, api, uploaded):
    server.fail_next("/api/models/org/tiny/revision/", status=503, method="GET")
    with pytest.raises(HfHubHTTPError, match="503"):
        api.model_info("org/tiny", revision="main")
    assert api.model_info("org/tiny", revision="main").sha == server.branches("org/tiny")["main"]
