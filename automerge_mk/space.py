"""Stage 2: blocks -> a conditional ConfigSpace, and a sampled configuration <-> a MergePlan.

Per block: a categorical `method`; its weights, active for the methods that take them; and a
density per source, active only for sparsifying methods (ConfigSpace InConditions). With two
sources and the default `--weighting scaled`, the weights are a mix m (0..1) and, for the
methods that add task vectors without normalising, a scale s: weights s*min(1, 2m) and
s*min(1, 2(1-m)), so s is the larger weight and m = 0.5 gives both sources s (both task vectors
whole at s = 1). Methods that normalise get (m, 1-m). `--weighting convex` (automerge-mk 0.1's
space, kept for its runs) gives one weight w and 1-w for every method. Three or more sources:
a weight per source. slerp's t is the second source's weight. Method facts come from
methods.py, which reads them from mergekit's own registry, so they are never restated here.

The parametrisation is scale x mix, not independent weights: it puts the two things that
decide a task-vector merge (how much of the task vectors in all, and in what balance) on the
forest's axes. Searching mergekit's `lambda` instead is the same family (lambda * sum w_i t_i)
with one more parameter for the recipe to carry, so weights are searched and lambda stays a
--set option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ConfigSpace import (
    Categorical,
    CategoricalHyperparameter,
    Configuration,
    ConfigurationSpace,
    Float,
    InCondition,
    Normal,
    UniformFloatHyperparameter,
)

from .errors import AutomergeError
from .methods import adds_weights, check_methods, is_sparsifying, takes_weights
from .settings import SearchSettings
from .types import Block, BlockChoice, MergePlan
from .vocab import plan_tokenizer

if TYPE_CHECKING:
    from .rundir import RunRecord


def _name(block: Block, what: str, source: str | None = None) -> str:
    return f"{block.name}:{what}" + (f":{source}" if source else "")


def _clamped(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _scaled(settings: SearchSettings) -> list[str]:
    """The searched methods that get a scale (two sources, --weighting scaled)."""
    if settings.weighting != "scaled":
        return []
    return [m for m in settings.methods if adds_weights(m, settings.method_parameters)]


def build_space(
    blocks: tuple[Block, ...], source_names: tuple[str, ...], settings: SearchSettings
) -> ConfigurationSpace:
    """The search space: per block a method, weights and (conditionally) densities."""
    space = ConfigurationSpace(seed=settings.seed)
    methods = list(settings.methods)
    sparsifying = [m for m in methods if is_sparsifying(m)]
    weighted = [m for m in methods if takes_weights(m)]
    scaled = _scaled(settings)

    def add(parameter, active: list[str]) -> None:
        space.add(parameter)
        if len(active) < len(methods):  # karcher, model_stock: no weights
            space.add(InCondition(parameter, method, active))

    for block in blocks:
        method = Categorical(_name(block, "method"), methods)
        space.add(method)
        if weighted:
            _add_weights(add, block, source_names, settings, weighted, scaled)
        for source in source_names if sparsifying else ():
            add(Float(_name(block, "density", source), settings.density_range,
                      default=_clamped(0.5, settings.density_range)), sparsifying)  # fmt: skip
    return space


def _add_weights(add, block: Block, source_names, settings: SearchSettings, weighted, scaled):
    """One block's weight parameters (see the module docstring), each active for the methods
    that use it."""
    low, high = settings.weight_range
    if len(source_names) != 2:
        for source in source_names:
            add(Float(_name(block, "weight", source), (low, high),
                      default=_clamped(0.5, (low, high))), weighted)  # fmt: skip
    elif settings.weighting == "convex":
        add(Float(_name(block, "weight"), (low, high), default=_clamped(0.5, (low, high))),
            weighted)  # fmt: skip
    else:
        add(Float(_name(block, "mix"), (0.0, 1.0), default=0.5), weighted)
        if scaled:
            add(Float(_name(block, "scale"), (low, high), default=_clamped(1.0, (low, high))),
                scaled)  # fmt: skip


# --prior-acquisition's belief in the prior's configuration: per block, its method gets
# PRIOR_METHOD of the method choice, and each of its values a normal with a standard deviation
# of PRIOR_SPREAD of the parameter's range (wide enough that a neighbouring value keeps most
# of the density: the rule is a guess, not a measurement).
PRIOR_METHOD = 0.5
PRIOR_SPREAD = 0.15


def with_prior(space: ConfigurationSpace, believed: Configuration, seed: int) -> ConfigurationSpace:
    """`space` with a prior over the optimum centred on `believed` (πBO, make_optimizer): the
    same names, ranges, defaults and conditions, so a configuration of one is a configuration
    of the other. Parameters `believed` leaves inactive stay uniform."""
    values = dict(believed)
    out = ConfigurationSpace(seed=seed)
    for parameter in space.values():
        name, value = parameter.name, values.get(parameter.name)
        if isinstance(parameter, CategoricalHyperparameter) and value is not None:
            rest = (1.0 - PRIOR_METHOD) / max(1, len(parameter.choices) - 1)
            weights = [PRIOR_METHOD if c == value else rest for c in parameter.choices]
            parameter = Categorical(name, list(parameter.choices), default=parameter.default_value,
                                    weights=weights if len(weights) > 1 else None)  # fmt: skip
        elif isinstance(parameter, UniformFloatHyperparameter) and value is not None:
            low, high = parameter.lower, parameter.upper
            belief = Normal(float(value), PRIOR_SPREAD * (high - low))
            parameter = Float(name, (low, high), default=parameter.default_value,
                              distribution=belief)  # fmt: skip
        out.add(parameter)
    for condition in space.conditions:  # build_space's conditions are all InConditions
        out.add(InCondition(out[condition.child.name], out[condition.parent.name],
                            list(condition.values)))  # fmt: skip
    return out


def _weights(
    config: Mapping[str, Any],
    block: Block,
    method: str,
    source_names: tuple[str, ...],
    settings: SearchSettings,
) -> tuple[float, ...]:
    if not takes_weights(method):  # not used by the merge; equal, for reports
        return (1.0 / len(source_names),) * len(source_names)
    if len(source_names) != 2:
        return tuple(float(config[_name(block, "weight", s)]) for s in source_names)
    if settings.weighting == "convex":
        w = float(config[_name(block, "weight")])
        return (w, 1.0 - w)
    mix = float(config[_name(block, "mix")])
    if method not in _scaled(settings):
        return (mix, 1.0 - mix)
    scale = float(config[_name(block, "scale")])
    return (scale * min(1.0, 2 * mix), scale * min(1.0, 2 * (1.0 - mix)))


def plan_from_config(
    config: Mapping[str, Any],
    blocks: tuple[Block, ...],
    sources: tuple[str, ...],
    source_names: tuple[str, ...],
    base: str | None,
    settings: SearchSettings,
    dtype: str,
) -> MergePlan:
    """Turn one sampled configuration into a per-block MergePlan."""
    choices = []
    for block in blocks:
        method = str(config[_name(block, "method")])
        weights = _weights(config, block, method, source_names, settings)
        densities = None
        if is_sparsifying(method):
            densities = tuple(float(config[_name(block, "density", s)]) for s in source_names)
        choices.append(BlockChoice(method=method, weights=weights, densities=densities))
    return MergePlan(
        sources=sources,
        base=base,
        blocks=blocks,
        choices=tuple(choices),
        dtype=dtype,
        method_parameters=dict(settings.method_parameters),
        seed=settings.seed,
        tokenizer=plan_tokenizer(settings.tokenizer_source, sources, source_names, base),
    )


def _weight_values(
    block: Block, choice: BlockChoice, source_names: tuple[str, ...], settings: SearchSettings
) -> dict[str, float] | None:
    """The weight parameters that give `choice`'s weights, or None when none do."""
    weights = choice.weights
    if not takes_weights(choice.method):
        return {}
    if len(source_names) != 2:
        return {_name(block, "weight", s): w for s, w in zip(source_names, weights)}
    a, b = weights
    if settings.weighting == "convex":
        return {_name(block, "weight"): a} if abs(a + b - 1.0) < 1e-12 else None
    if choice.method not in _scaled(settings):
        return {_name(block, "mix"): a / (a + b) if a + b else 0.5}
    scale = max(a, b)
    mix = 0.5 if scale == 0 else (1.0 - b / (2 * a) if a >= b else a / (2 * b))
    return {_name(block, "mix"): mix, _name(block, "scale"): scale}


def config_from_plan(
    plan: MergePlan,
    space: ConfigurationSpace,
    source_names: tuple[str, ...],
    settings: SearchSettings,
) -> Configuration | None:
    """The configuration of `space` that gives `plan`'s merge, or None when the space cannot
    express it (another method, a weight or density out of its range, other blocks)."""
    values: dict[str, Any] = {}
    for block, choice in zip(plan.blocks, plan.choices):
        weights = _weight_values(block, choice, source_names, settings)
        if weights is None or choice.method not in settings.methods:
            return None
        values |= {_name(block, "method"): choice.method, **weights}
        if choice.densities is not None:
            densities = zip(source_names, choice.densities)
            values |= {_name(block, "density", s): d for s, d in densities}
    try:
        return Configuration(space, values=values)
    except ValueError:  # ConfigSpace: a value out of range, a missing or inactive parameter
        return None


def rescaled(
    values: Mapping[str, Any],
    factor: float,
    blocks: tuple[Block, ...],
    source_names: tuple[str, ...],
    settings: SearchSettings,
) -> dict | None:
    """`values` (a configuration, as plain_values gives it) with the task vectors of every
    block whose method adds them without normalising taken `factor` times: its scale (two
    sources, --weighting scaled) or each of its weights (three or more sources), clipped to
    --weight-range and rounded to 3 decimals. None where that changes nothing: --weighting
    convex (a weight w and 1 - w has no overall scale), only normalising methods, or every
    scale already at the bound."""
    out = dict(values)
    for block in blocks:
        method = values.get(_name(block, "method"))
        if len(source_names) == 2 and method in _scaled(settings):
            names = [_name(block, "scale")]
        elif len(source_names) != 2 and adds_weights(method, settings.method_parameters):
            names = [_name(block, "weight", s) for s in source_names]
        else:
            continue
        for name in names:
            out[name] = round(_clamped(float(values[name]) * factor, settings.weight_range), 3)
    return out if out != dict(values) else None


def uniform_plan(
    method: str,
    weights: tuple[float, ...],
    densities: tuple[float, ...] | None,
    blocks: tuple[Block, ...],
    sources: tuple[str, ...],
    base: str | None,
    dtype: str,
    seed: int | None = None,
) -> MergePlan:
    """One method and one set of weights/densities for every block (a baseline merge)."""
    choice = BlockChoice(method=method, weights=weights, densities=densities)
    return MergePlan(
        sources=sources,
        base=base,
        blocks=blocks,
        choices=(choice,) * len(blocks),
        dtype=dtype,
        seed=seed,
    )


class Baseline(NamedTuple):
    """A fixed merge of every block: a method, each source's weight (None: equal weights
    that sum to 1, i.e. 0.5 each for two sources) and each source's density."""

    method: str
    weight: float | None = None
    density: float | None = None

    def each_weight(self, sources: int) -> float:
        return 1.0 / sources if self.weight is None else self.weight

    def label(self, sources: int) -> str:
        weight = self.each_weight(sources)
        text = f"{self.method} {'t' if self.method == 'slerp' else 'w'}={weight:.2g}"
        return text + (f" d={self.density:.2g}" if self.density is not None else "")


# The fixed merges users reach for first, scored by `baselines` and (they are the search's
# first trials) by every search: mergekit's README settings (equal weights, density 0.5) for
# the five default methods, and the task vectors added whole (weight 1 per source), with and
# without DARE, which is what a hand grid finds when the tasks barely interfere.
BASELINES = (
    Baseline("linear"),
    Baseline("task_arithmetic"),
    Baseline("ties", density=0.5),
    Baseline("dare_linear", density=0.5),
    Baseline("dare_ties", density=0.5),
    Baseline("task_arithmetic", 1.0),
    Baseline("dare_ties", 1.0, 0.5),
)
# `baselines --grid` adds a small hand grid: slerp at t = 0.5 (mergekit's README example),
# task arithmetic at the lambda values of the task-arithmetic papers (0.3, 0.7 beside 0.5
# and 1), ties at densities 0.3 and 0.7 beside 0.5 (its weights are normalised), and
# dare_linear with whole task vectors.
HAND_GRID = (
    Baseline("slerp"),
    Baseline("task_arithmetic", 0.3),
    Baseline("task_arithmetic", 0.7),
    Baseline("ties", density=0.3),
    Baseline("ties", density=0.7),
    Baseline("dare_linear", 1.0, 0.5),
)


def baseline_plans(
    blocks: tuple[Block, ...],
    sources: tuple[str, ...],
    base: str | None,
    dtype: str,
    seed: int | None,
    grid: bool = False,
) -> dict[str, MergePlan]:
    """One plan per baseline (and with `grid` per hand-grid row) that these sources and base
    can run: the task-vector methods need a base, slerp exactly two sources."""
    plans = {}
    for row in BASELINES + (HAND_GRID if grid else ()):
        try:  # the registry's facts: the base it needs, how many models it merges
            check_methods((row.method,), base is not None, len(sources))
        except AutomergeError:
            continue
        weight = row.each_weight(len(sources))
        densities = (row.density,) * len(sources) if is_sparsifying(row.method) else None
        plans[row.label(len(sources))] = uniform_plan(
            row.method, (weight,) * len(sources), densities, blocks, sources, base, dtype, seed
        )
    return plans


def plain_values(config: Configuration) -> dict[str, Any]:
    """A configuration's values as plain Python (ConfigSpace gives numpy scalars), as a
    trial records them."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in dict(config).items()}


def known_configs(
    plans: Mapping[str, MergePlan],
    space: ConfigurationSpace,
    source_names: tuple[str, ...],
    settings: SearchSettings,
) -> dict[str, Configuration]:
    """The baselines this search's space can express, as its configurations, in order."""
    known = {}
    for label, plan in plans.items():
        config = config_from_plan(plan, space, source_names, settings)
        if config is not None and config not in known.values():
            known[label] = config
    return known


def plan_from_record(record: RunRecord, config: Mapping[str, Any]) -> MergePlan:
    """The MergePlan of one of a recorded run's configurations."""
    base = str(record.base.path) if record.base else None
    sources = tuple(str(m.path) for m in record.models)
    return plan_from_config(config, record.blocks, sources, record.names, base, record.settings,
                            record.dtype)  # fmt: skip
