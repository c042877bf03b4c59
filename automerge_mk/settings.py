"""SearchSettings: what to search and how, declared once.

Each field carries its help text (`description`) and how it is spelt on the command line
(`json_schema_extra`: flag, metavar, repeatable, a default shown as typed); cli.py builds its
options from these fields, as mergekit's `add_merge_options` builds its flags from
`MergeOptions.model_fields`. Values typed on the command line (`0:1`, `tokens:100:900`,
`lambda=1.0`, `linear,ties`) are parsed by the field validators here, so a setting read from
a run's settings.json and one typed by a user go through the same validation.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .methods import DEFAULT_METHODS, METHODS_HELP
from .types import STRATEGY_HELP, Frozen

METRIC_HELP = (
    "Task metric for the preservation rate PR, NAME=module:function[:min] (also "
    "NAME=path/to/file.py:function): called as function(model, tokenizer, rows) on each "
    "task's validation rows (dicts as read from --data) after every trial; higher is better "
    "unless ':min'. Built in: label_accuracy (prompt/label data: the label with the highest "
    "log-likelihood among the task's labels) and token_accuracy. Repeatable; the first one "
    "gives PR. Default: label_accuracy for prompt/label data, else token_accuracy."
)
FIDELITY_HELP = (
    "Multi-fidelity search, tokens[:MIN:MAX]: SMAC's Hyperband (eta 3) evaluates most "
    "configurations on a seeded subset of MIN..MAX validation tokens per task (forward-pass "
    "positions) and only the best on more; each budget's AP is relative to the specialists' "
    "loss on the same examples. --trials counts evaluations at any budget. The result is the "
    "best at the highest budget, evaluated once more on all tokens when MAX is below them. "
    "Default MAX: all of the largest task's tokens; MIN: MAX/9."
)


WEIGHTING_HELP = (
    "How the sources' weights are searched per block. scaled: for the methods that add task "
    "vectors without dividing by the weights' sum (task_arithmetic, dare_linear, dare_ties, "
    "breadcrumbs, della_linear) a scale s in --weight-range and, for two sources, a mix m in "
    "0..1 give the weights s*min(1, 2m) and s*min(1, 2(1-m)) (m = 0.5: both s, so both task "
    "vectors whole at s = 1); the methods that normalise (linear, ties, della, slerp, nuslerp) "
    "get m and 1-m. convex: w and 1-w for every method (the space of automerge-mk 0.1; a "
    "block then holds at most half of each task vector in all). Three or more sources: a "
    "weight per source either way."
)
WEIGHT_RANGES = {"scaled": (0.0, 1.5), "convex": (0.0, 1.0)}


def _cli(**spelling: Any) -> dict[str, Any]:
    return {"cli": spelling}


class SearchSettings(Frozen):
    """What to search and how much; validated before any model is loaded."""

    methods: tuple[str, ...] = Field(
        DEFAULT_METHODS, description=METHODS_HELP, json_schema_extra=_cli(shown="comma list")
    )
    strategy: str = Field("layers:4", description=STRATEGY_HELP)
    weighting: Literal["scaled", "convex"] = Field(
        "scaled",
        description=WEIGHTING_HELP,
    )
    # Default (None): 0:1.5 for --weighting scaled, 0:1 for convex.
    weight_range: tuple[float, float] = Field(
        None,
        description="MIN:MAX of the searched weights: with --weighting scaled each source's "
        "weight for the methods that add task vectors (two sources: the scale, the larger "
        "of the two); with convex, w (the sources get w and 1-w) or each source's weight.",
        json_schema_extra=_cli(shown="0:1.5; convex: 0:1", metavar="MIN:MAX", unset=True),
        validate_default=True,
    )
    density_range: tuple[float, float] = Field(
        (0.1, 1.0),
        description="MIN:MAX of each source's density for sparsifying methods.",
        json_schema_extra=_cli(shown="0.1:1", metavar="MIN:MAX"),
    )
    trials: int = Field(200, description="Trials in total (the baselines' included).")
    initial: int = Field(20, description="Configurations in SMAC's Sobol initial design.")
    baselines_first: bool = Field(
        True,
        description="Evaluate the baselines (see `automerge-mk baselines`, among them every "
        "block task_arithmetic at weight 1 per source) as the search's first trials and "
        "tell them to the optimiser, before the Sobol design; the result is then never worse "
        "than the best of them (with racing: of those it did not stop). Off: they are scored "
        "after the search, for comparison only.",
    )
    optimizer: Literal["smac", "random"] = Field(
        "smac",
        description="smac: random-forest Bayesian optimisation; random: uniform random search "
        "of the same space (a baseline for the optimiser).",
    )
    prior: bool = Field(
        False,
        description="Start from what the weights say: per-block similarity features of the "
        "task vectors and a probe of the validation texts (see `automerge-mk suggest`) give a "
        "predicted merge per block, which the search evaluates with two variants (weights "
        "x1.25; longer task vectors fully balanced) right after the baselines, first the rule "
        "corrected by them (more weight to the task the best baseline kept least; no TIES "
        "where TIES lost to task arithmetic), and last the best merge so far with its task "
        "vectors x1.15, then x1.15 again where that won, else x0.85. Needs --base. "
        "Off by default; scripts/results/prior.md measures it: on the benchmark pairs it "
        "reached the default search's 50-trial best in every seed where that came after "
        "the baselines, in 25-46 % of its trials on average.",
    )
    prior_acquisition: bool = Field(
        True,
        description="With --prior, where the best scored prediction beats every baseline, "
        "end the Sobol design there and search around it: SMAC's acquisition weighted toward "
        "it (πBO: expected improvement times a prior centred on it, half the method choice "
        "and a normal of 15 % of each range per value, fading as trials accumulate); where a "
        "baseline beats them, the search goes on as without it. Off (and with --optimizer "
        "random or --fidelity): the predictions only join the initial design.",
    )
    prior_from: tuple[str, ...] = Field(
        (),
        description="Learn the prior from earlier runs (implies --prior): per block, the "
        "merges of the earlier runs' best trials in the blocks whose features are nearest "
        "(k-nearest neighbours over task-vector cosine, sign conflicts, relative norm, "
        "concentration) replace the hand rule. Runs of any models with the same number of "
        "sources; their models must still be readable where the run found them, or the run "
        "searched with --prior (prior.json keeps its features). Repeatable.",
        json_schema_extra=_cli(metavar="RUN_DIR", multiple=True, folder=True),
    )
    objective: Literal["harmonic", "pareto"] = Field(
        "harmonic",
        description="harmonic: minimise 1 - the harmonic mean of AP over tasks (one "
        "compromise); pareto: SMAC's ParEGO over the per-task costs 1 - AP (each proposal "
        "weighs the tasks at random), so that trials spread along the Pareto front of the "
        "tasks (see `automerge-mk front` and `pick`). Racing is off with pareto (it races "
        "against one best trial); the model built is still the best harmonic mean. Not with "
        "--fidelity.",
    )
    warm_start: str | None = Field(
        None,
        description="Tell the optimiser the finished trials of an earlier run over the same "
        "space (same models, --strategy, --methods and ranges; checked, and refused otherwise) "
        "before it proposes anything. Its models and data must be the same too (their "
        "fingerprints are compared).",
        json_schema_extra=_cli(metavar="RUN_DIR", folder=True),
    )
    seed: int = Field(
        0, description="Seed of the evaluation subset, DARE draws and (search) the optimiser."
    )
    workers: int = Field(
        1,
        description="Run trials in parallel on a local Dask cluster of this many worker "
        "processes (one per GPU, pinned with CUDA_VISIBLE_DEVICES, when --device is a GPU); "
        "each loads the sources once and keeps them resident. 1: trials run in this process.",
    )
    scheduler: str | None = Field(
        None,
        description="Run trials on the workers of an existing Dask cluster (e.g. dask-jobqueue "
        "on SLURM, see the README); each worker loads the sources once.",
        json_schema_extra=_cli(metavar="tcp://HOST:PORT"),
    )
    eval_tokens: int | None = Field(
        None, description="Validation tokens per task (a fixed seeded subset). Default: all."
    )
    # Multi-fidelity: Hyperband over validation tokens per task; (None, None) takes the
    # defaults MAX = all of them, MIN = MAX / 9.
    fidelity: tuple[int | None, int | None] | None = Field(
        None, description=FIDELITY_HELP, json_schema_extra=_cli(metavar="tokens[:MIN:MAX]")
    )
    racing: bool = Field(
        True,
        description="Score each trial in parts (16 examples per task first, then --race-chunk "
        "at a time, in one seeded order) and stop it once a confidence bound on its harmonic "
        "mean, its losses paired per example with the best trial's so far, says it cannot "
        "beat it; a stopped trial is recorded as partial with its estimate, and the result "
        "is always a trial scored on every example. "
        "The baselines race too (the first trial has nothing to race against). Off: every "
        "trial sees every example. Not used with --fidelity.",
    )
    # Defaults from scripts/results/racing.md: the baselines raced, no stop before 16 examples
    # a task (racing.FIRST_LOOK), one bound on the harmonic mean: live, on two real pairs,
    # seeds 0-2, 40 trials, 8 / 0.975 spent 39.8 % and 33.0 % of the full searches' tokens with
    # mean best validation and test H at least theirs. Replayed on the full searches' losses,
    # 0.975 stopped as few better trials as the per-task bound at 0.95 (1 and 5 vs 1 and 4 at
    # 200 trials); at 0.95 it stopped 2 and 7.
    race_chunk: int = Field(
        8, description="Racing: validation examples per task between two comparisons."
    )
    race_confidence: float = Field(
        0.975,
        description="Racing: one-sided confidence, per comparison (all tasks at once), that a "
        "stopped trial would not have beaten the best one.",
        json_schema_extra=_cli(metavar="P"),
    )
    max_length: int = Field(512, description="Truncate validation texts to this many tokens.")
    text_column: str = Field("text", description="Column holding the text.")
    metrics: tuple[str, ...] = Field(
        (),
        description=METRIC_HELP,
        json_schema_extra=_cli(flag="--metric", metavar="SPEC", multiple=True),
    )
    evals: tuple[str, ...] = Field(
        (),
        description="Also score lm-evaluation-harness tasks (optional extra: pip install "
        "'automerge-mk[lm-eval]') on every trial scored on all validation tokens, the "
        "sources, the baselines and the final model; recorded beside AP and PR "
        "(trials.jsonl, evals.json, summary.md), not optimised.",
        json_schema_extra=_cli(flag="--eval", metavar="lm-eval:TASK[,TASK]", multiple=True),
    )
    eval_arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed through to lm_eval.simple_evaluate, e.g. --eval-arg limit=100 "
        "--eval-arg num_fewshot=0 --eval-arg batch_size=8; include_path=FOLDER adds your own "
        "task YAMLs. Repeatable; unknown keys are refused.",
        json_schema_extra=_cli(flag="--eval-arg", metavar="KEY=VALUE", multiple=True),
    )
    dtype: str | None = Field(
        None, description="Merge dtype written in the recipe. Default: the base model's."
    )
    tokenizer_source: str | None = Field(
        None,
        description="The merged model's tokenizer when the models' vocabularies differ (added "
        "tokens, other tokenizers, padded embeddings): union (every model's tokens), base "
        "(the base's tokens only) or a source's name; mergekit's tokenizer_source, written "
        "in the recipe. Default: none, and models whose vocabularies differ are refused, "
        "naming the tokens.",
        json_schema_extra=_cli(metavar="union|base|NAME"),
    )
    device: str = Field(
        "auto",
        description="Where kernels run and the live model is scored: auto (a GPU when one is "
        "visible, else cpu), cpu, cuda, cuda:N.",
    )
    tier: Literal["auto", "resident", "host", "mmap"] = Field(
        "auto",
        description="Where the base and sources stay: resident (on --device, the fastest), host "
        "(in host memory, pinned, each tensor copied to the GPU when merged), mmap "
        "(memory-mapped from their safetensors files, read tensor by tensor: for models larger "
        "than memory; the files must stay unchanged until the search ends). auto: the first "
        "that fits, by the memory plan printed at start-up. "
        "Every tier merges bit-identically to stock mergekit.",
    )
    rank_cache: Literal["auto", "device", "host", "off"] = Field(
        "auto",
        description="Where TIES's magnitude order of every task vector is kept between trials "
        "(4 bytes per parameter per source, about 1.1 GB for two 135M-parameter sources): "
        "device (with the kernels), host (in host memory, copied over per use), off (sorted "
        "again each trial, as stock mergekit does: on a CPU seconds per ties trial). auto: on "
        "the device when it fits, else off.",
    )
    memory_limit: int | None = Field(
        None,
        description="Use at most this much memory, e.g. 20GB or 512MiB: the memory plan takes "
        "no more than this to be free on the device and in host memory (for a machine you "
        "share). Default: what is free when the search starts.",
        json_schema_extra=_cli(metavar="SIZE", text=True),  # parsed by _size below
    )
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the live model that is scored: auto = on a CPU, bfloat16 when a "
        "forward pass of this architecture on one batch of your data is at least 1.5x faster "
        "in it than in float32 (timed at start-up; AVX512 CPUs are often 2x faster in "
        "bfloat16, others slower), else float32; bfloat16 on a GPU. Recorded in memory.json; "
        "a resumed run and Dask workers keep it. Losses are summed in float32 either way.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Accept models whose config needs code from their repository (off: such "
        "models are refused and no code of theirs is downloaded or run). Only for "
        "repositories you trust.",
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Accept models that have only pickled pytorch_model*.bin weights (off: "
        "safetensors only). They are read with torch's weights-only unpickler, but a pickle "
        "is still code: only for models you trust.",
    )
    method_parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Fix a merge parameter for every trial, e.g. --set lambda=1.0 "
        "--set int8_mask=true. Unknown keys are rejected.",
        json_schema_extra=_cli(flag="--set", metavar="KEY=VALUE", multiple=True),
    )

    # --- values as typed on the command line ---

    @field_validator("methods", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value):
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f"--memory-limit takes a size such as 20GB or 512MiB, not {value!r}")
        number, unit = float(match[1]), (match[2] or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]  # fmt: skip
        return int(number * scale)

    @model_validator(mode="before")
    @classmethod
    def _cache_order(cls, data):
        """Runs of automerge-mk 0.2 recorded --cache-order/--no-cache-order: the rank cache."""
        if isinstance(data, dict) and "cache_order" in data:
            cached = data["cache_order"]
            data = {k: v for k, v in data.items() if k != "cache_order"}
            data.setdefault("rank_cache", "auto" if cached else "off")
        return data

    @model_validator(mode="before")
    @classmethod
    def _weight_range_default(cls, data):
        if isinstance(data, dict) and data.get("weight_range") is None:
            weighting = data.get("weighting", "scaled")
            return {**data, "weight_range": WEIGHT_RANGES.get(weighting, (0.0, 1.0))}
        return data

    @field_validator("weight_range", "density_range", mode="before")
    @classmethod
    def _range(cls, value, info):
        if not isinstance(value, str):
            return value
        try:
            low, high = (float(x) for x in value.split(":"))
        except ValueError:
            flag = "--" + info.field_name.replace("_", "-")
            raise ValueError(f"{flag} must be MIN:MAX, e.g. 0.1:1.0, not {value!r}") from None
        return low, high

    @field_validator("fidelity", mode="before")
    @classmethod
    def _fidelity(cls, value):
        if not isinstance(value, str):
            return value
        kind, *bounds = value.split(":")
        try:
            if kind != "tokens" or len(bounds) > 2:
                raise ValueError
            return [int(b) if b else None for b in bounds] + [None] * (2 - len(bounds))
        except ValueError:
            raise ValueError(
                f"--fidelity takes tokens or tokens:MIN:MAX (token counts per task), not {value!r}"
            ) from None

    @field_validator("method_parameters", "eval_arguments", mode="before")
    @classmethod
    def _key_values(cls, value, info):
        if not isinstance(value, list | tuple):
            return value
        flag = {"method_parameters": "--set", "eval_arguments": "--eval-arg"}[info.field_name]
        return {key: plain_value(text) for key, text in key_values(value, flag).items()}

    @field_validator("warm_start", mode="before")
    @classmethod
    def _absolute(cls, value):
        from pathlib import Path

        return str(Path(value).resolve()) if isinstance(value, str | Path) else value

    @field_validator("prior_from", mode="before")
    @classmethod
    def _absolutes(cls, value):
        from pathlib import Path

        if isinstance(value, list | tuple):
            return tuple(str(Path(v).resolve()) if isinstance(v, str | Path) else v for v in value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _prior_from_implies_prior(cls, data):
        if isinstance(data, dict) and data.get("prior_from"):
            return {**data, "prior": True}
        return data

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
        if self.race_chunk < 2:
            raise ValueError("--race-chunk must be at least 2 (a bound needs two examples)")
        if not 0.5 < self.race_confidence < 1:
            raise ValueError("--race-confidence must lie between 0.5 and 1 (e.g. 0.95)")
        if self.fidelity and self.objective == "pareto":
            raise ValueError("--objective pareto runs on all of the data: drop --fidelity "
                             "(Hyperband's budgets rank trials by one cost)")  # fmt: skip
        if self.fidelity and self.optimizer == "random":
            raise ValueError("--fidelity needs --optimizer smac (random search has no budgets)")
        return self


def key_values(pairs, option: str) -> dict[str, str]:
    """`NAME=VALUE` strings -> a dict of strings.

    Raises:
        ValueError: naming the option and the pair that is not NAME=VALUE.
    """
    out = {}
    for pair in pairs:
        if not isinstance(pair, str):
            raise ValueError(f"{option} takes NAME=VALUE, not {pair!r}")
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{option} takes NAME=VALUE, not {pair!r}")
        out[key.strip()] = value.strip()
    return out


def plain_value(text: str):
    """A --set / --eval-arg value as safe YAML: numbers, booleans, strings, lists.

    Raises:
        ValueError: for anything else (a python tag, malformed YAML).
    """
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ValueError(f"{text!r} is not a plain YAML value ({error})") from None
