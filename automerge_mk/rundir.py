"""The run directory: append-only trials.jsonl and atomically replaced result files.

A crash at any moment leaves every file either in its previous or its new complete state;
trials.jsonl only ever grows by whole, fsynced lines (a torn last line is ignored on read).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import OutputExistsError, RunDirectoryError
from .types import TrialResult

TRIALS = "trials.jsonl"


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
            text = file.read_text(encoding="utf-8")
            complete = "".join(r.model_dump_json() + "\n" for r in run.trials())
            if text != complete:
                run.write_text(TRIALS, complete)
        return run

    def append_trial(self, result: TrialResult) -> None:
        line = result.model_dump_json() + "\n"
        with open(self.path / TRIALS, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def trials(self) -> list[TrialResult]:
        """Every complete trial line, in order."""
        file = self.path / TRIALS
        if not file.exists():
            return []
        results = []
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                results.append(TrialResult.model_validate_json(line))
            except ValueError:
                continue  # a line torn by a crash mid-write
        return results

    def write_text(self, name: str, text: str) -> Path:
        """Write a file atomically (temp file, fsync, rename)."""
        target = self.path / name
        temp = target.with_name(target.name + ".tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))
