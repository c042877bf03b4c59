"""Model references -> local folders, pinned to a revision.

A reference is a local folder or a Hub id `org/name[@revision]`. Hub ids are fetched with
huggingface_hub's `snapshot_download` (only the files a merge needs), which honours
HF_HUB_OFFLINE, HF_HOME/HF_HUB_CACHE, HF_ENDPOINT and HF_TOKEN; the snapshot folder's name is
the resolved commit sha, which recipes record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ModelReferenceError
from .types import SourceModel

# What a merge and the evaluator read; no pickled weights, no remote code.
MERGE_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(reference: str, trust_remote_code: bool = False) -> SourceModel:
    """Resolve a folder or `org/name[@revision]` to a local folder with config and weights.

    Args:
        reference: a local folder, or a Hub id with an optional `@revision`.
        trust_remote_code: allow configs that need code from the repository.

    Returns:
        The resolved model; Hub models carry their repo id and commit sha.

    Raises:
        ModelReferenceError: when the reference is neither, cannot be downloaded, has no
            safetensors weights, or needs remote code without `trust_remote_code`.
    """
    folder = Path(reference).expanduser()
    if folder.is_dir():
        model = SourceModel(reference=reference, name=folder.resolve().name, path=folder.resolve())
    else:
        repo_id, _, revision = reference.partition("@")
        if not _HUB_ID.match(repo_id):
            raise ModelReferenceError(
                f"{reference!r} is neither an existing folder nor a Hub id like org/name[@rev]"
            )
        model = _download(reference, repo_id, revision or None)
    _check_folder(model, trust_remote_code)
    return model


def _download(reference: str, repo_id: str, revision: str | None) -> SourceModel:
    from huggingface_hub import snapshot_download  # deferred: only Hub ids need it

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=MERGE_FILES))
    except Exception as error:  # huggingface_hub raises many types; all mean "not available"
        raise ModelReferenceError(
            f"cannot fetch {reference} from the Hub: {type(error).__name__}: {error}. "
            "Check the id and revision, your network or HF_TOKEN; offline, populate the cache "
            "first (HF_HUB_OFFLINE=1 reads only the cache)"
        ) from None
    return SourceModel(
        reference=reference,
        name=repo_id.split("/")[1],
        path=path,
        revision=path.name,
        repo_id=repo_id,
    )


def _check_folder(model: SourceModel, trust_remote_code: bool) -> None:
    config = model.path / "config.json"
    if not config.is_file():
        raise ModelReferenceError(f"{model.reference}: no config.json in {model.path}")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ModelReferenceError(f"{model.reference}: unreadable config.json: {error}") from error
    if "auto_map" in data and not trust_remote_code:
        raise ModelReferenceError(
            f"{model.reference} needs code from its repository (auto_map in config.json); "
            "pass --trust-remote-code only if you trust it"
        )
    if not any(model.path.glob("*.safetensors")):
        raise ModelReferenceError(
            f"{model.reference}: no *.safetensors weights in {model.path} (pickled .bin weights "
            "are not loaded; convert with save_pretrained(..., safe_serialization=True))"
        )
