"""Reports: the best-so-far curve."""

from __future__ import annotations

from automerge_mk.report import best_so_far


def test_best_so_far_never_falls_and_tracks_each_new_best():
    values = [0.2, 0.5, 0.4, 0.0, 0.7, 0.6]
    curve = best_so_far(values)
    assert curve == [0.2, 0.5, 0.5, 0.5, 0.7, 0.7]
