"""Build the demo's base model and two trained specialists into a folder (offline, ~20 s).

    python scripts/build_demo_models.py --out automerge-demo/models [--seed 0]

The same models `automerge-mk demo` and the tests use; an existing build is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from automerge_mk.demo import build_demo_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("automerge-demo/models"))
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    models = build_demo_models(arguments.out, seed=arguments.seed)
    print(models.model_dump_json(indent=2))


if __name__ == "__main__":
    main()
