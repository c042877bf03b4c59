"""Stage 2: blocks -> a conditional ConfigSpace, and a sampled configuration -> a MergePlan.

Per block: a categorical `method`, a weight per source (for two sources one weight w, the
second source gets 1 - w; slerp's t is the second source's weight), active for the methods
that take one, and a density per source that is active only for sparsifying methods
(ConfigSpace InConditions). Method facts come from methods.py, which reads them from mergekit's
own registry, so they are never restated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ConfigSpace import Categorical, ConfigurationSpace, Float, InCondition

from .methods import DEFAULT_METHODS, is_sparsifying, needs_base, takes_weights
from .settings import SearchSettings
from .types import Block, BlockChoice, MergePlan

if TYPE_CHECKING:
    from .rundir import RunRecord


def _name(block: Block, what: str, source: str | None = None) -> str:
    return f"{block.name}:{what}" + (f":{source}" if source else "")


def build_space(
    blocks: tuple[Block, ...], source_names: tuple[str, ...], settings: SearchSettings
) -> ConfigurationSpace:
    """The search space: per block a method, weights and (conditionally) densities."""
    space = ConfigurationSpace(seed=settings.seed)
    sparsifying = [m for m in settings.methods if is_sparsifying(m)]
    weighted = [m for m in settings.methods if takes_weights(m)]
    for block in blocks:
        method = Categorical(_name(block, "method"), list(settings.methods))
        space.add(method)
        weight_sources = [None] if len(source_names) == 2 else list(source_names)
        for source in weight_sources if weighted else ():
            low, high = settings.weight_range
            default = min(max(0.5, low), high)
            weight = Float(_name(block, "weight", source), (low, high), default=default)
            space.add(weight)
            if len(weighted) < len(settings.methods):  # karcher, model_stock: no weights
                space.add(InCondition(weight, method, weighted))
        if not sparsifying:
            continue
        for source in source_names:
            density = Float(
                _name(block, "density", source),
                settings.density_range,
                default=max(settings.density_range[0], min(0.5, settings.density_range[1])),
            )
            space.add(density)
            if len(sparsifying) < len(settings.methods):
                space.add(InCondition(density, method, sparsifying))
    return space


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
        method = config[_name(block, "method")]
        if not takes_weights(method):  # not used by the merge; equal, for reports
            weights = (1.0 / len(source_names),) * len(source_names)
        elif len(source_names) == 2:
            w = float(config[_name(block, "weight")])
            weights: tuple[float, ...] = (w, 1.0 - w)
        else:
            weights = tuple(float(config[_name(block, "weight", s)]) for s in source_names)
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
    )


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


# The fixed settings users reach for first, as in mergekit's README examples: equal weights
# (0.5/0.5 for two sources) and density 0.5 for the sparsifying methods.
BASELINE_DENSITY = 0.5


def baseline_plans(
    blocks: tuple[Block, ...],
    sources: tuple[str, ...],
    base: str | None,
    dtype: str,
    seed: int | None,
) -> dict[str, MergePlan]:
    """The five default methods at fixed, documented settings, one plan each (linear alone
    when there is no base model)."""
    weights = (1.0 / len(sources),) * len(sources) if len(sources) > 2 else (0.5, 0.5)
    plans = {}
    for method in DEFAULT_METHODS:
        if needs_base(method) and base is None:
            continue
        densities = (BASELINE_DENSITY,) * len(sources) if is_sparsifying(method) else None
        label = f"{method} w={weights[0]:.2g}" + (f" d={BASELINE_DENSITY}" if densities else "")
        plans[label] = uniform_plan(method, weights, densities, blocks, sources, base, dtype, seed)
    return plans


def plan_from_record(record: RunRecord, config: Mapping[str, Any]) -> MergePlan:
    """The MergePlan of one of a recorded run's configurations."""
    base = str(record.base.path) if record.base else None
    sources = tuple(str(m.path) for m in record.models)
    return plan_from_config(config, record.blocks, sources, record.names, base, record.settings,
                            record.dtype)  # fmt: skip
