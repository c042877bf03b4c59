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

from benchmark import RESULTS, SEARCHES, append_step, benchmark_models, done_steps, home_path  # noqa: E402
from build_benchmark_models import DEFAULT_DIR  # noqa: E402

from automerge_mk import pipeline, report, segment, space  # noqa: E402
from automerge_mk.rundir import RunRecord  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

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


def run_search_step(models: Path, work: Path, full: dict, seed: int, fidelity: bool, args) -> dict:
    """One per-block search on validation: benchmark.py's settings with this seed, with or
    without --fidelity tokens."""
    sources, base, data = benchmark_models(models)
    changed = {"seed": seed, "trials": args.trials if fidelity else full["settings"]["trials"]}
    if fidelity:
        changed["fidelity"] = [None, None]
    settings = SearchSettings(**(full["settings"] | changed))
    kind = "fidelity" if fidelity else "full"
    out = work / f"blocks-{kind}-{seed}"
    # An interrupted search (killed, crashed after its trials) resumes: no trial runs twice.
    resume = (out / "trials.jsonl").is_file() and RunRecord.read(out).settings == settings
    started = time.perf_counter()
    request = pipeline.MergeRequest(sources, base, data["validation"])
    run = pipeline.run_search(request, settings, out, overwrite=not resume, resume=resume)
    wall = time.perf_counter() - started
    trials = _trials(run)
    if resume:  # the resumed part, plus the trials' own span before it
        stamps = [t["finished_at"] for t in trials if t.get("finished_at")]
        wall += (max(stamps) - min(stamps) + sum(trials[0]["seconds"].values())) if stamps else 0
    best = json.loads((run / "best.json").read_text())
    return {
        "step": f"{kind}:{seed}",
        "settings": settings.model_dump(mode="json"),
        "wall_s": wall,
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
    """A search's result on the test split, scored as benchmark.py scores its rows."""
    sources, base, data = benchmark_models(models)
    settings = SearchSettings(trials=1, initial=1, seed=searched["settings"]["seed"])
    request = pipeline.MergeRequest(sources, base, data["test"])
    session = pipeline.open_session(request, settings, work / "test-fidelity", True)
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
    scored = report.scored_json(result.tasks, result.harmonic_mean)
    return {"step": f"test:{searched['step']}", "row": scored}


def _from_benchmark(benchmark: dict) -> tuple[dict, dict]:
    """benchmark.py's seed-0 per-block search and its test row, as steps of this script."""
    full = benchmark[FULL]
    step = {
        "step": "full:0",
        "settings": full["settings"],
        "wall_s": full["wall_s"],
        "trials": full["trials"],
        "budgets": None,
        "validation_H": full["validation_H"],
        "best_config": full["best_config"],
        "best_trial": full["best_trial"],
        "best_validation_H": max(full["validation_H"]),
        "tokens": evaluated_tokens(Path(full["run_dir"])),
        "run_dir": full["run_dir"],
    }
    test = {"step": "test:full:0", "row": benchmark["test"]["rows"][SEARCHES[FULL][2]]}
    return step, test


def _rank_agreement(run: Path) -> list[str]:
    """Spearman's rho between a configuration's H at one budget and at the next one up."""
    from scipy.stats import spearmanr

    by_config: dict[str, dict[int, float]] = {}
    for trial in _trials(run):
        key = json.dumps(trial["config"], sort_keys=True)
        by_config.setdefault(key, {})[trial["budget"]] = trial["harmonic_mean"]
    budgets = sorted({b for scores in by_config.values() for b in scores})
    notes = []
    for low, high in zip(budgets, budgets[1:]):
        pairs = [(s[low], s[high]) for s in by_config.values() if low in s and high in s]
        if len(pairs) > 2:
            rho = spearmanr(*zip(*pairs)).statistic
            notes.append(f"{low} -> {high} tokens: rho {rho:.2f} over {len(pairs)} configurations")
    return notes


def render(done: dict[str, dict], seeds: list[int], models: Path, args) -> str:
    rows, pairs = [], []
    header = ("| seed | search | trials | configurations at all tokens | validation tokens "
              "evaluated | share of full fidelity | best validation H | test H | test mean PR "
              "| test PD | wall |")  # fmt: skip
    lines = [header, "|---" * 11 + "|"]
    for seed in seeds:
        full, mf = done.get(f"full:{seed}"), done.get(f"fidelity:{seed}")
        if not (full and mf and f"test:full:{seed}" in done and f"test:fidelity:{seed}" in done):
            continue
        full_tokens = sum(full["tokens"].values())
        for label, step in (("full fidelity", full), ("--fidelity tokens", mf)):
            scored = done[f"test:{step['step']}"]["row"]
            tokens = sum(step["tokens"].values())
            budgets = [b for b in step["budgets"] or () if b is not None]
            at_full = sum(b == max(budgets) for b in budgets) if budgets else step["trials"]
            rates = [task["rate"] for task in scored["tasks"].values()]
            lines.append(
                f"| {seed} | {label} | {step['trials']} | {at_full} | {tokens:,} | "
                f"{tokens / full_tokens:.0%} | {step['best_validation_H']:.4f} | "
                f"{scored['harmonic_mean']:.4f} | {statistics.mean(rates):.4f} | "
                f"{scored['pd']:.4f} | {step['wall_s'] / 60:.1f} min |"
            )
        test = [done[f"test:{k}:{seed}"]["row"]["harmonic_mean"] for k in ("full", "fidelity")]
        rows.append((seed, full, mf, test))
        pairs.append((full["best_validation_H"], mf["best_validation_H"]))
    if not rows:
        return "No seed has finished both searches and their test scores yet.\n"
    mean_full = statistics.mean(full for full, _ in pairs)
    mean_mf = statistics.mean(mf for _, mf in pairs)
    shares = [sum(mf["tokens"].values()) / sum(full["tokens"].values()) for _, full, mf, _ in rows]
    test_full = statistics.mean(t[0] for *_, t in rows)
    test_mf = statistics.mean(t[1] for *_, t in rows)
    checks = [
        ("mean best validation H: multi-fidelity >= full fidelity",
         f"{mean_mf:.4f} vs {mean_full:.4f}", mean_mf >= mean_full),
        ("... with at most 50 % of the validation tokens (largest share over seeds)",
         f"{max(shares):.0%}", max(shares) <= 0.5),
        ("seeds where multi-fidelity's validation H >= full fidelity's",
         f"{sum(mf >= full for full, mf in pairs)} of {len(pairs)}", None),
        ("(test split) mean test H: multi-fidelity >= full fidelity",
         f"{test_mf:.4f} vs {test_full:.4f}", test_mf >= test_full),
    ]  # fmt: skip
    targets = ["| target | measured | met |", "|---|---|---|"]
    for target, measured, ok in checks:
        met = "-" if ok is None else ("yes" if ok else "**no**")
        targets.append(f"| {target} | {measured} | {met} |")
    agreement = [
        f"- seed {seed}: " + "; ".join(_rank_agreement(Path(mf["run_dir"])))
        for seed, _, mf, _ in rows
    ]
    settings = rows[0][2]["settings"]
    counts = {b: rows[0][2]["budgets"].count(b) for b in sorted(set(rows[0][2]["budgets"]))}
    return f"""# Multi-fidelity search on the real benchmark

Reproduce (after scripts/benchmark.py; 2 CPU cores here):

```bash
python scripts/benchmark_fidelity.py --models {home_path(models)} --trials {args.trials} \\
    --seeds {",".join(map(str, seeds))}
```

The per-block search of benchmark.md (layers:4, SMAC, methods
{", ".join(settings["methods"])}, 50 trials, the same validation split of 104 prompt/label
examples per task; seed 0 is benchmark.md's own run) against the same search with
`--fidelity tokens` and {args.trials} trials: SMAC's Hyperband, eta 3, over validation tokens
per task (seed {rows[0][0]}: {", ".join(f"{b} tokens: {n} trials" for b, n in counts.items())}).
Each budget's AP is relative to the specialists' loss on the same examples; the result is the
best trial on all validation tokens. Tokens are forward-pass positions on validation data:
every trial's, plus, for multi-fidelity, the specialists' reference scores on each smaller
budget's examples. Test rows are scored as in benchmark.md (400 examples per task).

{chr(10).join(lines)}

{chr(10).join(targets)}

How well a budget ranks configurations the way the next budget up does (configurations that
Hyperband promoted):

{chr(10).join(agreement)}

Wall time is not cut with the tokens: a trial's merge (about 5 s of a full trial's ~18 s
here) costs the same at any budget. Wall times are as measured, and a run that shared the 2
cores with other work is slower than its tokens say (seed 1's full-fidelity search ran beside
a test suite for its first 20 minutes): compare tokens, not minutes.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--work", type=Path, default=DEFAULT_DIR / "runs")
    parser.add_argument("--trials", type=int, default=55)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    models, work = args.models.expanduser(), args.work.expanduser()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    benchmark = done_steps(args.results / "benchmark-steps.jsonl")
    if FULL not in benchmark or "test" not in benchmark:
        raise SystemExit("run scripts/benchmark.py first: its per-block search is the reference")
    steps_file = args.results / "fidelity-steps.jsonl"
    done = done_steps(steps_file)
    done["full:0"], done["test:full:0"] = _from_benchmark(benchmark)
    for seed in seeds:
        for kind in ("full", "fidelity"):
            step = f"{kind}:{seed}"
            if step in done and kind == "fidelity" and done[step]["trials"] < args.trials:
                raise SystemExit(f"{steps_file} has {step} with other --trials: delete it")
            if step not in done:
                print(f"{step}: running", flush=True)
                done[step] = run_search_step(models, work, benchmark[FULL], seed,
                                             kind == "fidelity", args)  # fmt: skip
                append_step(steps_file, done[step])
            if f"test:{step}" not in done:
                print(f"test:{step}: scoring its result on the test split", flush=True)
                done[f"test:{step}"] = run_test_step(models, work, done[step])
                append_step(steps_file, done[f"test:{step}"])
            (args.results / "fidelity.md").write_text(render(done, seeds, models, args))
    print((args.results / "fidelity.md").read_text())


if __name__ == "__main__":
    main()
