"""Search quality and optimiser cost: SMAC's default HPO facade vs automerge-mk's configuration.

    python scripts/bench_optimizer.py [--trials 40] [--seeds 0,1,2]

On the demo models (built offline, see `automerge-mk demo`), the same budget and seeds, it runs
`automerge-mk search` once with automerge-mk's optimiser (single-threaded forest, start points
of the local search sorted) and once with SMAC's HyperparameterOptimizationFacade as it comes
(same explicit Sobol initial design), and reports the best harmonic-mean AP and the optimiser's
seconds per trial of each. Writes scripts/results/bench_optimizer.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from smac import HyperparameterOptimizationFacade, Scenario

from automerge_mk import search
from automerge_mk.demo import build_demo_models
from automerge_mk.pipeline import MergeRequest, run_search
from automerge_mk.settings import SearchSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))


def smac_default(space, trials, initial, seed, output, kind="smac"):
    scenario = Scenario(space, deterministic=True, n_trials=trials, seed=seed,
                        output_directory=output)  # fmt: skip
    return HyperparameterOptimizationFacade(
        scenario,
        None,
        initial_design=HyperparameterOptimizationFacade.get_initial_design(
            scenario, n_configs=initial, max_ratio=1.0
        ),
        intensifier=HyperparameterOptimizationFacade.get_intensifier(scenario, max_config_calls=1),
        overwrite=True,
        logging_level=40,
    )


def one(models, trials, seed, out, make) -> tuple[float, float]:
    original = search.make_optimizer
    search.make_optimizer = make
    try:
        names = list(models.specialists)
        request = MergeRequest(
            [str(models.specialists[n]) for n in names],
            str(models.base),
            {n: str(models.validation[n]) for n in names},
        )
        run = run_search(
            request,
            SearchSettings(trials=trials, initial=10, seed=seed),
            out,
            overwrite=True,
            progress=False,
        )
    finally:
        search.make_optimizer = original
    from automerge_mk.rundir import RunDir

    lines = RunDir(run).trials()
    best = max(t.harmonic_mean for t in lines)
    optimiser = statistics.mean(t.seconds["ask"] + t.seconds["record"] for t in lines)
    return best, optimiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=Path("automerge-demo"))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_optimizer.md"
    )
    arguments = parser.parse_args()
    models = build_demo_models(arguments.work / "models", progress=False)
    rows = []
    for seed in (int(s) for s in arguments.seeds.split(",")):
        ours = one(
            models, arguments.trials, seed, arguments.work / "opt-ours", search.make_optimizer
        )
        stock = one(models, arguments.trials, seed, arguments.work / "opt-stock", smac_default)
        rows.append((seed, ours, stock))
        print(seed, ours, stock, flush=True)
    from bench_trial import machine

    lines = [
        "# Optimiser: SMAC's default facade vs automerge-mk's configuration",
        "",
        f"Machine: {machine('cpu')}. Demo models, {arguments.trials} trials, initial design 10, "
        "strategy layers:4, the default five methods.",
        "",
        f"Command: `python scripts/bench_optimizer.py --trials {arguments.trials} "
        f"--seeds {arguments.seeds}`",
        "",
        "| seed | best H, automerge-mk | best H, SMAC default | optimiser s/trial, "
        "automerge-mk | optimiser s/trial, SMAC default |",
        "|---|---|---|---|---|",
    ]
    for seed, ours, stock in rows:
        lines.append(
            f"| {seed} | {ours[0]:.4f} | {stock[0]:.4f} | {ours[1]:.3f} | {stock[1]:.3f} |"
        )
    arguments.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
