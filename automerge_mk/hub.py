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
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelReferenceError, PublishError, RunDirectoryError
from .types import SourceModel

# What a merge and the evaluator read: no code (*.py) and, unless opted in, no pickles.
MERGE_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
PICKLED_WEIGHTS = "pytorch_model*.bin"
# A Hub id's parts, a revision's and a shard's name: no `..`, no absolute or nested paths,
# since each becomes part of a path in the Hub cache or the model folder.
_NAME = r"(?!\.\.?(?:/|$))[\w.-]+"
_HUB_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_REVISION = re.compile(rf"^{_NAME}(/{_NAME})*$")
_SHARD = re.compile(rf"^{_NAME}$")


def resolve_model(
    reference: str, trust_remote_code: bool = False, allow_pickle: bool = False
) -> SourceModel:
    """Resolve a folder or `org/name[@revision]` to a local folder with config and weights.

    Args:
        reference: a local folder, or a Hub id with an optional `@revision`.
        trust_remote_code: allow configs that need code from the repository.
        allow_pickle: accept pickled `pytorch_model*.bin` weights when a model has no
            safetensors (read with torch's weights-only unpickler).

    Returns:
        The resolved model; Hub models carry their repo id and commit sha.

    Raises:
        ModelReferenceError: when the reference is neither, names a path outside its folder,
            cannot be downloaded, has no readable weights (naming the damaged file), has only
            pickled weights without `allow_pickle`, or needs remote code without
            `trust_remote_code`.
    """
    folder = Path(reference).expanduser()
    if folder.is_dir():
        model = SourceModel(reference=reference, name=folder.resolve().name, path=folder.resolve())
    else:
        check_reference(reference)
        repo_id, _, revision = reference.partition("@")
        files = MERGE_FILES + [PICKLED_WEIGHTS] * allow_pickle + ["*.py"] * trust_remote_code
        model = _download(reference, repo_id, revision or None, files)
    _check_folder(model, trust_remote_code, allow_pickle)
    return model


def check_reference(reference: str) -> None:
    """Check that a reference that is no folder is a Hub id `org/name[@revision]` whose parts
    are plain names (each becomes part of a path in the Hub cache).

    Raises:
        ModelReferenceError: saying what is wrong with it.
    """
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
        for shard in _index_shards(index):  # checked: a hostile index fetches nothing outside
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
    _check_index(model, files)
    for file in files:
        check_weights(file)


def _index_shards(index: Path) -> list[str]:
    """The shard file names a `*.index.json` maps tensors to.

    Raises:
        ModelReferenceError: when the index is unreadable or names anything but a plain file
            name (a path with `..` or `/` would reach outside the model folder or the cache).
    """
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelReferenceError(f"unreadable shard index {index}: {error!r}") from None
    for shard in shards:
        if not isinstance(shard, str) or not _SHARD.match(shard):
            raise ModelReferenceError(
                f"{index} names {shard!r} as a shard, which is not a file name; shards must be "
                "files of the model folder"
            )
    return sorted(shards)


def _check_index(model: SourceModel, files: list[Path]) -> None:
    """Every index names plain file names, and the index of the weights in use only files
    that exist."""
    in_use = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
    for index in sorted(model.path.glob("*.index.json")):
        shards = _index_shards(index)
        missing = [shard for shard in shards if not (model.path / shard).is_file()]
        if index.name == f"{in_use}.index.json" and missing:
            raise ModelReferenceError(f"{index} names {missing[0]}, which is missing")


def weight_files(folder: Path) -> list[Path]:
    """A model folder's weight shards: its safetensors, else its pickled .bin files."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob(PICKLED_WEIGHTS))


def model_bytes(folder: Path, stored_dtype: str, dtype: str) -> int:
    """The size of a model folder's weights once saved in `dtype` instead of `stored_dtype`
    (unknown dtype names count as equal)."""
    from mergekit.common import dtype_from_name

    stored = sum(file.stat().st_size for file in weight_files(folder))
    try:
        return stored * dtype_from_name(dtype).itemsize // dtype_from_name(stored_dtype).itemsize
    except RuntimeError:  # mergekit: 'Unimplemented dtype'
        return stored


def check_weights(file: Path) -> None:
    """Check that a weight shard opens: a complete safetensors header that covers the whole
    file (safetensors checks both), or a pickle archive torch's weights-only loader accepts.

    Raises:
        ModelReferenceError: naming the file, when it is damaged or truncated.
    """
    try:
        with open_weights(file):
            pass
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise many types
        lines = str(error).splitlines() or [type(error).__name__]
        if file.suffix == ".bin" and "Weights only load failed" in lines[0]:
            detail = next((line for line in lines if "Unsupported" in line), lines[-1])
            raise ModelReferenceError(
                f"{file} holds more than plain tensors, which a pickle could use to run code; "
                f"torch's weights-only unpickler refused it ({detail.strip()})"
            ) from None
        raise ModelReferenceError(
            f"damaged or truncated weights file {file} ({lines[0]}); download or copy it again"
        ) from None


class WeightShard:
    """Read access to one weight file by tensor name: `names`, `shape`, `tensor`."""

    def __init__(self, tensors):
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self._tensors, "get_slice"):  # safetensors: from the header, no data read
            return tuple(self._tensors.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)

    def tensor(self, name: str):
        if hasattr(self._tensors, "get_tensor"):
            return self._tensors.get_tensor(name)
        return self._tensors[name]


@contextmanager
def open_weights(file: Path) -> Iterator[WeightShard]:
    """One weight shard, memory-mapped: safetensors, or a pickled .bin read with torch's
    weights-only unpickler (plain tensors and containers; anything else is refused)."""
    import torch
    from safetensors import safe_open

    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            yield WeightShard(reader)
    else:
        # Archives from before torch 1.6 cannot be memory-mapped; they are read whole.
        mmap = zipfile.is_zipfile(file)
        yield WeightShard(torch.load(file, map_location="cpu", weights_only=True, mmap=mmap))


# --- publishing ---------------------------------------------------------------------------

# What a published repo holds besides the model folder's own files.
RUN_FILES = ("recipe.yaml", "trials.jsonl", "progress.png", "summary.md")


def _run_json(run_dir: Path, name: str) -> dict:
    try:
        return json.loads((run_dir / name).read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(
            f"{run_dir} is not a finished automerge-mk run ({name}: {error}); run "
            "`automerge-mk search` to completion first"
        ) from None


def preservation_rates(final: dict, sources: dict) -> tuple[dict[str, float], float, str]:
    """PR_i of the final model as its run computed them, PD = max PR - min PR, and the
    metric(s) they come from.

    Runs from before PR was stored get PR from next-token accuracy.
    """
    rates, metrics = {}, set()
    for task, score in final["tasks"].items():
        if score.get("rate") is not None:
            rates[task] = score["rate"]
            metrics.add(score.get("rate_metric") or "token_accuracy")
        else:
            own = sources[task]["tasks"][task]["accuracy"]
            rates[task] = score["accuracy"] / own if own > 0 else 0.0
            metrics.add("token_accuracy")
    return rates, max(rates.values()) - min(rates.values()), " / ".join(sorted(metrics))


REPORT_PLOTS = {
    "report-tasks.png": "AP and PR per task: this merge, the best baseline, each source alone",
    "report-blocks.png": "the merge method, weights and densities chosen per block",
}


def card_text(run_dir: Path, repo_id: str, plots: Path | None = None) -> str:
    """The model card (README.md) of a run: metadata, scores, plot, recipe, how to rebuild it.

    Raises:
        RunDirectoryError: when the run is not finished.
    """
    from huggingface_hub import ModelCard, ModelCardData

    settings = _run_json(run_dir, "settings.json")
    final = _run_json(run_dir, "final.json")
    sources = _run_json(run_dir, "sources.json")
    trials = (run_dir / "trials.jsonl").read_text().count("\n")
    recipe = (run_dir / "recipe.yaml").read_text()
    models = [SourceModel(**m) for m in settings["models"]]
    base = SourceModel(**settings["base"]) if settings.get("base") else None
    pinned = [m.pinned for m in models + ([base] if base else [])]
    _, discrepancy, metric = preservation_rates(final, sources)
    tasks = list(final["tasks"])
    header = "| model | H (AP) | " + " | ".join(f"{t} AP | {t} PR" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(tasks))]
    rows = {"this merge": final} | {f"{name} alone": value for name, value in sources.items()}
    for name, scores in rows.items():
        cells = [name, f"{scores['harmonic_mean']:.4f}"]
        scored = preservation_rates(scores, sources)[0]
        for task in tasks:
            cells += [f"{scores['tasks'][task]['preservation']:.4f}", f"{scored[task]:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    local = [m.reference for m in models + ([base] if base else []) if not m.repo_id]
    local_note = (
        f"\n\nThe recipe names local folders ({', '.join(local)}); replace them with the "
        "models' Hub ids to rebuild elsewhere."
        if local
        else ""
    )
    report_plots = "".join(
        f"\n![{text}]({name})\n"
        for name, text in REPORT_PLOTS.items()
        if plots and (plots / name).is_file()
    )
    seed = settings["settings"]["seed"]
    tool = "mergekit-multi" if "\n---\n" in recipe else "mergekit-yaml"
    rebuild = (
        f"mergekit-multi recipe.yaml --out-path merged --intermediate-dir "
        f'"$PWD/merged-parts" --random-seed {seed}'
        if tool == "mergekit-multi"
        else f"mergekit-yaml recipe.yaml merged --random-seed {seed}"
    )
    body = f"""# {repo_id.split("/")[-1]}

A merge of {", ".join(f"`{p}`" for p in pinned[: len(models)])}
{f"(base `{pinned[-1]}`) " if base else ""}found by automerge-mk on top of
[mergekit](https://github.com/arcee-ai/mergekit):
SMAC's Bayesian optimisation chose a merge method, weights and densities for every block of the
network over {trials} trials, and stock mergekit built this model from the recipe below.

## Preservation on the validation data

AP = a specialist's validation loss on its own task / this model's loss on it; H is the harmonic
mean of AP over tasks. PR = {metric.replace("_", " ")} of this model / of the task's specialist;
preservation discrepancy PD = max PR - min PR = **{discrepancy:.4f}**.

{chr(10).join(lines)}

![best harmonic-mean AP so far vs trial](progress.png)
{report_plots}
## Recipe

```yaml
{recipe.rstrip()}
```

## Reproduce with plain mergekit

```bash
pip install mergekit
{rebuild}
```{local_note}
"""
    data = ModelCardData(
        # Hub metadata names repos; local folders are named in the text instead.
        base_model=[m.pinned for m in models + ([base] if base else []) if m.repo_id] or None,
        tags=["merge", "mergekit", "automerge-mk"],
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model_relation="merge",
    )
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def publish(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    plots: Path | None = None,
) -> str:
    """Create (or reuse) a Hub model repo and upload model, recipe, trials, plots and card in
    one commit.

    Args:
        run_dir: a finished run directory (with `model/`).
        repo_id: `org/name` of the target repo.
        private: create the repo private.
        branch: commit to this branch (created from main when missing).
        token: a Hub token; default: HF_TOKEN or the stored login.
        endpoint: the Hub URL; default: HF_ENDPOINT or huggingface.co.
        plots: a folder with the report's plots (`automerge-mk report`) for the card.

    Returns:
        The commit URL.

    Raises:
        RunDirectoryError: when the run has no built model.
        PublishError: when the Hub refuses or cannot be reached; nothing local was changed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model = run_dir / "model"
    if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
        raise RunDirectoryError(f"{model} holds no built model; finish `automerge-mk search` first")
    card = card_text(run_dir, repo_id, plots).encode()
    operations = [
        CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        for path in sorted(model.iterdir())
        if path.is_file() and path.name not in ("README.md", "mergekit_config.yml")
    ]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run_dir / name))
        for name in RUN_FILES
        if (run_dir / name).is_file()
    ]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plots / name))
        for name in REPORT_PLOTS
        if plots and (plots / name).is_file()
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    # HF_ENDPOINT is read here, not only when huggingface_hub was imported.
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message="automerge-mk: merged model, recipe, trials and card",
            revision=branch,
        )
    except Exception as error:  # huggingface_hub and httpx raise many types for one cause
        message = redact(f"{type(error).__name__}: {error}", token)
        raise PublishError(
            f"upload of {run_dir} to {repo_id} failed ({message}). The run directory is "
            f"unchanged; retry with: automerge-mk push {run_dir} {repo_id}"
        ) from None
    return commit.commit_url
