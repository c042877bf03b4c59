"""The run directory: who may write it, what it records, and files that survive any crash.

- A run directory carries a marker file (`automerge-mk-run.json`); `--overwrite` replaces only
  a folder that has it (or, from before the marker, a run's settings.json) or an empty one.
- One writer at a time: search, resume, baselines and demo hold an exclusive lock on it for
  their whole life (`.automerge-mk.lock`, holding the holder's pid and host).
- settings.json is one typed record (`RunRecord`) with a fingerprint of every input, so a
  resume or warm start that would mix trials of other models or data is refused.
- trials.jsonl only ever grows by whole, fsynced lines: a torn last line (a crash mid-append)
  is cut off on resume; a complete line that cannot be read is an error, never deleted.
- Every other file is replaced atomically (temp file, fsync, rename).

Nothing here imports torch: input checks that use it run before anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator

from .errors import (
    NO_SPACE,
    InputChangedError,
    OutputExistsError,
    RunDirectoryError,
    RunInUseError,
    StorageError,
)
from .settings import SearchSettings
from .types import Block, Frozen, SourceModel, TrialResult
from .weights import weight_files

# Every file of a run directory, named here only.
TRIALS = "trials.jsonl"  # one line per finished trial
SETTINGS = "settings.json"  # the RunRecord
MARKER = "automerge-mk-run.json"  # what makes a folder a run directory
LOCK = ".automerge-mk.lock"  # held by its one writer
EVAL_SUBSET = "eval_subset.json"
MEMORY = "memory.json"  # the memory plan of the latest start (memory.py)
SOURCES = "sources.json"  # each source scored on every task
EVALS = "evals.json"  # --eval plug-in scores
BASELINES = "baselines.json"
BASELINES_TABLE = "baselines.md"
BUDGETS = "budgets.json"  # --fidelity
PRIOR = "prior.json"  # --prior: the features and the configurations they predicted
BEST = "best.json"
RECIPE = "recipe.yaml"
MODEL = "model"  # built by stock mergekit
FINAL = "final.json"  # model/ scored again
PROGRESS = "progress.png"
SUMMARY = "summary.md"  # written last
REPORT = "report.md"
REPORT_PROGRESS = "report-progress.png"
REPORT_TASKS = "report-tasks.png"
REPORT_BLOCKS = "report-blocks.png"
REPORT_FRONT = "report-front.png"
FRONT = "front.md"  # the Pareto front of the trials (automerge-mk front)
FRONT_PLOT = "front.png"
# What a point picked from a run's front (automerge-mk pick) takes over from the run: its
# record, its sources' and baselines' scores and its trials, so that report and push work.
PICKED_FROM_RUN = (SOURCES, EVAL_SUBSET, MEMORY, EVALS, BASELINES, BASELINES_TABLE, BUDGETS,
                   PRIOR, PROGRESS)  # fmt: skip


def check_space(folder: Path, needed: int, freed: int = 0) -> None:
    """Raise StorageError unless the file system of `folder` (or of its nearest existing
    parent) has `needed` bytes free, counting `freed` bytes an overwrite will delete.

    Raises:
        RunDirectoryError: when that folder cannot be written.
        StorageError: naming the free and the needed space.
    """
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not os.access(existing, os.W_OK):  # a read-only mount would read as "no space"
        raise RunDirectoryError(
            f"cannot write {folder} ({existing} is read-only or not yours): choose an --out "
            "folder you can write to"
        )
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
        raise RunDirectoryError(
            f"cannot write {what} ({error.strerror or error}): choose an --out folder you can "
            "write to"
        ) from None


# --- fingerprints of a run's inputs -------------------------------------------------------


class WeightPrint(Frozen):
    """A weight file as it was searched: its size, modification time, header and a sample of
    its content.

    A safetensors header holds every tensor's name, dtype, shape and offsets; the time catches
    a retrained model of the same shapes. A file of another time whose size, header and
    content sample are the same is the same file copied, downloaded again or rebuilt byte for
    byte, and is accepted. Reading these costs a few kilobytes per tensor, not the weights.
    Runs recorded before the sample (None) are held to the time.
    """

    size: int
    mtime_ns: int
    header_sha256: str
    content_sha256: str | None = None


class ModelPrint(Frozen):
    """A model as it was searched: its Hub commit, or each of its local weight files."""

    reference: str
    revision: str | None = None
    files: dict[str, WeightPrint] = {}


class DataPrint(Frozen):
    path: str
    sha256: str


class Fingerprints(Frozen):
    models: dict[str, ModelPrint]  # by source name
    base: ModelPrint | None = None
    data: dict[str, DataPrint]  # by task (source) name


def _header_sha256(file: Path) -> str:
    """sha256 of a safetensors file's header (its 8-byte length and the JSON after it), or of
    the first MiB of another weight file."""
    with open(file, "rb") as handle:
        start = handle.read(8)
        if file.suffix == ".safetensors" and len(start) == 8:
            return hashlib.sha256(start + handle.read(struct.unpack("<Q", start)[0])).hexdigest()
        return hashlib.sha256(start + handle.read(2**20)).hexdigest()


SAMPLE = 4096  # bytes read at the start, middle and end of each tensor (_content_sha256)


def _content_sha256(file: Path) -> str:
    """sha256 of SAMPLE bytes at the start, middle and end of every tensor of a safetensors
    file (of 64 evenly spaced places in another weight file). Training changes nearly every
    entry of a tensor it touches, so any tensor it changed changes this; a full hash would
    read every byte (14 GB for a 7B model in bfloat16) at every resume."""
    digest = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        starts = None
        if file.suffix == ".safetensors" and len(head) == 8:
            length = struct.unpack("<Q", head)[0]
            try:  # an unreadable header is sampled as another file (loading names it later)
                header = json.loads(handle.read(min(length, size)))
                spans = sorted(tuple(v["data_offsets"]) for k, v in header.items()
                               if k != "__metadata__")  # fmt: skip
                starts = [(8 + length + a, 8 + length + max(a, b)) for a, b in spans]
            except (ValueError, TypeError, KeyError, AttributeError):
                starts = None
        if starts is None:
            step = max(size // 64, 1)
            starts = [(i, min(i + step, size)) for i in range(0, size, step)]
        for begin, end in starts:
            middle = begin + (end - begin) // 2
            for at in sorted({begin, max(begin, middle - SAMPLE // 2), max(begin, end - SAMPLE)}):
                handle.seek(at)
                digest.update(handle.read(min(SAMPLE, end - at)))
    return digest.hexdigest()


def model_print(model: SourceModel) -> ModelPrint:
    """A Hub model is pinned by its commit sha (its files are content-addressed); a local one
    by each weight file's size, time and header."""
    if model.repo_id and model.revision:
        return ModelPrint(reference=model.pinned, revision=model.revision)
    files = {}
    for file in weight_files(model.path):
        stat = file.stat()
        files[file.name] = WeightPrint(
            size=stat.st_size, mtime_ns=stat.st_mtime_ns, header_sha256=_header_sha256(file),
            content_sha256=_content_sha256(file),
        )  # fmt: skip
    return ModelPrint(reference=model.pinned, files=files)


def _model_changes(what: str, recorded: ModelPrint, current: ModelPrint) -> list[str]:
    if recorded.revision or current.revision:
        if recorded.revision != current.revision:
            return [f"{what} {current.reference} is commit {current.revision}, the run used "
                    f"{recorded.reference} (commit {recorded.revision})"]  # fmt: skip
        return []
    folder = Path(current.reference)
    changes = [
        f"weights file {folder / name} is gone"
        for name in sorted(set(recorded.files) - set(current.files))
    ] + [
        f"weights file {folder / name} is new"
        for name in sorted(set(current.files) - set(recorded.files))
    ]
    for name in sorted(set(recorded.files) & set(current.files)):
        old, new = recorded.files[name], current.files[name]
        if old.content_sha256 is None:  # recorded before content samples: the time decides
            changed = old != new.model_copy(update={"content_sha256": None})
        else:  # another time with the same bytes: copied, downloaded again
            changed = old.model_copy(update={"mtime_ns": new.mtime_ns}) != new
        if changed:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(new.mtime_ns / 1e9))
            if old.size != new.size:
                detail = f"size {old.size} -> {new.size}"
            elif old.header_sha256 != new.header_sha256:
                detail = "another header"
            elif old.content_sha256 is not None:
                detail = f"other content, modified {when}"
            else:
                detail = (
                    f"modified {when}; the run is from before content samples, so the time decides"
                )
            changes.append(f"weights file {folder / name} changed since the run used it ({detail})")
    return changes


def input_changes(recorded: Fingerprints, current: Fingerprints, data: bool = True) -> list[str]:
    """Every model (and, with `data`, data) file that differs from what a run recorded."""
    changes = []
    for name in sorted(set(recorded.models) | set(current.models)):
        old, new = recorded.models.get(name), current.models.get(name)
        if old is None or new is None:
            changes.append(f"source model {name} is {'new' if old is None else 'missing'}")
        else:
            changes += _model_changes("source model", old, new)
    if (recorded.base is None) != (current.base is None):
        changes.append("the base model differs")
    elif recorded.base and current.base:
        changes += _model_changes("base model", recorded.base, current.base)
    for name in sorted(set(recorded.data) | set(current.data)) if data else ():
        old, new = recorded.data.get(name), current.data.get(name)
        if old is None or new is None or old.sha256 != new.sha256:
            path = (new or old).path
            changes.append(f"data file {path} of task {name} differs from the one the run used")
    return changes


def check_unchanged(recorded: Fingerprints, current: Fingerprints, run: Path, use: str) -> None:
    """Refuse to `use` (resume, warm-start from) the run at `run` when any model or data file
    differs from what its trials were scored with.

    Raises:
        InputChangedError: naming every file that differs.
    """
    changes = input_changes(recorded, current)
    if changes:
        raise InputChangedError(
            f"cannot {use} {run}: its trials were scored on other inputs: "
            + "; ".join(changes)
            + ". Restore the files, or start a new search (without --resume / --warm-start)"
        )


# --- settings.json ------------------------------------------------------------------------


class RunRecord(Frozen):
    """What a run's settings.json records: inputs, settings, blocks and their fingerprints.

    Runs from before fingerprints have none (and may hold relative data paths).
    """

    models: list[SourceModel]
    base: SourceModel | None
    data: dict[str, str]
    settings: SearchSettings
    dtype: str
    blocks: tuple[Block, ...]
    fingerprints: Fingerprints | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_space(cls, data):
        """A run recorded before --weighting, --baselines-first, --racing and
        --prior-acquisition searched the convex space, started from the Sobol design, scored
        every trial on all of the data and kept a --prior out of the acquisition: it resumes
        so."""
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            older = {
                "weighting": "convex",
                "baselines_first": False,
                "racing": False,
                "prior_acquisition": False,
            }
            data = {**data, "settings": older | data["settings"]}
        return data

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        """Raises RunDirectoryError when `run_dir` has no readable settings.json."""
        try:
            return cls.model_validate_json((run_dir / SETTINGS).read_bytes())
        except (OSError, ValueError) as error:
            detail = _validation_detail(error) if isinstance(error, ValidationError) else error
            raise RunDirectoryError(
                f"{run_dir} is not an automerge-mk run directory (settings.json: {detail})"
            ) from None


def _validation_detail(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(map(str, first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]


# --- the lock -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder_text(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} "
        f"({holder.get('command', 'automerge-mk')}, since {started})"
    )


class RunLock:
    """An exclusive lock on a run directory for one writing process.

    The lock is `flock` on `.automerge-mk.lock` (released by the kernel when the holder dies,
    however it dies); the file also names the holder, so a refused writer is told who holds it
    and a lock left by a dead process is recognised and taken over. Checked: `filelock` (used
    by huggingface_hub) locks the same way but records no holder and cannot say who it waits
    for, so it is not used here. Within one process the lock is re-entrant.
    """

    _held: dict[Path, list] = {}  # folder -> [RunLock, depth], for re-entry in one process

    def __init__(self, folder: Path, handle, took_over: dict | None):
        self.folder, self._handle, self.took_over = folder, handle, took_over

    @classmethod
    def acquire(cls, folder: Path, command: str) -> RunLock:
        """Lock `folder` (an existing directory) for `command`.

        Raises:
            RunInUseError: when another process holds it, or a holder on another host left it.
            RunDirectoryError / StorageError: when the lock file cannot be written.
        """
        folder = folder.resolve()
        if folder in cls._held:
            cls._held[folder][1] += 1
            return cls._held[folder][0]
        file = folder / LOCK
        with writing(file):
            handle = open(file, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
        _lock_or_refuse(handle, folder)
        previous = _read_holder(handle)
        if previous and previous.get("host") != socket.gethostname():
            handle.close()  # its holder may still run there: a lock cannot tell across hosts
            raise RunInUseError(
                f"{folder} was locked by {_holder_text(previous)} and not released; if that "
                f"process is gone, delete {file} and try again"
            )
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started_at": time.time()}  # fmt: skip
        with writing(file):
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
        lock = cls(folder, handle, previous or None)
        cls._held[folder] = [lock, 1]
        return lock

    def release(self) -> None:
        """Give the lock up (the outermost release of this process unlocks it)."""
        entry = self._held.get(self.folder)
        if entry is None or entry[0] is not self:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[self.folder]
        try:  # an empty file says "released cleanly"; failing that, flock still goes with close
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        except OSError:
            pass
        self._handle.close()

    @classmethod
    def check_free(cls, folder: Path) -> None:
        """Raises RunInUseError when another process holds the lock on `folder` (a probe that
        writes nothing)."""
        if not (folder / LOCK).is_file() or folder.resolve() in cls._held:
            return
        with open(folder / LOCK, encoding="utf-8") as handle:
            _lock_or_refuse(handle, folder)  # closing the file unlocks it


def _lock_or_refuse(handle, folder: Path) -> None:
    """Lock the open lock file of `folder`, or close it and raise RunInUseError naming the
    holder."""
    try:
        _lock_exclusive(handle)
    except OSError:
        holder = _read_holder(handle)
        handle.close()
        who = _holder_text(holder) if holder else "another process"
        raise RunInUseError(
            f"{folder} is in use by {who}: wait for it to finish or stop it; a run directory "
            "has one writer at a time"
        ) from None


def _read_holder(handle) -> dict:
    try:
        handle.seek(0)
        holder = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_exclusive(handle) -> None:
    """A non-blocking exclusive lock; OSError when it is held."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def describe_takeover(lock: RunLock) -> str | None:
    """A line saying that `lock` was taken over from a holder that died, if it was."""
    if not lock.took_over:
        return None
    pid = lock.took_over.get("pid")
    state = "is still running but no longer holds it" if _alive(pid) else "is no longer running"
    return f"took over the lock of {lock.folder} from pid {pid}, which {state}"


# --- the run directory --------------------------------------------------------------------


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a run directory: it has the marker, or (runs from before the marker)
    a settings.json that reads as a run's."""
    if (path / MARKER).is_file():
        return True
    try:
        stored = json.loads((path / SETTINGS).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and {"models", "settings", "blocks"} <= stored.keys()


def _is_empty(path: Path) -> bool:
    return not any(p.name != LOCK for p in path.iterdir())


def _not_a_run(path: Path) -> str:
    return (
        f"{path} already exists and is not an automerge-mk run directory (no {MARKER}); "
        "--overwrite replaces only run directories, so choose another --out"
    )


def check_inputs_outside(out: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that is, contains or lies inside a model or data input
    (symlinks resolved), since replacing or writing it would destroy the input.

    Raises:
        OutputExistsError: naming the input.
    """
    target = out.resolve()
    for item in map(Path, inputs):
        real = item.resolve()
        if real == target or target in real.parents or real in target.parents:
            relation = (
                "is" if real == target else "contains" if target in real.parents else "lies inside"
            )
            raise OutputExistsError(
                f"--out {out} {relation} the input {item}{'' if real == item else f' ({real})'}: "
                "a run directory must be apart from the models and data; choose another --out"
            )


class RunDir:
    """A search's output folder.

    Args:
        path: the folder; it must already exist (see `create` and `reopen`, which also lock it
            for this process until `release`).
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock: RunLock | None = None

    @classmethod
    def check_free(cls, path: Path, overwrite: bool) -> None:
        """Raises OutputExistsError when `path` exists, is not empty, and `overwrite` is false
        (cheap: run before the inputs are checked)."""
        if not path.exists():
            return
        if not path.is_dir():
            raise OutputExistsError(f"--out {path} is a file; choose a folder for --out")
        if overwrite or _is_empty(path):
            return
        if is_run_directory(path):
            raise OutputExistsError(
                f"{path} already exists; pass --overwrite to replace it, --resume to continue "
                "it, or choose another --out"
            )
        raise OutputExistsError(_not_a_run(path))

    @classmethod
    def check_replaceable(cls, path: Path, overwrite: bool) -> None:
        """`check_free`, and with `overwrite` a non-empty `path` must be a run directory: a
        user's other folder is never deleted.

        Raises:
            OutputExistsError: saying why `path` may not be replaced.
        """
        cls.check_free(path, overwrite)
        if path.exists() and not _is_empty(path) and not is_run_directory(path):
            raise OutputExistsError(_not_a_run(path))

    @classmethod
    def create(
        cls, path: Path, overwrite: bool, inputs: list[Path] = (), command: str = "search"
    ) -> RunDir:
        """Create an empty run directory and lock it, replacing an earlier run only when
        `overwrite`; `inputs` (model folders and their files, data files) must lie apart.

        Raises:
            OutputExistsError: when `path` is not free (see `check_free`) or overlaps an input.
            RunInUseError: when another process is writing it.
        """
        check_inputs_outside(path, list(inputs))
        cls.check_replaceable(path, overwrite)
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.lock = RunLock.acquire(path, command)
        try:
            cls.check_replaceable(path, overwrite)  # again: another process may have written it
            with writing(path):
                for entry in path.iterdir():
                    if entry.name == LOCK:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            run.write_marker(None)
        except BaseException:
            run.release()
            raise
        return run

    @classmethod
    def reopen(cls, path: Path, command: str = "search --resume") -> RunDir:
        """An interrupted run, locked, with a torn last line of trials.jsonl (a crash
        mid-append) cut off.

        Raises:
            RunDirectoryError: when `path` is not a run directory, a complete line of
                trials.jsonl cannot be read (the file is left as it is), or settings.json was
                changed after the run recorded it.
            RunInUseError: when another process is writing it.
        """
        if not (path / SETTINGS).is_file():
            raise RunDirectoryError(
                f"{path} is not an automerge-mk run directory (no settings.json); --resume "
                "takes the --out folder of an interrupted `automerge-mk search`"
            )
        run = cls(path)
        run.lock = RunLock.acquire(path, command)
        try:
            run._check_settings_unedited()
            file = path / TRIALS
            if file.exists():
                _, complete = _read_trials(file)
                if complete < file.stat().st_size:
                    with writing(file):
                        os.truncate(file, complete)
        except BaseException:
            run.release()
            raise
        return run

    def release(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    # --- the marker and settings.json ---

    def write_marker(self, settings_sha256: str | None) -> None:
        from importlib.metadata import version

        self.write_json(MARKER, {
            "automerge_mk": version("automerge-mk"),
            "created_at": time.time(),
            "settings_sha256": settings_sha256,
        })  # fmt: skip

    def write_record(self, record: RunRecord) -> None:
        """Write settings.json, then its checksum into the marker (a crash between the two
        leaves no checksum, which is not checked)."""
        written = self.write_text(SETTINGS, record.model_dump_json(indent=2) + "\n")
        self.write_marker(hashlib.sha256(written.read_bytes()).hexdigest())

    def _check_settings_unedited(self) -> None:
        try:
            recorded = json.loads((self.path / MARKER).read_bytes()).get("settings_sha256")
        except (OSError, ValueError, AttributeError):
            return  # a run from before the marker: nothing recorded to compare
        if recorded and hashlib.sha256((self.path / SETTINGS).read_bytes()).hexdigest() != recorded:
            raise RunDirectoryError(
                f"{self.path / SETTINGS} was changed after the run wrote it, so its trials may "
                "not match it; restore it, or start a new search (--warm-start reuses the "
                "trials of a run over the same space)"
            )

    # --- trials ---

    def append_trial(self, result: TrialResult) -> None:
        line = result.model_dump_json() + "\n"
        # A failed append may leave a torn line; `reopen` cuts it off.
        with writing(self.path / TRIALS), open(self.path / TRIALS, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    def trials(self) -> list[TrialResult]:
        """Every complete trial line, in order (a torn last line is not a trial yet).

        Raises:
            RunDirectoryError: naming a complete line that is not a readable trial.
        """
        file = self.path / TRIALS
        return _read_trials(file)[0] if file.exists() else []

    # --- other files ---

    def write_text(self, name: str, text: str) -> Path:
        """Write a file atomically (temp file, fsync, rename)."""
        target = self.path / name
        temp = target.with_name(target.name + ".tmp")
        try:
            with writing(target):
                with open(temp, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)  # the target keeps its previous complete content
            raise
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=str) + "\n")

    def copy_from(self, run: RunDir, names: Sequence[str]) -> None:
        """Copy `names` (those `run` has), each atomically, and `run`'s record and complete
        trials; `run` may be a search that is still writing (its torn last line is left)."""
        self.write_record(RunRecord.read(run.path))
        self.write_text(TRIALS, "".join(t.model_dump_json() + "\n" for t in run.trials()))
        for name in names:
            source, target = run.path / name, self.path / name
            if source.is_file():
                temp = target.with_name(target.name + ".tmp")
                with writing(target):
                    shutil.copyfile(source, temp)
                    os.replace(temp, target)

    def add_evals(self, entries: dict[str, dict]) -> None:
        """Add evaluation plug-in scores to evals.json; an entry of the same label is replaced,
        the others keep their place."""
        known = self.read_json(EVALS) if (self.path / EVALS).is_file() else {}
        self.write_json(EVALS, known | entries)

    def read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_bytes())
        except (OSError, ValueError) as error:
            raise RunDirectoryError(f"cannot read {self.path / name}: {error}") from None


def _read_trials(file: Path) -> tuple[list[TrialResult], int]:
    """The trials of a trials.jsonl and how many bytes they fill; a last line without its
    newline, or one that is not JSON, is torn (a crash mid-append) and not counted.

    Raises:
        RunDirectoryError: for any other line that is not a trial, or a repeated trial number.
    """
    try:
        data = file.read_bytes()
    except OSError as error:
        raise RunDirectoryError(f"cannot read {file}: {error}") from None
    lines = data.splitlines(keepends=True)
    results: list[TrialResult] = []
    seen: set[int] = set()
    end = 0
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.endswith(b"\n"):
            break  # only the last line can lack its newline: torn
        try:
            value = json.loads(line)
        except ValueError:
            if last:
                break
            raise RunDirectoryError(_bad_line(file, number, "not JSON")) from None
        try:
            result = TrialResult.model_validate(value)
        except ValidationError as error:
            raise RunDirectoryError(_bad_line(file, number, _validation_detail(error))) from None
        if result.trial in seen:
            raise RunDirectoryError(_bad_line(file, number, f"trial {result.trial} repeats"))
        seen.add(result.trial)
        results.append(result)
        end += len(line)
    return results, end


def _bad_line(file: Path, number: int, detail: str) -> str:
    return (
        f"{file} line {number} is not a trial this version can read ({detail}); nothing was "
        "changed: fix or remove that line, or start a new search"
    )
