"""Multi-fidelity vs full-fidelity search on the real benchmark (issue 6).

    python scripts/build_benchmark_models.py     # once
    python scripts/benchmark.py                   # the full-fidelity searches (issue 5)
    python scripts/benchmark_fidelity.py [--trials 55]

Runs the per-block search of scripts/benchmark.py (layers:4, SMAC, seed 0, the same
validation split) again with `--fidelity tokens` (Hyperband, eta 3, 1/9..all validation tokens
per task), scores its result on the test split like every row of benchmark.md, and compares it
with the full-fidelity per-block search recorded in benchmark-steps.jsonl: best validation H
(on all validation tokens), test H and PR, and the validation tokens each search evaluated
(forward-pass positions of its trials, plus, for multi-fidelity, the specialists' reference
scores on each smaller budget's examples). Steps are appended to
scripts/results/fidelity-steps.jsonl; a rerun skips finished ones. Writes
scripts/results/fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import RESULTS, SEARCHES, _append, _done, _home, _models  # noqa: E402
from build_benchmark_models import DEFAULT_DIR  # noqa: E402

from automerge_mk import cli, report, segment, space  # noqa: E402
from automerge_mk.types import SearchSettings  # noqa: E402

FULL = "search:blocks"  # the full-fidelity search of benchmark.py


def _trials(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


def evaluated_tokens(run: Path) -> dict[str, int]:
    """Forward-pass positions a search spent on validation data, by what they scored."""
    trials = _trials(run)
    subset = json.loads((run / "eval_subset.json").read_text())
    all_tokens = sum(task["computed"] for task in subset.values())
    spent = {"trials": sum(t.get("computed_tokens") or all_tokens for t in trials)}
    budgets = run / "budgets.json"
    if budgets.is_file():  # each specialist scored once on its task's examples of each budget
        levels = json.loads(budgets.read_text())["levels"]
        spent["references"] = sum(
            task["computed_tokens"] for level in levels.values() for task in level.values()
        )
    return spent


def run_fidelity_step(models: Path, work: Path, full: dict, args) -> dict:
    sources, base, data = _models(models)
    settings = SearchSettings(
        **(full["settings"] | {"trials": args.trials, "fidelity": [None, None]})
    )
    started = time.perf_counter()
    run = cli.run_search(sources, base, data["validation"], settings, work / "blocks-fidelity",
                         overwrite=True)  # fmt: skip
    wall = time.perf_counter() - started
    trials = _trials(run)
    best = json.loads((run / "best.json").read_text())
    return {
        "step": "search:blocks-fidelity",
        "settings": settings.model_dump(mode="json"),
        "wall_s": wall,
        "search_s": sum(sum(t["seconds"].values()) for t in trials),
        "trials": len(trials),
        "budgets": [t["budget"] for t in trials],
        "validation_H": [t["harmonic_mean"] for t in trials],
        "best_config": best["config"],
        "best_trial": best["trial"],
        "best_validation_H": best["harmonic_mean"],
        "tokens": evaluated_tokens(run),
        "run_dir": str(run),
    }


def run_test_step(models: Path, work: Path, searched: dict) -> dict:
    """The multi-fidelity result on the test split, scored as benchmark.py scores its rows."""
    sources, base, data = _models(models)
    settings = SearchSettings(trials=1, initial=1, seed=searched["settings"]["seed"])
    session = cli._open_session(sources, base, data["test"], settings, work / "test-fidelity",
                                True)  # fmt: skip
    inputs = session.inputs
    plan = space.plan_from_config(
        searched["best_config"],
        segment.segment_model(Path(base), searched["settings"]["strategy"]),
        tuple(str(s.path) for s in inputs.sources),
        tuple(s.name for s in inputs.sources),
        str(inputs.base.path),
        SearchSettings(**searched["settings"]),
        inputs.dtype,
    )
    result = session.objective().evaluate_plan(plan, -1, searched["best_config"])
    return {"step": "test", "row": report.scored_json(result.tasks, result.harmonic_mean)}


def render(full: dict, test_full: dict, searched: dict, test: dict, models: Path) -> str:
    full_run = Path(full["run_dir"])
    full_tokens = sum(evaluated_tokens(full_run).values())
    mf_tokens = sum(searched["tokens"].values())
    rows = [(SEARCHES[FULL][2], full, test_full, full_tokens, max(full["validation_H"])),
            ("per-block search, multi-fidelity (--fidelity tokens)", searched, test["row"],
             mf_tokens, searched["best_validation_H"])]  # fmt: skip
    lines = [
        "| search | trials | configurations at all tokens | validation tokens evaluated | "
        "share of full fidelity | best validation H | test H | test mean PR | test PD | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, step, scored, tokens, validation in rows:
        budgets = step.get("budgets")
        at_full = sum(b == max(budgets) for b in budgets) if budgets else step["trials"]
        rates = [task["rate"] for task in scored["tasks"].values()]
        lines.append(
            f"| {label} | {step['trials']} | {at_full} | {tokens:,} | "
            f"{tokens / full_tokens:.0%} | {validation:.4f} | {scored['harmonic_mean']:.4f} | "
            f"{statistics.mean(rates):.4f} | {scored['pd']:.4f} | {step['wall_s'] / 60:.1f} min |"
        )
    share = mf_tokens / full_tokens
    same_or_better = searched["best_validation_H"] >= max(full["validation_H"])
    test_ok = test["row"]["harmonic_mean"] >= test_full["harmonic_mean"]
    counts = {b: searched["budgets"].count(b) for b in sorted(set(searched["budgets"]))}
    checks = [
        ("multi-fidelity best validation H >= full fidelity's",
         f"{searched['best_validation_H']:.4f} vs {max(full['validation_H']):.4f}",
         same_or_better),
        ("... with at most 50 % of its validation tokens", f"{share:.0%}", share <= 0.5),
        ("(test split) multi-fidelity test H >= full fidelity's",
         f"{test['row']['harmonic_mean']:.4f} vs {test_full['harmonic_mean']:.4f}", test_ok),
    ]  # fmt: skip
    targets = ["| target | measured | met |", "|---|---|---|"]
    targets += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checks]
    settings = searched["settings"]
    return f"""# Multi-fidelity search on the real benchmark

Reproduce (after scripts/benchmark.py; 2 CPU cores here):

```bash
python scripts/benchmark_fidelity.py --models {_home(models)} --trials {settings["trials"]}
```

The per-block search of benchmark.md (layers:4, SMAC, seed {settings["seed"]}, methods
{", ".join(settings["methods"])}, the same validation split) with `--fidelity tokens`:
SMAC's Hyperband, eta 3, budgets of validation tokens per task
({", ".join(f"{b}: {n} trials" for b, n in counts.items())}). Each budget's AP is relative to
the specialists' loss on the same examples; the result is the best trial at all validation
tokens. Tokens are forward-pass positions on validation data: every trial's, plus the
specialists' reference scores on each smaller budget's examples
({searched["tokens"].get("references", 0):,} tokens). Test rows are scored as in benchmark.md
(400 examples per task).

{chr(10).join(lines)}

{chr(10).join(targets)}

Wall time is not halved with the tokens: each trial's merge (about 5 s of the ~18 s of a full
trial here) costs the same at any budget.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--work", type=Path, default=DEFAULT_DIR / "runs")
    parser.add_argument("--trials", type=int, default=55)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    models, work = args.models.expanduser(), args.work.expanduser()
    benchmark = _done(args.results / "benchmark-steps.jsonl")
    if FULL not in benchmark or "test" not in benchmark:
        raise SystemExit("run scripts/benchmark.py first: its per-block search is the reference")
    steps_file = args.results / "fidelity-steps.jsonl"
    done = _done(steps_file)
    step = "search:blocks-fidelity"
    if step in done and done[step]["settings"]["trials"] != args.trials:
        raise SystemExit(f"{steps_file} has {step} with other --trials: delete it to rerun")
    if step not in done:
        print(f"{step}: running", flush=True)
        done[step] = run_fidelity_step(models, work, benchmark[FULL], args)
        _append(steps_file, done[step])
    if "test" not in done:
        print("test: scoring the multi-fidelity result on the test split", flush=True)
        done["test"] = run_test_step(models, work, done[step])
        _append(steps_file, done["test"])
    test_full = benchmark["test"]["rows"][SEARCHES[FULL][2]]
    text = render(benchmark[FULL], test_full, done[step], done["test"], models)
    (args.results / "fidelity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
