"""The concepts that cross module boundaries, validated once on construction and frozen."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Component = Literal["all", "attention", "mlp"]
STRATEGY_HELP = (
    "'trace' (shape-signature blocks of one forward pass), 'layers:K' (K contiguous layer "
    "groups), 'components' (attention vs the rest: MLP, norms, embeddings); combine with '+', "
    "e.g. 'layers:4+components'. The trace is always applied first."
)

BUILT_IN_METRICS = ("label_accuracy", "token_accuracy")
METRIC_HELP = (
    "Task metric for the preservation rate PR, NAME=module:function[:min] (also "
    "NAME=path/to/file.py:function): called as function(model, tokenizer, rows) on each "
    "task's validation rows (dicts as read from --data) after every trial; higher is better "
    "unless ':min'. Built in: label_accuracy (prompt/label data: the label with the highest "
    "log-likelihood among the task's labels) and token_accuracy. Repeatable; the first one "
    "gives PR. Default: label_accuracy for prompt/label data, else token_accuracy."
)


class Frozen(BaseModel):
    # NaN losses of failed trials must survive a JSON round trip (trials.jsonl, resume).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class SourceModel(Frozen):
    """A model reference resolved to a local folder.

    `pinned` is what recipes record: the absolute folder for local models, `org/name@sha` for
    Hub models, so that a recipe always names exactly the weights that were searched.
    """

    reference: str
    name: str
    path: Path
    revision: str | None = None
    repo_id: str | None = None

    @property
    def pinned(self) -> str:
        if self.repo_id and self.revision:
            return f"{self.repo_id}@{self.revision}"
        return str(self.path)


class Block(Frozen):
    """A set of tensors that share one merge configuration.

    `filters` are substrings of tensor names (mergekit's parameter-filter semantics) that match
    exactly this block's tensors among all of the model's tensors.
    """

    name: str
    tensors: tuple[str, ...]
    filters: tuple[str, ...]
    layers: tuple[int, int] | None = None
    component: Component = "all"
    parameters: int


class BlockChoice(Frozen):
    """The merge chosen for one block: method, a weight per source, a density per source."""

    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...] | None = None


class MergePlan(Frozen):
    """A complete per-block merge: what the optimiser proposes and a recipe encodes."""

    sources: tuple[str, ...]
    base: str | None
    blocks: tuple[Block, ...]
    choices: tuple[BlockChoice, ...]
    dtype: str = "float32"
    method_parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None

    @model_validator(mode="after")
    def _one_choice_per_block(self) -> MergePlan:
        if len(self.blocks) != len(self.choices):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.choices)} choices")
        for choice in self.choices:
            if len(choice.weights) != len(self.sources):
                raise ValueError(f"{len(self.sources)} sources but weights {choice.weights}")
        return self

    @property
    def methods(self) -> tuple[str, ...]:
        """Methods used, in order of first use."""
        return tuple(dict.fromkeys(c.method for c in self.choices))


class TaskScore(Frozen):
    """A model's scores on one task's validation data.

    `loss` and `accuracy` (next-token) are over the scored tokens: every token of a text, or
    only the label's tokens of a prompt/label example. `metrics` holds `label_accuracy` for
    prompt/label data and each user metric. `preservation` is AP (from the loss) and `rate` is
    PR, from the metric named `rate_metric`; both relative to the task's own specialist.
    """

    loss: float
    accuracy: float
    tokens: int
    metrics: dict[str, float] = Field(default_factory=dict)
    preservation: float | None = None
    rate: float | None = None
    rate_metric: str | None = None

    def value(self, metric: str) -> float:
        """A metric by name; `token_accuracy` is the next-token accuracy."""
        return self.accuracy if metric == "token_accuracy" else self.metrics[metric]


class TrialResult(Frozen):
    """One finished trial, as written to a line of trials.jsonl."""

    trial: int
    status: Literal["ok", "failed"]
    config: dict[str, Any]
    cost: float
    harmonic_mean: float
    tasks: dict[str, TaskScore]
    seconds: dict[str, float]
    error: str | None = None
    budget: int | None = None  # validation tokens per task (multi-fidelity); None: all of them
    computed_tokens: int | None = None  # forward-pass positions over all tasks
    evals: dict[str, float] = Field(default_factory=dict)  # evaluation plug-ins (--eval)
    worker: dict[str, Any] | None = None  # the Dask worker that ran it: host, pid, loads
    finished_at: float | None = None  # Unix time it was recorded


def budget_rank(result: TrialResult) -> float:
    """A trial's budget for comparisons: all of the data (None) ranks above every budget."""
    return math.inf if result.budget is None else result.budget


def top_budget(results: list[TrialResult]) -> list[TrialResult]:
    """The successful trials at the highest budget any successful trial was evaluated on.

    Scores on fewer validation tokens are neither comparable with nor as reliable as scores on
    more, so a multi-fidelity search's result comes from its highest budget only; in a
    full-fidelity search every successful trial qualifies.
    """
    ok = [r for r in results if r.status == "ok"]
    top = max((budget_rank(r) for r in ok), default=None)
    return [r for r in ok if budget_rank(r) == top]


def best_trial(results: list[TrialResult]) -> TrialResult | None:
    """The best successful trial at the highest budget evaluated (see `top_budget`)."""
    return max(top_budget(results), key=lambda r: r.harmonic_mean, default=None)


def harmonic_mean(values: list[float]) -> float:
    """n / sum(1/v): zero as soon as one value is zero or not finite."""
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


class SearchSettings(Frozen):
    """What to search and how much; validated before any model is loaded."""

    methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
    strategy: str = "layers:4"
    weight_range: tuple[float, float] = (0.0, 1.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    trials: int = 200
    initial: int = 20
    optimizer: Literal["smac", "random"] = "smac"
    warm_start: str | None = None  # an earlier run directory whose trials the optimiser is told
    seed: int = 0
    workers: int = 1  # Dask worker processes on this machine (1: trials run in this process)
    scheduler: str | None = None  # tcp://HOST:PORT of an existing Dask cluster
    eval_tokens: int | None = None
    # Multi-fidelity (--fidelity tokens[:MIN:MAX]): Hyperband over validation tokens per task;
    # (None, None) takes the defaults MAX = all of them, MIN = MAX / 9.
    fidelity: tuple[int | None, int | None] | None = None
    max_length: int = 512
    text_column: str = "text"
    metrics: tuple[str, ...] = ()  # NAME=module:function[:min] specs or built-in names
    evals: tuple[str, ...] = ()  # evaluation plug-ins: lm-eval:TASK[,TASK]
    eval_arguments: dict[str, Any] = Field(default_factory=dict)  # passed through to them
    dtype: str | None = None
    device: str = "cpu"
    cache_order: bool = True
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # accept pytorch_model*.bin when there is no safetensors
    method_parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SearchSettings:
        if self.initial < 1:
            raise ValueError("--initial must be at least 1")
        if self.trials < self.initial:
            raise ValueError(
                f"--trials ({self.trials}) is smaller than --initial ({self.initial}): "
                "the initial design alone would exceed the budget; raise --trials or lower "
                "--initial"
            )
        for label, (low, high) in (("weight", self.weight_range), ("density", self.density_range)):
            if not low < high:
                raise ValueError(f"{label} range {low}..{high} is empty: give MIN < MAX")
        if not (0.0 < self.density_range[0] and self.density_range[1] <= 1.0):
            raise ValueError("densities must lie in (0, 1]")
        low, high = self.fidelity or (None, None)
        if (low is not None and low < 1) or (low and high and not low < high):
            raise ValueError(f"--fidelity tokens:{low}:{high}: give 0 < MIN < MAX")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.scheduler and self.workers > 1:
            raise ValueError("--workers starts a local cluster; with --scheduler the cluster's "
                             "workers are used: give one of them")  # fmt: skip
        if self.fidelity and self.optimizer == "random":
            raise ValueError("--fidelity needs --optimizer smac (random search has no budgets)")
        return self
