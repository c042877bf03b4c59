"""Faults during a search: damaged weights, trials that run out of memory, Ctrl-C, a full disk.

Each test checks that nothing finished is lost and that the error says what to do next.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import short_search_arguments

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.errors import StorageError
from automerge_mk.rundir import RunDir, check_space
from automerge_mk.types import TrialResult
from automerge_mk.weights import model_bytes

CLI = [sys.executable, "-c", "from automerge_mk.cli import main; main()"]


def _trials(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _wait_for_trials(process: subprocess.Popen, out: Path, count: int) -> None:
    deadline = time.monotonic() + 600
    trials = out / "trials.jsonl"
    while not (trials.exists() and trials.read_text().count("\n") >= count):
        assert process.poll() is None, "the search ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE: writes past `limit` bytes fail with EFBIG, as on a full disk (Python
    ignores SIGXFSZ, so the write raises instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# --- damaged weights ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: os.urandom(len(data)), id="garbage"),
    ],
)
def test_damaged_shard_is_named_before_anything_is_written(demo_models, tmp_path, damage):
    folder = shutil.copytree(demo_models.specialists["arith"], tmp_path / "copy" / "arith")
    shard = folder / "model.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    out = tmp_path / "run"
    arguments = short_search_arguments(demo_models, out, 3, folders={"arith": folder})
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 1, result.output
    assert "damaged or truncated weights file" in result.output and str(shard) in result.output
    assert not out.exists()


# --- a trial that fails ------------------------------------------------------------------


def test_a_trial_out_of_memory_fails_alone_and_the_search_goes_on(
    demo_models, tmp_path, monkeypatch
):
    """GPU and host memory are a boundary CI cannot exhaust on purpose: the engine's merge
    raises torch's own OutOfMemoryError on one trial and Python's MemoryError on another,
    exactly where a real allocation failure surfaces."""
    merge = MergeEngine.merge_into_model
    faults = {1: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
              3: MemoryError("cannot allocate")}  # fmt: skip
    calls = []

    def merge_or_fail(self, plan):
        calls.append(plan)
        if len(calls) - 1 in faults:
            raise faults[len(calls) - 1]
        return merge(self, plan)

    monkeypatch.setattr(MergeEngine, "merge_into_model", merge_or_fail)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, short_search_arguments(demo_models, out, 6))
    assert result.exit_code == 0, result.output + repr(result.exception)
    trials = _trials(out)
    assert [t["status"] for t in trials] == ["ok", "failed", "ok", "failed", "ok", "ok"]
    assert "OutOfMemoryError" in trials[1]["error"] and "MemoryError" in trials[3]["error"]
    assert trials[1]["cost"] == 1.0  # the worst cost: the optimiser steers away from it
    assert (out / "model" / "config.json").is_file()


# --- Ctrl-C ------------------------------------------------------------------------------


# Trials of the interrupted searches. A demo trial takes about 0.3 s: with 12, a CI run whose
# polling test process was descheduled (two pytest-xdist workers and Dask workers on 2 cores)
# saw the search end before the signal was sent. 30 leave it 27 trials (8 s or more).
TRIALS = 30


def _stop_search(demo_models, out: Path, trials: int, number: signal.Signals) -> str:
    """Start a search, send it the signal `number` once 3 trials are finished, and return its
    stderr once it has exited with 128 + `number`, the shell's convention."""
    process = subprocess.Popen(
        CLI + short_search_arguments(demo_models, out, trials),
        stderr=subprocess.PIPE,
        text=True,
        # Default actions, even when this test runs where SIGINT is ignored (e.g. under `&`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_trials(process, out, 3)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + number, stderr
    assert "Traceback" not in stderr
    return stderr


def test_ctrl_c_stops_with_every_finished_trial_saved_and_resume_finishes(demo_models, tmp_path):
    out = tmp_path / "run"
    stderr = _stop_search(demo_models, out, TRIALS, signal.SIGINT)
    before = _trials(out)
    assert 3 <= len(before) < TRIALS
    assert f"Interrupted: {len(before)} finished trials are saved" in stderr
    assert f"automerge-mk search --resume {out}" in stderr

    result = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    after = _trials(out)
    assert [t["trial"] for t in after] == list(range(TRIALS))
    assert after[: len(before)] == before  # kept as they were, not evaluated again
    assert (out / "model" / "config.json").is_file() and (out / "summary.md").is_file()


def test_sigterm_stops_like_ctrl_c(demo_models, tmp_path):
    """What SLURM sends at the time limit, before it kills."""
    out = tmp_path / "run"
    stderr = _stop_search(demo_models, out, TRIALS, signal.SIGTERM)
    saved = _trials(out)
    assert f"Interrupted: {len(saved)} finished trials are saved" in stderr
    assert f"automerge-mk search --resume {out}" in stderr
    assert 3 <= len(saved) < TRIALS and [t["trial"] for t in saved] == list(range(len(saved)))


def test_ctrl_c_during_the_model_build_leaves_no_partial_model(demo_models, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        CLI + short_search_arguments(demo_models, out, 2),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600
    while not (out / "model.partial").exists():  # mergekit is writing the model
        assert process.poll() is None, "the build ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Interrupted: 2 finished trials are saved" in stderr and "Traceback" not in stderr
    assert not (out / "model.partial").exists() and not (out / "model").exists()
    assert len(_trials(out)) == 2 and (out / "recipe.yaml").is_file()  # --resume builds it


# --- a full disk -------------------------------------------------------------------------


def test_full_disk_during_the_model_write_leaves_no_model_and_resume_builds_it(
    demo_models, tmp_path
):
    out = tmp_path / "run"
    model_bytes = (demo_models.base / "model.safetensors").stat().st_size
    limit = model_bytes // 2  # the run's own files are far smaller; the model is not
    result = subprocess.run(
        CLI + short_search_arguments(demo_models, out, 3),
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 1, result.stderr
    assert "StorageError: out of disk space while mergekit wrote the model" in result.stderr
    assert f"automerge-mk search --resume {out}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "model").exists() and not (out / "model.partial").exists()
    finished = _trials(out)
    assert len(finished) == 3 and (out / "recipe.yaml").is_file() and (out / "best.json").is_file()

    resumed = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert _trials(out) == finished  # nothing evaluated again
    assert (out / "model" / "model.safetensors").stat().st_size >= model_bytes // 2
    final = json.loads((out / "final.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert final["harmonic_mean"] == pytest.approx(best["harmonic_mean"], abs=1e-5)


def test_a_run_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StorageError, match="GiB free; the run needs about"):
        check_space(tmp_path / "new" / "run", needed=free + 2**40)
    check_space(tmp_path / "new" / "run", needed=free + 2**40, freed=2**41)  # --overwrite frees


def test_the_space_check_sizes_the_model_in_the_merge_dtype(demo_models):
    size = (demo_models.base / "model.safetensors").stat().st_size
    assert model_bytes(demo_models.base, "float32", "float32") == size
    assert model_bytes(demo_models.base, "float32", "bfloat16") == size // 2
    assert model_bytes(demo_models.base, "no-such-dtype", "bfloat16") == size


def test_a_write_that_fails_keeps_the_previous_file(tmp_path):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    run.write_text("best.json", "previous\n")
    with file_size_limit(1024), pytest.raises(StorageError, match="no space left to write"):
        run.write_text("best.json", "x" * 4096)
    assert (run.path / "best.json").read_text() == "previous\n"
    assert not list(run.path.glob("*.tmp"))


def test_a_trial_append_that_fails_keeps_the_earlier_trials(tmp_path):
    run = RunDir.create(tmp_path / "run", overwrite=False)
    run.write_json("settings.json", {})  # what makes it a run directory for reopen
    trial = TrialResult(
        trial=0, status="ok", config={"x": 1}, cost=0.5, harmonic_mean=0.5, tasks={}, seconds={}
    )
    run.append_trial(trial)
    limit = (run.path / "trials.jsonl").stat().st_size + 10
    big = trial.model_copy(update={"trial": 1, "error": "y" * 4096})
    with file_size_limit(limit), pytest.raises(StorageError, match="trials.jsonl"):
        run.append_trial(big)
    assert RunDir.reopen(run.path).trials() == [trial]  # the torn line is cut off
