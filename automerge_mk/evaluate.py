"""Stage 5: validation data, token losses, task metrics and the preservation objective.

AP_i = L_i(S_i) / L_i(merged) for each task i with specialist S_i; the search maximises the
harmonic mean of AP over tasks, which punishes a merge that keeps one task and drops another.
PR_i = metric_i(merged) / metric_i(S_i) reports a real metric beside it: label accuracy for
prompt/label data, next-token accuracy for plain text, or a user callable (`--metric`).
Texts are tokenised once per search and batched by length so few padded positions are computed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import random
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .classify import ClassTask, score_classes
from .errors import DataError, MetricError, SettingsError
from .inputs import ARRAY_FORMATS, DATA_BUILDERS, check_data_file
from .types import BUILT_IN_METRICS, TaskScore, harmonic_mean


class TaskData(BaseModel):
    """One task's tokenised validation sequences.

    Plain texts score every token (`starts` are 1). Prompt/label examples are scored on the
    label's tokens only (`starts` = where the label begins), and carry what label accuracy
    needs: the label set, each example's answer, and either each label's single token (when
    every label is one token after every prompt: the accuracy then comes free from the loss
    pass) or every example's candidate sequences (prompt + each label).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    sequences: tuple[tuple[int, ...], ...]
    pad_id: int
    indices: tuple[int, ...]  # which of the task's rows the sequences come from
    starts: tuple[int, ...] = ()  # first scored position per sequence; empty: all 1
    rows: tuple[dict[str, Any], ...] = ()  # the rows themselves, for user metrics
    labels: tuple[str, ...] = ()  # the label set of a prompt/label task
    answers: tuple[int, ...] = ()  # index into `labels` per sequence
    label_tokens: tuple[int, ...] = ()  # one token per label, when that suffices
    candidates: tuple[tuple[tuple[tuple[int, ...], int], ...], ...] = ()  # (ids, start) per label

    @property
    def tokens(self) -> int:
        """Scored positions: each sequence predicts its tokens from its start on."""
        return sum(self.example_tokens)

    @property
    def example_tokens(self) -> tuple[int, ...]:
        """Scored positions of each example."""
        starts = self.starts or (1,) * len(self.sequences)
        return tuple(len(s) - b for s, b in zip(self.sequences, starts))

    @property
    def computed_tokens(self) -> int:
        """Positions a forward pass computes (what `--eval-tokens` budgets), candidates included."""
        if self.candidates:
            return sum(len(ids) for options in self.candidates for ids, _ in options)
        return sum(len(s) for s in self.sequences)


class Metric(NamedTuple):
    """A task metric for PR: built in (`function` None) or `function(model, tokenizer, rows)`."""

    name: str
    function: Callable[..., float] | None = None
    lower_is_better: bool = False


def parse_metric(spec: str) -> Metric:
    """A `--metric` value -> Metric, importing the user's function now (before any work).

    Raises:
        SettingsError: for a malformed spec, a module that cannot be imported, or a missing
            or non-callable function.
    """
    if spec in BUILT_IN_METRICS:
        return Metric(spec)
    name, _, target = spec.partition("=")
    lower = target.endswith(":min")
    target = target.removesuffix(":min").removesuffix(":max")
    module_name, _, attribute = target.rpartition(":")
    if not (name.isidentifier() and module_name and attribute):
        raise SettingsError(
            f"--metric {spec!r}: give NAME=module:function (or NAME=file.py:function), "
            f"or one of {', '.join(BUILT_IN_METRICS)}"
        )
    if name in BUILT_IN_METRICS:
        raise SettingsError(f"--metric {spec!r}: {name!r} is a built-in metric's name")
    try:
        if module_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec_ is None or spec_.loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's to fix
        raise SettingsError(
            f"--metric {spec!r}: cannot import {module_name}: {type(error).__name__}: {error}"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise SettingsError(f"--metric {spec!r}: {module_name} has no function {attribute!r}")
    return Metric(name, function, lower)


def load_rows(path: Path, text_column: str = "text") -> list[dict[str, Any]]:
    """Load a task's examples with `datasets` (jsonl/json/csv/parquet/txt).

    A row is a plain text (`text_column`) or a prompt/label pair (columns `prompt` and `label`,
    scored as prompt + " " + label). Rows keep all their columns, for user metrics.

    Raises:
        DataError: when the file is missing, unreadable, empty or has neither kind of column.
    """
    import datasets  # deferred: importing datasets costs seconds and only searches need it

    check_data_file(path)
    if path.suffix.lower() in ARRAY_FORMATS:
        raise DataError(
            f"{path} is an image task (.npz): it goes with raw PyTorch models (module.json); "
            "give a causal LM texts or prompt/label rows (jsonl, json, csv, parquet, txt)"
        )
    builder = DATA_BUILDERS[path.suffix.lower()]
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise DataError(f"cannot read data file {path}: {error}") from error
    column = "text" if builder == "text" else text_column
    columns = dataset.column_names
    if column in columns:
        rows = [r for r in dataset if isinstance(r[column], str) and r[column].strip()]
        _note_left_out(path, len(dataset) - len(rows), f"no text in column {column!r}")
        if "prompt" in columns and any(r[column] is None and r["prompt"] for r in dataset):
            raise DataError(
                f"{path} mixes texts (column {column!r}) and prompt/label rows: use one kind"
            )
        rows = [r | {"text": r[column]} for r in rows]
    elif {"prompt", "label"} <= set(columns):
        rows = [_labelled_row(r, dataset.features["label"], path) for r in dataset]
        rows = [r for r in rows if r["prompt"].strip()]
        _note_left_out(path, len(dataset) - len(rows), "an empty prompt")
    else:
        raise DataError(
            f"{path} has no column {column!r} and no prompt/label columns; its columns are "
            f"{columns}: pass --text-column, or give prompt and label columns"
        )
    if not rows:
        kind = f"text in column {column!r}" if column in columns else "prompt/label example"
        raise DataError(f"data file {path} has no non-empty {kind}")
    if "label" in rows[0] and "text" not in rows[0] and len({r["label"] for r in rows}) < 2:
        raise DataError(f"{path}: prompt/label data needs at least two distinct labels")
    return rows


def _note_left_out(path: Path, count: int, why: str) -> None:
    if count:
        logging.getLogger("automerge_mk").warning(
            "%s: %d row(s) with %s (null, blank or not a string) are left out", path, count, why
        )


def _labelled_row(row: dict[str, Any], feature, path: Path) -> dict[str, Any]:
    """A prompt/label row with its label as a clean string (class names for ClassLabel)."""
    label, prompt = row["label"], row["prompt"]
    if label is None or (isinstance(label, float) and math.isnan(label)) or prompt is None:
        raise DataError(f"{path}: a row has no prompt or no label: {row}")
    if hasattr(feature, "int2str"):
        label = feature.int2str(label)
    elif isinstance(label, float) and label.is_integer():
        label = int(label)  # a numeric column with gaps is read as floats
    label = str(label).strip()
    if not label:
        raise DataError(f"{path}: a row has an empty label: {row}")
    row = {k: v for k, v in row.items() if k != "text"}  # "text" marks plain-text rows
    return row | {"prompt": str(prompt), "label": label}


def load_texts(path: Path, text_column: str = "text") -> list[str]:
    """The texts of a plain-text data file (see `load_rows`)."""
    rows = load_rows(path, text_column)
    if "text" not in rows[0]:
        raise DataError(f"{path} holds prompt/label examples, not texts")
    return [r["text"] for r in rows]


MAX_LABELS = 64  # more distinct labels: free-form completions, scored by loss only
BATCH_TOKENS = 4096  # padded positions per forward pass
CHUNK_ROWS = 1024  # scored positions per vocabulary projection


def _label_start(prompt: list[int], full: list[int]) -> int:
    """Where the label's tokens start in prompt + label (the first token that differs)."""
    return next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))


def _candidates(
    prompt: list[int], fulls: list[list[int]], max_length: int
) -> tuple[tuple[tuple[int, ...], int], ...] | None:
    """(ids, label start) per label, within `max_length`; None when a label cannot fit.

    Too long sequences lose prompt tokens after the first one (BOS), by the same count for
    every label, so that all labels are compared on the same context.
    """
    starts = [_label_start(prompt, full) for full in fulls]
    cut = max(0, max(map(len, fulls)) - max_length)
    if cut and cut > min(starts) - 1:
        return None
    return tuple(
        (tuple(full[:1] + full[1 + cut :]), start - cut) for full, start in zip(fulls, starts)
    )


def tokenize_task(
    name: str,
    rows: Sequence[str] | Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    eval_tokens: int | None = None,
    seed: int = 0,
    one_pass: bool = True,
) -> TaskData:
    """Tokenise once; with `eval_tokens`, keep a seeded random subset of about that many tokens.

    `rows` are texts, or rows from `load_rows` (texts or prompt/label pairs). `one_pass=False`
    scores every label as its own sequence even where one pass would do (for checking).

    Raises:
        DataError: when no text yields at least two tokens.
    """
    rows = [{"text": r} if isinstance(r, str) else r for r in rows]
    labelled = "text" not in rows[0]
    if labelled:
        labels = tuple(sorted({r["label"] for r in rows}))
        # A label set is scored in full for label accuracy; free-form answers only by loss.
        scored = labels if len(labels) <= MAX_LABELS else None
        prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
        per_label = {
            label: tokenizer([f"{r['prompt']} {label}" for r in rows])["input_ids"]
            for label in scored or ()
        }
        candidates, encoded = [], []
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            if scored:
                options = _candidates(prompt, [per_label[x][i] for x in labels], max_length)
                answer = options[labels.index(row["label"])] if options else ((), 0)
            else:
                own = tokenizer(f"{row['prompt']} {row['label']}")["input_ids"]
                options = _candidates(prompt, [own], max_length)
                answer = options[0] if options else ((), 0)
            candidates.append(options)
            encoded.append(answer)
        answers = [labels.index(r["label"]) for r in rows]
    else:
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        encoded = [(tuple(s), 1) for s in ids["input_ids"]]
    kept = [i for i, (ids, start) in enumerate(encoded) if len(ids) >= 2 and start < len(ids)]
    if not kept:
        raise DataError(
            f"task {name!r}: no example has two or more tokens"
            + (f" and a label that fits in --max-length {max_length}" if labelled else "")
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    task = {
        "name": name,
        "sequences": tuple(encoded[i][0] for i in kept),
        "starts": tuple(encoded[i][1] for i in kept),
        "pad_id": pad,
        "indices": tuple(kept),
        "rows": tuple(rows[i] for i in kept),
    }
    if labelled and scored:
        chosen = [candidates[i] for i in kept]
        # One forward pass suffices when every label is one token after the same context.
        tokens = {tuple(ids[-1] for ids, _ in options) for options in chosen}
        one_token = len(tokens) == 1 and len(set(next(iter(tokens)))) == len(labels)
        one_token = one_token and all(
            len(ids) - start == 1 and ids[:-1] == options[0][0][:-1]
            for options in chosen
            for ids, start in options
        )
        task |= {"labels": labels, "answers": tuple(answers[i] for i in kept)}
        if one_token and one_pass:
            task["label_tokens"] = next(iter(tokens))
        else:
            task["candidates"] = tuple(chosen)
    return subset_task(TaskData(**task), eval_tokens, seed) if eval_tokens else TaskData(**task)


def retokenize(task: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TaskData:
    """The same examples of a task (its subset, if cut), tokenised with another tokenizer: a
    specialist's own, when the merged model's differs."""
    own = tokenize_task(task.name, list(task.rows), tokenizer, max_length)
    return own.model_copy(update={"indices": tuple(task.indices[i] for i in own.indices)})


def same_examples(task: TaskData, indices: Sequence[int]) -> TaskData:
    """A task cut to the examples (row indices) another tokenisation of it kept."""
    wanted = set(indices)
    chosen = [i for i, index in enumerate(task.indices) if index in wanted]

    def pick(values: tuple) -> tuple:
        return tuple(values[i] for i in chosen) if values else values

    fields = ("sequences", "starts", "indices", "rows", "answers", "candidates")
    return task.model_copy(update={name: pick(getattr(task, name)) for name in fields})


def subset_task(task: TaskData, tokens: int, seed: int = 0) -> TaskData:
    """A seeded random subset of a task's examples of about `tokens` forward-pass positions.

    Examples are taken in one seeded random order until `tokens` is reached (at least one), so
    the subsets of one seed are nested: a smaller budget keeps some of a larger one's examples
    and no others. A budget of the whole task or more returns the task itself.
    """
    if tokens >= task.computed_tokens:
        return task
    order = list(range(len(task.sequences)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for index in order:
        if chosen and total >= tokens:
            break
        chosen.append(index)
        options = task.candidates[index] if task.candidates else ((task.sequences[index], 0),)
        total += sum(len(ids) for ids, _ in options)
    return same_examples(task, [task.indices[i] for i in chosen])


def largest_batch(tasks: Sequence[TaskData], batch_tokens: int = BATCH_TOKENS) -> tuple[int, int]:
    """(padded positions, width) of the largest batch that scoring `tasks` runs, label
    candidates included: what the memory plan sizes activations by."""
    found = (0, 0)
    for task in tasks:
        groups = [task.sequences, [ids for options in task.candidates for ids, _ in options]]
        for lengths in ([len(s) for s in group] for group in groups if group):
            for batch in _batches(lengths, batch_tokens):
                width = lengths[batch[0]]
                found = max(found, (width * len(batch), width))
    return found


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped into batches of similar length."""
    ordered = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in ordered:
        # Sorted by length, the first sequence of a batch is its longest: padding stays small.
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


_HEAD_MATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_can_be_chunked(model: PreTrainedModel) -> bool:
    """Whether logits are exactly the output embedding applied to the last hidden state.

    Checked once per model on a short input: models that scale or soft-cap their logits
    (gemma2, cohere …) fail the check and are scored through their full forward instead.
    """
    if model not in _HEAD_MATCHES:
        head, body = model.get_output_embeddings(), model.base_model
        ok = head is not None and body is not model
        if ok:
            device = next(model.parameters()).device
            ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.config.vocab_size
            full = model(input_ids=ids).logits
            hidden = body(input_ids=ids).last_hidden_state
            ok = torch.equal(full, head(hidden))
        _HEAD_MATCHES[model] = ok
    return _HEAD_MATCHES[model]


class _SequenceScores(NamedTuple):
    loss: torch.Tensor  # summed loss per sequence (float64)
    correct: torch.Tensor  # argmax hits per sequence
    count: torch.Tensor  # scored positions per sequence
    choice: torch.Tensor | None  # per sequence, the best of `label_tokens` at its first position


def _score_sequences(
    model: PreTrainedModel,
    sequences: Sequence[tuple[int, ...]],
    starts: Sequence[int],
    pad_id: int,
    batch_tokens: int,
    chunk_rows: int,
    label_tokens: Sequence[int] = (),
) -> _SequenceScores:
    """Per-sequence loss sums, hits and counts over positions `start..len-1`.

    Batches hold sequences of similar length (few padded positions); the vocabulary
    projection and the loss run over `chunk_rows` scored positions at a time, so the
    full-vocabulary logits of a whole batch never sit in memory at once. Losses are summed in
    float32 whatever the model's dtype.
    """
    device = next(model.parameters()).device
    chunked = _head_can_be_chunked(model)
    n = len(sequences)
    loss = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    choice = torch.zeros(n, dtype=torch.long) if label_tokens else None
    wanted_labels = torch.tensor(label_tokens, device=device) if label_tokens else None
    for batch in _batches([len(s) for s in sequences], batch_tokens):
        width = len(sequences[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for row, index in enumerate(batch):
            sequence = sequences[index]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            scored[row, starts[index] - 1 : len(sequence) - 1] = True  # row p predicts p+1
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        wanted = ids[:, 1:][scored]
        owner = torch.tensor(batch, device=device).unsqueeze(1).expand_as(scored)[scored]
        if chunked:
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, project = hidden[:, :-1][scored], model.get_output_embeddings()
        else:
            rows = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
            project = None
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            logits = (project(part) if project else part).float()
            target = wanted[start : start + chunk_rows]
            who = owner[start : start + chunk_rows].cpu()
            losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            loss.index_add_(0, who, losses.double().cpu())
            correct.index_add_(0, who, (logits.argmax(-1) == target).long().cpu())
            count.index_add_(0, who, torch.ones_like(who))
            if wanted_labels is not None:
                # One scored position per sequence: the label's only token.
                choice[who] = logits[:, wanted_labels].argmax(-1).cpu()
    return _SequenceScores(loss, correct, count, choice)


def _label_accuracy(
    model: PreTrainedModel,
    task: TaskData,
    found: _SequenceScores,
    batch_tokens: int,
    chunk_rows: int,
) -> float:
    """Share of examples whose answer is the label with the highest log-likelihood."""
    answers = torch.tensor(task.answers)
    if task.label_tokens:
        return (found.choice == answers).double().mean().item()
    flat = [option for options in task.candidates for option in options]
    scores = _score_sequences(
        model, [ids for ids, _ in flat], [start for _, start in flat], task.pad_id,
        batch_tokens, chunk_rows,
    )  # fmt: skip
    loglik = -scores.loss.view(len(task.candidates), len(task.labels))
    return (loglik.argmax(-1) == answers).double().mean().item()


@torch.inference_mode()
def score_task(
    model: PreTrainedModel,
    task: TaskData,
    batch_tokens: int = BATCH_TOKENS,
    chunk_rows: int = CHUNK_ROWS,
    metrics: Sequence[Metric] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep_examples: bool = False,
) -> TaskScore:
    """Mean loss and next-token accuracy of `model` over a task's scored tokens, and its metrics.

    Label accuracy is computed for prompt/label tasks; each user metric is called as
    `function(model, tokenizer, rows)` on the task's rows. `keep_examples`: the score carries
    each example's summed loss too (what racing compares). A classification task (classify.py) is
    scored by cross-entropy and top-1 accuracy instead.
    """
    if isinstance(task, ClassTask):
        return score_classes(model, task, keep_examples)
    starts = task.starts or (1,) * len(task.sequences)
    found = _score_sequences(
        model, task.sequences, starts, task.pad_id, batch_tokens, chunk_rows, task.label_tokens
    )
    total = int(found.count.sum())
    values = {}
    if task.answers and (task.label_tokens or task.candidates):
        values["label_accuracy"] = _label_accuracy(model, task, found, batch_tokens, chunk_rows)
    values |= user_metrics(model, task, metrics, tokenizer)
    return TaskScore(
        loss=found.loss.sum().item() / total,
        accuracy=int(found.correct.sum()) / total,
        tokens=total,
        metrics=values,
        example_losses=tuple(found.loss.tolist()) if keep_examples else (),
    )


def user_metrics(
    model: PreTrainedModel,
    task: TaskData,
    metrics: Sequence[Metric],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, float]:
    """The user metrics (`--metric` functions) of a model on a task's rows."""
    return {m.name: _user_metric(m, model, tokenizer, task) for m in metrics if m.function}


def _user_metric(metric: Metric, model, tokenizer, task: TaskData) -> float:
    """Call a user metric; whatever goes wrong becomes a MetricError naming it and the task."""
    try:
        value = float(metric.function(model, tokenizer, list(task.rows)))
    except Exception as error:  # noqa: BLE001 - the user's code may raise anything
        raise MetricError(
            f"metric {metric.name!r} failed on task {task.name!r}: {type(error).__name__}: {error}"
        ) from error
    if not math.isfinite(value):
        raise MetricError(f"metric {metric.name!r} returned {value} on task {task.name!r}")
    return value


def score_model(
    model: PreTrainedModel,
    tasks: list[TaskData],
    metrics: Sequence[Metric] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep_examples: bool = False,
) -> dict[str, TaskScore]:
    """Scores of one model on every task (`keep_examples`: with per-example losses)."""
    return {
        task.name: score_task(
            model, task, metrics=metrics, tokenizer=tokenizer, keep_examples=keep_examples
        )  # fmt: skip
        for task in tasks
    }


def rate_metric(score: TaskScore, metrics: Sequence[Metric] = ()) -> Metric:
    """The metric PR uses for a task: the first `--metric`, else its default."""
    if metrics:
        return metrics[0]
    return Metric("label_accuracy" if "label_accuracy" in score.metrics else "token_accuracy")


def error_free_references(references: Mapping[str, TaskScore], tasks: Sequence) -> list[str]:
    """A warning per task whose specialist labels every validation example right.

    Its loss there is AP's denominator. With no error among n examples it counts none of the
    errors the specialist makes on other data (up to 3/n of them: the rule of three), so a
    merge's few errors weigh far more on that task than they would on new data, and the search
    leans toward it. Seen on scripts/results/space.md's langid-digits pair: langid's
    specialist, error-free on 100 validation examples, had loss 0.022 there and 0.074 on test;
    the search traded digits for langid on validation and lost to task_arithmetic on test.
    """
    out = []
    for task in tasks:
        score = references.get(task.name)
        if score is None or score.metrics.get("label_accuracy") != 1.0:
            continue
        examples = len(task.indices)
        out.append(
            f"{task.name}: its specialist labels all {examples} validation examples right, so "
            f"its loss there ({score.loss:.3g}), the denominator of AP, counts none of the "
            f"errors it makes on other data (up to {3 / examples:.0%} of them, by the rule of "
            f"three): the search may favour {task.name} beyond what new data confirm. A few "
            f"hundred {task.name} examples, with some the specialist gets wrong, make AP sound"
        )
    return out


def with_preservation(
    scores: dict[str, TaskScore],
    references: dict[str, TaskScore],
    metrics: Sequence[Metric] = (),
) -> tuple[dict[str, TaskScore], float]:
    """Add AP and PR to each task score; return them and the harmonic mean of AP.

    `references` holds each task's score under its own specialist:
    AP_i = L_i(S_i) / L_i(merged) and PR_i = metric_i(merged) / metric_i(S_i) (inverted for a
    lower-is-better metric).
    """
    out = {}
    for name, score in scores.items():
        reference = references[name]
        ap = reference.loss / score.loss if score.loss > 0 else 0.0
        metric = rate_metric(score, metrics)
        mine, theirs = score.value(metric.name), reference.value(metric.name)
        if metric.lower_is_better:
            mine, theirs = theirs, mine
        # A ratio of metric values means something only for positive values.
        rate = mine / theirs if mine >= 0 and theirs > 0 else None
        out[name] = score.model_copy(
            update={"preservation": ap, "rate": rate, "rate_metric": metric.name}
        )
    values = [s.preservation for s in out.values()]
    return out, harmonic_mean(values)


def forward_seconds(config, positions: int, dtype: torch.dtype, device: str) -> float | None:
    """Seconds of one forward pass over `positions` tokens (at most 512; timed after a first
    pass) through a two-layer model of `config`'s architecture with random weights in
    `dtype`, or None when such a model cannot be built. Per token a layer costs the same in a
    deeper model, so this ranks dtypes for the real one in a fraction of its time (SmolLM2's
    shape, 512 positions, one thread of an AVX2 CPU: 0.64 s in float32, 4.3 s in bfloat16)."""
    import copy
    import time

    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    text = getattr(small, "text_config", None) or small
    if not hasattr(text, "num_hidden_layers"):
        return None
    text.num_hidden_layers = min(2, text.num_hidden_layers)
    try:
        model = AutoModelForCausalLM.from_config(small, dtype=dtype).to(device).eval()
    except (ValueError, TypeError, RuntimeError, ImportError):
        return None
    positions = min(positions, 512)
    width = min(positions, getattr(text, "max_position_embeddings", None) or positions, 128)
    ids = torch.randint(0, text.vocab_size, (max(1, positions // width), width), device=device)
    with torch.no_grad():
        model(input_ids=ids)  # the first pass allocates and warms caches
        started = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - started


def timed_eval_dtype(config, positions: int, device: str, faster: float) -> tuple[str | None, str]:
    """bfloat16 when one forward pass of this architecture over `positions` tokens is `faster`
    times faster in it than in float32 here, else float32; and a note saying why. Timed once
    per machine, torch version, thread count and architecture, then reused from
    eval-dtype.json in $AUTOMERGE_MK_CACHE (default ~/.cache/automerge-mk): a timing under load
    could choose either, and one machine's searches of one seed would score in different
    dtypes (delete the file to time again). None: the timing failed."""
    import os
    import platform

    cache = Path(os.environ.get("AUTOMERGE_MK_CACHE", "~/.cache/automerge-mk")).expanduser()
    record = cache / "eval-dtype.json"
    text = getattr(config, "text_config", None) or config
    shape = [getattr(text, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                              "intermediate_size", "vocab_size")]  # fmt: skip
    processor = platform.processor() or platform.machine()
    key = (f"{processor} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
           f"{' '.join(map(str, shape))} | {positions} positions")  # fmt: skip
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    found = known.get(key) if isinstance(known, dict) else None
    if isinstance(found, dict) and found.get("chosen") in ("float32", "bfloat16"):
        return found["chosen"], (
            f"--eval-dtype auto: {found['chosen']} (timed earlier on this machine: float32 "
            f"{found.get('float32', 0):.3f} s, bfloat16 {found.get('bfloat16', 0):.3f} s; "
            f"{record})"
        )
    timed = {name: forward_seconds(config, positions, getattr(torch, name), device)
             for name in ("float32", "bfloat16")}  # fmt: skip
    if None in timed.values():
        return None, "--eval-dtype auto: the timing failed"
    chosen = "bfloat16" if timed["bfloat16"] * faster < timed["float32"] else "float32"
    try:  # written whole through a temporary file; a failure only means timing again
        cache.mkdir(parents=True, exist_ok=True)
        temporary = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        known = known if isinstance(known, dict) else {}
        temporary.write_text(json.dumps(known | {key: {"chosen": chosen, **timed}}, indent=1))
        os.replace(temporary, record)
    except OSError:
        pass
    return chosen, (
        f"--eval-dtype auto: {chosen} (one forward pass of {positions} tokens: "
        f"float32 {timed['float32']:.3f} s, bfloat16 {timed['bfloat16']:.3f} s)"
    )
