"""Reports: the best-so-far curve."""

from __future__ import annotations

from automerge_mk.report import best_so_far
from automerge_mk.types import TrialResult


def _trial(index: int, harmonic: float) -> TrialResult:
    return TrialResult(
        trial=index,
        status="ok",
        config={},
        cost=1 - harmonic,
        harmonic_mean=harmonic,
        tasks={},
        seconds={},
    )


def test_best_so_far_never_falls_and_tracks_each_new_best():
    values = [0.2, 0.5, 0.4, 0.0, 0.7, 0.6]
    curve = best_so_far([_trial(i, v) for i, v in enumerate(values)])
    assert curve == [0.2, 0.5, 0.5, 0.5, 0.7, 0.7]
