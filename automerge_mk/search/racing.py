"""Racing: a trial scored chunk by chunk against the incumbent, and stopped once it cannot win.

Each task's validation examples are taken in one seeded order: the first `first` per task,
then `chunk` at a time. After each such look the candidate's per-example losses are compared
with the incumbent's (the best trial scored on every example) on *the same examples*: the
paired ratio r = sum(candidate) / sum(incumbent) estimates the candidate's loss on all
examples as the incumbent's times r, with far less variance than either mean alone, because
both models find the same examples hard. Its standard error is the ratio estimator's under
sampling without replacement,

    se(r) = sqrt((1 - n / N) * var(c - r * a) / n) / mean(a),

over the n examples seen of N (c, a: candidate's and incumbent's summed loss per example).
The candidate's harmonic mean over T tasks is T / sum(1 / AP_t), and 1 / AP_t = w_t * r_t with
w_t = (incumbent's loss / reference loss) on task t: the sum S = sum w_t r_t is linear in the
ratios, so one bound covers all tasks at once, S - z * sqrt(sum (w_t se_t)^2) (tasks scored on
separate examples are independent), z for the one-sided `confidence` per look. A candidate
whose optimistic harmonic mean, T over that bound, is still below the incumbent's cannot win:
it stops, and reports its estimate (the incumbent's loss times r, per task) as a partial trial.
(The rule before bounded every task at z at once, S - z * sum w_t se_t: a margin up to
sqrt(T) times the harmonic mean's own, so it grew with the tasks. Replayed on the real
benchmark at 200 trials, that rule at 0.95 per task and this one at 0.975 stopped the same
wrong trials but one (0.007 H), and this one spent 1-3 % fewer of full's tokens:
scripts/results/racing.md.)

No trial is stopped before `first` examples a task (FIRST_LOOK, 16, scored in one pass), and
after that it is looked at every `chunk`: on the real benchmark most trials stopped wrongly
(better than their incumbent) had been stopped after their first 8 examples, where a variance
from 8 heavy-tailed losses is itself a guess (a Student t quantile in place of z, replayed,
stopped the same trials).

Checked first: SMAC's intensifier and irace race whole trials over instances and seeds, and
neither stops one trial midway; mergenetic's IRT estimates need anchor items fitted on other
models. So the bound is written here, on the per-example losses `evaluate.score_task` keeps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from ..evaluate import TaskData, same_examples
from ..types import TaskScore, TrialResult, harmonic_mean

FIRST_LOOK = 16


class Race(NamedTuple):
    """How trials race: `chunk` examples per task between looks, a one-sided `confidence` per
    look, the seed of the examples' order, and the examples per task scored before the first
    look (at least a chunk)."""

    chunk: int
    confidence: float
    seed: int = 0
    first: int = FIRST_LOOK

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(self.confidence)

    def order(self, task: TaskData) -> list[int]:
        """The task's examples (positions) in the order every trial scores them."""
        order = list(range(len(task.sequences)))
        random.Random(f"{self.seed}:{task.name}").shuffle(order)
        return order

    def steps(self, tasks: Sequence[TaskData]) -> list[dict[str, list[int]]]:
        """Per look, the positions each task scores next (sorted; a finished task has none):
        the first `first` (or one chunk, if larger), then a chunk at a time."""
        orders = {task.name: self.order(task) for task in tasks}
        longest = max(len(order) for order in orders.values())
        first = max(self.first, self.chunk)
        bounds = [0, *range(first, longest, self.chunk), longest]
        return [{name: sorted(order[start:end]) for name, order in orders.items()}
                for start, end in zip(bounds, bounds[1:])]  # fmt: skip


class Incumbent(NamedTuple):
    """The best trial scored on every example: its harmonic mean and per-example losses."""

    harmonic_mean: float
    losses: dict[str, np.ndarray]

    @classmethod
    def best(cls, results: Sequence[TrialResult], tasks: Sequence[TaskData]) -> Incumbent | None:
        """The best full trial that kept its per-example losses for these tasks (None: none)."""
        sizes = {task.name: len(task.sequences) for task in tasks}
        eligible = [
            r
            for r in results
            if r.status == "ok" and not r.partial and r.budget is None
            and all(len(r.tasks[n].example_losses) == k for n, k in sizes.items() if n in r.tasks)
            and set(sizes) <= set(r.tasks)
        ]  # fmt: skip
        best = max(eligible, key=lambda r: r.harmonic_mean, default=None)
        if best is None:
            return None
        losses = {name: np.array(best.tasks[name].example_losses) for name in sizes}
        return cls(best.harmonic_mean, losses)


class Raced(NamedTuple):
    """What a race found: the scores on the examples seen (all of them when `complete`), the
    estimated harmonic mean and AP per task, and the forward-pass positions computed."""

    scores: dict[str, TaskScore]
    complete: bool
    estimate: float
    preservation: dict[str, float]
    computed_tokens: int


def paired_ratio(candidate: np.ndarray, incumbent: np.ndarray, population: int):
    """The paired ratio r = sum(candidate) / sum(incumbent) over the examples seen, and its
    standard error se(r) (see the module docstring): 0 once every example is seen, infinite
    below two."""
    n = len(candidate)
    ratio = candidate.sum() / incumbent.sum()
    if n >= population or n < 2:
        return ratio, 0.0 if n >= population else math.inf
    spread = np.var(candidate - ratio * incumbent, ddof=1)
    return ratio, math.sqrt((1 - n / population) * spread / n) / incumbent.mean()


def _merged(parts: list[TaskScore], positions: list[int]) -> TaskScore:
    """One task's score over the chunks scored so far (per-example losses in task order)."""
    tokens = sum(p.tokens for p in parts)
    losses = [loss for p in parts for loss in p.example_losses]
    by_position = [loss for _, loss in sorted(zip(positions, losses))]
    correct = sum(round(p.accuracy * p.tokens) for p in parts)
    metrics = {}
    if parts and "label_accuracy" in parts[0].metrics:
        hits = sum(p.metrics["label_accuracy"] * len(p.example_losses) for p in parts)
        metrics["label_accuracy"] = hits / len(losses)
    return TaskScore(loss=math.fsum(losses) / tokens, accuracy=correct / tokens, tokens=tokens,
                     metrics=metrics, example_losses=tuple(by_position))  # fmt: skip


def run_race(
    score_part: Callable[[TaskData], TaskScore],
    tasks: Sequence[TaskData],
    references: dict[str, TaskScore],
    race: Race,
    incumbent: Incumbent | None,
) -> Raced:
    """Score the tasks chunk by chunk with `score_part` (a task subset -> its score with
    per-example losses); after each look, stop when the optimistic harmonic mean is below the
    incumbent's. Without an incumbent every example is scored."""
    by_name = {task.name: task for task in tasks}
    parts: dict[str, list[TaskScore]] = {task.name: [] for task in tasks}
    seen: dict[str, list[int]] = {task.name: [] for task in tasks}
    computed = 0
    steps = race.steps(tasks)
    for look, step in enumerate(steps, 1):
        for name, positions in step.items():
            if positions:
                task = by_name[name]
                part = same_examples(task, [task.indices[p] for p in positions])
                parts[name].append(score_part(part))
                seen[name] += positions
                computed += part.computed_tokens
        if incumbent is None or look == len(steps):
            continue
        estimate, optimistic, preservation = _estimate(parts, seen, by_name, references,
                                                       incumbent, race.z)  # fmt: skip
        if optimistic < incumbent.harmonic_mean:
            scores = {name: _merged(parts[name], seen[name]) for name in parts}
            return Raced(scores, False, estimate, preservation, computed)
    scores = {name: _merged(parts[name], seen[name]) for name in parts}
    return Raced(scores, True, math.nan, {}, computed)


def _estimate(parts, seen, tasks, references, incumbent: Incumbent, z: float):
    """The candidate's estimated and optimistic harmonic mean over all examples, and its
    estimated AP per task, from the examples seen (the bound: the module docstring)."""
    estimated, total, variance = {}, 0.0, 0.0
    for name, positions in seen.items():
        candidate = np.array([loss for p in parts[name] for loss in p.example_losses])
        theirs = incumbent.losses[name]
        ratio, se = paired_ratio(candidate, theirs[positions], len(theirs))
        weight = theirs.sum() / sum(tasks[name].example_tokens) / references[name].loss
        estimated[name] = 1 / (weight * ratio)  # = reference / (incumbent's loss * ratio)
        total += weight * ratio
        variance += (weight * se) ** 2
    low_total = total - z * math.sqrt(variance)
    best_case = len(seen) / low_total if low_total > 0 else math.inf
    return harmonic_mean(list(estimated.values())), best_case, estimated
