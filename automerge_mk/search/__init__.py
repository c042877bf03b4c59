"""Stage 6: the search. What to optimise (objective.py: a configuration -> TrialResult) is kept
apart from how (optimizer.py: SMAC's facades), from the one loop that asks and tells
(loop.py) and from where trials run (loop.SerialRunner here, parallel.DaskRunner on a cluster).
"""

from .loop import SerialRunner, reevaluate_best, run_search
from .objective import WORST_COST, Fidelity, MergeObjective, failed_result
from .optimizer import (
    Belief,
    check_same_space,
    make_optimizer,
    tell_recorded,
    trial_value,
    warm_start,
)
from .racing import Race

__all__ = [
    "WORST_COST",
    "Belief",
    "Fidelity",
    "MergeObjective",
    "Race",
    "SerialRunner",
    "check_same_space",
    "failed_result",
    "make_optimizer",
    "reevaluate_best",
    "run_search",
    "tell_recorded",
    "trial_value",
    "warm_start",
]
