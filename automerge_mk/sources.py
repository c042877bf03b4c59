"""Model references -> local folders, pinned to a revision.

A reference is a local folder or a Hub id `org/name[@revision]`. Hub ids are fetched with
huggingface_hub's `snapshot_download` (only the files a merge needs), which honours
HF_HUB_OFFLINE, HF_HOME/HF_HUB_CACHE, HF_ENDPOINT and HF_TOKEN; the snapshot folder's name is
the resolved commit sha, which recipes record.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .errors import AdapterError, ModelReferenceError
from .modules import is_module_folder, read_spec
from .types import SourceModel
from .weights import PICKLED_WEIGHTS, check_index, check_weights, index_shards, weight_files

# What a merge and the evaluator read: no code (*.py) and, unless opted in, no pickles.
MERGE_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
# A Hub id's parts and a revision's: no `..`, no absolute or nested paths,
# since each becomes part of a path in the Hub cache or the model folder.
_NAME = r"(?!\.\.?(?:/|$))[\w.-]+"
_HUB_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_REVISION = re.compile(rf"^{_NAME}(/{_NAME})*$")


def resolve_model(
    reference: str,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    base: SourceModel | None = None,
) -> SourceModel:
    """Resolve a folder, `org/name[@revision]` or mergekit's `model+adapter` to a local folder
    with config and weights, or with a PEFT adapter (adapter_config.json and its weights).

    Args:
        reference: a local folder, or a Hub id with an optional `@revision`; either may be a
            PEFT adapter, or `MODEL+ADAPTER` (mergekit's syntax: ADAPTER applied to MODEL).
        trust_remote_code: allow configs that need code from the repository.
        allow_pickle: accept pickled `pytorch_model*.bin` weights when a model has no
            safetensors (read with torch's weights-only unpickler).
        base: the --base model, which an adapter given alone applies to.

    Returns:
        The resolved model; Hub models carry their repo id and commit sha, adapters the model
        they apply to (`adapter_of`).

    Raises:
        ModelReferenceError: when the reference is neither, names a path outside its folder,
            cannot be downloaded, has no readable weights (naming the damaged file), has only
            pickled weights without `allow_pickle`, or needs remote code without
            `trust_remote_code`.
        AdapterError: when an adapter is unreadable, has no model to apply to, or was made
            for a model of another name than the one it is applied to.
    """
    folder = Path(reference).expanduser()
    if is_module_folder(folder):  # a raw PyTorch model (modules.py): a local folder only
        read_spec(folder)
        return _resolve(reference, trust_remote_code, allow_pickle)
    model_ref, plus, adapter_ref = reference.partition("+")
    if plus and not Path(reference).expanduser().is_dir():
        applied_to = resolve_model(model_ref, trust_remote_code, allow_pickle)
        adapter = _resolve(adapter_ref, trust_remote_code, allow_pickle)
        if not is_adapter(adapter.path):
            raise AdapterError(
                f"{reference}: {adapter_ref} is no PEFT adapter (no {ADAPTER_CONFIG}); "
                "MODEL+ADAPTER applies an adapter to a model"
            )
        if base is not None and applied_to.name.lower() != base.name.lower():
            raise AdapterError(
                f"{reference} applies {adapter.name} to {applied_to.name}, but --base is "
                f"{base.name}: task vectors would be taken against another model; give "
                f"{base.reference}+{adapter_ref} or the adapter alone"
            )
        return _adapter(adapter.model_copy(update={"reference": reference}), applied_to,
                        allow_pickle)  # fmt: skip
    model = _resolve(reference, trust_remote_code, allow_pickle)
    if not is_adapter(model.path):
        _check_folder(model, trust_remote_code, allow_pickle)
        return model
    if base is None:
        raise AdapterError(
            f"{reference} is a PEFT adapter: give the model it applies to as --base, or as "
            f"MODEL+{reference} (mergekit's syntax)"
        )
    return _adapter(model, base, allow_pickle)


def _resolve(reference: str, trust_remote_code: bool, allow_pickle: bool) -> SourceModel:
    """A folder or Hub id, unchecked: a model or an adapter."""
    folder = Path(reference).expanduser()
    if folder.is_dir():
        if "+" in str(folder.resolve()):
            raise ModelReferenceError(
                f"{folder.resolve()}: mergekit reads '+' in a model path as MODEL+ADAPTER, so "
                "no recipe could name this folder; move or rename it"
            )
        return SourceModel(reference=reference, name=folder.resolve().name, path=folder.resolve())
    check_reference(reference)
    repo_id, _, revision = reference.partition("@")
    files = MERGE_FILES + [PICKLED_WEIGHTS, "adapter_model.bin"] * allow_pickle
    return _download(reference, repo_id, revision or None, files + ["*.py"] * trust_remote_code)


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter's folder: adapter_config.json and no model config.json."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def _adapter(adapter: SourceModel, model: SourceModel, allow_pickle: bool) -> SourceModel:
    """An adapter checked (peft reads its config; its weights open; it was made for a model of
    `model`'s name) and tied to the model it applies to."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(adapter.path))
    except Exception as error:  # noqa: BLE001 - peft raises many types for a bad config
        raise AdapterError(
            f"{adapter.reference}: peft cannot read {ADAPTER_CONFIG}: {error}"
        ) from None
    made_for = (config.base_model_name_or_path or "").rstrip("/")
    made_for_name = made_for.partition("@")[0].rsplit("/", 1)[-1]
    if made_for_name and made_for_name.lower() != model.name.lower():
        raise AdapterError(
            f"{adapter.reference} is a {config.peft_type} adapter of {made_for}, not of "
            f"{model.name} ({model.reference}): give the model it was trained on as --base"
        )
    files = sorted(adapter.path.glob("adapter_model*.safetensors"))
    if not files and allow_pickle:
        files = sorted(adapter.path.glob("adapter_model*.bin"))
    if not files:
        raise AdapterError(f"{adapter.reference}: no adapter_model.safetensors in {adapter.path}")
    for file in files:
        check_weights(file)
    return adapter.model_copy(update={"adapter_of": model})


def check_reference(reference: str) -> None:
    """Check that a reference that is no folder is a Hub id `org/name[@revision]` whose parts
    are plain names (each becomes part of a path in the Hub cache).

    Raises:
        ModelReferenceError: saying what is wrong with it.
    """
    if "+" in reference:  # mergekit's MODEL+ADAPTER: each part on its own
        for part in reference.split("+", 1):
            if not Path(part).expanduser().is_dir():
                check_reference(part)
        return
    repo_id, _, revision = reference.partition("@")
    if not _HUB_ID.match(repo_id):
        raise ModelReferenceError(
            f"{reference!r} is neither an existing folder nor a Hub id like org/name[@rev]"
        )
    if revision and not _REVISION.match(revision):
        raise ModelReferenceError(
            f"{reference!r}: {revision!r} is not a branch, tag or commit (no '..', no leading '/')"
        )


def redact(text: str, token: str | None = None) -> str:
    """`text` with the Hub token (given, HF_TOKEN or the stored login) replaced by ***: a
    server or proxy may quote request headers in the error messages we pass on."""
    from huggingface_hub import get_token

    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


_LOGGED_SECRETS: set[str] = set()


def redact_logs() -> None:
    """From now on, every log record has the Hub token replaced by ***.

    httpx and httpcore log response headers at DEBUG level, and a server or proxy may quote
    the Authorization header in them; neither huggingface_hub nor httpx redacts those.
    """
    from huggingface_hub import get_token

    secret = get_token()
    if not secret:
        return
    if not _LOGGED_SECRETS:
        make_record = logging.getLogRecordFactory()

        def redacting_record(*args, **kwargs) -> logging.LogRecord:
            record = make_record(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record fails later, as it would have
                return record
            if any(secret in message for secret in _LOGGED_SECRETS):
                for secret in _LOGGED_SECRETS:
                    message = message.replace(secret, "***")
                record.msg, record.args = message, ()
            return record

        logging.setLogRecordFactory(redacting_record)
    _LOGGED_SECRETS.add(secret)


def _download(reference: str, repo_id: str, revision: str | None, files: list[str]) -> SourceModel:
    from huggingface_hub import snapshot_download  # deferred: only Hub ids need it
    from huggingface_hub.errors import LocalEntryNotFoundError

    # HF_ENDPOINT / HF_HUB_CACHE are read here, not only when huggingface_hub was imported.
    where = {"endpoint": os.environ.get("HF_ENDPOINT"), "cache_dir": os.environ.get("HF_HUB_CACHE")}
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, **where))
    except LocalEntryNotFoundError as error:
        raise ModelReferenceError(_not_downloaded(reference, error)) from None
    except Exception:  # noqa: BLE001 - mirrors refuse listing routes (401/404): fetch by name
        path = _download_by_name(reference, repo_id, revision, where)
    return SourceModel(
        reference=reference,
        name=repo_id.split("/")[1],
        path=path,
        revision=path.name,
        repo_id=repo_id,
    )


def _not_downloaded(reference: str, error: Exception) -> str:
    """Why snapshot_download found neither the Hub nor the cache: huggingface_hub raises the
    same LocalEntryNotFoundError for an offline switch, a dead connection and a server error,
    with the real cause chained."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = error.__cause__ or error.__context__
    missing = f"{reference} is not in the local Hugging Face cache"
    if isinstance(cause, OfflineModeIsEnabled) or cause is None:
        return f"{missing} and HF_HUB_OFFLINE=1 reads only the cache: download it once online"
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, HfHubHTTPError) and status is not None:
        return redact(
            f"{missing}, and the Hub answered HTTP {status} ({str(cause).splitlines()[0]}); "
            "a 5xx is the server's fault: try again later, or check HF_ENDPOINT"
        )
    return redact(
        f"{missing}, and the Hub cannot be reached ({type(cause).__name__}: {cause}); check "
        "the network and HF_ENDPOINT, or download it once online"
    )


def _download_by_name(reference: str, repo_id: str, revision: str | None, where: dict) -> Path:
    """Fetch the files a merge needs one by one, for mirrors that serve files but not the
    repo-listing routes snapshot_download uses (model_info, tree). Optional files may be
    refused (401/404)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(name: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, **where))
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as error:
            raise ModelReferenceError(
                f"{reference}: {type(error).__name__} on the Hub; check the id and revision, "
                "and HF_TOKEN for private or gated repos"
            ) from None
        except Exception as error:  # noqa: BLE001 - any refusal of an optional file is fine
            if required:
                raise ModelReferenceError(
                    redact(f"cannot fetch {name} of {reference}: {type(error).__name__}: {error}")
                ) from None
            return None

    config = fetch("config.json", required=True)
    index = fetch("model.safetensors.index.json", required=False)
    if index is not None:
        for shard in index_shards(index):  # checked: a hostile index fetches nothing outside
            fetch(shard, required=True)
    else:
        fetch("model.safetensors", required=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
    ):
        fetch(name, required=False)  # fmt: skip
    return config.parent


def _check_folder(model: SourceModel, trust_remote_code: bool, allow_pickle: bool) -> None:
    config = model.path / "config.json"
    if not config.is_file():
        raise ModelReferenceError(f"{model.reference}: no config.json in {model.path}")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise ModelReferenceError(f"{model.reference}: unreadable config.json: {error}") from error
    if not isinstance(data, dict):
        raise ModelReferenceError(f"{model.reference}: config.json is not a JSON object")
    if "auto_map" in data and not trust_remote_code:
        raise ModelReferenceError(
            f"{model.reference} needs code from its repository (auto_map in config.json); "
            "pass --trust-remote-code only if you trust it"
        )
    files = weight_files(model.path)
    if not files:
        raise ModelReferenceError(f"{model.reference}: no *.safetensors weights in {model.path}")
    if files[0].suffix == ".bin" and not allow_pickle:
        raise ModelReferenceError(
            f"{model.reference} has only pickled weights ({files[0].name}), which can run code "
            "when loaded; convert them with save_pretrained(..., safe_serialization=True), or "
            "pass --allow-pickle-weights if you trust the model (read with torch's "
            "weights-only unpickler)"
        )
    check_index(model.path, files)
    for file in files:
        check_weights(file)
