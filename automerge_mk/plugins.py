"""Evaluation plug-ins: benchmark scores of each merge, next to the loss objective.

`--eval lm-eval:TASK[,TASK]` runs lm-evaluation-harness tasks on the live model after every
trial scored on all validation tokens, and on the sources and the final model; the scores are
recorded beside AP and PR but do not steer the search. `--eval-arg KEY=VALUE` passes arguments
through to `lm_eval.simple_evaluate` (limit, num_fewshot, batch_size …); `include_path` adds
folders of the user's own task YAMLs (lm-eval's `--include_path`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

from .errors import MetricError, SettingsError

INSTALL_HINT = "pip install 'automerge-mk[lm-eval]'"
# simple_evaluate arguments that automerge-mk sets itself.
_OWN_ARGUMENTS = {"model", "model_args", "tasks", "task_manager", "device", "log_samples"}


class LmEval:
    """lm-evaluation-harness tasks, scored on an in-memory model.

    Args:
        tasks: lm-eval task or group names (patterns as lm-eval matches them).
        arguments: passed to `lm_eval.simple_evaluate`; `include_path` goes to its TaskManager
            and `batch_size` to its HF model wrapper too.
    """

    def __init__(self, tasks: tuple[str, ...], arguments: Mapping[str, Any]):
        from lm_eval.tasks import TaskManager

        # Its warnings are about passing an in-memory model and default aggregations: our
        # choices, nothing a user can act on; errors still show.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        arguments = dict(arguments)
        self.include_path = arguments.pop("include_path", None)
        self.tasks = tasks
        self.arguments = arguments
        self.manager = TaskManager(include_path=self.include_path)

    @classmethod
    def parse(cls, spec: str, arguments: Mapping[str, Any]) -> LmEval:
        """A checked `--eval` value: lm-eval installed, every task known, every argument one
        that simple_evaluate takes. Raises SettingsError naming what is wrong."""
        kind, _, names = spec.partition(":")
        tasks = tuple(t.strip() for t in names.split(",") if t.strip())
        if kind != "lm-eval" or not tasks:
            raise SettingsError(f"--eval {spec!r}: give lm-eval:TASK[,TASK]")
        try:
            import lm_eval
        except ImportError:
            raise SettingsError(
                f"--eval {spec}: lm-evaluation-harness is not installed; {INSTALL_HINT}"
            ) from None
        known = set(inspect.signature(lm_eval.simple_evaluate).parameters) - _OWN_ARGUMENTS
        known.add("include_path")
        for key in arguments:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SettingsError(
                    f"--eval-arg {key}: lm_eval.simple_evaluate takes no {key!r}{hint}"
                )
        plugin = cls(tasks, arguments)
        missing = [t for t in tasks if not plugin.manager.match_tasks([t])]
        if missing:
            raise SettingsError(
                f"--eval: lm-eval has no task {', '.join(map(repr, missing))}; for your own "
                "task YAMLs add --eval-arg include_path=FOLDER"
            )
        return plugin

    def __call__(self, model, tokenizer) -> dict[str, float]:
        """`{"TASK/METRIC": value}` of the model, stderr estimates left out.

        Raises:
            MetricError: when lm-eval fails on this model (the trial then fails, not the run).
        """
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        arguments = dict(self.arguments)
        device = str(next(model.parameters()).device)
        try:
            wrapped = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=arguments.get("batch_size") or 1,
                device=device,
            )
            results = simple_evaluate(
                model=wrapped,
                tasks=list(self.tasks),
                task_manager=self.manager,
                log_samples=False,
                **arguments,
            )
        except Exception as error:  # noqa: BLE001 - lm-eval and the user's tasks may raise anything
            raise MetricError(f"lm-eval failed: {type(error).__name__}: {error}") from error
        scores = {}
        results = results or {}
        for task, metrics in results.get("results", {}).items():
            # The task's metrics are those with a direction; sample_len, alias … are not.
            wanted = results.get("higher_is_better", {}).get(task, {})
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if metric not in wanted or not isinstance(value, (int, float)):
                    continue
                name = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
                if math.isfinite(value):
                    scores[f"{task}/{name}"] = float(value)
        return scores


def parse_evals(specs: tuple[str, ...], arguments: Mapping[str, Any]) -> tuple[LmEval, ...]:
    """Every `--eval`, checked before any model is loaded."""
    if arguments and not specs:
        raise SettingsError("--eval-arg needs an --eval")
    return tuple(LmEval.parse(spec, arguments) for spec in specs)


def run_evals(plugins: tuple[LmEval, ...], model, tokenizer) -> dict[str, float]:
    """All plug-ins' scores of one model."""
    scores: dict[str, float] = {}
    for plugin in plugins:
        scores |= plugin(model, tokenizer)
    return scores
