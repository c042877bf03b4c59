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

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ConfigSpace import Configuration
from distributed import Variable
from smac.facade.abstract_facade import AbstractFacade
from smac.runhistory.dataclasses import TrialInfo, TrialValue
from smac.runhistory.enumerations import StatusType
from smac.runner.dask_runner import DaskParallelRunner
from smac.runner.target_function_runner import TargetFunctionRunner

from ..errors import SettingsError
from ..types import TrialResult, top_budget
from .objective import WORST_COST, failed_result
from .optimizer import trial_value

# Per worker process: the objective (engine with resident sources, tasks, references) of each
# search it has run trials for, and how many times it was built.
_OBJECTIVES: dict[str, Any] = {}
_LOADS: dict[str, int] = {}


class WorkerTrial:
    """The target function SMAC ships to Dask workers: small to pickle, it builds the heavy
    objective in the worker on first use, as `build(*arguments)`, and keeps it.

    `build` is a module-level function (pickled by reference, so this module need not import
    the layer that wires a search together); `arguments` are JSON values, which key the cache.
    """

    def __init__(self, build: Callable[..., Any], *arguments: Any, objectives: tuple = ()):
        # `objectives`: the tasks of a multi-objective search, whose SMAC wants a cost each
        self.build, self.arguments, self.objectives = build, arguments, tuple(objectives)
        name = f"{build.__module__}.{build.__qualname__}"
        self.key = json.dumps([name, arguments], sort_keys=True)

    def objective(self):
        if self.key not in _OBJECTIVES:
            _OBJECTIVES[self.key] = self.build(*self.arguments)
            _LOADS[self.key] = _LOADS.get(self.key, 0) + 1
        return _OBJECTIVES[self.key]

    @property
    def incumbent_name(self) -> str:
        """The Dask Variable through which the client tells workers the best trial so far."""
        return "automerge-mk-incumbent-" + hashlib.sha256(self.key.encode()).hexdigest()[:16]

    def __call__(self, config: Configuration, seed: int = 0, budget: float | None = None):
        objective = self.objective()
        if getattr(objective, "race", None):
            objective.observe(_incumbent(self.incumbent_name))
        result = objective(dict(config), -1, None if budget is None else round(budget))
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "loads": _LOADS[self.key]}
        cost = trial_value(result, self.objectives).cost
        return cost, {"result": result.model_dump(mode="json"), "worker": worker}


def _incumbent(name: str) -> list[TrialResult]:
    """The best trial the client has published (none yet: an empty list)."""
    try:
        published = Variable(name).get(timeout=0)
    except TimeoutError:
        return []
    return [TrialResult.model_validate_json(published)]


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


class DaskRunner:
    """The loop's runner on a Dask client: SMAC's own DaskParallelRunner submits each trial to
    a free worker; results come back in the order they finish."""

    replays = False  # completion order is not repeatable: a resume tells finished trials first

    def __init__(self, optimizer: AbstractFacade, target: WorkerTrial, client):
        required = optimizer._get_signature_arguments()
        self._runner = _Runner(
            TargetFunctionRunner(optimizer.scenario, target, required_arguments=required),
            dask_client=client,
        )
        self._asked: dict[str, list[TrialInfo]] = {}  # the loop's own TrialInfo per trial
        self._incumbent = Variable(target.incumbent_name, client=client)
        self._published: int | None = None

    def free(self) -> bool:
        return self._runner.count_available_workers() > 0

    def submit(self, info: TrialInfo) -> None:
        self._asked.setdefault(_key(info), []).append(info)
        self._runner.submit_trial(info)

    def observe(self, results: list[TrialResult]) -> None:
        """Publish the best full trial that kept its per-example losses, for racing workers."""
        full = [r for r in top_budget(results) if r.budget is None and r.tasks
                and all(s.example_losses for s in r.tasks.values())]  # fmt: skip
        best = max(full, key=lambda r: r.harmonic_mean, default=None)
        if best is not None and best.trial != self._published:
            self._incumbent.set(best.model_dump_json())
            self._published = best.trial

    def finished(self, first: int) -> Iterator[tuple[TrialInfo, TrialResult]]:
        self._runner.wait()
        for offset, (info, value) in enumerate(self._runner.iter_results()):
            asked = self._asked.get(_key(info))
            original = asked.pop(0) if asked else info
            yield original, _result(original, value, first + offset)


def _result(info: TrialInfo, value: TrialValue, trial: int) -> TrialResult:
    config = dict(info.config)
    budget = None if info.budget is None else round(info.budget)
    extra = value.additional_info or {}
    if "result" in extra:
        result = TrialResult(**extra["result"])
        return result.model_copy(update={"trial": trial, "worker": extra.get("worker")})
    # The target function raised, or its workers died: a failed trial, the search goes on.
    error = extra.get("error") or extra.get("traceback") or str(value.status)
    return failed_result(trial, config, {}, error).model_copy(update={"budget": budget})


def _key(info: TrialInfo) -> str:
    """A trial's identity across the trip to a worker and back (TrialInfo is not hashable)."""
    return json.dumps([dict(info.config), info.budget], sort_keys=True, default=str)
