"""Checks of the user's input that need no model: paths, names and data files.

They run first, before torch, transformers, mergekit or SMAC are imported and before any model
is loaded, so that a mistyped path is refused in well under two seconds instead of after the
imports (about 10 s on two cores). Nothing here imports more than the standard library,
pydantic and our own light modules.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import DataError, ModelReferenceError
from .sources import check_reference

# `datasets` builder per file suffix (checked: datasets 5.2 packaged modules).
DATA_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
_TEXT_FORMATS = {".jsonl", ".json", ".csv", ".txt"}  # read as UTF-8 text by `datasets`
ARRAY_FORMATS = {".npz"}  # image tasks of raw PyTorch models (classify.py), read by numpy


def source_name(reference: str) -> str:
    """The name a model reference goes by in --data: its folder's or its repo's name (an
    adapter's in MODEL+ADAPTER).

    Raises:
        ModelReferenceError: when it is neither an existing folder nor a Hub id.
    """
    folder = Path(reference).expanduser()
    if folder.is_dir():
        return folder.resolve().name
    check_reference(reference)
    if "+" in reference:  # mergekit's MODEL+ADAPTER goes by the adapter's name
        return source_name(reference.partition("+")[2])
    return reference.partition("@")[0].split("/")[1]


def check_data_file(path: Path) -> str:
    """Check that a data file exists, is a readable file of a supported format and, for the
    text formats, valid UTF-8; return the sha256 of its bytes.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; give the data file itself")
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.suffix.lower() not in DATA_BUILDERS.keys() | ARRAY_FORMATS:
        raise DataError(
            f"{path}: unsupported data format; use {', '.join(DATA_BUILDERS)} (texts), or .npz "
            "(images, for raw PyTorch models)"
        )
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read data file {path} ({error.strerror or error})") from None
    if not content:
        raise DataError(f"data file {path} is empty")
    if path.suffix.lower() in _TEXT_FORMATS:
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as error:
            line = content[: error.start].count(b"\n") + 1
            raise DataError(
                f"data file {path} is not valid UTF-8 (byte 0x{content[error.start]:02x} on line "
                f"{line}); save it as UTF-8"
            ) from None
    return hashlib.sha256(content).hexdigest()


def data_files(
    data: dict[str, str], model_refs: list[str]
) -> tuple[dict[str, Path], dict[str, str]]:
    """Map each source model's name to its absolute validation file, and check the files.

    Returns:
        The files and their sha256, both by source name, in source order.

    Raises:
        ModelReferenceError: when a source is neither a folder nor a Hub id, or names repeat.
        DataError: when a name matches no model, a model has no data, or a file is unusable.
    """
    names = [source_name(ref) for ref in model_refs]
    if len(set(names)) < len(names):
        raise ModelReferenceError(
            f"source models share a name ({', '.join(names)}); --data needs distinct folder "
            "or repo names"
        )
    by_key = dict(zip(names, names)) | dict(zip(model_refs, names))
    files: dict[str, Path] = {}
    for key, path in data.items():
        if key not in by_key:
            raise DataError(
                f"--data {key}=... names no source model; model names are {', '.join(names)}"
            )
        files[by_key[key]] = Path(path).expanduser().absolute()
    missing = [name for name in names if name not in files]
    if missing:
        raise DataError(
            f"no --data for {', '.join(missing)}: give each source model its validation data "
            f"as --data NAME=PATH (names: {', '.join(names)})"
        )
    files = {name: files[name] for name in names}
    return files, {name: check_data_file(path) for name, path in files.items()}
