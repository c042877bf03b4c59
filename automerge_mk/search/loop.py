"""The one ask -> run -> tell -> record loop of a search, in this process or on Dask workers.

A runner runs the trials: `SerialRunner` here, one at a time, or `parallel.DaskRunner` on a
cluster, as many at once as it has free workers. The loop is the same for both: ask SMAC while
the runner has room, hand the trial over, and tell, record (append + fsync) and show each
result as it comes back. A finished trial is written before the next one is asked for, so a
resume reads trials.jsonl, never SMAC's own state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ConfigSpace import Configuration
from smac.facade.abstract_facade import AbstractFacade
from smac.runhistory.dataclasses import TrialInfo
from tqdm.auto import tqdm

from ..errors import RunDirectoryError
from ..types import TrialResult, best_trial, budget_rank
from .objective import Fidelity
from .optimizer import ask, tell, tell_recorded


class Runner(Protocol):
    """What runs the trials the loop asks for.

    `replays` says whether a resumed run is replayed (the seeded optimiser proposes the
    finished trials again, in order) or its trials are told up front (parallel completion
    order is not repeatable).
    """

    replays: bool

    def free(self) -> bool:
        """Whether another trial can be handed over now."""

    def submit(self, info: TrialInfo) -> None: ...

    def finished(self, first: int) -> Iterator[tuple[TrialInfo, TrialResult]]:
        """Wait for at least one trial and yield the finished ones, numbered from `first` in
        the order they finish."""

    def observe(self, results: list[TrialResult]) -> None:
        """The search's trials so far (a racing search races the next ones against their
        best)."""


def _config(info: TrialInfo) -> dict:
    return dict(info.config) if isinstance(info.config, Configuration) else info.config


def _budget(info: TrialInfo) -> int | None:
    return None if info.budget is None else round(info.budget)


class SerialRunner:
    """Trials in this process, one at a time, with the objective `config, trial, budget ->
    TrialResult`."""

    replays = True

    def __init__(self, objective: Callable[..., TrialResult]):
        self.objective = objective
        self._pending: TrialInfo | None = None

    def free(self) -> bool:
        return self._pending is None

    def submit(self, info: TrialInfo) -> None:
        self._pending = info

    def finished(self, first: int) -> Iterator[tuple[TrialInfo, TrialResult]]:
        info, self._pending = self._pending, None
        yield info, self.objective(_config(info), first, _budget(info))

    def observe(self, results: list[TrialResult]) -> None:
        observe = getattr(self.objective, "observe", None)
        if observe:
            observe(results)


def run_search(
    optimizer: AbstractFacade,
    runner: Runner,
    trials: int,
    record: Callable[[TrialResult], None],
    progress: bool = True,
    finished: Sequence[TrialResult] = (),
    full_tokens: int | None = None,
    observe: Callable[[list[TrialResult]], None] | None = None,
) -> list[TrialResult]:
    """Ask, run, tell and record until `trials` trials are finished (`full_tokens`: forward
    positions of one trial on all of the data, for the progress bar; `observe`: also shown
    the trials so far after each, as the runner is, e.g. optimizer.Belief.observe).

    `finished` trials of an interrupted run are never run again: a replaying runner's
    optimiser proposes them again and is told their recorded results; otherwise they are told
    first.

    Returns:
        All trial results in order.

    Raises:
        RunDirectoryError: when a replayed optimiser does not propose a finished trial's
            configuration again (another SMAC version, or a changed space).
    """
    results: list[TrialResult] = [] if runner.replays else list(finished)
    for result in results:
        tell_recorded(optimizer, result, result.budget)
    observers = [runner.observe, *([observe] if observe else [])]
    for seen in observers:
        seen(results)
    asked: dict[int, float] = {}  # id(TrialInfo) -> seconds its ask took
    bar = tqdm(total=trials, initial=len(results), desc="search", unit="trial",
               disable=not progress)  # fmt: skip
    started, submitted = time.perf_counter(), len(results)

    def show(result: TrialResult) -> None:
        results.append(result)
        for seen in observers:
            seen(results)
        best = best_trial(results)
        rate = 3600 * len(results) / (time.perf_counter() - started)
        bar.set_postfix(
            best_H=f"{best.harmonic_mean:.4f}" if best else "-",
            trials_per_h=f"{rate:.0f}",
            **_tokens(results, full_tokens),
        )
        bar.update()

    while len(results) < trials:
        while submitted < trials and runner.free():
            start = time.perf_counter()
            info = ask(optimizer)
            if runner.replays and submitted < len(finished):
                result = _replayed(info, finished[submitted], submitted)
                tell(optimizer, info, result)
                show(result)
            else:
                asked[id(info)] = time.perf_counter() - start
                runner.submit(info)
            submitted += 1
        if len(results) == submitted:
            continue  # only replayed trials so far
        for info, result in runner.finished(len(results)):
            recording = time.perf_counter()
            tell(optimizer, info, result)
            # "record": SMAC's tell and building the line; the append + fsync follows it.
            seconds = {"ask": asked.pop(id(info), 0.0), **result.seconds}
            seconds["record"] = time.perf_counter() - recording
            result = result.model_copy(update={"seconds": seconds, "finished_at": time.time()})
            record(result)
            show(result)
    bar.close()
    return results


def _tokens(results: Sequence[TrialResult], full: int | None) -> dict[str, str]:
    """Progress: validation tokens computed so far and the share a full evaluation of every
    trial would have computed more (racing, multi-fidelity)."""
    if not full:
        return {}
    spent = sum(r.computed_tokens or 0 for r in results)
    saved = 1 - spent / (full * len(results))
    return {"tokens": f"{spent:,}", "saved": f"{saved:.0%}"}


def _replayed(info: TrialInfo, result: TrialResult, trial: int) -> TrialResult:
    config, budget = _config(info), _budget(info)
    if (config, budget) != (result.config, result.budget):
        raise RunDirectoryError(
            f"cannot resume: trial {trial} was {result.config} (budget {result.budget}) "
            f"but the optimiser now proposes {config} (budget {budget}); start a new run"
        )
    return result


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
