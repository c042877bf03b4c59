"""Issue 23: does the similarity prior save trials? `--prior` vs the default search (resumable).

    python scripts/bench_prior.py --pairs demo                      # minutes
    python scripts/build_benchmark_models.py                        # the real benchmark
    python scripts/bench_prior.py --pairs sentiment-wordnet,langid-digits   # hours per pair

Per pair and seed, the default search (every default: baselines first, racing) at `--trials`
(50, the issue's) and three searches with a prior: `--prior --no-prior-acquisition` (the
rule's predicted configuration and two rescaled variants right after the baselines, nothing
else), `--prior` (the same, and SMAC's acquisition weighted toward the prediction: πBO), and
`--prior-from` the default searches of the pair's other seeds (the rule learned from earlier
runs: here of the same models, as for a user who merges a pair again, so an upper bound of
what learning across pairs gives). Measured: the trials and the minutes (merge + scoring +
optimiser, summed over trials) each search took to reach the default search's final best
validation H, and each final best. Then `automerge-mk suggest`'s recipe (the prior alone, no
evaluation) on the disjoint test split next to the five baselines and the default search's
result.

Pairs: `demo` (the demo's models, built here when missing) and scripts/bench_space.py's two
SmolLM2-135M pairs. Each finished step is appended to scripts/results/prior-steps.jsonl with
the models' digest; a rerun skips finished steps and resumes an interrupted search. Writes
scripts/results/prior.md from whatever is finished.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_space import PAIRS, TestScorer, pair_inputs  # noqa: E402
from benchmark import append_step, current_steps, models_digest  # noqa: E402

from automerge_mk import pipeline, rundir  # noqa: E402
from automerge_mk.demo import build_demo_models  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
DEMO = CACHE / "demo-models"
PAIRS["demo"] = (DEMO, ("arith", "reverse"))  # the demo's layout is the benchmark's
# mode -> (its settings, its column); "learned" adds --prior-from (see learned_from)
MODES = {
    "default": ({}, "default"),
    "prior": ({"prior": True, "prior_acquisition": False}, "--prior, design only"),
    "pibo": ({"prior": True}, "--prior (πBO)"),
    "learned": ({"prior": True}, "--prior-from other seeds"),
}
BASELINES = ("linear w=0.5", "task_arithmetic w=0.5", "ties w=0.5 d=0.5",
             "dare_linear w=0.5 d=0.5", "dare_ties w=0.5 d=0.5")  # fmt: skip


def learned_from(pair: str, trials: int, seed: int, work: Path) -> list[str]:
    """The finished default searches of the pair's other seeds (main runs every default
    first; with --seeds 0 after a --seeds 0,1 --modes default run, seed 1's)."""
    runs = sorted(work.glob(f"{pair}-default-{trials}-*"))
    return [str(r) for r in runs if r.name != f"{pair}-default-{trials}-{seed}"
            and (r / rundir.BEST).is_file()]  # fmt: skip


def search_step(pair: str, mode: str, trials: int, seed: int, work: Path) -> dict:
    """One search on the validation split (resumed when interrupted)."""
    extra = {"prior_from": learned_from(pair, trials, seed, work)} if mode == "learned" else {}
    settings = SearchSettings(trials=trials, seed=seed, **MODES[mode][0], **extra)
    out = work / f"{pair}-{mode}-{trials}-{seed}"
    resume = (out / rundir.SETTINGS).is_file() and not pipeline.finished(out, settings)
    if not pipeline.finished(out, settings):
        pipeline.run_search(pair_inputs(pair, "validation"), settings, out,
                            overwrite=not resume, resume=resume, progress=False)  # fmt: skip
    best = rundir.RunDir(out).read_json(rundir.BEST)
    return {
        "run": str(out),
        "best_H": best["harmonic_mean"],
        "best_config": best["config"],
        "settings": settings.model_dump(mode="json"),
        "trials": [
            [t.harmonic_mean, t.partial, sum(t.seconds.values())]
            for t in rundir.RunDir(out).trials()
        ],  # fmt: skip
    }


def reach(record: dict, target: float) -> tuple[int | None, float]:
    """Trials (1-based count) and seconds until a full trial first reached `target`."""
    seconds = 0.0
    for index, (h, partial, took) in enumerate(record["trials"]):
        seconds += took
        if not partial and h >= target - 1e-12:
            return index + 1, seconds
    return None, seconds


def suggest_step(pair: str, work: Path, scorer: TestScorer, learned: list[str]) -> dict:
    """suggest's recipe (validation probe, no evaluation) scored on the test split, with the
    baselines beside it; with `learned` runs, also `suggest --prior-from` them."""
    request = pair_inputs(pair, "validation")
    out = work / f"{pair}-suggested.yaml"
    settings = SearchSettings()
    pipeline.run_suggest(request, settings, out, overwrite=True)
    inputs = scorer.open().inputs
    _, plans = pipeline.predicted_plans(inputs, settings)  # the rule suggest applied
    rows = {"suggest": scorer.score_plan(plans["prior"], "suggest")}
    if learned:
        settings = SearchSettings(prior_from=learned)
        _, plans = pipeline.predicted_plans(inputs, settings)
        label = f"suggest --prior-from (seeds {', '.join(r.rsplit('-', 1)[1] for r in learned)})"
        rows[label] = scorer.score_plan(plans["prior"], label)
    for label, plan in scorer.fixed_rows().items():
        if label in BASELINES:
            rows[label] = scorer.score_plan(plan, label)
    return {"rows": rows, "recipe": str(out)}


def render(done: dict, pairs, seeds, trials: int, digests: dict) -> str:
    lines = [
        "# A prior from similarity features: trials saved (issue 23)",
        __doc__.split("\n\n", 2)[2].split("\n\nPairs:")[0],
        f"Reproduce: `python scripts/bench_prior.py --pairs {','.join(pairs)} --trials {trials}`."
        " Models (sha256 of weights and data): "
        + ", ".join(f"{p} {d}" for p, d in digests.items())
        + ". Seconds are the trials' own (merge, scoring, optimiser), summed; other work may "
        "have shared the 2 cores.",
    ]
    others = [m for m in MODES if m != "default"]
    for pair in pairs:
        columns = [MODES[m][1] for m in others]
        rows = ["| seed | default best H | trials to reach it: default | "
                + " | ".join(columns) + " | minutes: default | " + " | ".join(columns)
                + " | final best H − default's: " + " | ".join(columns) + " |"]  # fmt: skip
        rows.append("|---" * (len(rows[0].split("|")) - 2) + "|")
        ratios = {m: [] for m in others}
        finals = {m: [] for m in others}
        compared = {m: 0 for m in others}
        for seed in seeds:
            default = done.get(f"search:{pair}:default:{trials}:{seed}")
            if not default:
                rows.append(f"| {seed} | not finished yet |" + " |" * (len(rows[1]) // 4 - 2))
                continue
            target = default["best_H"]
            n_default, s_default = reach(default, target)
            counts, minutes, deltas = [], [], []
            for mode in others:
                found = done.get(f"search:{pair}:{mode}:{trials}:{seed}")
                if not found:
                    counts.append("-"), minutes.append("-"), deltas.append("-")
                    continue
                n, took = reach(found, target)
                compared[mode] += 1
                finals[mode].append(found["best_H"] - target)
                if n:
                    ratios[mode].append(n / n_default)
                counts.append(str(n or "never"))
                minutes.append(f"{took / 60:.1f}")
                deltas.append(f"{found['best_H'] - target:+.4f}")
            rows.append(f"| {seed} | {target:.4f} | {n_default} | " + " | ".join(counts)
                        + f" | {s_default / 60:.1f} | " + " | ".join(minutes) + " | "
                        + " | ".join(deltas) + " |")  # fmt: skip
        text = [f"## {pair}", "\n".join(rows)]
        for mode in others:
            if compared[mode]:
                share = f"{statistics.mean(ratios[mode]):.0%}" if ratios[mode] else "-"
                text.append(
                    f"{MODES[mode][1]}: the default's best reached in {len(ratios[mode])} of "
                    f"{compared[mode]} seeds, with {share} of the default's trials on average "
                    f"where it was (the issue asks for at most 50 %); final best H minus the "
                    f"default's, mean {statistics.mean(finals[mode]):+.4f}."
                )
        text.append(
            "πBO multiplies the acquisition by the prior, so it is as good as the prediction: "
            "compare the `suggest` rows below with the baselines (the prediction scored "
            "alone). --prior-from learns from runs of the same models here, the most a user "
            "who merges again can expect; from other pairs it can only be as good as their "
            "blocks are alike."
        )
        suggested = done.get(f"suggest:{pair}")
        if suggested:
            table = [
                "| test split | H (AP) | "
                + " | ".join(f"{t} AP" for t in next(iter(suggested["rows"].values()))["tasks"])
                + " |"
            ]
            table.append("|---" * (len(table[0].split("|")) - 2) + "|")
            searched = done.get(f"test:{pair}:default:{trials}:0")
            shown = dict(suggested["rows"])
            if searched:
                shown[f"default search (seed 0, {trials} trials)"] = searched["row"]
            for label, row in shown.items():
                aps = " | ".join(f"{s['preservation']:.4f}" for s in row["tasks"].values())
                table.append(f"| {label} | {row['harmonic_mean']:.4f} | {aps} |")
            text.append("`suggest` (no evaluation) on the test split:\n\n" + "\n".join(table))
        lines.append("\n\n".join(text))
    return "\n\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="demo")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default=",".join(MODES), help="which searches to run")
    parser.add_argument("--work", type=Path, default=CACHE / "prior-runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only write prior.md")
    args = parser.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",")]
    if "demo" in pairs and not args.render:
        build_demo_models(DEMO, seed=0, progress=False)
    steps_file = args.results / "prior-steps.jsonl"
    digests = {pair: models_digest(*PAIRS[pair]) for pair in pairs}
    done, _ = current_steps(steps_file, digests, lambda s: s.split(":")[1])
    scorers = {pair: TestScorer(pair, args.work) for pair in pairs}

    def record(step: str, pair: str, fields: dict) -> None:
        done[step] = {"step": step, **fields, "models": digests[pair]}
        append_step(steps_file, done[step])
        (args.results / "prior.md").write_text(render(done, pairs, seeds, args.trials, digests))

    for pair in [] if args.render else pairs:
        # every seed's default first: the learned mode learns from the other seeds' defaults
        for mode, seed in [(m, s) for m in MODES for s in seeds]:
            step = f"search:{pair}:{mode}:{args.trials}:{seed}"
            if step not in done and mode in args.modes.split(","):
                print(f"{step}: running", flush=True)
                record(step, pair, search_step(pair, mode, args.trials, seed, args.work))
        if f"test:{pair}:default:{args.trials}:0" not in done:
            searched = done[f"search:{pair}:default:{args.trials}:{seeds[0]}"]
            record(f"test:{pair}:default:{args.trials}:0", pair,
                   {"row": scorers[pair].score_search(searched)})  # fmt: skip
        learned = learned_from(pair, args.trials, seeds[0], args.work)
        rows = len(done.get(f"suggest:{pair}", {}).get("rows", ()))
        if rows < 6 + bool(learned):  # suggest and the five baselines, and the learned one
            print(f"suggest:{pair}: running", flush=True)
            record(f"suggest:{pair}", pair, suggest_step(pair, args.work, scorers[pair], learned))
    (args.results / "prior.md").write_text(render(done, pairs, seeds, args.trials, digests))
    print((args.results / "prior.md").read_text())


if __name__ == "__main__":
    main()
