"""One table of merge-method facts, read from mergekit's own registry.

Whether a method draws random masks (and so depends on --random-seed), sparsifies by a
density, needs, accepts or ignores a base model, takes per-source weights, how many inputs it
merges and which parameters it shares: every stage asks here (space, engine, recipe, the input
checks, the CLI help) so that they cannot disagree. mergekit is imported on first use only,
so that the help text and the cheap checks stay light.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import cache
from typing import Any, NamedTuple

from .errors import MissingBaseModelError, SettingsError

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
# The parameters by which mergekit divides a merge by the sum of its weights (linear, ties,
# della: `normalize`; multislerp: `normalize_weights`). nuslerp has none but always uses
# t = w2 / (w1 + w2) (mergekit/merge_methods/nuslerp.py); slerp's t is a fraction anyway.
NORMALIZING_PARAMETERS = ("normalize", "normalize_weights")
ALWAYS_NORMALIZED = frozenset({"slerp", "nuslerp"})


class MethodFacts(NamedTuple):
    """What the rest of the package needs to know about one mergekit method."""

    name: str
    random: bool  # its sparsification draws from torch's RNG (DARE, DELLA)
    sparsifying: bool  # drops task-vector entries by a density
    ranked: bool  # keeps the largest-magnitude entries (TIES): what the engine's rank cache serves
    base: str  # mergekit's BasePolicy: required, optional or ignored
    weights: bool  # per-source weights (or slerp's t) are searched
    parameters: tuple[str, ...]  # every parameter name it accepts
    defaults: tuple[tuple[str, Any], ...]  # (name, default) of the parameters that have one


def _registry():
    from mergekit.merge_methods import registry  # deferred: mergekit imports torch

    return registry


@cache
def facts(method: str) -> MethodFacts:
    """The facts of a method, from its mergekit registry entry."""
    from mergekit.sparsify import SparsificationMethod

    entry = _registry().get(method)
    sparsification = getattr(entry, "sparsification_method", None)
    names = tuple(p.name for p in entry.spec.parameters)
    defaults = tuple((p.name, p.default) for p in entry.spec.parameters
                     if isinstance(p.default, bool | int | float | str))  # fmt: skip
    return MethodFacts(
        name=method,
        random=sparsification in (SparsificationMethod.random, SparsificationMethod.della_magprune),
        sparsifying=sparsification is not None,
        ranked=sparsification == SparsificationMethod.magnitude,
        base=entry.spec.contract.base.value,
        weights="weight" in names or "t" in names,
        parameters=names,
        defaults=defaults,
    )


def is_sparsifying(method: str) -> bool:
    """Whether mergekit's method drops task-vector entries by a density."""
    return facts(method).sparsifying


def is_ranked(method: str) -> bool:
    """Whether the method keeps each task vector's largest-magnitude entries (mergekit's
    magnitude sparsification: ties and the methods built on it), the order the rank cache keeps."""
    return facts(method).ranked


def is_random(method: str) -> bool:
    """Whether the method's masks are random draws, so that its result depends on the seed."""
    return facts(method).random


def needs_base(method: str) -> bool:
    """Whether mergekit's method needs the base model (the model the sources came from)."""
    return facts(method).base == "required" and method not in SOURCE_AS_BASE


def uses_base(method: str, has_base: bool) -> bool:
    """Whether a merge with `method` takes the base model: when required, and when optional
    and given (nuslerp and multislerp then interpolate task vectors, not weights)."""
    return needs_base(method) or (facts(method).base == "optional" and has_base)


def takes_weights(method: str) -> bool:
    """Whether the method's per-source weights (or slerp's t) are searched."""
    return facts(method).weights


def adds_weights(method: str, parameters: Mapping[str, Any] | None = None) -> bool:
    """Whether the merge depends on the sum of the weights, not only their ratio: task vectors
    added with their weights and not divided by the weights' sum (task_arithmetic, dare_*,
    breadcrumbs*, della_linear; ties or della with `normalize: false`). Such methods get a
    searched scale; the others a mix only. `parameters` are the ones fixed with --set."""
    if not takes_weights(method) or method in ALWAYS_NORMALIZED:
        return False
    defaults = dict(facts(method).defaults) | dict(parameters or {})
    return not any(defaults.get(name) for name in NORMALIZING_PARAMETERS)


def _check_input_count(method: str, sources: int, has_base: bool) -> None:
    contract = _registry().get(method).spec.contract
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
        for spec in _registry().get(method).spec.parameters:
            if spec.scope.value == "shared":
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
    return parameter in facts(method).parameters


METHODS_HELP = (
    "Comma-separated merge methods to search per block (mergekit's own kernels). Default: "
    "linear (weighted average; weights searched), task_arithmetic (base + weighted task "
    "vectors), ties (task vectors trimmed to the top-density magnitudes, sign election), "
    "dare_linear / dare_ties (task vectors randomly dropped to density and rescaled, then "
    "summed / sign-elected). Also: breadcrumbs / breadcrumbs_ties (drop the largest and "
    "smallest magnitudes; density searched, gamma at mergekit's default), della / "
    "della_linear (magnitude-ranked drop probabilities; density searched, epsilon at "
    "mergekit's default); slerp (two sources: spherical interpolation from the first to the "
    "second, t = the second source's weight), nuslerp (two sources, weights searched; with "
    "--base it interpolates task vectors), multislerp (any number of sources, weights "
    "searched; task vectors with --base), karcher (Riemannian mean of the sources, nothing "
    "searched), model_stock (base + sources, geometric interpolation, nothing searched; needs "
    "3 models in all). lambda, normalize, rescale, int8_mask, filter_wise, nuslerp_row_wise, "
    "nuslerp_flatten, normalize_weights, eps, max_iter, tol: via --set. Searched per block: "
    "a weight per source for the methods that take weights, and a density per source for "
    "the sparsifying ones. Task-vector methods and model_stock need --base."
)
