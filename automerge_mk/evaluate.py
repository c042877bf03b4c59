"""Stage 5: validation data, token losses, and the preservation objective.

AP_i = L_i(S_i) / L_i(merged) for each task i with specialist S_i; the search maximises the
harmonic mean of AP over tasks, which punishes a merge that keeps one task and drops another.
Texts are tokenised once per search and batched by length so few padded positions are computed.
"""

from __future__ import annotations

import random
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
    sequences = [tuple(ids) for ids in encoded if len(ids) >= 2]
    if not sequences:
        raise DataError(f"task {name!r}: no text has two or more tokens")
    if eval_tokens:
        random.Random(seed).shuffle(sequences)
        kept, total = [], 0
        for sequence in sequences:
            if total >= eval_tokens:
                break
            kept.append(sequence)
            total += len(sequence) - 1
        sequences = kept
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TaskData(name=name, sequences=tuple(sequences), pad_id=pad)


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


@torch.inference_mode()
def score_task(model: PreTrainedModel, task: TaskData, batch_tokens: int = 2048) -> TaskScore:
    """Mean next-token loss and accuracy of `model` over a task's sequences."""
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for batch in _batches(task, batch_tokens):
        width = len(batch[0])
        ids = torch.full((len(batch), width), task.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        picked, wanted = logits[valid], targets[valid]
        loss_sum += torch.nn.functional.cross_entropy(picked, wanted, reduction="sum").item()
        correct += (picked.argmax(-1) == wanted).sum().item()
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
