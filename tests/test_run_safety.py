"""A user's models, data and finished trials survive --overwrite, concurrent runs and resumes.

Each test here failed on the main branch before run directories were marked, locked and bound
to fingerprints of their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import short_search_arguments
from safetensors.torch import load_file, save_file

from automerge_mk.cli import main
from automerge_mk.errors import RunInUseError
from automerge_mk.rundir import LOCK, RunDir, RunLock, describe_takeover

CLI = [sys.executable, "-c", "from automerge_mk.cli import main; main()"]


def _invoke(arguments: list) -> Result:
    return CliRunner().invoke(main, [str(a) for a in arguments])


def _assert_refused(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


@pytest.fixture
def models(demo_models, tmp_path) -> dict[str, Path]:
    """Copies of the demo's base, specialists and validation data that a test may change."""
    root = tmp_path / "models"
    shutil.copytree(demo_models.base.parent, root, ignore=shutil.ignore_patterns("*.lock"))
    return {"root": root, "base": root / "base", "arith": root / "arith",
            "reverse": root / "reverse", "data": root / "data"}  # fmt: skip


def _search(models: dict[str, Path], out: Path, trials: int = 3, *extra) -> list[str]:
    arguments = ["search", models["arith"], models["reverse"], "--base", models["base"]]
    for name in ("arith", "reverse"):
        arguments += ["--data", f"{name}={models['data'] / f'{name}-validation.jsonl'}"]
    arguments += ["--out", out, "--quiet", "--trials", trials, "--initial", min(trials, 2)]
    return [str(a) for a in arguments + list(extra)]


@pytest.fixture(scope="module")
def short_run(demo_models, tmp_path_factory) -> Path:
    """A finished 3-trial search on the demo models."""
    out = tmp_path_factory.mktemp("short") / "run"
    result = CliRunner().invoke(main, short_search_arguments(demo_models, out, 3))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _interrupted_copy(run: Path, to: Path, keep: int) -> Path:
    """A copy of a finished run as if it had been killed after `keep` trials."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("model", LOCK, "summary.md"))
    lines = (to / "trials.jsonl").read_text().splitlines(keepends=True)
    (to / "trials.jsonl").write_text("".join(lines[:keep]))
    return to


# --- --overwrite never deletes an input ---------------------------------------------------


@pytest.mark.parametrize("where", ["base", "arith", "root", "inside"])
def test_overwrite_of_a_folder_holding_the_sources_is_refused_and_they_stay_identical(
    models, where
):
    out = models["base"] / "runs" if where == "inside" else models[where]
    before = _digests(models["root"])
    result = _invoke(_search(models, out, 3, "--overwrite"))
    relation = {"base": "is", "arith": "is", "root": "contains", "inside": "lies inside"}[where]
    _assert_refused(result, "OutputExistsError", f"{relation} the input")
    assert _digests(models["root"]) == before  # byte for byte, nothing added or removed


def test_overwrite_replaces_only_a_run_directory(models, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    result = _invoke(_search(models, folder, 3, "--overwrite"))
    _assert_refused(result, "OutputExistsError", "not an automerge-mk run directory")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def test_a_symlink_to_a_source_is_refused_as_out(models, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(models["arith"], target_is_directory=True)
    before = _digests(models["root"])
    _assert_refused(_invoke(_search(models, link, 3, "--overwrite")), "is the input")
    assert _digests(models["root"]) == before


# --- one writer at a time -----------------------------------------------------------------


def _start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen(CLI + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_two_concurrent_resumes_leave_one_finished_run_and_refuse_the_other(short_run, tmp_path):
    out = _interrupted_copy(short_run, tmp_path / "run", keep=1)
    first, second = (_start(["search", "--resume", str(out), "--quiet"]) for _ in range(2))
    outcomes = sorted((p.wait(timeout=600), p.communicate()[1]) for p in (first, second))
    (ok, ok_err), (refused, refused_err) = outcomes
    assert ok == 0, ok_err
    assert refused == 1 and "RunInUseError" in refused_err and "in use by pid" in refused_err
    assert "Traceback" not in refused_err
    assert [t["trial"] for t in _lines(out)] == [0, 1, 2]  # each trial once
    assert (out / "model" / "config.json").is_file() and (out / "summary.md").is_file()
    assert not (out / "model.partial").exists()


def test_two_searches_with_the_same_out_and_overwrite_run_one_at_a_time(models, tmp_path):
    out = tmp_path / "run"
    processes = [_start(_search(models, out, 2, "--overwrite")) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=600), p.communicate()[1]) for p in processes)
    (ok, ok_err), (refused, refused_err) = outcomes
    assert ok == 0, ok_err
    assert refused == 1 and "RunInUseError" in refused_err, refused_err
    assert [t["trial"] for t in _lines(out)] == [0, 1]  # one search's trials, not a mix
    assert (out / "model" / "config.json").is_file()


_HOLDER = """
import fcntl, json, os, socket, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "search"}))
handle.flush()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another live process holds."""
    folder = tmp_path / "held"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder / LOCK)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    yield folder, holder.pid
    holder.kill()
    holder.wait()


def test_a_lock_held_by_a_live_process_refuses_a_second_writer_by_name(held):
    folder, pid = held
    with pytest.raises(RunInUseError, match=rf"in use by pid {pid} on host"):
        RunLock.acquire(folder, "search")


def test_push_refuses_a_run_that_a_search_is_writing(held):
    folder, pid = held
    _assert_refused(_invoke(["push", folder, "org/name"]), "RunInUseError", f"pid {pid}")


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_says_so(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "command": "search"}
    (folder / LOCK).write_text(json.dumps(holder))
    lock = RunLock.acquire(folder, "search --resume")
    try:
        assert describe_takeover(lock) == (
            f"took over the lock of {folder.resolve()} from pid {dead.pid}, which is no "
            "longer running"
        )
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (folder / LOCK).read_text() == ""  # released cleanly: nothing to take over


def test_a_lock_left_on_another_host_is_not_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "node-17", "command": "search"}))
    with pytest.raises(RunInUseError, match=rf"node-17.*delete {folder.resolve() / LOCK}"):
        RunLock.acquire(folder, "search")


# --- resume keeps every finished trial ----------------------------------------------------


def test_a_complete_bad_middle_line_survives_a_refused_resume(short_run, tmp_path):
    out = _interrupted_copy(short_run, tmp_path / "run", keep=3)
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    lines[1] = json.dumps(json.loads(lines[1]) | {"note": "added by hand"}) + "\n"
    (out / "trials.jsonl").write_text("".join(lines))
    before = (out / "trials.jsonl").read_bytes()
    result = _invoke(["search", "--resume", out, "--quiet"])
    _assert_refused(
        result, "RunDirectoryError", "trials.jsonl line 2", "note", "nothing was changed"
    )
    assert (out / "trials.jsonl").read_bytes() == before


def test_a_torn_last_line_is_the_only_thing_cut(short_run, tmp_path):
    out = _interrupted_copy(short_run, tmp_path / "run", keep=2)
    complete = (out / "trials.jsonl").read_bytes()
    with (out / "trials.jsonl").open("ab") as handle:
        handle.write(b'{"trial": 2, "status": "ok", "conf')  # a crash mid-append
    run = RunDir.reopen(out)
    run.release()
    assert (out / "trials.jsonl").read_bytes() == complete


def test_a_finished_run_says_so_on_resume_and_runs_nothing(short_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("trials.jsonl", "final.json")}
    model = _digests(out / "model")
    result = _invoke(["search", "--resume", out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "is already finished: all 3 trials ran" in result.output
    assert "--warm-start" in result.output
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert _digests(out / "model") == model


# --- resume and warm start are bound to their inputs --------------------------------------


def test_resume_from_another_working_directory_uses_the_recorded_absolute_data(
    models, tmp_path, monkeypatch
):
    monkeypatch.chdir(models["root"])
    out = tmp_path / "run"
    arguments = ["search", "arith", "reverse", "--base", "base", "--out", out, "--quiet"]
    arguments += ["--data", "arith=data/arith-validation.jsonl"]
    arguments += ["--data", "reverse=data/reverse-validation.jsonl", "--trials", 3, "--initial", 2]
    first = _invoke(arguments)
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "settings.json").read_text())["data"]
    assert recorded == {n: str(models["data"] / f"{n}-validation.jsonl")
                        for n in ("arith", "reverse")}  # fmt: skip
    sources = (out / "sources.json").read_text()
    (out / "summary.md").unlink()  # as if killed before the end
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    for name in ("arith", "reverse"):  # same names, other texts
        (elsewhere / "data" / f"{name}-validation.jsonl").write_text('{"text": "1 + 1 = 3"}\n')
    monkeypatch.chdir(elsewhere)
    resumed = _invoke(["search", "--resume", out, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "sources.json").read_text() == sources  # scored on the same data again


def test_a_changed_source_weight_file_is_refused_on_resume(models, tmp_path):
    out = tmp_path / "run"
    assert _invoke(_search(models, out, 3)).exit_code == 0
    (out / "summary.md").unlink()
    shard = models["arith"] / "model.safetensors"
    weights = load_file(str(shard))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(shard), metadata={"format": "pt"})
    trials = (out / "trials.jsonl").read_bytes()
    result = _invoke(["search", "--resume", out, "--quiet"])
    _assert_refused(result, "InputChangedError", f"weights file {shard} changed")
    assert (out / "trials.jsonl").read_bytes() == trials


def test_a_source_copied_byte_for_byte_resumes_and_one_byte_changed_is_refused(models, tmp_path):
    out = tmp_path / "run"
    assert _invoke(_search(models, out, 4)).exit_code == 0
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    (out / "trials.jsonl").write_text("".join(lines[:2]))  # as if killed after two trials
    (out / "summary.md").unlink()
    shard = models["arith"] / "model.safetensors"
    content = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(content)  # as `cp` without -p, or a second download, writes it
    later = shard.stat().st_mtime_ns + 10**9
    os.utime(shard, ns=(later, later))
    resumed = _invoke(["search", "--resume", out, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "trials.jsonl").read_text().splitlines(keepends=True)[:2] == lines[:2]
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4
    # One value changed in the middle of one tensor: the same size, header and time, refused.
    (out / "summary.md").unlink()
    lines = (out / "trials.jsonl").read_text().splitlines(keepends=True)
    (out / "trials.jsonl").write_text("".join(lines[:3]))
    header = 8 + struct.unpack("<Q", content[:8])[0]
    tensors = {k: v for k, v in json.loads(content[8:header]).items() if k != "__metadata__"}
    name = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])  # the last one
    begin, end = tensors[name]["data_offsets"]
    middle = header + (begin + end) // 2
    edited = bytearray(content)
    edited[middle] ^= 0x01
    shard.write_bytes(bytes(edited))
    os.utime(shard, ns=(later, later))
    result = _invoke(["search", "--resume", out, "--quiet"])
    _assert_refused(result, "InputChangedError", f"weights file {shard} changed")
    assert "other content" in result.output, name


def test_a_run_recorded_before_content_samples_is_held_to_the_time_alone():
    from automerge_mk.rundir import ModelPrint, WeightPrint, _model_changes

    def printed(mtime: int, content: str | None) -> ModelPrint:
        weights = WeightPrint(size=8, mtime_ns=mtime, header_sha256="h", content_sha256=content)
        return ModelPrint(reference="/m", files={"model.safetensors": weights})

    now = printed(2, "c")
    assert _model_changes("source", printed(2, None), now) == []  # the same time: unchanged
    (older,) = _model_changes("source", printed(1, None), now)
    assert "from before content samples, so the time decides" in older
    assert _model_changes("source", printed(1, "c"), now) == []  # the same bytes, copied
    (other,) = _model_changes("source", printed(2, "d"), now)
    assert "other content" in other


def test_an_edited_settings_file_is_refused_on_resume(short_run, tmp_path):
    out = _interrupted_copy(short_run, tmp_path / "run", keep=2)
    settings = json.loads((out / "settings.json").read_text())
    settings["settings"]["methods"] = ["linear"]
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    result = _invoke(["search", "--resume", out, "--quiet"])
    _assert_refused(result, "RunDirectoryError", "settings.json was changed after the run")


def test_warm_start_from_a_run_on_other_data_is_refused(short_run, models, tmp_path):
    data = models["data"] / "arith-validation.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    result = _invoke(_search(models, tmp_path / "run", 3, "--warm-start", short_run))
    _assert_refused(result, "InputChangedError", f"data file {data} of task arith")
    assert not (tmp_path / "run").exists()


# --- bad input is named, before any trial -------------------------------------------------


@pytest.fixture
def poisoned(models) -> Path:
    """The arith specialist with one all-NaN tensor."""
    shard = models["arith"] / "model.safetensors"
    weights = load_file(str(shard))
    weights["model.layers.1.mlp.down_proj.weight"].fill_(float("nan"))
    save_file(weights, str(shard), metadata={"format": "pt"})
    return models["arith"]


def test_a_nan_source_fails_before_trial_1_naming_the_tensor(models, poisoned, tmp_path):
    out = tmp_path / "run"
    result = _invoke(_search(models, out, 3))
    _assert_refused(result, "NonFiniteError", "source model arith",
                    "model.layers.1.mlp.down_proj.weight", "NaN/inf")  # fmt: skip
    assert not (out / "trials.jsonl").exists()


def test_invalid_utf8_in_a_data_file_is_named(models, tmp_path):
    data = models["data"] / "arith-validation.jsonl"
    data.write_bytes(data.read_bytes() + b'{"text": "caf\xe9"}\n')
    result = _invoke(_search(models, tmp_path / "run", 3))
    _assert_refused(result, "DataError", str(data), "not valid UTF-8", "byte 0xe9")


def test_a_data_path_that_is_a_directory_is_named_as_one(models, tmp_path):
    folder = models["data"] / "arith-validation.jsonl"
    folder.unlink()
    folder.mkdir()
    _assert_refused(_invoke(_search(models, tmp_path / "run", 3)), "is a directory")


def test_rows_without_text_are_counted_not_dropped_silently(models, tmp_path):
    data = models["data"] / "arith-validation.jsonl"
    data.write_text(data.read_text() + '{"text": null}\n{"text": "  "}\n')
    result = _invoke(_search(models, tmp_path / "run", 2))
    assert result.exit_code == 0, result.output
    assert f"Note: {data}: 2 row(s) with no text in column 'text'" in result.output


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nothing can be written to: a read-only tmpfs where mounting is allowed (root),
    else a folder without write permission (which binds every user but root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        assert os.geteuid() != 0, "root without mount: no way to make a read-only folder"
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    folder.chmod(0o755)


def test_a_read_only_out_is_a_named_error(models, read_only):
    result = _invoke(_search(models, read_only / "run", 3))
    _assert_refused(result, "RunDirectoryError", f"cannot write {read_only / 'run'}",
                    "choose an --out folder you can write to")  # fmt: skip


@pytest.mark.parametrize("command", ["search", "suggest", "segment --features", "baselines"])
def test_a_missing_data_file_is_refused_before_the_heavy_imports(models, tmp_path, command):
    """The cheap checks import no torch: a subprocess shows it (this process has torch)."""
    missing = tmp_path / "nowhere.jsonl"
    arguments = _search(models, tmp_path / "run", 3)
    arguments[arguments.index(f"arith={models['data'] / 'arith-validation.jsonl'}")] = (
        f"arith={missing}"
    )
    if command != "search":  # the same models, base and data; only search's own options go
        arguments = command.split() + arguments[1 : arguments.index("--out")]
        arguments += {"suggest": ["--out", str(tmp_path / "s.yaml")],
                      "baselines": ["--out", str(tmp_path / "b")]}.get(command, [])  # fmt: skip
    probe = (
        "import sys\nfrom automerge_mk.cli import main\ntry:\n    main()\nfinally:\n"
        "    print('heavy:', sorted(m for m in ('torch', 'transformers', 'mergekit', 'smac') "
        "if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *arguments], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 1 and f"{missing} does not exist" in result.stderr
    assert "heavy: []" in result.stderr, result.stderr
