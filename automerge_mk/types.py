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
    "e.g. 'layers:4+components'; 'whole' (one block: the whole model, as a fixed recipe "
    "merges it). The trace is always applied first."
)

BUILT_IN_METRICS = ("label_accuracy", "token_accuracy")


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
    # A PEFT adapter (its folder is `path`) applies to this model; a recipe names the pair as
    # mergekit's `base+adapter`.
    adapter_of: SourceModel | None = None

    @property
    def pinned(self) -> str:
        hub = self.repo_id and self.revision
        own = f"{self.repo_id}@{self.revision}" if hub else str(self.path)
        return f"{self.adapter_of.pinned}+{own}" if self.adapter_of else own

    @property
    def model_folder(self) -> Path:
        """The folder with the model's config and tokenizer: an adapter's base's."""
        return self.adapter_of.path if self.adapter_of else self.path


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
    # mergekit's tokenizer_source: "union" or a model (one of `sources` or `base`); None: the
    # models share one vocabulary.
    tokenizer: str | None = None

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
    # Per example (in the task's order): its summed loss over its scored tokens. Kept for the
    # trials of a racing search, whose best is the incumbent later trials are compared with.
    example_losses: tuple[float, ...] = ()

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
    # Racing: stopped early because it could not beat the incumbent; its scores are those of
    # the examples seen and its harmonic_mean an estimate for all of them (search/racing.py).
    partial: bool = False
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
    full-fidelity search every successful trial qualifies. A racing search's partial trials
    (stopped on some of the examples) never do.
    """
    ok = [r for r in results if r.status == "ok" and not r.partial]
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
