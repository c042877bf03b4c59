"""--eval lm-eval: lm-evaluation-harness tasks scored beside the loss objective, offline.

The harness's own tasks download their datasets from the Hub, which tests cannot reach; the
tasks here are the user's own task YAMLs (`--eval-arg include_path=...`) over the demo's local
validation files, scored by the real harness on the real in-memory merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from automerge_mk.cli import main
from automerge_mk.space import BASELINES

TASK = """task: demo_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def tasks(demo_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, path in demo_models.validation.items():
        (folder / f"demo_{name}.yaml").write_text(TASK.format(name=name, path=path))
    return folder


def _search(demo_models, out: Path, *extra: str):
    names = list(demo_models.specialists)
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet"]
    arguments += ["--trials", "3", "--initial", "3", "--seed", "0", *extra]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    return CliRunner().invoke(main, arguments)


@pytest.fixture(scope="module")
def eval_run(demo_models, tasks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-eval") / "run"
    # Racing off: every trial scored on every example, so every one gets the harness's scores
    # (a trial racing stops is not scored by the harness: search/objective.py).
    result = _search(demo_models, out, "--eval", "lm-eval:demo_arith,demo_reverse",
                     "--eval-arg", f"include_path={tasks}", "--eval-arg", "limit=12",
                     "--no-racing")  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_every_trial_sources_baselines_and_final_model_get_the_harness_scores(eval_run):
    keys = {f"demo_{t}/{m}" for t in ("arith", "reverse") for m in ("word_perplexity",
                                                                    "bits_per_byte")}  # fmt: skip
    trials = [json.loads(line) for line in (eval_run / "trials.jsonl").read_text().splitlines()]
    assert all(set(t["evals"]) == keys for t in trials)
    evals = json.loads((eval_run / "evals.json").read_text())
    assert {"search (best trial)", "model/ (stock mergekit)", "arith alone", "reverse alone"} <= (
        set(evals)
    )
    assert sum(label.startswith("baseline: ") for label in evals) == len(BASELINES)
    assert all(set(scores) == keys for scores in evals.values())
    # Each specialist models its own task's texts better than the other specialist does.
    for task, other in (("arith", "reverse"), ("reverse", "arith")):
        key = f"demo_{task}/bits_per_byte"
        assert evals[f"{task} alone"][key] < evals[f"{other} alone"][key]
    # The stock mergekit build is the best trial's merge: the harness agrees with itself.
    best, built = evals["search (best trial)"], evals["model/ (stock mergekit)"]
    assert built == pytest.approx(best, rel=1e-4)
    assert len({t["evals"]["demo_arith/bits_per_byte"] for t in trials}) > 1  # merges differ
    summary = (eval_run / "summary.md").read_text()
    assert "## Evaluation plug-ins (--eval)" in summary and "demo_arith/bits_per_byte" in summary


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval", "lm-eval:no_such_task_xyz"], "lm-eval has no task 'no_such_task_xyz'"),
        (["--eval", "lm-eval:demo_arith", "--eval-arg", "limt=3"], "did you mean 'limit'?"),
        (["--eval", "helm:mmlu"], "give lm-eval:TASK[,TASK]"),
        (["--eval-arg", "limit=3"], "--eval-arg needs an --eval"),
    ],
)
def test_bad_eval_settings_are_refused_before_anything_is_written(
    demo_models, tasks, tmp_path, extra, message
):
    out = tmp_path / "run"
    result = _search(demo_models, out, "--eval-arg", f"include_path={tasks}", *extra)
    if "--eval-arg needs" in message:
        result = _search(demo_models, out, *extra)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists()
