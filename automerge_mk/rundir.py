"""The run directory: append-only trials.jsonl and atomically replaced result files.

A crash at any moment leaves every file either in its previous or its new complete state;
trials.jsonl only ever grows by whole, fsynced lines (a torn last line is ignored on read).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import NO_SPACE, OutputExistsError, RunDirectoryError, StorageError
from .types import TrialResult

TRIALS = "trials.jsonl"


def check_space(folder: Path, needed: int, freed: int = 0) -> None:
    """Raise StorageError unless the file system of `folder` (or of its nearest existing
    parent) has `needed` bytes free, counting `freed` bytes an overwrite will delete.

    Raises:
        StorageError: naming the free and the needed space.
    """
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free + freed
    if free < needed:
        raise StorageError(
            f"{existing} has {free / 2**30:.2f} GiB free; the run needs about "
            f"{needed / 2**30:.2f} GiB (the merged model and the run's files): free space or "
            "choose another --out"
        )


@contextmanager
def writing(what: Path) -> Iterator[None]:
    """Turn a failed write into StorageError (out of space) or RunDirectoryError, naming the
    file; what was written before stays as it was."""
    try:
        yield
    except OSError as error:
        if error.errno in NO_SPACE:
            raise StorageError(f"no space left to write {what} ({error.strerror})") from None
        raise RunDirectoryError(f"cannot write {what}: {error}") from None


class RunDir:
    """A search's output folder.

    Args:
        path: the folder; it must already exist (see `create`).
    """

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def check_free(cls, path: Path, overwrite: bool) -> None:
        """Raises OutputExistsError when `path` exists and may not be replaced."""
        if path.exists() and not overwrite:
            raise OutputExistsError(
                f"{path} already exists; pass --overwrite to replace it or choose another --out"
            )

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDir:
        """Create an empty run directory, replacing an old one only when `overwrite`.

        Raises:
            OutputExistsError: when `path` exists and `overwrite` is false.
        """
        cls.check_free(path, overwrite)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def reopen(cls, path: Path) -> RunDir:
        """An interrupted run, with a torn last line of trials.jsonl (a crash mid-append) cut off.

        Raises:
            RunDirectoryError: when `path` is not a run directory.
        """
        if not (path / "settings.json").is_file():
            raise RunDirectoryError(
                f"{path} is not an automerge-mk run directory (no settings.json); --resume "
                "takes the --out folder of an interrupted `automerge-mk search`"
            )
        run = cls(path)
        file = path / TRIALS
        if file.exists():
            complete = "".join(r.model_dump_json() + "\n" for r in run.trials())
            if file.read_bytes() != complete.encode():
                run.write_text(TRIALS, complete)
        return run

    def append_trial(self, result: TrialResult) -> None:
        line = result.model_dump_json() + "\n"
        # A failed append may leave a torn line; `reopen` cuts it off.
        with writing(self.path / TRIALS), open(self.path / TRIALS, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    def trials(self) -> list[TrialResult]:
        """Every complete trial line, in order."""
        file = self.path / TRIALS
        if not file.exists():
            return []
        results = []
        for line in file.read_bytes().splitlines():
            try:
                results.append(TrialResult.model_validate_json(line))
            except ValueError:
                continue  # a line torn by a crash mid-write (or not a trial at all)
        return results

    def write_text(self, name: str, text: str) -> Path:
        """Write a file atomically (temp file, fsync, rename)."""
        target = self.path / name
        temp = target.with_name(target.name + ".tmp")
        try:
            with writing(target), open(temp, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)  # the target keeps its previous complete content
            raise
        os.replace(temp, target)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))
