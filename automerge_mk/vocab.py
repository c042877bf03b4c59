"""Vocabularies: the sources' and base's tokenizers compared before the search, and the merged
model's vocabulary built exactly as mergekit builds it.

When the models' tokenizers or embedding rows differ (a chat tune that added `<|im_start|>`,
embeddings padded to a multiple of 64), a merge needs mergekit's `tokenizer_source`: `union`
(every model's tokens), one model's tokenizer, or the base's. mergekit then permutes each
model's embedding and head rows into the merged vocabulary before the merge method runs
(mergekit/tokenizer: `build_tokenizer`, `PermutedVocabulary`). This module calls exactly those
two, so that the engine's in-memory merge equals what stock `mergekit-yaml` writes; what is
hand-written here is only the comparison that names the differing tokens (mergekit and
transformers have none: mergekit silently assumes a tokenizer it cannot load is the base's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from .errors import ModelReferenceError, TokenizerMismatchError

UNION = "union"
# What --tokenizer-source takes besides a source's name.
CHOICES = ("base", UNION)
_SHOWN = 4  # tokens quoted per difference


class Vocabulary(NamedTuple):
    """What a model's tokenizer and config say about its tokens."""

    label: str  # "the base", "source a"
    tokens: dict[str, int] | None  # token -> id; None: the model has no tokenizer
    special: dict[str, str]  # bos_token, eos_token, pad_token ... -> token
    rows: int | None  # the config's vocab_size: embedding rows
    added: tuple[str, ...] = ()  # the tokenizer's added tokens (special or not)

    def summary(self) -> str:
        """One line for `segment` and notes: tokens, added tokens, embedding rows."""
        if self.tokens is None:
            return f"tokenizer: none ({self.rows:,} embedding rows)"
        last = list(self.added)[-_SHOWN:]  # the latest added: a fine-tune's own
        earlier = "..., " if len(self.added) > _SHOWN else ""
        added = f", {len(self.added)} added ({earlier}{_quote(last, self.tokens)})"
        return (f"tokenizer: {len(self.tokens):,} tokens{added if self.added else ''}; "
                f"{self.rows:,} embedding rows")  # fmt: skip


def read_vocabulary(label: str, folder: Path, trust_remote_code: bool = False) -> Vocabulary:
    """A model folder's tokens (None when it has no tokenizer) and embedding rows.

    Raises:
        ModelReferenceError: when its tokenizer files exist but cannot be loaded.
    """
    import json

    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not any(folder.glob("tokenizer*")) and not (folder / "vocab.json").is_file():
        return Vocabulary(label, None, {}, rows)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - transformers raises many types for bad files
        raise ModelReferenceError(
            f"cannot load the tokenizer of {label} ({folder}): {error}"
        ) from None
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    added = tuple(t.content for t in tokenizer.added_tokens_decoder.values())
    return Vocabulary(label, tokenizer.get_vocab(), special, rows, added)


def differences(reference: Vocabulary, other: Vocabulary) -> list[str]:
    """How `other`'s vocabulary differs from `reference`'s, in words (empty: the same).

    A model without a tokenizer is taken to have the reference's, as mergekit does.
    """
    found = []
    if reference.tokens is not None and other.tokens is not None:
        ours, theirs = reference.tokens, other.tokens
        extra = [t for t in theirs if t not in ours]
        missing = [t for t in ours if t not in theirs]
        moved = [t for t in theirs if t in ours and theirs[t] != ours[t]]
        for tokens, what in (
            (extra, f"that {reference.label} lacks"),
            (missing, f"fewer: it lacks {reference.label}'s"),
            (moved, f"at other ids than in {reference.label}"),
        ):
            if tokens:
                found.append(f"{len(tokens)} tokens {what} ({_quote(tokens, theirs | ours)})")
        for role in sorted(set(reference.special) | set(other.special)):
            if reference.special.get(role) != other.special.get(role):
                found.append(f"{role} {other.special.get(role)!r} (there: "
                             f"{reference.special.get(role)!r})")  # fmt: skip
    if reference.rows and other.rows and reference.rows != other.rows:
        found.append(f"{other.rows} embedding rows ({reference.label}: {reference.rows})")
    return found


def _quote(tokens: list[str], ids: Mapping[str, int]) -> str:
    shown = ", ".join(f"{t!r} (id {ids[t]})" for t in tokens[:_SHOWN])
    return shown + (f" and {len(tokens) - _SHOWN} more" if len(tokens) > _SHOWN else "")


def check_vocabularies(
    vocabularies: Sequence[Vocabulary], choice: str | None, names: Sequence[str]
) -> list[str]:
    """Compare every model's vocabulary with the first's (the base's, else the first
    source's); return the differences found, in words.

    Raises:
        TokenizerMismatchError: when they differ and no --tokenizer-source is chosen, naming
            the tokens and the options that resolve them.
    """
    reference, *others = vocabularies
    found = [f"{v.label} has {'; '.join(d)}" for v in others if (d := differences(reference, v))]
    if found and choice is None:
        raise TokenizerMismatchError(
            "the models' vocabularies differ, so their embedding and head rows do not mean the "
            f"same tokens: {'. '.join(found)}. Choose the merged model's tokenizer with "
            "--tokenizer-source (mergekit's tokenizer_source): union keeps every model's "
            "tokens (rows a model lacks come from the models that have them), base keeps "
            f"{reference.label}'s tokens only, or a source's name ({', '.join(names)}) keeps "
            "that source's"
        )
    return found


def plan_tokenizer(choice: str | None, sources: Sequence[str], names: Sequence[str],
                   base: str | None) -> str | None:  # fmt: skip
    """The tokenizer source a plan and its recipe carry: `union`, or the chosen model's path.

    `base` is written as the base model itself (the first source without one): in a
    mergekit-multi recipe, mergekit's `base` would mean each document's own base_model, which
    is the first source for slerp and an arbitrary one for methods without a base.

    Raises:
        TokenizerMismatchError: when the choice is neither base, union nor a source's name.
    """
    if choice is None or choice == UNION:
        return choice
    if choice == "base":
        return base or sources[0]
    if choice in names:
        return sources[list(names).index(choice)]
    raise TokenizerMismatchError(
        f"--tokenizer-source {choice!r} is neither base, union nor a source's name "
        f"({', '.join(names)})"
    )


def union_chat_template(models: Sequence[str | None]) -> str | None:
    """The chat template a `union` recipe writes explicitly: the first of `models` (the base,
    then the sources) whose tokenizer has one.

    mergekit builds a union on the document's base_model's tokenizer, and its template comes
    along; a document without a base_model (linear) takes the first of its models in a Python
    set's order, which changes between processes, so without an explicit `chat_template` the
    merged model's template would be the base's in one build and a chat tune's in another.
    """
    for model in models:
        if model is not None and (template := _chat_template(model)):
            return template
    return None


@lru_cache(maxsize=64)
def _chat_template(model: str) -> str | None:
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(model).chat_template
    except (OSError, ValueError):  # no tokenizer here (an adapter folder): nothing to take
        return None
    if isinstance(template, dict):  # named templates: mergekit's "auto" takes the default
        template = template.get("default")
    return template or None


@contextmanager
def _quiet_tqdm():
    """mergekit's build_tokenizer draws a tqdm bar per call (`tqdm.tqdm(...)` of its module);
    ours show the progress. (TQDM_DISABLE is read once, when tqdm is imported.)"""
    from functools import partial
    from types import SimpleNamespace

    import tqdm
    from mergekit.tokenizer import build

    build.tqdm = SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))
    try:
        yield
    finally:
        build.tqdm = tqdm


def output_tokenizer(document: Mapping, trust_remote_code: bool = False):
    """What mergekit builds for one recipe document with a `tokenizer_source`: its TokenizerInfo
    (the merged tokenizer and each model's permutation) and the parsed document."""
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(dict(document))
    with _quiet_tqdm():
        return _build_task(config, trust_remote_code).execute(), config


def run_tokenizer(sources: Sequence[str], base: str | None, tokenizer: str,
                  trust_remote_code: bool = False):  # fmt: skip
    """The merged model's tokenizer: what mergekit builds from these models for a document
    whose base_model is the base (else the first source), as every task-vector document is."""
    models = [{"model": source, "parameters": {"weight": 1.0}} for source in sources]
    document = {"merge_method": "linear", "base_model": base or sources[0], "models": models,
                "tokenizer_source": tokenizer}  # fmt: skip
    return output_tokenizer(document, trust_remote_code)[0].tokenizer


def permuted_inputs(
    document: Mapping,
    tensors: Mapping[Path, Mapping[str, object]],
    vocabulary: Mapping[str, int],
    trust_remote_code: bool = False,
) -> dict[str, dict[Path, object]]:
    """Each vocabulary tensor of each model, permuted into the merged vocabulary as stock
    mergekit permutes it for this document (PermutedVocabulary on the tensors the document's
    models give, in mergekit's order: its models, then its base_model).

    Args:
        document: one mergekit document with a tokenizer_source.
        tensors: resident tensors by model folder (an adapter's folder for `base+adapter`).
        vocabulary: mergekit tensor name -> its vocabulary axis.

    Returns:
        tensor name -> model folder -> the permuted tensor.
    """
    from mergekit.common import ImmutableMap
    from mergekit.io.tasks import GatherTensors
    from mergekit.tokenizer import PermutedVocabulary

    info, config = output_tokenizer(document, trust_remote_code)
    models = [m.model for m in config.models]
    if config.base_model is not None and config.base_model not in models:
        models.append(config.base_model)  # as mergekit's planner adds it to the slice

    def folder(model) -> Path:
        return Path((model.lora or model.model).path)

    permuted: dict[str, dict[Path, object]] = {}
    for name, axis in vocabulary.items():
        task = PermutedVocabulary(
            gather_tensors=GatherTensors(weight_info=ImmutableMap(data={})),
            tokenizer_task=_build_task(config, trust_remote_code),
            tokens={},
            pad_to_multiple_of=None,
            base_model=config.base_model,
            vocabulary_axis=axis,
        )
        with _quiet_tqdm():
            out = task.execute(info, {m: tensors[folder(m)][name] for m in models})
        permuted[name] = {folder(m): tensor for m, tensor in out.items()}
    return permuted


def _build_task(config, trust_remote_code: bool = False):
    """mergekit's BuildTokenizer task for a parsed document, as its MergePlanner sets it up."""
    from mergekit.tokenizer import BuildTokenizer

    return BuildTokenizer(
        base_model=config.base_model,
        referenced_models=tuple(config.referenced_models()),
        tokenizer_source=config.tokenizer_source,
        trust_remote_code=trust_remote_code,
        add_tokens=(),
    )
