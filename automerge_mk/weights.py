"""Weight files of a model folder: which they are, what they hold, whether they are whole.

safetensors are read through `safetensors.safe_open` (headers only, memory-mapped tensors);
pickled `pytorch_model*.bin` files, opted into with --allow-pickle-weights, through torch's
weights-only unpickler. Segmentation, the engine, the input checks and the space check read
weights through this module only.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelReferenceError

PICKLED_WEIGHTS = "pytorch_model*.bin"
# A shard's name: no `..`, no absolute or nested paths (it becomes part of a path).
_SHARD = re.compile(r"^(?!\.\.?(?:/|$))[\w.-]+$")


def index_shards(index: Path) -> list[str]:
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


def check_index(folder: Path, files: list[Path]) -> None:
    """Every index names plain file names, and the index of the weights in use only files
    that exist."""
    in_use = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
    for index in sorted(folder.glob("*.index.json")):
        shards = index_shards(index)
        missing = [shard for shard in shards if not (folder / shard).is_file()]
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
