"""Task metrics beside the loss: prompt/label data, label accuracy, user metric callables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.cli import main
from automerge_mk.errors import DataError, SettingsError
from automerge_mk.evaluate import (
    Metric,
    TaskData,
    error_free_references,
    load_rows,
    parse_metric,
    score_task,
    tokenize_task,
    with_preservation,
)
from automerge_mk.types import TaskScore

METRIC_FILE = '''
import torch


def label_probability(model, tokenizer, rows):
    """Mean probability of each row's label right after its prompt (first token)."""
    total = 0.0
    for row in rows:
        ids = tokenizer(row["prompt"] + " " + row["label"], return_tensors="pt")["input_ids"]
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device)).logits[0, prompt - 1].float()
        total += logits.softmax(-1)[ids[0, prompt]].item()
    return total / len(rows)


def broken(model, tokenizer, rows):
    raise KeyError("no such column")
'''


def _labelled_file(source: Path, out: Path, limit: int | None = None) -> Path:
    """Demo texts "A = B" as prompt/label rows: prompt "A =", label "B"."""
    rows = []
    for line in source.read_text().splitlines()[:limit]:
        prompt, label = json.loads(line)["text"].split(" = ")
        rows.append({"prompt": f"{prompt} =", "label": label, "extra": len(rows)})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def labelled(demo_models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("labelled")
    return {
        # Answers are single number tokens: label accuracy comes from the loss pass.
        "arith": _labelled_file(demo_models.validation["arith"], folder / "arith.jsonl"),
        # Answers are letter sequences: every label is scored as its own sequence.
        "reverse": _labelled_file(
            demo_models.validation["reverse"], folder / "reverse.jsonl", limit=12
        ),
    }


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    return AutoTokenizer.from_pretrained(str(demo_models.base))


def _brute_force(model, tokenizer, rows) -> tuple[float, float, int]:
    """Label accuracy, mean label-token loss and label-token count, one sequence at a time."""
    labels = sorted({r["label"] for r in rows})
    hits, loss, count = 0, 0.0, 0
    for row in rows:
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        loglik = {}
        for label in labels:
            ids = tokenizer(f"{row['prompt']} {label}", return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            positions = range(prompt, ids.shape[1])
            loglik[label] = sum(logp[p - 1, ids[0, p]].item() for p in positions)
            if label == row["label"]:
                loss -= loglik[label]
                count += len(positions)
        hits += max(loglik, key=loglik.get) == row["label"]
    return hits / len(rows), loss / count, count


@pytest.mark.parametrize("task", ["arith", "reverse"])
def test_label_accuracy_and_loss_match_scoring_each_label_alone(
    task, labelled, demo_models, tokenizer
):
    rows = load_rows(labelled[task])
    data = tokenize_task(task, rows, tokenizer, max_length=512)
    assert bool(data.label_tokens) == (task == "arith")  # fast path only for one-token labels
    model = AutoModelForCausalLM.from_pretrained(str(demo_models.specialists[task]))
    score = score_task(model, data, batch_tokens=64)
    accuracy, loss, count = _brute_force(model, tokenizer, rows)
    assert score.metrics["label_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert score.tokens == count  # the prompt's tokens are not scored
    assert score.loss == pytest.approx(loss, rel=1e-5)


def test_each_specialist_has_the_better_label_accuracy_on_its_task(
    labelled, demo_models, tokenizer
):
    data = tokenize_task("arith", load_rows(labelled["arith"]), tokenizer, max_length=512)
    accuracy = {
        name: score_task(AutoModelForCausalLM.from_pretrained(str(path)), data).metrics
        for name, path in demo_models.specialists.items()
    }
    assert accuracy["arith"]["label_accuracy"] > accuracy["reverse"]["label_accuracy"]


def test_metric_specs_are_checked_when_parsed(tmp_path):
    assert parse_metric("label_accuracy").function is None
    file = tmp_path / "metrics.py"
    file.write_text(METRIC_FILE)
    metric = parse_metric(f"prob={file}:label_probability:min")
    assert metric.name == "prob" and metric.lower_is_better and callable(metric.function)
    for spec, message in [
        ("accuracy", "NAME=module:function"),
        ("x=no_such_module_here:f", "cannot import no_such_module_here"),
        ("x=json:no_such_function", "has no function 'no_such_function'"),
        (f"x={tmp_path / 'missing.py'}:f", "cannot import"),
        ("label_accuracy=json:dumps", "built-in metric"),
    ]:
        with pytest.raises(SettingsError, match=message):
            parse_metric(spec)


def _baselines(demo_models, labelled, out: Path, *extra: str):
    names = list(demo_models.specialists)
    arguments = ["baselines", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), *extra]
    for name in names:
        arguments += ["--data", f"{name}={labelled[name]}"]
    return CliRunner().invoke(main, arguments)


def test_user_metric_gives_pr_in_baselines_and_sources(demo_models, labelled, tmp_path):
    file = tmp_path / "metrics.py"
    file.write_text(METRIC_FILE)
    out = tmp_path / "b"
    result = _baselines(demo_models, labelled, out, "--metric", f"prob={file}:label_probability")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "prob" in result.output and "PD" in result.output
    sources = json.loads((out / "sources.json").read_text())
    baselines = json.loads((out / "baselines.json").read_text())
    for scored in baselines.values():
        for task, score in scored["tasks"].items():
            own = sources[task]["tasks"][task]["metrics"]["prob"]
            assert score["rate_metric"] == "prob"
            assert "label_accuracy" in score["metrics"]  # computed beside the user metric
            assert score["rate"] == pytest.approx(score["metrics"]["prob"] / own)
        rates = [s["rate"] for s in scored["tasks"].values()]
        assert scored["pd"] == pytest.approx(max(rates) - min(rates))
    # The metric depends on the model: the specialists differ on their own task.
    assert sources["arith"]["tasks"]["arith"]["metrics"]["prob"] != pytest.approx(
        sources["reverse"]["tasks"]["arith"]["metrics"]["prob"]
    )


def test_search_records_label_accuracy_and_pr_per_trial(demo_models, labelled, tmp_path):
    names = list(demo_models.specialists)
    out = tmp_path / "run"
    arguments = ["search", *(str(demo_models.specialists[n]) for n in names)]
    arguments += ["--base", str(demo_models.base), "--out", str(out), "--quiet"]
    arguments += ["--trials", "3", "--initial", "2", "--methods", "linear,task_arithmetic"]
    for name in names:
        arguments += ["--data", f"{name}={labelled[name]}"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    sources = json.loads((out / "sources.json").read_text())
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    full = [t for t in trials if not t["partial"]]  # a raced trial stopped early has no PR
    assert full
    for trial in full:
        for task, score in trial["tasks"].items():
            own = sources[task]["tasks"][task]["metrics"]["label_accuracy"]
            assert score["rate_metric"] == "label_accuracy"
            assert score["rate"] == pytest.approx(score["metrics"]["label_accuracy"] / own)
    final = json.loads((out / "final.json").read_text())
    assert final["pd"] is not None
    summary = (out / "summary.md").read_text()
    assert "| arith label_accuracy | arith PR |" in summary
    # A task whose specialist labels every example right is named, on screen and in the summary.
    for task in names:
        perfect = sources[task]["tasks"][task]["metrics"]["label_accuracy"] == 1.0
        named = f"{task}: its specialist labels all" in summary
        assert named == perfect
        assert (f"{task}: its specialist labels all" in result.output) == perfect


def test_a_reference_without_a_label_error_is_named_with_what_would_make_ap_sound():
    def task(name: str, examples: int) -> TaskData:
        return TaskData(name=name, sequences=((1, 2),) * examples, pad_id=0,
                        indices=tuple(range(examples)))  # fmt: skip

    def score(loss: float, **metrics: float) -> TaskScore:
        return TaskScore(loss=loss, accuracy=0.5, tokens=100, metrics=metrics)

    references = {
        "langid": score(0.022, label_accuracy=1.0),  # no error among its 100 examples
        "digits": score(0.26, label_accuracy=0.9),
        "texts": score(2.1),  # plain texts: no label accuracy
    }
    tasks = [task("langid", 100), task("digits", 100), task("texts", 50)]
    (warning,) = error_free_references(references, tasks)
    assert warning.startswith("langid: its specialist labels all 100 validation examples right")
    assert "(0.022)" in warning and "up to 3% of them" in warning
    assert "A few hundred langid examples" in warning
    assert error_free_references(references | {"langid": score(0.03, label_accuracy=0.99)},
                                 tasks) == []  # fmt: skip


@pytest.mark.parametrize(
    "spec, message",
    [
        ("x=no_such_module_here:f", "cannot import no_such_module_here"),
        ("label_accuracy", "needs prompt/label data"),
    ],
)
def test_bad_metric_fails_before_the_run_directory_exists(demo_models, tmp_path, spec, message):
    out = tmp_path / "b"
    texts = {n: demo_models.validation[n] for n in demo_models.specialists}
    result = _baselines(demo_models, texts, out, "--metric", spec)
    assert result.exit_code == 1 and message in result.output
    assert not out.exists()


def test_failing_user_metric_is_named(demo_models, labelled, tmp_path):
    file = tmp_path / "metrics.py"
    file.write_text(METRIC_FILE)
    result = _baselines(demo_models, labelled, tmp_path / "b", "--metric", f"x={file}:broken")
    assert result.exit_code == 1
    assert "metric 'x' failed on task" in result.output and "no such column" in result.output


def test_one_pass_label_accuracy_equals_scoring_every_label(labelled, demo_models, tokenizer):
    rows = load_rows(labelled["arith"])
    fast = tokenize_task("arith", rows, tokenizer, max_length=512)
    slow = tokenize_task("arith", rows, tokenizer, max_length=512, one_pass=False)
    assert fast.label_tokens and slow.candidates and not slow.label_tokens
    for path in demo_models.specialists.values():
        model = AutoModelForCausalLM.from_pretrained(str(path))
        one, every = score_task(model, fast), score_task(model, slow)
        assert one.metrics == every.metrics and one.loss == pytest.approx(every.loss, rel=1e-6)


def test_long_prompts_lose_prompt_tokens_never_the_label_or_bos(labelled, demo_models, tokenizer):
    rows = [r | {"prompt": "1 + " * 12 + r["prompt"]} for r in load_rows(labelled["arith"])]
    task = tokenize_task("arith", rows, tokenizer, max_length=10, one_pass=False)
    bos = tokenizer.bos_token_id
    for sequence, start, answer in zip(task.sequences, task.starts, task.answers):
        assert len(sequence) == 10 and sequence[0] == bos and start == 9
        assert tokenizer.decode(sequence[start:]).strip() == task.labels[answer]
    for options in task.candidates:  # every label is compared on the same context
        assert len({ids[:-1] for ids, _ in options}) == 1
    model = AutoModelForCausalLM.from_pretrained(str(demo_models.specialists["arith"]))
    assert 0.0 <= score_task(model, task).metrics["label_accuracy"] <= 1.0


def test_label_columns_are_checked_and_cleaned(tmp_path):
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"prompt": "a", "label": 1}\n{"prompt": "b", "label": 2}\n')
    assert [r["label"] for r in load_rows(numbers)] == ["1", "2"]
    for name, text, message in [
        ("missing", '{"prompt": "a", "label": 1}\n{"prompt": "b", "label": null}\n', "no label"),
        ("one", '{"prompt": "a", "label": "x"}\n{"prompt": "b", "label": " x"}\n', "two distinct"),
        ("mixed", '{"text": "a b"}\n{"prompt": "b", "label": "x"}\n', "mixes texts"),
    ]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            load_rows(path)


def test_pr_of_a_lower_is_better_metric_is_inverted_and_undefined_when_not_positive():
    lower = Metric("error", lambda *_: 0.0, lower_is_better=True)
    mine = {"t": TaskScore(loss=2.0, accuracy=0.5, tokens=4, metrics={"error": 0.4})}
    theirs = {"t": TaskScore(loss=1.0, accuracy=0.5, tokens=4, metrics={"error": 0.2})}
    scores, harmonic = with_preservation(mine, theirs, (lower,))
    assert scores["t"].rate == pytest.approx(0.5) and scores["t"].rate_metric == "error"
    assert harmonic == pytest.approx(0.5)  # AP = 1.0 / 2.0
    negative = {"t": theirs["t"].model_copy(update={"metrics": {"error": -1.0}})}
    assert with_preservation(mine, negative, (Metric("error"),))[0]["t"].rate is None
