"""Trade-offs between tasks: the Pareto front of a run's trials, a preferred point on it, and
the hypervolume it dominates.

Every trial records AP per task, so the front of a finished (or running) search costs nothing.
Written here because what we use has none for plain points: SMAC's
`smac.utils.pareto_front.calculate_pareto_front` works on a RunHistory and its normalised
costs, and the hypervolume indicators of pymoo and BoTorch are not dependencies (a few front
points over a few tasks need no more than the exact recursion below).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .errors import SettingsError
from .types import TrialResult, top_budget

Point = tuple[float, ...]


def task_point(scores: Mapping, tasks: Sequence[str]) -> Point | None:
    """AP per task, in `tasks` order, of a {task: TaskScore or scored-JSON dict} mapping;
    None when one is missing or not finite."""
    values = []
    for task in tasks:
        score = scores.get(task)
        value = (
            score.get("preservation")
            if isinstance(score, dict)
            else getattr(score, "preservation", None)
        )
        if value is None or not math.isfinite(value):
            return None
        values.append(float(value))
    return tuple(values)


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as good as `b` on every task and better on one (higher AP is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def candidates(trials: Sequence[TrialResult], tasks: Sequence[str]) -> list[TrialResult]:
    """The trials a front is taken from: successful, evaluated on all of the data at the
    highest budget (a racing trial stopped early has only an estimate), with AP on every
    task."""
    return [t for t in top_budget(list(trials)) if task_point(t.tasks, tasks) is not None]


def pareto_front(trials: Sequence[TrialResult], tasks: Sequence[str]) -> list[TrialResult]:
    """The non-dominated trials among `candidates`, in trial order. Equal points do not
    dominate each other, so both stay (different recipes with the same scores)."""
    pool = candidates(trials, tasks)
    points = {t.trial: task_point(t.tasks, tasks) for t in pool}
    return [t for t in pool if not any(dominates(points[o.trial], points[t.trial]) for o in pool)]


def parse_preferences(specs: Sequence[str], tasks: Sequence[str]) -> dict[str, float]:
    """`task=WEIGHT` strings as {task: weight}; tasks not named weigh 1.

    Raises:
        SettingsError: for a malformed spec, an unknown task or a weight that is not positive.
    """
    weights = dict.fromkeys(tasks, 1.0)
    for spec in specs:
        task, _, text = spec.partition("=")
        task = task.strip()
        if task not in weights:
            raise SettingsError(
                f"--prefer {spec!r}: the run's tasks are {', '.join(tasks)}; write TASK=WEIGHT"
            )
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise SettingsError(f"--prefer {spec!r}: the weight must be a positive number")
        weights[task] = weight
    return weights


def weighted_harmonic_mean(point: Point, weights: Sequence[float]) -> float:
    """sum(w) / sum(w / AP): the harmonic mean with each task counted `w` times (0 as soon as
    one AP is 0)."""
    if any(v <= 0 for v in point):
        return 0.0
    return sum(weights) / sum(w / v for w, v in zip(weights, point))


def preferred(
    front: Sequence[TrialResult], tasks: Sequence[str], weights: Mapping[str, float]
) -> TrialResult:
    """The front's point with the highest weighted harmonic mean of AP (the earliest trial of
    equal ones). With every weight 1 it is the search's own best trial."""
    w = [weights[t] for t in tasks]
    return max(front, key=lambda t: (weighted_harmonic_mean(task_point(t.tasks, tasks), w),
                                     -t.trial))  # fmt: skip


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """The volume of task space that the points dominate and that dominates `reference` (AP
    maximised). Exact: the points are sorted along the last task and each slab between two
    successive values adds the lower-dimensional volume of the points that reach it."""
    above = [p for p in points if all(x > r for x, r in zip(p, reference))]
    if not above:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in above) - reference[0]
    levels = sorted({p[-1] for p in above}, reverse=True)
    volume = 0.0
    for index, level in enumerate(levels):
        lower = levels[index + 1] if index + 1 < len(levels) else reference[-1]
        reaching = [p[:-1] for p in above if p[-1] >= level]
        volume += hypervolume(reaching, reference[:-1]) * (level - lower)
    return volume


def nadir(points: Sequence[Point]) -> Point:
    """Per task, the lowest of `points` (the sources' point: a merge counts toward the
    hypervolume where it beats every source alone on every task)."""
    return tuple(min(values) for values in zip(*points))
