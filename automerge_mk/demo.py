"""Tiny, fully offline demo models: a base LM and two specialists that merging must trade off.

`build_demo_models` trains, on CPU and in seconds, a 4-layer Llama base model on generic text
with a light mix of both tasks, then fine-tunes two copies of it on one synthetic task each:

* ``arith``: ``"12 + 7 = 19"`` and ``"9 - 4 = 5"``, with the numbers as whole-word tokens;
* ``reverse``: ``"rev c a f = f a c"``, reversing a short sequence of letters.

Both tasks share one closed word-level vocabulary, so the models are real transformers
checkpoints (``config.json``, ``model.safetensors`` and a tokenizer) that mergekit can merge
and ``transformers`` can load, while staying small enough for end-to-end tests and the README.
Each specialist is clearly better than the base and than the other specialist on its own task
and worse than the other specialist on the other task, which is what makes a merge search
meaningful.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["DemoModels", "build_demo_models"]

TASKS: tuple[str, ...] = ("arith", "reverse")

# Bumped whenever the recipe below changes, so that an old manifest is rebuilt, not reused.
_FORMAT = 2
_MANIFEST = "demo.json"
_WEIGHTS = "model.safetensors"

_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "</s>", "<unk>"
_SPECIALS = (_PAD, _BOS, _EOS, _UNK)
# Operands go up to 19, so sums reach 38; 0..39 keeps counting sequences uniform over numbers.
_MAX_OPERAND = 19
_NUMBERS = tuple(str(i) for i in range(40))
_LETTERS = tuple("abcdefgh")
_SYMBOLS = ("+", "-", "=", "rev")
_VOCAB = _SPECIALS + _NUMBERS + _LETTERS + _SYMBOLS
_REVERSE_LENGTHS = (3, 6)

# Per task: held-out texts for validation and for test, each disjoint from everything else.
_HELD_OUT = 96
# Reverse has ~300k possible texts; this many distinct training texts is plenty.
_REVERSE_TRAIN = 4000
# Generic pre-training texts (with repeats), before the task mix is added.
_GENERIC_TRAIN = 4000
# Share of base pre-training batches drawn from the tasks' training texts.
_BASE_TASK_MIX = 0.2

_BATCH = 64
_BASE_STEPS = 200
_BASE_LR = 3e-3
_SPECIALIST_STEPS = 250
# Gentle enough that the specialists keep some of the other task, so merges are not hopeless.
_SPECIALIST_LR = 1e-3
_WARMUP = 10


class DemoModels(BaseModel):
    """Where a built demo lives: a base model, its specialists and their held-out data.

    Attributes:
        base: transformers folder of the base model.
        specialists: task name -> specialist folder (the folder name is the task name).
        validation: task name -> validation jsonl, one ``{"text": ...}`` per line.
        test: task name -> test jsonl, disjoint from validation and training.
    """

    model_config = ConfigDict(frozen=True)

    base: Path
    specialists: dict[str, Path]
    validation: dict[str, Path]
    test: dict[str, Path]


class _Manifest(BaseModel):
    """What ``demo.json`` holds: `DemoModels` relative to the output folder, plus the seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int
    seed: int
    base: str
    specialists: dict[str, str]
    validation: dict[str, str]
    test: dict[str, str]


def build_demo_models(out_dir: Path, *, seed: int = 0, progress: bool = True) -> DemoModels:
    """Build (or reuse) the demo base model and its two specialists under `out_dir`.

    The layout is ``base/``, one folder per task (``arith/``, ``reverse/``), ``data/`` with
    ``<task>-{train,validation,test}.jsonl`` and finally ``demo.json``. The manifest is written
    last and atomically, so its presence means the build completed; if it is present, matches
    `seed` and every folder it names has ``config.json`` and ``model.safetensors``, the models
    are returned without retraining. Everything is deterministic for a given seed.

    Args:
        out_dir: folder to build into; created if missing, reused if it holds a finished build.
        seed: seed for the synthetic data, the initial weights and the batch order.
        progress: show a tqdm bar per training run; when False nothing is printed.

    Returns:
        The absolute paths of the base model, the specialists and the validation/test files.

    Raises:
        NotADirectoryError: `out_dir` exists and is not a directory.
        OSError: `out_dir` cannot be created or written.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"demo output {out_dir} exists and is not a directory; "
            "remove it or choose another folder for the demo models"
        )
    existing = _load_manifest(out_dir, seed)
    if existing is not None:
        return existing

    # A stale manifest must not survive a rebuild that is interrupted halfway.
    (out_dir / _MANIFEST).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Heavy imports live here so that importing the package (e.g. for `--help`) stays fast.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    data = _make_data(seed)
    data_dir = out_dir / "data"
    data_dir.mkdir(exist_ok=True)
    for task, splits in data.items():
        for split, texts in splits.items():
            _write_jsonl(data_dir / f"{task}-{split}.jsonl", texts)

    tokenizer = _make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(_VOCAB),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=_VOCAB.index(_PAD),
        bos_token_id=_VOCAB.index(_BOS),
        eos_token_id=_VOCAB.index(_EOS),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _train(
        model,
        tokenizer,
        _base_corpus(data, seed),
        steps=_BASE_STEPS,
        lr=_BASE_LR,
        rng=random.Random(f"demo-{seed}-base"),
        desc="demo base",
        progress=progress,
    )
    _save(model, tokenizer, out_dir / "base")
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    for task in TASKS:
        # Each specialist starts from the same base weights; training order is the only
        # randomness (the Llama config has no dropout), seeded per task.
        model.load_state_dict(base_state)
        _train(
            model,
            tokenizer,
            data[task]["train"],
            steps=_SPECIALIST_STEPS,
            lr=_SPECIALIST_LR,
            rng=random.Random(f"demo-{seed}-{task}"),
            desc=f"demo {task}",
            progress=progress,
        )
        _save(model, tokenizer, out_dir / task)

    manifest = _Manifest(
        format=_FORMAT,
        seed=seed,
        base="base",
        specialists={task: task for task in TASKS},
        validation={task: f"data/{task}-validation.jsonl" for task in TASKS},
        test={task: f"data/{task}-test.jsonl" for task in TASKS},
    )
    tmp = out_dir / f".{_MANIFEST}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / _MANIFEST)
    return _resolve(out_dir, manifest)


def _load_manifest(out_dir: Path, seed: int) -> DemoModels | None:
    """Return the finished build in `out_dir` for `seed`, or None if it must be (re)built."""
    path = out_dir / _MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = _Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        return None
    if manifest.format != _FORMAT or manifest.seed != seed:
        return None
    demo = _resolve(out_dir, manifest)
    folders = [demo.base, *demo.specialists.values()]
    files = [*demo.validation.values(), *demo.test.values()]
    if all((f / "config.json").is_file() and (f / _WEIGHTS).is_file() for f in folders) and all(
        f.is_file() for f in files
    ):
        return demo
    return None


def _resolve(out_dir: Path, manifest: _Manifest) -> DemoModels:
    """Turn the manifest's relative paths into absolute ones under `out_dir`."""
    return DemoModels(
        base=out_dir / manifest.base,
        specialists={t: out_dir / p for t, p in manifest.specialists.items()},
        validation={t: out_dir / p for t, p in manifest.validation.items()},
        test={t: out_dir / p for t, p in manifest.test.items()},
    )


def _make_data(seed: int) -> dict[str, dict[str, list[str]]]:
    """Split each task's texts into train/validation/test, pairwise disjoint by text."""
    rng = random.Random(f"demo-{seed}-data")
    data: dict[str, dict[str, list[str]]] = {}

    # Arithmetic has only 610 distinct texts, so enumerate them all and split.
    arith = [
        f"{a} + {b} = {a + b}" for a in range(_MAX_OPERAND + 1) for b in range(_MAX_OPERAND + 1)
    ]
    arith += [f"{a} - {b} = {a - b}" for a in range(_MAX_OPERAND + 1) for b in range(a + 1)]
    rng.shuffle(arith)
    data["arith"] = {
        "validation": arith[:_HELD_OUT],
        "test": arith[_HELD_OUT : 2 * _HELD_OUT],
        "train": arith[2 * _HELD_OUT :],
    }

    # Reversal has far too many texts to enumerate, so sample distinct ones in order.
    def reverse_text() -> str:
        letters = rng.choices(_LETTERS, k=rng.randint(*_REVERSE_LENGTHS))
        return " ".join(["rev", *letters, "=", *reversed(letters)])

    reverse = _distinct(reverse_text, 2 * _HELD_OUT + _REVERSE_TRAIN)
    data["reverse"] = {
        "validation": reverse[:_HELD_OUT],
        "test": reverse[_HELD_OUT : 2 * _HELD_OUT],
        "train": reverse[2 * _HELD_OUT :],
    }
    return data


def _base_corpus(data: dict[str, dict[str, list[str]]], seed: int) -> list[str]:
    """Pre-training text for the base: mostly generic, with a light mix of both tasks.

    Random word sequences teach the unigram distribution and counting runs teach positional
    structure. The small share of task training text gives the base both formats, so the
    specialists start from a common, sensible point and their task vectors stay small enough
    to be merged; it is far too little for the base to master either task.
    """
    rng = random.Random(f"demo-{seed}-generic")
    words = _NUMBERS + _LETTERS + _SYMBOLS
    held_out = {t for splits in data.values() for s in ("validation", "test") for t in splits[s]}

    def generic_text() -> str:
        kind = rng.random()
        length = rng.randint(3, 10)
        if kind < 0.4:
            return " ".join(rng.choices(words, k=length))
        alphabet = _NUMBERS if kind < 0.75 else _LETTERS
        start = rng.randrange(len(alphabet) - 2)
        run = alphabet[start : start + length]
        # Descending runs too, so "reverse order" is not entirely foreign to the base.
        return " ".join(run if rng.random() < 0.5 else reversed(run))

    # Repeats are kept on purpose: they make the shares of the three kinds the ones above.
    corpus = [t for t in (generic_text() for _ in range(_GENERIC_TRAIN)) if t not in held_out]
    # Batches sample the list uniformly, so list shares are sampling probabilities.
    per_task = round(len(corpus) * _BASE_TASK_MIX / (1.0 - _BASE_TASK_MIX) / len(TASKS))
    for task in TASKS:
        corpus += rng.choices(data[task]["train"], k=per_task)
    return corpus


def _distinct(make: Callable[[], str], count: int) -> list[str]:
    """Call `make` until it has produced `count` distinct texts; keep first-seen order."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(make(), None)
    return list(seen)


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the closed demo vocabulary that prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama, add BOS but not EOS: the first word is then predicted from a real context,
    # and the loss evaluators measure is exactly the loss the models were trained on.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A",
        pair=f"{_BOS} $A {_BOS} $B",
        special_tokens=[(_BOS, vocab[_BOS])],
    )
    # Words are whole tokens, so decoding re-joins them with single spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_UNK,
        pad_token=_PAD,
        model_max_length=128,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    *,
    steps: int,
    lr: float,
    rng: random.Random,
    desc: str,
    progress: bool,
) -> None:
    """Train `model` in place on random batches of `texts` with AdamW and linear decay."""
    import torch
    from tqdm.auto import tqdm

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Short warm-up avoids blowing up the fresh base; decaying to 10% settles the weights.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / _WARMUP) * (1.0 - 0.9 * step / steps),
    )
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
    for _ in bar:
        batch = tokenizer(rng.choices(texts, k=_BATCH), padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save weights as a single model.safetensors plus the tokenizer into `folder`."""
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True, exist_ok=True)
    # transformers draws its own bar per saved file; our bars (or silence) are the whole story,
    # so hide it for the duration and restore whatever the caller had.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # safetensors is the default (and, in transformers 5, the only) format; the model is far
        # below the shard size, so this writes exactly one model.safetensors.
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _write_jsonl(path: Path, texts: Iterable[str]) -> None:
    """Write one ``{"text": ...}`` object per line."""
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
