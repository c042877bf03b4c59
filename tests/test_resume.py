"""Resume: a search killed with SIGKILL continues with no finished trial lost or repeated."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import DEMO_TRIALS, demo_search_arguments

from automerge_mk.cli import main

KILL_AFTER = 8  # finished trials


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_search_resumes_without_losing_or_repeating_a_trial(demo_models, demo_run, tmp_path):
    out = tmp_path / "run"
    trials = out / "trials.jsonl"
    command = [sys.executable, "-c", "from automerge_mk.cli import main; main()"]
    # The same search as the `demo_run` fixture, in another folder, in the dtype it scored in:
    # --eval-dtype auto times both on the tiny demo model, and on a loaded CPU (0.040 s each)
    # another process may choose the other one, whose scores steer the search elsewhere.
    dtype = json.loads((demo_run / "memory.json").read_text())["eval_dtype"]
    arguments = demo_search_arguments(demo_models, out) + ["--eval-dtype", dtype]
    process = subprocess.Popen(command + arguments)
    deadline = time.monotonic() + 600
    while not (trials.exists() and trials.read_text().count("\n") >= KILL_AFTER):
        assert process.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _lines(trials)
    assert KILL_AFTER <= len(before) < DEMO_TRIALS
    assert not (out / "best.json").exists()
    with trials.open("a") as handle:  # as if the kill had torn the next line mid-write
        handle.write(json.dumps({"trial": len(before), "status": "ok", "config": {}})[:-9])

    result = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    after = _lines(trials)
    assert [t["trial"] for t in after] == list(range(DEMO_TRIALS))  # each exactly once
    assert after[: len(before)] == before  # finished trials kept as they were, not rerun
    uninterrupted = _lines(demo_run / "trials.jsonl")
    # The replayed optimiser went on exactly as the uninterrupted search did.
    assert [t["config"] for t in after] == [t["config"] for t in uninterrupted]
    assert [t["harmonic_mean"] for t in after] == [t["harmonic_mean"] for t in uninterrupted]
    for name in ["best.json", "recipe.yaml", "final.json", "summary.md", "model/config.json"]:
        assert (out / name).exists(), name


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["search", "--resume", str(tmp_path)])
    assert result.exit_code == 1 and "not an automerge-mk run directory" in result.output


def test_resume_takes_no_models(tmp_path):
    result = CliRunner().invoke(main, ["search", "a", "b", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "--resume takes the models and data" in result.output


FIXTURE = Path(__file__).parent / "fixtures" / "run-before-fingerprints"


def test_a_run_written_before_the_redesign_still_resumes(demo_models, tmp_path, monkeypatch):
    """settings.json and two trials as the main branch wrote them at 6049ef5 (no marker, no
    fingerprints, data paths relative to where the search was started), on the demo models."""
    out = tmp_path / "run"
    out.mkdir()
    settings = (FIXTURE / "settings.json").read_text()
    (out / "settings.json").write_text(settings.replace("{MODELS}", str(demo_models.base.parent)))
    (out / "trials.jsonl").write_text((FIXTURE / "trials.jsonl").read_text())
    before = _lines(out / "trials.jsonl")
    started_in = tmp_path / "where-it-was-started"
    started_in.mkdir()
    (started_in / "models").symlink_to(demo_models.base.parent, target_is_directory=True)
    monkeypatch.chdir(started_in)

    result = CliRunner().invoke(main, ["search", "--resume", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    after = _lines(out / "trials.jsonl")
    assert [t["trial"] for t in after] == [0, 1, 2] and after[:2] == before
    assert (out / "model" / "config.json").is_file() and (out / "summary.md").is_file()
    # Nothing was recorded to compare; from now on the run records its inputs' fingerprints.
    assert "from before input fingerprints" in result.output
    recorded = json.loads((out / "settings.json").read_text())["fingerprints"]
    assert set(recorded["models"]) == set(recorded["data"]) == {"arith", "reverse"}
    assert (out / "automerge-mk-run.json").is_file()
    # It went on in its own space (automerge-mk 0.1's convex one, no baselines first), which
    # settings.json now names, so a later resume stays there too.
    assert ":weight" in "".join(after[2]["config"]) and ":mix" not in "".join(after[2]["config"])
    written = json.loads((out / "settings.json").read_text())["settings"]
    assert written["weighting"] == "convex" and written["baselines_first"] is False


def test_eval_dtype_auto_is_chosen_once_and_a_resumed_run_keeps_it(demo_models, tmp_path):
    from automerge_mk import pipeline
    from automerge_mk.settings import SearchSettings

    names = list(demo_models.specialists)
    request = pipeline.MergeRequest([str(demo_models.specialists[n]) for n in names],
                                    str(demo_models.base),
                                    {n: str(demo_models.validation[n]) for n in names})  # fmt: skip
    settings = SearchSettings(trials=2, initial=1, device="cpu")
    assert settings.eval_dtype == "auto"
    out = tmp_path / "run"
    session = pipeline.open_session(request, settings, out, overwrite=False)
    session.run.release()
    chosen = json.loads((out / "memory.json").read_text())["eval_dtype"]
    assert chosen in ("float32", "bfloat16")
    assert str(session.engine.model.dtype) == f"torch.{chosen}"
    # As if the first start had found bfloat16 faster: a resumed run scores in it too.
    memory = json.loads((out / "memory.json").read_text())
    (out / "memory.json").write_text(json.dumps(memory | {"eval_dtype": "bfloat16"}))
    resumed = pipeline.open_session(request, settings, out, overwrite=False, resume=True)
    resumed.run.release()
    assert resumed.engine.model.dtype == torch.bfloat16
    assert resumed.settings.eval_dtype == "bfloat16"  # what workers are given
    assert json.loads((out / "memory.json").read_text())["eval_dtype"] == "bfloat16"
