"""The target function: a configuration -> a merge in memory -> scores -> a TrialResult.

What to optimise is kept apart from how (optimizer.py) and from the loop that asks and tells
(loop.py), as SMAC keeps its Scenario and target function apart from its facades.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..engine import MergeEngine, release_memory
from ..errors import MetricError, SettingsError
from ..evaluate import (
    Metric,
    TaskData,
    same_examples,
    score_model,
    score_task,
    subset_task,
    user_metrics,
    with_preservation,
)
from ..plugins import run_evals
from ..types import MergePlan, TaskScore, TrialResult
from .racing import Incumbent, Race, Raced, run_race

WORST_COST = 1.0  # cost = 1 - harmonic mean of AP, and the harmonic mean is never below 0


class Fidelity(NamedTuple):
    """Multi-fidelity budgets, in validation tokens per task: Hyperband evaluates between `low`
    and `high`; `full` is all of the data, at which the result is always evaluated."""

    low: int
    high: int
    full: int

    ETA = 3  # Hyperband keeps the best third at each budget and triples it

    @classmethod
    def resolve(cls, spec: tuple[int | None, int | None] | None, tasks: list[TaskData]):
        """The budgets of `--fidelity tokens[:MIN:MAX]` for these tasks; None without it.

        Raises:
            SettingsError: when MIN or MAX does not fit the validation data.
        """
        if spec is None:
            return None
        full = max(task.computed_tokens for task in tasks)
        low, high = spec
        high = high or full
        # At least ETA**2 between them, or SMAC's Hyperband drops its lowest budget.
        low = low or max(1, high // cls.ETA**2)
        if high > full:
            raise SettingsError(
                f"--fidelity tokens:{low}:{high}: MAX is more than the {full} validation tokens "
                "of the largest task; leave MAX out to use all of them"
            )
        if not low < high:
            raise SettingsError(f"--fidelity tokens:{low}:{high}: give MIN < MAX")
        return cls(low, high, full)


class MergeObjective:
    """The target function: a configuration -> merge in memory -> score -> TrialResult.

    Args:
        engine: resident sources and the live model.
        tasks: tokenised validation data, one per source model.
        references: each task's scores under its own specialist (the reference of AP and PR).
        to_plan: turns a configuration into a MergePlan.
        metrics: user metrics computed after every merge; the first gives PR.
        tokenizer: passed to user metrics.
        specialists: each task's own source folder, to score references on fewer tokens.
        seed: which subsets of the tasks lower budgets score.
        evals: evaluation plug-ins (`--eval`), run on trials scored on all tokens.
        own: task name -> its specialist's own tokenizer and the task tokenised with it, where
            the merged model's tokenizer differs (--tokenizer-source): references use them.
        race: score trials on all of the data chunk by chunk and stop those that cannot beat
            the incumbent (racing.py); None: one pass over all of the data.
        unraced: configurations always scored on every example (the baselines of the search).
    """

    def __init__(
        self,
        engine: MergeEngine,
        tasks: list[TaskData],
        references: dict[str, TaskScore],
        to_plan: Callable[[dict[str, Any]], MergePlan] | None,
        metrics: tuple[Metric, ...] = (),
        tokenizer=None,
        specialists: dict[str, Path] | None = None,
        seed: int = 0,
        evals: tuple = (),
        own: dict[str, tuple[Any, TaskData]] | None = None,
        race: Race | None = None,
        unraced: tuple[dict[str, Any], ...] = (),
    ):
        self.engine = engine
        self.tasks = tasks
        self.references = references
        self.to_plan = to_plan
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.specialists = specialists or {}
        self.seed = seed
        self.evals = evals
        self.own = own or {}
        self.race = race
        self.unraced = list(unraced)
        self.incumbent: Incumbent | None = None
        self.levels: dict[int, tuple[list[TaskData], dict[str, TaskScore]]] = {}

    def at_budget(self, budget: int | None) -> tuple[list[TaskData], dict[str, TaskScore]]:
        """The tasks cut to `budget` tokens each, and their specialists' reference scores on
        exactly those examples (scored once per budget). None: all of the data."""
        if budget is None or all(budget >= task.computed_tokens for task in self.tasks):
            return self.tasks, self.references
        if budget not in self.levels:
            tasks = [subset_task(task, budget, self.seed) for task in self.tasks]
            references = {task.name: self._reference(task) for task in tasks}
            self.levels[budget] = tasks, references
        return self.levels[budget]

    def _reference(self, task: TaskData) -> TaskScore:
        """The task's specialist on these examples, in its own tokenisation."""
        tokenizer, own = self.own.get(task.name, (self.tokenizer, None))
        return score_task(
            self.engine.load_source(self.specialists[task.name]),
            same_examples(own, task.indices) if own else task,
            metrics=self.metrics,
            tokenizer=tokenizer,
        )

    def observe(self, results: list[TrialResult]) -> None:
        """Race later trials against the best of these (all of the search's trials so far)."""
        if self.race:
            self.incumbent = Incumbent.best(results, self.tasks)

    def score(self, model, budget: int | None = None) -> tuple[dict[str, TaskScore], float]:
        """Scores of a model with AP and PR, and the harmonic mean of AP (a racing search's in
        its chunks, so that a model scores exactly as a trial of it would)."""
        if self.race and budget is None:
            raced = self._race(model, None)
            return self._complete(model, raced)
        tasks, references = self.at_budget(budget)
        # On all of the data, per-example losses are kept: a later racing run (resumed or
        # warm-started) can race against any such trial.
        whole = tasks is self.tasks
        scores = score_model(model, tasks, self.metrics, self.tokenizer, keep_examples=whole)
        return with_preservation(scores, references, self.metrics)

    def _race(self, model, incumbent: Incumbent | None) -> Raced:
        def score_part(part: TaskData) -> TaskScore:
            return score_task(model, part, keep_examples=True)

        return run_race(score_part, self.tasks, self.references, self.race, incumbent)

    def _complete(self, model, raced: Raced) -> tuple[dict[str, TaskScore], float]:
        """A race that saw every example: its scores with the user metrics, AP and PR."""
        scores = raced.scores
        if any(m.function for m in self.metrics):
            scores = {
                task.name: scores[task.name].model_copy(update={"metrics": scores[task.name].metrics
                          | user_metrics(model, task, self.metrics, self.tokenizer)})
                for task in self.tasks
            }  # fmt: skip
        return with_preservation(scores, self.references, self.metrics)

    def __call__(self, config: dict[str, Any], trial: int, budget: int | None = None):
        return self.evaluate_plan(self.to_plan(config), trial, config, budget)

    def _racing(self, config: dict[str, Any], budget: int | None) -> Incumbent | None:
        """The incumbent this trial races against; None: it is scored on every example."""
        if not self.race or budget is not None or config in self.unraced:
            return None
        return self.incumbent

    def evaluate_plan(
        self,
        plan: MergePlan,
        trial: int,
        config: dict[str, Any],
        budget: int | None = None,
        race: bool = True,
    ) -> TrialResult:
        """Merge a plan into the live model and score it on `budget` tokens per task (None:
        all); failures become failed results. `race` False: never stopped early (a baseline
        scored for the summary)."""
        tasks, _ = self.at_budget(budget)  # references first: they use the live model too
        spent = {"budget": budget, "computed_tokens": sum(task.computed_tokens for task in tasks)}
        started = time.perf_counter()
        try:
            model = self.engine.merge_into_model(plan)
            merge_seconds = time.perf_counter() - started
            partial = False
            if self.race and budget is None:
                raced = self._race(model, self._racing(config, budget) if race else None)
                partial = not raced.complete
                if partial:
                    scores, mean = _estimated(raced), raced.estimate
                else:
                    scores, mean = self._complete(model, raced)
                spent = {"budget": None, "computed_tokens": raced.computed_tokens}
            else:
                scores, mean = self.score(model, budget)
            full = tasks is self.tasks and not partial
            evals = run_evals(self.evals, model, self.tokenizer) if full else {}
        # A kernel failure, out of memory (torch's OutOfMemoryError is a RuntimeError) or a
        # metric that fails on this merge fails this trial only.
        except (RuntimeError, ValueError, MemoryError, MetricError) as error:
            release_memory(self.engine.device)
            seconds = {"merge": time.perf_counter() - started}
            return failed_result(trial, config, seconds, repr(error)).model_copy(update=spent)
        seconds = {
            "merge": merge_seconds,
            "evaluate": time.perf_counter() - started - merge_seconds,
        }
        if not all(math.isfinite(s.loss) for s in scores.values()):
            failed = failed_result(trial, config, seconds, "non-finite loss", scores)
            return failed.model_copy(update=spent)
        return TrialResult(
            trial=trial,
            status="ok",
            config=config,
            cost=1.0 - mean,
            harmonic_mean=mean,
            tasks=scores,
            seconds=seconds,
            evals=evals,
            partial=partial,
            **spent,
        )


def _estimated(raced: Raced) -> dict[str, TaskScore]:
    """A stopped race's scores on the examples seen, with AP estimated for all of them (PR is
    left out: it would be a ratio over different examples)."""
    return {
        name: score.model_copy(update={"preservation": raced.preservation[name]})
        for name, score in raced.scores.items()
    }


def failed_result(trial, config, seconds, error, scores=None) -> TrialResult:
    """A trial that failed: the worst cost, so the optimiser steers away from it."""
    return TrialResult(
        trial=trial,
        status="failed",
        config=config,
        cost=WORST_COST,
        harmonic_mean=0.0,
        tasks=scores or {},
        seconds=seconds,
        error=error,
    )
