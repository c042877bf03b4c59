"""Issue 22: the Pareto front of the default search vs an `--objective pareto` search (resumable).

    python scripts/build_benchmark_models.py            # the benchmark: sentiment + WordNet
    python scripts/bench_racing.py --seeds 0            # the default searches (racing on, off)
    python scripts/bench_pareto.py [--trials 40] [--seed 0] [--pairs sentiment-wordnet]

On the real benchmark (SmolLM2-135M-Instruct specialists, scripts/bench_space.py's pairs),
the same budget three ways: the default search (racing on), the same with every trial on
every example (--no-racing), both run by scripts/bench_racing.py and read from its steps, and
`--objective pareto` (SMAC's ParEGO over 1 - AP per task, racing off), run here. For each:
the trials scored on all of the validation data, how many of them are on the Pareto front,
the front's hypervolume over the sources' point (per task, the least a specialist alone keeps
of it), the best harmonic mean and its test H. Then one non-default point of the pareto
search's front, chosen with `automerge-mk pick --prefer TASK=3` (the task its harmonic-mean
pick keeps least of, or the next task when that weight leaves the pick where it is; failing
both, `--trial` of another front point), is rebuilt by stock mergekit and scored again: its AP
per task against its trial's (evaluation noise only), and on the test split.

Each finished step is appended to scripts/results/pareto-steps.jsonl with the models' digest;
a rerun skips finished steps and resumes an interrupted search. Writes
scripts/results/pareto.md and pareto.png from whatever is finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_racing import settings_for  # noqa: E402
from bench_space import PAIRS, TestScorer, pair_inputs  # noqa: E402
from benchmark import append_step, current_steps, models_digest  # noqa: E402

from automerge_mk import front, pipeline, report, rundir, space  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
PREFER = 3.0  # the weight of the task the harmonic-mean pick keeps least of
MODES = ("racing", "full", "pareto")  # bench_racing's two default searches, and ours
LABELS = {"racing": "default (racing)", "full": "--no-racing", "pareto": "--objective pareto"}


def pareto_settings(trials: int, seed: int) -> SearchSettings:
    return settings_for("full", trials, seed).model_copy(update={"objective": "pareto"})


def search_step(step: str, pair: str, settings: SearchSettings, work: Path) -> dict:
    """The pareto search on the validation split; an interrupted one resumes from its trials."""
    out = work / step.replace(":", "-")
    resume = (out / rundir.SETTINGS).is_file() and not pipeline.finished(out, settings)
    if not pipeline.finished(out, settings):
        pipeline.run_search(pair_inputs(pair, "validation"), settings, out,
                            overwrite=not resume, resume=resume)  # fmt: skip
    best = json.loads((out / rundir.BEST).read_text())
    return {"run": str(out), "settings": settings.model_dump(mode="json"),
            "best_config": best["config"], "resumed": resume}  # fmt: skip


def front_record(run: Path) -> dict:
    """What a finished search's front is: its full trials' AP per task (by trial number), the
    front's trials, its hypervolume over the sources' point, the best harmonic mean."""
    record = rundir.RunRecord.read(run)
    tasks, trials = list(record.names), rundir.RunDir(run).trials()
    pool, points = front.candidates(trials, tasks), front.pareto_front(trials, tasks)
    sources = json.loads((run / rundir.SOURCES).read_text())
    reference = front.nadir([front.task_point(s["tasks"], tasks) for s in sources.values()])
    best = json.loads((run / rundir.BEST).read_text())
    return {
        "tasks": tasks,
        "reference": reference,
        "full": {str(t.trial): front.task_point(t.tasks, tasks) for t in pool},
        "front": [t.trial for t in points],
        "hypervolume": front.hypervolume(
            [front.task_point(t.tasks, tasks) for t in points], reference
        ),  # fmt: skip
        "trials": len(trials),
        "tokens": sum(report.computed_tokens(t) for t in trials),
        "best_trial": best["trial"],
        "best_H": best["harmonic_mean"],
    }


def pick_step(run: Path, work: Path, scorer: TestScorer) -> dict:
    """A non-default front point of `run` rebuilt by `automerge-mk pick --prefer` and scored
    again, on the validation split (by pick) and on the test split."""
    record = rundir.RunRecord.read(run)
    tasks, trials = list(record.names), rundir.RunDir(run).trials()
    best = json.loads((run / rundir.BEST).read_text())
    points, number = front.pareto_front(trials, tasks), None
    # The task the harmonic-mean pick keeps least of first, weighted PREFER; when that weight
    # does not move the choice off the pick, the next task; failing all, another front point.
    for task in sorted(tasks, key=lambda t: best["tasks"][t]["preservation"]):
        prefer = (f"{task}={PREFER:g}",)
        weights = front.parse_preferences(prefer, tasks)
        if front.preferred(points, tasks, weights).trial != best["trial"]:
            break
    else:
        prefer = ()
        number = next((t.trial for t in points if t.trial != best["trial"]), best["trial"])
    out = pipeline.run_pick(run, number, prefer, work / f"{run.name}-pick", overwrite=True)
    picked = json.loads((out / rundir.BEST).read_text())
    final = json.loads((out / rundir.FINAL).read_text())
    trial = next(t for t in trials if t.trial == picked["trial"])
    plan = space.plan_from_record(record, trial.config)
    return {
        "prefer": list(prefer),
        "trial": picked["trial"],
        "is_default": picked["trial"] == best["trial"],
        "search": {t: trial.tasks[t].preservation for t in tasks},
        "rebuilt": {t: final["tasks"][t]["preservation"] for t in tasks},
        "search_H": trial.harmonic_mean,
        "rebuilt_H": final["harmonic_mean"],
        "test": scorer.score_plan(plan, "pick"),
        "recipe": str(out / rundir.RECIPE),
    }


def _racing_steps(results: Path, pair: str, digest: str) -> dict:
    """bench_racing.py's steps of this pair on the models built now."""
    return current_steps(results / "racing-steps.jsonl", {pair: digest}, lambda s: pair)[0]


def plot(fronts: dict[str, dict], path: Path) -> None:
    """The three searches' fronts on one AP-vs-AP plane (two tasks), with every full trial."""
    pyplot = report._pyplot()
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5), dpi=120)
    for index, (mode, record) in enumerate(fronts.items()):
        points = list(record["full"].values())
        axes.scatter(*zip(*points), s=8, alpha=0.35, color=f"C{index}")
        edge = sorted(record["full"][str(t)] for t in record["front"])
        axes.step(*zip(*edge), where="pre", color=f"C{index}",
                  label=f"{LABELS[mode]}: HV {record['hypervolume']:.4f}")  # fmt: skip
    tasks = next(iter(fronts.values()))["tasks"]
    axes.set_xlabel(f"AP {tasks[0]}")
    axes.set_ylabel(f"AP {tasks[1]}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def render(done: dict, pairs, trials: int, seed: int, digests: dict, results: Path) -> str:
    lines = [
        "# The Pareto front: default search vs `--objective pareto` (issue 22)",
        __doc__.split("\n\n", 2)[2].split("\n\nEach finished")[0],
        f"Reproduce: `python scripts/bench_pareto.py --trials {trials} --seed {seed}`. Models "
        "(sha256 of weights and data): "
        + ", ".join(f"{p} {d}" for p, d in digests.items())
        + ". 2 CPU cores, one torch thread per search; other work shared the cores, so no "
        "wall times are compared here.",
    ]
    for pair in pairs:
        fronts = {m: done[f"front:{pair}:{m}"]["front"] for m in MODES
                  if f"front:{pair}:{m}" in done}  # fmt: skip
        if not fronts:
            lines.append(f"## {pair}\n\nNot finished yet.")
            continue
        rows = ["| search | trials | scored on all examples | on the front | hypervolume | "
                "best val H | its test H | val tokens |", "|---" * 8 + "|"]  # fmt: skip
        for mode, record in fronts.items():
            test = done.get(f"test:{pair}:{mode}", {}).get("row", {}).get("harmonic_mean")
            rows.append(
                f"| {LABELS[mode]} | {record['trials']} | {len(record['full'])} | "
                f"{len(record['front'])} | {record['hypervolume']:.4f} | {record['best_H']:.4f} "
                f"| {'-' if test is None else f'{test:.4f}'} | {record['tokens']:,} |"
            )
        reference = next(iter(fronts.values()))["reference"]
        tasks = next(iter(fronts.values()))["tasks"]
        corner = ", ".join(f"AP {t} {v:.3f}" for t, v in zip(tasks, reference))
        text = [f"## {pair}", f"Sources' point (hypervolume reference): {corner}.",
                "\n".join(rows)]  # fmt: skip
        if len(tasks) == 2:
            plot(fronts, results / "pareto.png")
            text.append("![the three searches' fronts](pareto.png)")
        pick = done.get(f"pick:{pair}")
        if pick:
            cells = ["| | " + " | ".join(f"AP {t}" for t in tasks) + " | H |",
                     "|---|" + "---|" * (len(tasks) + 1)]  # fmt: skip
            for label, values, h in (
                ("trial (search time)", pick["search"], pick["search_H"]),
                ("rebuilt by stock mergekit, scored again", pick["rebuilt"], pick["rebuilt_H"]),
                ("the same recipe on the test split",
                 {t: pick["test"]["tasks"][t]["preservation"] for t in tasks},
                 pick["test"]["harmonic_mean"]),
            ):  # fmt: skip
                cells.append(f"| {label} | " + " | ".join(f"{values[t]:.4f}" for t in tasks)
                             + f" | {h:.4f} |")  # fmt: skip
            gap = max(abs(pick["search"][t] - pick["rebuilt"][t]) for t in tasks)
            default = " (it is the harmonic-mean pick: the front offered nothing else)" \
                if pick["is_default"] else ""  # fmt: skip
            how = f"--prefer {' '.join(pick['prefer'])}" if pick["prefer"] else \
                f"--trial {pick['trial']}"  # fmt: skip
            text.append(
                f"Picked: `automerge-mk pick RUN {how}` chose trial {pick['trial']}{default}. "
                f"Rebuilt by stock mergekit and rescored, its AP differs from its trial's by at "
                f"most {gap:.2e}.\n\n" + "\n".join(cells)
            )
        lines.append("\n\n".join(text))
    return "\n\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="sentiment-wordnet")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=CACHE / "pareto-runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only write pareto.md")
    args = parser.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    steps_file = args.results / "pareto-steps.jsonl"
    digests = {pair: models_digest(*PAIRS[pair]) for pair in pairs}
    done, _ = current_steps(steps_file, digests, lambda s: s.split(":")[1])
    scorers = {pair: TestScorer(pair, args.work) for pair in pairs}

    def write() -> None:
        text = render(done, pairs, args.trials, args.seed, digests, args.results)
        (args.results / "pareto.md").write_text(text)

    def record(step: str, pair: str, **fields) -> None:
        done[step] = {"step": step, **fields, "models": digests[pair]}
        append_step(steps_file, done[step])

    for pair in [] if args.render else pairs:
        theirs, runs = _racing_steps(args.results, pair, digests[pair]), {}
        for mode in MODES:
            key = f"search:{pair}:{mode}:{args.trials}:{args.seed}"
            if mode == "pareto" and key not in done:
                print(f"{key}: running", flush=True)
                settings = pareto_settings(args.trials, args.seed)
                record(key, pair, **search_step(key, pair, settings, args.work))
            searched = done.get(key) or theirs.get(key)
            if searched is None or not Path(searched["run"]).is_dir():
                print(f"{key}: not run yet (scripts/bench_racing.py runs it); skipped")
                continue
            runs[mode] = Path(searched["run"])
            if f"front:{pair}:{mode}" not in done:
                record(f"front:{pair}:{mode}", pair, front=front_record(runs[mode]))
            if f"test:{pair}:{mode}" not in done:
                row = theirs.get(f"test:{key}", {}).get("row")  # bench_racing scored it already
                print(f"test:{pair}:{mode}: {'read' if row else 'running'}", flush=True)
                record(f"test:{pair}:{mode}", pair, row=row or scorers[pair].score_search(searched))
            write()
        if f"pick:{pair}" not in done and "pareto" in runs:
            print(f"pick:{pair}: running", flush=True)
            record(f"pick:{pair}", pair, **pick_step(runs["pareto"], args.work, scorers[pair]))
    write()
    print((args.results / "pareto.md").read_text())


if __name__ == "__main__":
    main()
