"""Stage 2: blocks -> a conditional ConfigSpace, and a sampled configuration -> a MergePlan.

Per block: a categorical `method`, a weight per source (for two sources one weight w, the
second source gets 1 - w; slerp's t is the second source's weight), active for the methods
that take one, and a density per source that is active only for sparsifying methods
(ConfigSpace InConditions). Method facts come from mergekit's own registry (parameters, how
many inputs, whether a base is required, optional or ignored), so they are never restated here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from ConfigSpace import Categorical, ConfigurationSpace, Float, InCondition
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BasePolicy, ParameterScope

from .errors import MissingBaseModelError, SettingsError
from .types import Block, BlockChoice, MergePlan, SearchSettings

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
# Methods whose parameters the space expresses: a weight per source (+ a density per source
# when they sparsify), slerp's t, or nothing to search. Not offered: sce (no weights, a
# shared top-k), nearswap (a similarity threshold), ram / ramplus_tl / arcee_fusion
# (thresholds and importance estimates), passthrough (no merge).
SUPPORTED_METHODS = DEFAULT_METHODS + (
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "slerp", "nuslerp", "multislerp", "karcher", "model_stock",
)  # fmt: skip
SEARCHED_PARAMETERS = frozenset({"weight", "density", "t"})
# slerp interpolates from its `base_model` to the one other input: the first source plays
# that part (t = 0 is the first source, t = 1 the second).
SOURCE_AS_BASE = frozenset({"slerp"})


def is_sparsifying(method: str) -> bool:
    """Whether mergekit's method drops task-vector entries by a density."""
    return getattr(registry.get(method), "sparsification_method", None) is not None


def needs_base(method: str) -> bool:
    """Whether mergekit's method needs the base model (the model the sources came from)."""
    contract = registry.get(method).spec.contract
    return contract.base == BasePolicy.REQUIRED and method not in SOURCE_AS_BASE


def uses_base(method: str, has_base: bool) -> bool:
    """Whether a merge with `method` takes the base model: when required, and when optional
    and given (nuslerp and multislerp then interpolate task vectors, not weights)."""
    policy = registry.get(method).spec.contract.base
    return needs_base(method) or (policy == BasePolicy.OPTIONAL and has_base)


def takes_weights(method: str) -> bool:
    """Whether the method's per-source weights (or slerp's t) are searched."""
    return method_accepts(method, "weight") or method_accepts(method, "t")


def _check_input_count(method: str, sources: int, has_base: bool) -> None:
    contract = registry.get(method).spec.contract
    with_base = uses_base(method, has_base)
    inputs, non_base = sources + with_base, sources - (method in SOURCE_AS_BASE)
    for count, low, high, what in (
        (inputs, contract.min_inputs, contract.max_inputs, "models in all"),
        (non_base, contract.min_non_base, contract.max_non_base, "models besides the base"),
    ):
        if (low and count < low) or (high and count > high):
            wanted = f"exactly {low}" if low == high else f"{low or 0}..{high or 'any'}"
            raise SettingsError(
                f"{method} merges {wanted} {what}; here it would get {count} ({sources} "
                f"sources{' + the base' if with_base else ''}): drop it from --methods"
            )


def check_methods(methods: tuple[str, ...], has_base: bool, sources: int = 2) -> None:
    """Check each method is supported, fits the number of sources, and has the base it needs.

    Raises:
        SettingsError: on an unknown or unsupported method, or one that cannot merge
            `sources` models (slerp and nuslerp take exactly two).
        MissingBaseModelError: when a task-vector method is asked for without a base.
    """
    for method in methods:
        if method not in SUPPORTED_METHODS:
            close = difflib.get_close_matches(method, SUPPORTED_METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(
                f"unknown or unsupported merge method {method!r}{hint}; "
                f"choose from {', '.join(SUPPORTED_METHODS)}"
            )
    if not has_base:
        needing = [m for m in methods if needs_base(m)]
        if needing:
            raise MissingBaseModelError(
                f"{', '.join(needing)} merge relative to a base model: give --base BASE (the "
                "model the sources were fine-tuned from) or restrict --methods to methods "
                "without one (linear, slerp, nuslerp, multislerp, karcher)"
            )
    for method in methods:
        _check_input_count(method, sources, has_base)


def check_method_parameters(methods: tuple[str, ...], parameters: Mapping[str, Any]) -> None:
    """Check fixed parameters (e.g. lambda, normalize) against mergekit's method specs.

    mergekit silently ignores unknown keys (`densty`), so each key must be a shared parameter
    of at least one chosen method, and its value must validate.

    Raises:
        SettingsError: naming the unknown key and the known ones.
    """
    known: dict[str, Any] = {}
    for method in methods:
        for spec in registry.get(method).spec.parameters:
            if spec.scope == ParameterScope.SHARED:
                known.setdefault(spec.name, spec)
    for key, value in parameters.items():
        if key in SEARCHED_PARAMETERS:
            option = "--density-range" if key == "density" else "--weight-range"
            raise SettingsError(
                f"parameter {key!r} is searched per block; bound it with {option} instead"
                + (" (slerp's t is the second source's weight)" if key == "t" else "")
            )
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(SEARCHED_PARAMETERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if close and close[0] in SEARCHED_PARAMETERS:
                hint = f" (did you mean {close[0]!r}? it is searched: use --{close[0]}-range)"
            raise SettingsError(
                f"unknown merge parameter {key!r}{hint}: none of {', '.join(methods)} accepts "
                f"it, and mergekit would silently ignore it; known: {', '.join(sorted(known))}"
            )
        try:
            known[key].validate(value)
        except Exception as error:
            raise SettingsError(f"bad value {value!r} for parameter {key!r}: {error}") from error


def method_accepts(method: str, parameter: str) -> bool:
    return any(p.name == parameter for p in registry.get(method).spec.parameters)


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
