"""Stage 6: the SMAC loop. What to optimise (a target function config -> TrialResult) is kept
apart from how (SMAC's HyperparameterOptimizationFacade: random-forest surrogate, log EI,
an explicit Sobol initial design, deterministic trials; or its MultiFidelityFacade, whose
Hyperband gives most configurations a few validation tokens and only the best all of them).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ConfigSpace import Configuration, ConfigurationSpace
from smac import HyperparameterOptimizationFacade, MultiFidelityFacade, RandomFacade, Scenario
from smac.acquisition.maximizer.local_search import LocalSearch
from smac.facade.abstract_facade import AbstractFacade
from smac.initial_design import RandomInitialDesign
from smac.model.random_forest import RandomForest
from smac.runhistory.dataclasses import TrialInfo, TrialValue
from tqdm.auto import tqdm

from .engine import MergeEngine, release_memory
from .errors import MetricError, RunDirectoryError, SettingsError
from .evaluate import Metric, TaskData, score_model, score_task, subset_task, with_preservation
from .plugins import run_evals
from .types import MergePlan, TaskScore, TrialResult, best_trial, budget_rank

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
        self.levels: dict[int, tuple[list[TaskData], dict[str, TaskScore]]] = {}

    def at_budget(self, budget: int | None) -> tuple[list[TaskData], dict[str, TaskScore]]:
        """The tasks cut to `budget` tokens each, and their specialists' reference scores on
        exactly those examples (scored once per budget). None: all of the data."""
        if budget is None or all(budget >= task.computed_tokens for task in self.tasks):
            return self.tasks, self.references
        if budget not in self.levels:
            tasks = [subset_task(task, budget, self.seed) for task in self.tasks]
            references = {
                task.name: score_task(
                    self.engine.load_source(self.specialists[task.name]),
                    task,
                    metrics=self.metrics,
                    tokenizer=self.tokenizer,
                )
                for task in tasks
            }
            self.levels[budget] = tasks, references
        return self.levels[budget]

    def score(self, model, budget: int | None = None) -> tuple[dict[str, TaskScore], float]:
        """Scores of a model with AP and PR, and the harmonic mean of AP."""
        tasks, references = self.at_budget(budget)
        scores = score_model(model, tasks, self.metrics, self.tokenizer)
        return with_preservation(scores, references, self.metrics)

    def __call__(self, config: dict[str, Any], trial: int, budget: int | None = None):
        return self.evaluate_plan(self.to_plan(config), trial, config, budget)

    def evaluate_plan(
        self, plan: MergePlan, trial: int, config: dict[str, Any], budget: int | None = None
    ) -> TrialResult:
        """Merge a plan into the live model and score it on `budget` tokens per task (None:
        all); failures become failed results."""
        tasks, _ = self.at_budget(budget)  # references first: they use the live model too
        spent = {"budget": budget, "computed_tokens": sum(task.computed_tokens for task in tasks)}
        started = time.perf_counter()
        try:
            model = self.engine.merge_into_model(plan)
            merge_seconds = time.perf_counter() - started
            scores, mean = self.score(model, budget)
            full = tasks is self.tasks
            evals = run_evals(self.evals, model, self.tokenizer) if full else {}
        # A kernel failure, out of memory (torch's OutOfMemoryError is a RuntimeError) or a
        # metric that fails on this merge fails this trial only.
        except (RuntimeError, ValueError, MemoryError, MetricError) as error:
            release_memory(self.engine.device)
            seconds = {"merge": time.perf_counter() - started}
            return _failed(trial, config, seconds, repr(error)).model_copy(update=spent)
        seconds = {
            "merge": merge_seconds,
            "evaluate": time.perf_counter() - started - merge_seconds,
        }
        if not all(math.isfinite(s.loss) for s in scores.values()):
            failed = _failed(trial, config, seconds, "non-finite loss", scores)
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
            **spent,
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
    fidelity: Fidelity | None = None,
) -> AbstractFacade:
    """SMAC's HPO facade with an explicit Sobol initial design and a single-threaded forest.

    The initial design is set explicitly because SMAC's default size rule changes between
    versions; `n_jobs=1` cuts the forest's per-ask cost about threefold on few cores.
    `kind="random"` gives SMAC's random-search facade instead (uniform samples of the same
    space, the usual baseline for an optimiser). With `fidelity`, SMAC's multi-fidelity facade
    (the same forest and design, Hyperband with eta 3 over validation tokens per task, the
    incumbent chosen on the highest budget only).
    """
    budgets = {"min_budget": fidelity.low, "max_budget": fidelity.high} if fidelity else {}
    scenario = Scenario(
        space,
        deterministic=True,
        n_trials=trials,
        seed=seed,
        output_directory=output,
        **budgets,
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
    if fidelity:
        facade = MultiFidelityFacade
        intensifier = MultiFidelityFacade.get_intensifier(
            scenario, eta=Fidelity.ETA, incumbent_selection="highest_budget"
        )
    else:
        facade = HyperparameterOptimizationFacade
        intensifier = facade.get_intensifier(scenario, max_config_calls=1)
    return facade(
        scenario,
        target_function=None,  # trials are run by ask/tell, so every result is recorded first
        model=RandomForest(space, n_jobs=1, log_y=True, seed=seed),
        acquisition_maximizer=maximizer,
        initial_design=HyperparameterOptimizationFacade.get_initial_design(
            scenario, n_configs=initial, max_ratio=1.0
        ),
        intensifier=intensifier,
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


def trial_value(result: TrialResult) -> TrialValue:
    """What SMAC is told of a recorded trial: its cost and the seconds it took."""
    return TrialValue(cost=result.cost, time=sum(result.seconds.values()))


def warm_start(
    optimizer: AbstractFacade,
    space: ConfigurationSpace,
    trials: Sequence[TrialResult],
    fidelity: Fidelity | None = None,
) -> None:
    """Tell the optimiser an earlier run's finished trials (of the same space) before it asks.

    Of a multi-fidelity run only the trials at its highest budget are told (the others were
    scored on other data); a multi-fidelity search is told them at its own highest budget.
    """
    top = max((budget_rank(trial) for trial in trials), default=None)
    for trial in trials:
        if budget_rank(trial) != top:
            continue
        info = TrialInfo(
            config=Configuration(space, values=trial.config),
            seed=0,
            budget=fidelity.high if fidelity else None,
        )
        optimizer.tell(info, trial_value(trial))


def _ask(optimizer: AbstractFacade):
    with warnings.catch_warnings():
        # SMAC's forest averages empty leaves early in a search; harmless, but noisy.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return optimizer.ask()


def run_search(
    optimizer: AbstractFacade,
    objective: Callable[..., TrialResult],
    trials: int,
    record: Callable[[TrialResult], None],
    progress: bool = True,
    finished: Sequence[TrialResult] = (),
    fidelity: Fidelity | None = None,
) -> list[TrialResult]:
    """Ask, merge, evaluate, tell and record, `trials` times.

    A trial is appended to the run directory (fsynced) before the next is asked for; SMAC's own
    state is not what a resume reads. `finished` trials of an interrupted run are replayed:
    the seeded optimiser proposes the same configurations (and budgets) again and is told their
    recorded results, so none is evaluated twice. With `fidelity`, a best trial whose highest
    budget is below all of the data is evaluated on all of it once more, as one extra trial.

    Returns:
        All trial results in order.

    Raises:
        RunDirectoryError: when the optimiser does not propose a finished trial's configuration
            again (another SMAC version, or a changed space).
    """
    results: list[TrialResult] = []
    started = time.perf_counter()
    bar = tqdm(total=trials, desc="search", unit="trial", disable=not progress)
    for trial in range(trials):
        asked = time.perf_counter()
        info = _ask(optimizer)
        ask_seconds = time.perf_counter() - asked
        config = dict(info.config) if isinstance(info.config, Configuration) else info.config
        budget = None if info.budget is None else round(info.budget)
        if trial < len(finished):
            result = finished[trial]
            if (config, budget) != (result.config, result.budget):
                raise RunDirectoryError(
                    f"cannot resume: trial {trial} was {result.config} (budget {result.budget}) "
                    f"but the optimiser now proposes {config} (budget {budget}); start a new run"
                )
        else:
            result = objective(config, trial, budget)
        recording = time.perf_counter()
        optimizer.tell(info, trial_value(result))
        if trial >= len(finished):
            # "record": SMAC's tell and building the line; the append + fsync follows it.
            seconds = {"ask": ask_seconds, **result.seconds}
            seconds["record"] = time.perf_counter() - recording
            result = result.model_copy(update={"seconds": seconds, "finished_at": time.time()})
            record(result)
        results.append(result)
        best = best_trial(results)
        elapsed = time.perf_counter() - started
        bar.set_postfix(
            best_H=f"{best.harmonic_mean:.4f}" if best else "-",
            trials_per_h=f"{3600 * (trial + 1) / elapsed:.0f}",
        )
        bar.update()
    bar.close()
    return reevaluate_best(results, objective, fidelity, record, finished)


def reevaluate_best(
    results: list[TrialResult],
    objective: Callable[..., TrialResult],
    fidelity: Fidelity | None,
    record: Callable[[TrialResult], None],
    finished: Sequence[TrialResult] = (),
) -> list[TrialResult]:
    """With `fidelity`, a best trial whose highest budget is below all of the data is evaluated
    on all of it once more, as one extra trial (taken from `finished` when a resumed run has
    it already)."""
    best = best_trial(results)
    if fidelity and best and budget_rank(best) < fidelity.full:
        trial = len(results)
        result = finished[trial] if trial < len(finished) else None
        if result is None:
            result = objective(best.config, trial, fidelity.full)
            record(result)
        results = [*results, result]
    return results
