"""Image classification tasks: arrays and labels, scored by cross-entropy and top-1 accuracy.

The tasks of raw PyTorch models (modules.py) such as the CCT benchmark: a `.npz` file (numpy's
own archive of named arrays) with

- `pixel_values`: the images, shape (N, *input_shape) of the model's module.json, floating;
- `labels`: (N,) integer class indices into the model's logits.

`datasets` has no builder for `.npz` (its packaged modules read text, json, csv, parquet,
arrow, image folders) and an image folder would need decoding and a transform the model does
not say; numpy reads the arrays as they were saved, without pickle.

A task scores like a prompt/label task of a causal LM: `loss` is the mean cross-entropy over
its examples (AP comes from it), `label_accuracy` the top-1 accuracy (PR comes from it), and
`tokens` counts examples.
"""

from __future__ import annotations

import hashlib
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


class ImageTask:
    """One task's validation images and labels (`indices`: which of the file's rows)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor,
                 indices: tuple[int, ...]):  # fmt: skip
        self.name, self.images, self.labels, self.indices = name, images, labels, indices

    @property
    def tokens(self) -> int:
        """Scored examples (what a causal LM's task counts in tokens)."""
        return len(self.indices)

    computed_tokens = tokens

    def digest(self) -> str:
        """sha256 of the images and labels, to tell two tasks' data apart."""
        content = self.images.numpy().tobytes() + self.labels.numpy().tobytes()
        return hashlib.sha256(content).hexdigest()


def load_image_task(
    name: str, path: Path, input_shape: Sequence[int], examples: int | None = None, seed: int = 0
) -> ImageTask:
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
    return ImageTask(name, chosen, torch.from_numpy(labels[indices]).long(), tuple(indices))


def check_classes(task: ImageTask, classes: int, path: Path) -> None:
    """Raises DataError when a label is not a class of a model with `classes` logits."""
    if int(task.labels.max()) >= classes:
        raise DataError(
            f"{path}: label {int(task.labels.max())} is not a class of the model, whose output "
            f"has {classes} logits"
        )


def score_images(model: torch.nn.Module, task: ImageTask, keep_examples: bool = False) -> TaskScore:
    """Mean cross-entropy and top-1 accuracy of a classifier (logits (N, classes)) on a task,
    in the model's dtype and on its device."""
    import torch

    parameter = next(model.parameters())
    losses, correct = [], 0
    with torch.no_grad():
        for start in range(0, task.tokens, BATCH):
            images = task.images[start : start + BATCH].to(parameter.device, parameter.dtype)
            labels = task.labels[start : start + BATCH].to(parameter.device)
            logits = model(images).float()
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
