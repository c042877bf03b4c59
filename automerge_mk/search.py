"""Stage 6: the SMAC loop. What to optimise (a target function config -> TrialResult) is kept
apart from how (SMAC's HyperparameterOptimizationFacade: random-forest surrogate, log EI,
an explicit Sobol initial design, deterministic trials).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ConfigSpace import Configuration, ConfigurationSpace
from smac import HyperparameterOptimizationFacade, RandomFacade, Scenario
from smac.acquisition.maximizer.local_search import LocalSearch
from smac.facade.abstract_facade import AbstractFacade
from smac.initial_design import RandomInitialDesign
from smac.model.random_forest import RandomForest
from smac.runhistory.dataclasses import TrialInfo, TrialValue
from tqdm.auto import tqdm

from .engine import MergeEngine
from .errors import MetricError, RunDirectoryError, SettingsError
from .evaluate import Metric, TaskData, score_model, with_preservation
from .types import MergePlan, TaskScore, TrialResult

WORST_COST = 1.0  # cost = 1 - harmonic mean of AP, and the harmonic mean is never below 0


class MergeObjective:
    """The target function: a configuration -> merge in memory -> score -> TrialResult.

    Args:
        engine: resident sources and the live model.
        tasks: tokenised validation data, one per source model.
        references: each task's scores under its own specialist (the reference of AP and PR).
        to_plan: turns a configuration into a MergePlan.
        metrics: user metrics computed after every merge; the first gives PR.
        tokenizer: passed to user metrics.
    """

    def __init__(
        self,
        engine: MergeEngine,
        tasks: list[TaskData],
        references: dict[str, TaskScore],
        to_plan: Callable[[dict[str, Any]], MergePlan] | None,
        metrics: tuple[Metric, ...] = (),
        tokenizer=None,
    ):
        self.engine = engine
        self.tasks = tasks
        self.references = references
        self.to_plan = to_plan
        self.metrics = metrics
        self.tokenizer = tokenizer

    def score(self, model) -> tuple[dict[str, TaskScore], float]:
        """Scores of a model with AP and PR, and the harmonic mean of AP."""
        scores = score_model(model, self.tasks, self.metrics, self.tokenizer)
        return with_preservation(scores, self.references, self.metrics)

    def __call__(self, config: dict[str, Any], trial: int) -> TrialResult:
        return self.evaluate_plan(self.to_plan(config), trial, config)

    def evaluate_plan(self, plan: MergePlan, trial: int, config: dict[str, Any]) -> TrialResult:
        """Merge a plan into the live model and score it; failures become failed results."""
        started = time.perf_counter()
        try:
            model = self.engine.merge_into_model(plan)
            merge_seconds = time.perf_counter() - started
            scores, mean = self.score(model)
        # A kernel failure or a metric that fails on this merge fails this trial only.
        except (RuntimeError, ValueError, MetricError) as error:
            return _failed(trial, config, {"merge": time.perf_counter() - started}, repr(error))
        seconds = {
            "merge": merge_seconds,
            "evaluate": time.perf_counter() - started - merge_seconds,
        }
        if not all(math.isfinite(s.loss) for s in scores.values()):
            return _failed(trial, config, seconds, "non-finite loss", scores)
        return TrialResult(
            trial=trial,
            status="ok",
            config=config,
            cost=1.0 - mean,
            harmonic_mean=mean,
            tasks=scores,
            seconds=seconds,
        )


def _failed(trial, config, seconds, error, scores=None) -> TrialResult:
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


class _RepeatableLocalSearch(LocalSearch):
    """SMAC 2.4.1 dedupes local-search start points through a set, whose order follows
    Python's per-process hash seed, so one --seed gave different searches in different
    processes. Sorting the start points by their vector makes a seeded search repeatable."""

    def _get_initial_points(self, *args, **kwargs):
        points = super()._get_initial_points(*args, **kwargs)
        return sorted(points, key=lambda c: tuple(np.nan_to_num(c.get_array(), nan=-1.0)))


def make_optimizer(
    space: ConfigurationSpace,
    trials: int,
    initial: int,
    seed: int,
    output: Path,
    kind: str = "smac",
) -> AbstractFacade:
    """SMAC's HPO facade with an explicit Sobol initial design and a single-threaded forest.

    The initial design is set explicitly because SMAC's default size rule changes between
    versions; `n_jobs=1` cuts the forest's per-ask cost about threefold on few cores.
    `kind="random"` gives SMAC's random-search facade instead (uniform samples of the same
    space, the usual baseline for an optimiser).
    """
    scenario = Scenario(
        space,
        deterministic=True,
        n_trials=trials,
        seed=seed,
        output_directory=output,
    )
    if kind == "random":
        return RandomFacade(
            scenario,
            target_function=None,
            initial_design=RandomInitialDesign(scenario, n_configs=1),
            intensifier=RandomFacade.get_intensifier(scenario, max_config_calls=1),
            overwrite=True,
            logging_level=40,
        )
    maximizer = HyperparameterOptimizationFacade.get_acquisition_maximizer(scenario)
    maximizer._local_search.__class__ = _RepeatableLocalSearch
    return HyperparameterOptimizationFacade(
        scenario,
        target_function=None,  # trials are run by ask/tell, so every result is recorded first
        model=RandomForest(space, n_jobs=1, log_y=True, seed=seed),
        acquisition_maximizer=maximizer,
        initial_design=HyperparameterOptimizationFacade.get_initial_design(
            scenario, n_configs=initial, max_ratio=1.0
        ),
        intensifier=HyperparameterOptimizationFacade.get_intensifier(scenario, max_config_calls=1),
        overwrite=True,
        logging_level=40,
    )


def check_same_space(earlier: ConfigurationSpace, current: ConfigurationSpace, where: str) -> None:
    """Raises SettingsError naming what differs when an earlier run searched another space."""
    if earlier == current:
        return
    old, new = set(earlier), set(current)
    differences = [f"only in {where}: {', '.join(sorted(old - new))}" if old - new else "",
                   f"only here: {', '.join(sorted(new - old))}" if new - old else ""]  # fmt: skip
    changed = [n for n in sorted(old & new) if earlier[n] != current[n]]
    if changed:
        differences.append(f"different ranges or choices: {', '.join(changed)}")
    raise SettingsError(
        f"--warm-start {where} searched another space ({'; '.join(d for d in differences if d)}); "
        "use a run with the same models, --strategy, --methods and ranges"
    )


def warm_start(
    optimizer: AbstractFacade, space: ConfigurationSpace, trials: Sequence[TrialResult]
) -> None:
    """Tell the optimiser an earlier run's finished trials (of the same space) before it asks."""
    for trial in trials:
        info = TrialInfo(config=Configuration(space, values=trial.config), seed=0)
        optimizer.tell(info, TrialValue(cost=trial.cost, time=sum(trial.seconds.values())))


def _ask(optimizer: AbstractFacade):
    with warnings.catch_warnings():
        # SMAC's forest averages empty leaves early in a search; harmless, but noisy.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return optimizer.ask()


def run_search(
    optimizer: AbstractFacade,
    objective: Callable[[dict[str, Any], int], TrialResult],
    trials: int,
    record: Callable[[TrialResult], None],
    progress: bool = True,
    finished: Sequence[TrialResult] = (),
) -> list[TrialResult]:
    """Ask, merge, evaluate, tell and record, `trials` times.

    A trial is appended to the run directory (fsynced) before the next is asked for; SMAC's own
    state is not what a resume reads. `finished` trials of an interrupted run are replayed:
    the seeded optimiser proposes the same configurations again and is told their recorded
    results, so none is evaluated twice.

    Returns:
        All trial results in order.

    Raises:
        RunDirectoryError: when the optimiser does not propose a finished trial's configuration
            again (another SMAC version, or a changed space).
    """
    results: list[TrialResult] = []
    best = 0.0
    started = time.perf_counter()
    bar = tqdm(total=trials, desc="search", unit="trial", disable=not progress)
    for trial in range(trials):
        if trial < len(finished):
            result = finished[trial]
            info = _ask(optimizer)
            if dict(info.config) != result.config:
                raise RunDirectoryError(
                    f"cannot resume: trial {trial} was {result.config} but the optimiser now "
                    f"proposes {dict(info.config)}; start a new run"
                )
            optimizer.tell(info, TrialValue(cost=result.cost, time=sum(result.seconds.values())))
            results.append(result)
            best = max(best, result.harmonic_mean)
            bar.update()
            continue
        asked = time.perf_counter()
        info = _ask(optimizer)
        ask_seconds = time.perf_counter() - asked
        config = dict(info.config) if isinstance(info.config, Configuration) else info.config
        result = objective(config, trial)
        recording = time.perf_counter()
        optimizer.tell(info, TrialValue(cost=result.cost, time=sum(result.seconds.values())))
        # "record": SMAC's tell and building the line; the append + fsync follows it.
        seconds = {"ask": ask_seconds, **result.seconds}
        seconds["record"] = time.perf_counter() - recording
        result = result.model_copy(update={"seconds": seconds})
        record(result)
        results.append(result)
        best = max(best, result.harmonic_mean)
        elapsed = time.perf_counter() - started
        bar.set_postfix(best_H=f"{best:.4f}", trials_per_h=f"{3600 * (trial + 1) / elapsed:.0f}")
        bar.update()
    bar.close()
    return results
