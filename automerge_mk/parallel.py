"""Parallel and multi-machine trials on Dask.

SMAC's own DaskParallelRunner submits trials through a Dask client: to a local cluster of
`--workers N` processes (one GPU each when there are GPUs, pinned by CUDA_VISIBLE_DEVICES), or to
an existing cluster (`--scheduler tcp://HOST:PORT`, e.g. from dask-jobqueue on SLURM). Each
worker process loads the sources once, on its first trial, and keeps them resident for every
later trial (a per-process cache keyed by the resolved models, data and settings). Dask retries
a trial whose worker died once on another worker (`distributed.scheduler.allowed-failures` 1);
if that one dies too, the trial is recorded as failed and the search goes on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ConfigSpace import Configuration
from smac.facade.abstract_facade import AbstractFacade
from smac.runhistory.dataclasses import TrialInfo, TrialValue
from smac.runhistory.enumerations import StatusType
from smac.runner.dask_runner import DaskParallelRunner
from smac.runner.target_function_runner import TargetFunctionRunner
from tqdm.auto import tqdm

from .errors import SettingsError
from .search import WORST_COST, _ask, _failed, trial_value
from .types import SearchSettings, TrialResult, best_trial

# Per worker process: the objective (engine with resident sources, tasks, references) of each
# search it has run trials for, and how many times it was built.
_OBJECTIVES: dict[str, Any] = {}
_LOADS: dict[str, int] = {}


class WorkerTrial:
    """The target function SMAC ships to Dask workers: small to pickle (model references, data
    paths, settings), it builds the heavy objective in the worker on first use and keeps it."""

    def __init__(
        self,
        model_refs: list[str],
        base_ref: str | None,
        data: dict[str, str],
        settings: SearchSettings,
    ):
        self.model_refs, self.base_ref, self.data = list(model_refs), base_ref, dict(data)
        # A warm start is told to SMAC in the main process; workers only run trials.
        self.settings = settings.model_copy(update={"warm_start": None}).model_dump(mode="json")
        self.key = json.dumps([self.model_refs, base_ref, self.data, self.settings], sort_keys=True)

    def objective(self):
        if self.key not in _OBJECTIVES:
            from .cli import worker_objective

            settings = SearchSettings(**self.settings)
            _OBJECTIVES[self.key] = worker_objective(
                self.model_refs, self.base_ref, self.data, settings
            )
            _LOADS[self.key] = _LOADS.get(self.key, 0) + 1
        return _OBJECTIVES[self.key]

    def __call__(self, config: Configuration, seed: int = 0, budget: float | None = None):
        objective = self.objective()
        result = objective(dict(config), -1, None if budget is None else round(budget))
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "loads": _LOADS[self.key]}
        return result.cost, {"result": result.model_dump(mode="json"), "worker": worker}


class _Runner(DaskParallelRunner):
    """SMAC's Dask runner, except that a trial whose workers died (twice: Dask retries once)
    comes back as a crashed result instead of an exception that would end the search."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._infos: dict[Any, TrialInfo] = {}

    def submit_trial(self, trial_info: TrialInfo, **data) -> None:
        super().submit_trial(trial_info, **data)
        self._infos[self._pending_trials[-1].key] = trial_info

    def _process_pending_trials(self) -> None:
        for future in [f for f in self._pending_trials if f.done()]:
            self._pending_trials.remove(future)
            info = self._infos.pop(future.key)
            try:
                self._results_queue.append(future.result())
            except Exception as error:  # noqa: BLE001 - KilledWorker, a lost connection …
                value = TrialValue(
                    cost=WORST_COST,
                    status=StatusType.CRASHED,
                    additional_info={"error": f"{type(error).__name__}: {error}"},
                )
                self._results_queue.append((info, value))


def _worker_specs(workers: int, device: str) -> dict:
    """One single-threaded worker process per GPU (CUDA_VISIBLE_DEVICES) or per CPU share."""
    from distributed import Nanny

    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
        if gpus and workers > gpus:
            raise SettingsError(f"--workers {workers} but only {gpus} GPUs: one worker per GPU")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    specs = {}
    for index in range(workers):
        env = {
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "DASK_LOGGING__DISTRIBUTED": "error",
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index)
        specs[index] = {"cls": Nanny, "options": {"nthreads": 1, "env": env}}
    return specs


@contextmanager
def dask_client(workers: int, scheduler: str | None, device: str) -> Iterator:
    """A client of an existing cluster (`scheduler`) or of a local one on 127.0.0.1."""
    import dask
    from distributed import Client, Scheduler, SpecCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=30)
        except OSError as error:
            raise SettingsError(f"--scheduler {scheduler}: cannot connect: {error}") from None
        with client:
            yield client
        return
    specs = _worker_specs(workers, device)
    config = {"distributed.scheduler.allowed-failures": 1, "distributed.worker.daemon": False}
    with dask.config.set(config):
        scheduler_spec = {
            "cls": Scheduler,
            "options": {"host": "127.0.0.1", "dashboard_address": None},
        }
        with SpecCluster(workers=specs, scheduler=scheduler_spec, silence_logs=40) as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(workers, timeout=120)
                yield client


def _result(info: TrialInfo, value: TrialValue, trial: int, ask_seconds: float) -> TrialResult:
    config = dict(info.config)
    budget = None if info.budget is None else round(info.budget)
    extra = value.additional_info or {}
    if "result" in extra:
        result = TrialResult(**extra["result"])
        seconds = {"ask": ask_seconds, **result.seconds}
        return result.model_copy(
            update={"trial": trial, "seconds": seconds, "worker": extra.get("worker")}
        )
    # The target function raised, or its workers died: a failed trial, the search goes on.
    error = extra.get("error") or extra.get("traceback") or str(value.status)
    return _failed(trial, config, {"ask": ask_seconds}, error).model_copy(update={"budget": budget})


def run_parallel_search(
    optimizer: AbstractFacade,
    target: WorkerTrial,
    client,
    trials: int,
    record: Callable[[TrialResult], None],
    progress: bool = True,
    finished: Sequence[TrialResult] = (),
) -> list[TrialResult]:
    """Keep every worker busy: ask SMAC for a trial whenever one is free, submit it through
    SMAC's Dask runner, and tell and record (append + fsync) results as they arrive.

    Trials are numbered in the order they finish. `finished` trials of an interrupted run are
    told to SMAC first, and the search goes on to `trials`; unlike a serial search, the
    proposals after a resume differ from an uninterrupted run's (completion order is not
    repeatable), but no finished trial is lost or run again.
    """
    scenario = optimizer.scenario
    runner = _Runner(
        TargetFunctionRunner(scenario, target, required_arguments=_required(optimizer)),
        dask_client=client,
    )
    for result in finished:
        info = TrialInfo(
            config=Configuration(scenario.configspace, values=result.config),
            seed=0,
            budget=result.budget,
        )
        optimizer.tell(info, trial_value(result))
    results = list(finished)
    asked: dict[str, float] = {}
    submitted = len(results)
    bar = tqdm(
        total=trials, initial=len(results), desc="search", unit="trial", disable=not progress
    )
    started = time.perf_counter()
    while len(results) < trials:
        while submitted < trials and runner.count_available_workers() > 0:
            start = time.perf_counter()
            info = _ask(optimizer)
            asked[_key(info)] = time.perf_counter() - start
            runner.submit_trial(info)
            submitted += 1
        runner.wait()
        for info, value in runner.iter_results():
            result = _result(info, value, len(results), asked.pop(_key(info), 0.0))
            result = result.model_copy(update={"finished_at": time.time()})
            optimizer.tell(info, trial_value(result))
            record(result)
            results.append(result)
            best = best_trial(results)
            rate = 3600 * (len(results) - len(finished)) / (time.perf_counter() - started)
            bar.set_postfix(
                best_H=f"{best.harmonic_mean:.4f}" if best else "-", trials_per_h=f"{rate:.0f}"
            )
            bar.update()
    bar.close()
    return results


def _key(info: TrialInfo) -> str:
    """A trial's identity across the trip to a worker and back (TrialInfo is not hashable)."""
    return json.dumps([dict(info.config), info.budget], sort_keys=True, default=str)


def _required(optimizer: AbstractFacade) -> list[str]:
    return optimizer._get_signature_arguments()
