"""The optimiser: a seeded search proposes the same configurations in any process."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys, tempfile
from pathlib import Path
from ConfigSpace import Categorical, ConfigurationSpace, Float
from smac.runhistory.dataclasses import TrialValue
from automerge_mk.search import make_optimizer

space = ConfigurationSpace(seed=0)
space.add([Float(f"x{i}", (0, 1)) for i in range(6)] + [Categorical("m", ["a", "b", "c"])])
optimizer = make_optimizer(space, 16, 10, 0, Path(tempfile.mkdtemp()))
for _ in range(16):
    info = optimizer.ask()
    config = dict(info.config)
    cost = sum((config[f"x{i}"] - 0.3) ** 2 for i in range(6)) + (config["m"] == "a") * 0.1
    optimizer.tell(info, TrialValue(cost=cost))
    print(sorted(config.items()))
"""


def _proposals(hash_seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.splitlines()


def test_same_seed_gives_the_same_search_in_processes_with_different_hash_seeds():
    first, second = _proposals("1"), _proposals("2")
    assert len(first) == 16
    assert first == second  # SMAC alone differs from trial 11 on (set order of start points)
