"""Stage 5: validation data, token losses, and the preservation objective.

AP_i = L_i(S_i) / L_i(merged) for each task i with specialist S_i; the search maximises the
harmonic mean of AP over tasks, which punishes a merge that keeps one task and drops another.
Texts are tokenised once per search and batched by length so few padded positions are computed.
"""

from __future__ import annotations

import random
import weakref
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import DataError
from .types import TaskScore, harmonic_mean

# `datasets` builder per file suffix (checked: datasets 5.2 packaged modules).
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


class TaskData(BaseModel):
    """One task's tokenised validation sequences."""

    model_config = ConfigDict(frozen=True)

    name: str
    sequences: tuple[tuple[int, ...], ...]
    pad_id: int
    indices: tuple[int, ...]  # which of the task's texts the sequences come from

    @property
    def tokens(self) -> int:
        """Predicted positions: each sequence predicts all but its first token."""
        return sum(len(s) - 1 for s in self.sequences)


def load_texts(path: Path, text_column: str = "text") -> list[str]:
    """Load a task's texts with `datasets` (jsonl/json/csv/parquet/txt).

    Raises:
        DataError: when the file is missing, unreadable, empty or lacks `text_column`.
    """
    import datasets  # deferred: importing datasets costs seconds and only searches need it

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data format; use {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise DataError(f"cannot read data file {path}: {error}") from error
    column = "text" if builder == "text" else text_column
    if column not in dataset.column_names:
        raise DataError(
            f"{path} has no column {column!r}; its columns are {dataset.column_names}: "
            "pass --text-column"
        )
    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"data file {path} has no non-empty text in column {column!r}")
    return texts


def tokenize_task(
    name: str,
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    eval_tokens: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Tokenise once; with `eval_tokens`, keep a seeded random subset of about that many tokens.

    Raises:
        DataError: when no text yields at least two tokens.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    kept = [(i, tuple(ids)) for i, ids in enumerate(encoded) if len(ids) >= 2]
    if not kept:
        raise DataError(f"task {name!r}: no text has two or more tokens")
    if eval_tokens:
        random.Random(seed).shuffle(kept)
        subset, total = [], 0
        for index, sequence in kept:
            if total >= eval_tokens:
                break
            subset.append((index, sequence))
            total += len(sequence) - 1
        kept = sorted(subset)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TaskData(
        name=name,
        sequences=tuple(s for _, s in kept),
        pad_id=pad,
        indices=tuple(i for i, _ in kept),
    )


def _batches(task: TaskData, batch_tokens: int) -> list[list[tuple[int, ...]]]:
    ordered = sorted(task.sequences, key=len, reverse=True)
    batches: list[list[tuple[int, ...]]] = []
    for sequence in ordered:
        # Sorted by length, the first sequence of a batch is its longest: padding stays small.
        if batches and len(batches[-1][0]) * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(sequence)
        else:
            batches.append([sequence])
    return batches


_HEAD_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_can_be_chunked(model: PreTrainedModel) -> bool:
    """Whether logits are exactly the output embedding applied to the last hidden state.

    Checked once per model on a short input: models that scale or soft-cap their logits
    (gemma2, cohere …) fail the check and are scored through their full forward instead.
    """
    if model not in _HEAD_MATCHES:
        head, body = model.get_output_embeddings(), model.base_model
        ok = head is not None and body is not model
        if ok:
            device = next(model.parameters()).device
            ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.config.vocab_size
            full = model(input_ids=ids).logits
            hidden = body(input_ids=ids).last_hidden_state
            ok = torch.equal(full, head(hidden))
        _HEAD_MATCHES[model] = ok
    return _HEAD_MATCHES[model]


@torch.inference_mode()
def score_task(
    model: PreTrainedModel, task: TaskData, batch_tokens: int = 4096, chunk_rows: int = 1024
) -> TaskScore:
    """Mean next-token loss and accuracy of `model` over a task's sequences.

    Batches hold sequences of similar length (few padded positions); the vocabulary
    projection and the loss run over `chunk_rows` predicted positions at a time, so the
    full-vocabulary logits of a whole batch never sit in memory at once. Losses are summed in
    float32 whatever the model's dtype.
    """
    device = next(model.parameters()).device
    chunked = _head_can_be_chunked(model)
    loss_sum, correct, count = 0.0, 0, 0
    for batch in _batches(task, batch_tokens):
        width = len(batch[0])
        ids = torch.full((len(batch), width), task.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(device), mask.to(device)
        valid = mask[:, 1:].bool()
        wanted = ids[:, 1:][valid]
        if chunked:
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, project = hidden[:, :-1][valid], model.get_output_embeddings()
        else:
            rows = model(input_ids=ids, attention_mask=mask).logits[:, :-1][valid]
            project = None
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            logits = (project(part) if project else part).float()
            target = wanted[start : start + chunk_rows]
            loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
        count += int(valid.sum().item())
    return TaskScore(loss=loss_sum / count, accuracy=correct / count, tokens=count)


def score_model(model: PreTrainedModel, tasks: list[TaskData]) -> dict[str, TaskScore]:
    """Scores of one model on every task."""
    return {task.name: score_task(model, task) for task in tasks}


def with_preservation(
    scores: dict[str, TaskScore], reference_losses: dict[str, float]
) -> tuple[dict[str, TaskScore], float]:
    """Add AP_i = L_i(S_i) / L_i(merged) to each task score; return them and their harmonic mean."""
    out = {}
    for name, score in scores.items():
        ap = reference_losses[name] / score.loss if score.loss > 0 else 0.0
        out[name] = score.model_copy(update={"preservation": ap})
    values = [s.preservation for s in out.values()]
    return out, harmonic_mean(values)
