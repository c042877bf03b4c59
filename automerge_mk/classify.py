"""Classification tasks: examples with class labels, scored by cross-entropy and accuracy.

Two kinds of examples (kinds.py says which a model takes):

- images, for raw PyTorch models (modules.py) such as the CCT benchmark: a `.npz` file
  (numpy's own archive of named arrays) with

  - `pixel_values`: the images, shape (N, *input_shape) of the model's module.json, floating;
  - `labels`: (N,) integer class indices into the model's logits;

  `datasets` has no builder for `.npz` (its packaged modules read text, json, csv, parquet,
  arrow, image folders) and an image folder would need decoding and a transform the model
  does not say; numpy reads the arrays as they were saved, without pickle;
- texts, for transformers sequence classifiers (BERT, RoBERTa, DistilBERT): rows with a text
  column and a `label` column (read with `datasets`, like a causal LM's data), the label a
  name of the model's `id2label` or a class index.

A task scores like a prompt/label task of a causal LM: `loss` is the mean cross-entropy over
its examples (AP comes from it), `label_accuracy` the top-1 accuracy (PR comes from it), and
`tokens` counts examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError
from .types import TaskScore

if TYPE_CHECKING:
    import torch

IMAGES, LABELS = "pixel_values", "labels"
BATCH = 256  # images per forward pass


class ClassTask:
    """One task's validation examples and labels (`indices`: which of the file's rows).

    `inputs` are the model's inputs for all examples, first axis the example: one tensor
    (images, passed positionally to a raw module) or keyword tensors (a tokenizer's
    input_ids and attention_mask, padded to the longest example).
    """

    def __init__(self, name: str, inputs: torch.Tensor | dict[str, torch.Tensor],
                 labels: torch.Tensor, indices: tuple[int, ...]):  # fmt: skip
        self.name, self.inputs, self.labels, self.indices = name, inputs, labels, indices

    @property
    def tokens(self) -> int:
        """Scored examples (what a causal LM's task counts in tokens)."""
        return len(self.indices)

    computed_tokens = tokens

    def batch(self, start: int, stop: int, device, dtype) -> tuple[tuple, dict]:
        """Examples start:stop as (args, kwargs) of a forward call, floating inputs in
        `dtype`, on `device`."""
        if isinstance(self.inputs, dict):
            return (), {k: v[start:stop].to(device) for k, v in self.inputs.items()}
        return (self.inputs[start:stop].to(device, dtype),), {}


def load_image_task(
    name: str, path: Path, input_shape: Sequence[int], examples: int | None = None, seed: int = 0
) -> ClassTask:
    """A task from a `.npz` file, checked against the model's input shape; `examples`: at most
    that many, a seeded random choice (None: all).

    Raises:
        DataError: when the file is not such an archive, an array is missing, the shapes or
            dtypes do not fit, or a label is negative.
    """
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npz archive of arrays: {error}") from None
    missing = [key for key in (IMAGES, LABELS) if key not in found]
    if missing:
        raise DataError(
            f"{path} lacks array(s) {', '.join(missing)}; an image task holds {IMAGES} "
            f"(N, {', '.join(map(str, input_shape))}) and {LABELS} (N,); it has "
            f"{', '.join(found) or 'none'}"
        )
    images, labels = found[IMAGES], found[LABELS]
    if tuple(images.shape[1:]) != tuple(input_shape) or not np.issubdtype(
        images.dtype, np.floating
    ):
        raise DataError(
            f"{path}: {IMAGES} is {images.dtype} of shape {images.shape}; the model's "
            f"module.json takes floating images of shape (N, {', '.join(map(str, input_shape))})"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {LABELS} is {labels.dtype} of shape {labels.shape}; give one integer "
            f"class per image ({len(images)})"
        )
    if not len(images):
        raise DataError(f"{path} holds no images")
    if labels.min() < 0:
        raise DataError(f"{path}: labels must be class indices >= 0, found {labels.min()}")
    indices = list(range(len(images)))
    if examples is not None and examples < len(indices):
        indices = sorted(random.Random(seed).sample(indices, examples))
    chosen = torch.from_numpy(np.ascontiguousarray(images[indices])).float()
    return ClassTask(name, chosen, torch.from_numpy(labels[indices]).long(), tuple(indices))


def load_text_task(
    name: str,
    path: Path,
    tokenizer,
    label2id: dict[str, int],
    max_length: int,
    text_column: str = "text",
    examples: int | None = None,
    seed: int = 0,
) -> ClassTask:
    """A sequence classifier's task from a data file `datasets` reads (jsonl, json, csv,
    parquet): a text column and a `label` column, each label a name of the model's
    `label2id` or a class index; texts are cut to `max_length` tokens. `examples`: at most
    that many, a seeded random choice (None: all).

    Raises:
        DataError: when the file cannot be read, a column is missing, a text is empty or a
            label is not one of the model's.
    """
    import datasets
    import torch

    from .inputs import DATA_BUILDERS

    builder = DATA_BUILDERS.get(path.suffix.lower())
    if builder is None or builder == "text":
        raise DataError(f"{path}: a sequence classifier's task is a table of {text_column!r} "
                        "and 'label' columns: jsonl, json, csv or parquet")  # fmt: skip
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise DataError(f"cannot read data file {path}: {error}") from error
    missing = [c for c in (text_column, "label") if c not in rows.column_names]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)} (it has {rows.column_names}); a "
            f"sequence classifier's task has a text column ({text_column!r}, --text-column) "
            "and a 'label' column"
        )
    texts, labels = list(rows[text_column]), list(rows["label"])
    if not texts:
        raise DataError(f"data file {path} has no rows")
    if empty := [i for i, text in enumerate(texts) if not isinstance(text, str) or not text]:
        raise DataError(f"{path}: row {empty[0]} has no text in column {text_column!r}")
    ids = []
    for row, label in enumerate(labels):
        known = label2id.get(str(label), label if isinstance(label, int) else None)
        if known is None or not 0 <= known < len(label2id):
            raise DataError(
                f"{path}: row {row} has label {label!r}, which is not a class of the model "
                f"(its labels: {', '.join(list(label2id)[:12])}{' ...' * (len(label2id) > 12)})"
            )
        ids.append(known)
    indices = list(range(len(texts)))
    if examples is not None and examples < len(indices):
        indices = sorted(random.Random(seed).sample(indices, examples))
    encoded = tokenizer([texts[i] for i in indices], padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
    inputs = {k: v for k, v in encoded.items()}
    return ClassTask(name, inputs, torch.tensor([ids[i] for i in indices]), tuple(indices))


def check_classes(task: ClassTask, classes: int, path: Path) -> None:
    """Raises DataError when a label is not a class of a model with `classes` logits."""
    if int(task.labels.max()) >= classes:
        raise DataError(
            f"{path}: label {int(task.labels.max())} is not a class of the model, whose output "
            f"has {classes} logits"
        )


def score_classes(
    model: torch.nn.Module, task: ClassTask, keep_examples: bool = False
) -> TaskScore:
    """Mean cross-entropy and top-1 accuracy of a classifier on a task, in the model's dtype
    and on its device: its logits (N, classes), or a transformers output's `.logits`."""
    import torch

    parameter = next(model.parameters())
    losses, correct = [], 0
    with torch.no_grad():
        for start in range(0, task.tokens, BATCH):
            args, kwargs = task.batch(start, start + BATCH, parameter.device, parameter.dtype)
            labels = task.labels[start : start + BATCH].to(parameter.device)
            output = model(*args, **kwargs)
            logits = getattr(output, "logits", output).float()
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
    loss = torch.cat(losses)
    return TaskScore(
        loss=loss.mean().item(),
        accuracy=correct / task.tokens,
        tokens=task.tokens,
        metrics={"label_accuracy": correct / task.tokens},
        example_losses=tuple(loss.tolist()) if keep_examples else (),
    )
