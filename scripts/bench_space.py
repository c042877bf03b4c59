"""Issue 16: does the scaled space with the baselines first beat a hand grid? (resumable)

    python scripts/build_benchmark_models.py                      # sentiment + WordNet
    python scripts/build_benchmark_models.py --pair langid-digits \
        --out ~/.cache/automerge-mk/benchmark-langid-digits        # words vs pictures
    python scripts/bench_space.py [--budgets 40,200] [--seeds 0,1]
    python scripts/build_benchmark_models.py --pair langid-digits --validation 400 \
        --out ~/.cache/automerge-mk/benchmark-langid-digits-400
    python scripts/bench_space.py --pairs langid-digits-400 --budgets 40

On two SmolLM2-135M-Instruct specialist pairs (scripts/build_benchmark_models.py), each search
runs on the validation split and every row is scored on the disjoint test split:

- the fixed rows: every baseline of `automerge-mk baselines --grid` (the default baselines
  plus the hand grid: slerp, task_arithmetic at 0.3 / 0.5 / 0.7 / 1, ties at densities
  0.3 / 0.5 / 0.7, dare_linear and dare_ties at weights 0.5 and 1);
- the new search (defaults: --weighting scaled, --baselines-first) and the old one
  (--weighting convex --no-baselines-first: automerge-mk 0.1's space), at each budget
  (40 trials with --initial 10, as the issue's user ran it, and the default 200 / 20) and
  seed;
- the default search as shipped (the new space with racing on), as scripts/bench_racing.py
  runs it with the racing defaults of today (read from racing-steps.jsonl, not run here);
- langid-digits-400: the far-apart pair built with 400 validation examples a task instead of
  100 (the specialists train on the rest), new search at 40 trials only: whether the search's
  validation set, not its space, decides the far-apart pair.

Each finished step (a search, one test row) is appended to scripts/results/space-steps.jsonl;
a rerun skips finished steps and resumes an interrupted search from its trials.jsonl, so the
benchmark can span sessions. Writes scripts/results/space.md from whatever is finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import (  # noqa: E402
    append_step,
    benchmark_models,
    current_steps,
    done_steps,
    home_path,
    models_digest,
    search_folder,
    steps_by_build,
    stored_path,
)

from automerge_mk import pipeline, report, rundir, space  # noqa: E402
from automerge_mk.methods import DEFAULT_METHODS  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
PAIRS = {  # name -> (models folder, tasks)
    "sentiment-wordnet": (CACHE / "benchmark", ("sentiment", "wordnet")),
    "langid-digits": (CACHE / "benchmark-langid-digits", ("langid", "digits")),
    # The same pair built with 400 validation examples a task instead of 100 (--validation
    # 400): with 100, the langid specialist's validation loss, the denominator of AP, is a
    # third of its test loss (no errors on 100 examples, 2 % on test).
    "langid-digits-400": (CACHE / "benchmark-langid-digits-400", ("langid", "digits")),
}
ISSUE_PAIRS = ("sentiment-wordnet", "langid-digits")  # what the scripts run by default
SPACES = {  # label -> settings of the search (racing off: this compares the spaces only)
    "new": {"racing": False},
    "old": {"weighting": "convex", "baselines_first": False, "racing": False},
}
ONLY_SPACES = {"langid-digits-400": ("new",)}  # a pair searched in some spaces only
# langid-digits-400 is a diagnostic of the validation set's size, not a pair the issue asks
# for: it is searched at 40 trials only (200 would take 2 x 40 minutes for no must-show)
ONLY_BUDGETS = {"langid-digits-400": (40,)}
BUDGETS, SEEDS = (40, 200), (0, 1)  # the issue's: 40 trials and the default budget, seeds 0, 1
INITIAL = {40: 10}  # the issue's 40-trial runs; other budgets take the default design


def pair_inputs(pair: str, split: str) -> pipeline.MergeRequest:
    sources, base, data = benchmark_models(*PAIRS[pair])
    return pipeline.MergeRequest(sources, base, data[split])


def search_settings(space_label: str, trials: int, seed: int) -> SearchSettings:
    initial = INITIAL.get(trials, SearchSettings.model_fields["initial"].default)
    return SearchSettings(trials=trials, initial=initial, seed=seed, **SPACES[space_label])


def run_search_step(step: str, pair: str, settings: SearchSettings, out: Path,
                    results: Path = RESULTS) -> dict:  # fmt: skip
    """One search on the validation split in `out` (benchmark.search_folder); an interrupted
    one resumes from its trials, and a finished one with the same settings
    (scripts/bench_racing.py runs its full-fidelity searches here) is read, with the wall time
    that script recorded."""
    resume = (out / rundir.SETTINGS).is_file() and not pipeline.finished(out, settings)
    started = time.perf_counter()
    if _finished_as(out, settings):
        run, wall = out, _racing_wall(out, results)
    else:
        run = pipeline.run_search(pair_inputs(pair, "validation"), settings, out,
                                  overwrite=not resume, resume=resume)  # fmt: skip
        wall = time.perf_counter() - started
    trials = rundir.RunDir(run).trials()
    best = json.loads((run / rundir.BEST).read_text())
    baselines = json.loads((run / rundir.BASELINES).read_text())
    return {
        "step": step,
        "settings": settings.model_dump(mode="json"),
        "wall_s": wall,
        "resumed": resume,
        "trials": len(trials),
        "validation_H": [t.harmonic_mean for t in trials],
        "best_config": best["config"],
        "best_trial": best["trial"],
        "validation_baselines": {k: v["harmonic_mean"] for k, v in baselines.items()},
        "run_dir": stored_path(run),
    }


def _finished_as(folder: Path, settings: SearchSettings) -> bool:
    if not pipeline.finished(folder, settings):
        return False
    theirs = rundir.RunRecord.read(folder).settings.model_dump(mode="json")
    return theirs == settings.model_dump(mode="json")


def _racing_wall(folder: Path, results: Path) -> float:
    """The wall time bench_racing.py recorded for the search it ran in `folder`."""
    for record in done_steps(results / "racing-steps.jsonl").values():
        if record.get("run") in (str(folder), stored_path(folder)):
            return record["wall_s"]
    return float("nan")


class TestScorer:
    """One session on a pair's test split (or `split`), opened on first use: rows scored like
    trials."""

    def __init__(self, pair: str, work: Path, split: str = "test"):
        self.pair, self.work, self.split, self.session = pair, work, split, None

    def open(self):
        if self.session is None:
            settings = SearchSettings(trials=1, initial=1, racing=False,
                                      methods=(*DEFAULT_METHODS, "slerp"))  # fmt: skip
            self.session = pipeline.open_session(pair_inputs(self.pair, self.split), settings,
                                                 self.work / f"{self.split}-{self.pair}",
                                                 True)  # fmt: skip
            self.session.run.release()
        return self.session

    def fixed_rows(self) -> dict:
        session = self.open()
        inputs = session.inputs
        return space.baseline_plans(
            inputs.blocks, tuple(str(s.path) for s in inputs.sources), str(inputs.base.path),
            inputs.dtype, 0, grid=True,
        )  # fmt: skip

    def score_plan(self, plan, label: str) -> dict:
        result = self.open().objective().evaluate_plan(plan, -1, {"row": label})
        return report.scored_json(result.tasks, result.harmonic_mean)

    def score_search(self, record: dict) -> dict:
        session = self.open()
        inputs = session.inputs
        settings = SearchSettings(**record["settings"])
        plan = space.plan_from_config(
            record["best_config"], inputs.blocks, tuple(str(s.path) for s in inputs.sources),
            tuple(s.name for s in inputs.sources), str(inputs.base.path), settings, inputs.dtype,
        )  # fmt: skip
        return self.score_plan(plan, record["step"])

    def references(self) -> dict:
        session = self.open()
        rows = {
            f"specialist: {n}": report.scored_json(*s) for n, s in session.sources_scored.items()
        }
        base = session.engine.load_source(session.inputs.base.path)
        rows["base"] = report.scored_json(*session.objective().score(base))
        return rows


def plan_steps(pairs, budgets, seeds, spaces=tuple(SPACES)):
    """(step, pair, kind, detail) in the order they are worth running: the fixed rows (on the
    test split, then on the validation split: the row a hand grid would pick) and the new
    search of each pair first, then the old search, then the next seed and budget."""
    for budget in budgets:
        for seed in seeds:
            for space_label in spaces:
                for pair in [p for p in pairs if space_label in ONLY_SPACES.get(p, SPACES)
                             and budget in ONLY_BUDGETS.get(p, budgets)]:  # fmt: skip
                    if budget == budgets[0] and seed == seeds[0] and space_label == spaces[0]:
                        yield f"reference:{pair}", pair, "reference", None
                        yield f"fixed:{pair}", pair, "fixed", None
                        yield f"fixed-val:{pair}", pair, "fixed", None
                    yield f"search:{pair}:{space_label}:{budget}:{seed}", pair, "search", (
                        space_label, budget, seed)  # fmt: skip


def fixed_rows(done: dict[str, dict], pair: str, kind: str = "fixed") -> dict[str, dict]:
    """The fixed rows of a pair scored so far on the test split (`kind` fixed-val: on the
    validation split), by label."""
    prefix = f"{kind}:{pair}:"
    return {f"fixed: {k.removeprefix(prefix)}": v["row"] for k, v in done.items()
            if k.startswith(prefix)}  # fmt: skip


def mean_pr(scored: dict) -> float:
    return statistics.mean(t["rate"] for t in scored["tasks"].values())


def _pair(step: str) -> str:
    """The pair a step belongs to (every step's name holds it)."""
    return next(pair for pair in PAIRS if f":{pair}:" in f":{step}:")


def render(builds: dict, budgets, seeds, digests, untagged: int) -> str:
    """space.md: one section per pair and build (`builds`: (pair, digest) -> its steps; every
    pair, not only those this run searches), the models built now (`digests`) first. A
    rebuild on another CPU trains other fine-tunes, so every comparison (search vs fixed
    rows, new vs old search) is made within one build only."""
    paragraphs = __doc__.split("\n\n")
    start = next(i for i, part in enumerate(paragraphs) if part.startswith("On two"))
    described = "\n\n".join(paragraphs[start : start + 2])
    done = {}
    for pair, digest in digests.items():
        done |= builds.get((pair, digest), {})
    pending = [step for step, _, kind, _ in plan_steps(list(digests), budgets, seeds)
               if kind == "search" and f"test:{step}" not in done]  # fmt: skip
    status = (f"Not finished yet on the models built now (a rerun goes on from here): "
              f"{', '.join(pending)}." if pending else "All steps finished on the models "
              "built now.")  # fmt: skip
    current = ", ".join(f"{pair} {digest}" for pair, digest in digests.items())
    status += (f" Models built now (sha256 of weights and data, 16 hex digits): {current}. "
               "Sections of other builds (earlier sessions, other CPUs) follow each pair's "
               "current one; each compares only rows of its own build.")  # fmt: skip
    if untagged:
        status += f" {untagged} lines of space-steps.jsonl predate the digest and are not shown."
    parts = ["# Search space vs a hand grid (issue 16)", described, _how(), status]
    targets = []
    for pair in PAIRS:
        now = digests.get(pair)
        order = [now] + [d for (p, d) in builds if p == pair and d != now]
        for digest in order:
            if (pair, digest) in builds:
                shipped = _default_searches(pair, digest, budgets, seeds)
                section, found = _section(builds[(pair, digest)], pair, budgets, seeds, shipped)
                if section:
                    built_now = " (built now)" if digest == now else ""
                    parts.append(f"## {pair}, models {digest}{built_now} (test split)\n\n"
                                 + section)  # fmt: skip
                    targets += [(f"{pair} ({digest}): {t}", a, b) for t, a, b in found]
    if targets:
        lines = ["| target | measured (test H) | met |", "|---|---|---|"]
        lines += [f"| {t} | {a:.4f} vs {b:.4f} | {'yes' if a >= b else '**no**'} |"
                  for t, a, b in targets]  # fmt: skip
        parts.insert(4, "## Targets\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _default_searches(pair: str, digest: str, budgets, seeds, results: Path = RESULTS) -> dict:
    """The default search as shipped (the new space with racing on), as scripts/bench_racing.py
    ran it on this build with today's racing defaults: label -> (record, test row)."""
    from bench_racing import comparable_steps  # it imports this module

    steps, _ = comparable_steps(results / "racing-steps.jsonl", {pair: digest})
    found = {}
    for budget in budgets:
        for seed in seeds:
            step = f"search:{pair}:racing:{budget}:{seed}"
            if f"test:{step}" in steps:
                record = steps[step]
                shown = {"validation_H": [record["best_H"]], "best_trial": record["best_trial"],
                         "wall_s": record["wall_s"]}  # fmt: skip
                label = f"default search (racing on), {budget} trials, seed {seed}"
                found[label] = (shown, steps[f"test:{step}"]["row"])
    return found


def _section(done: dict[str, dict], pair: str, budgets, seeds, shipped=None) -> tuple[str, list]:
    """One build's table of a pair, its wall times, and its targets (label, measured, bar);
    `shipped`: the default searches (racing on) of `_default_searches`."""
    _, tasks = PAIRS[pair]
    fixed = fixed_rows(done, pair)
    rows = done.get(f"reference:{pair}", {}).get("rows", {}) | fixed
    searches, walls, targets = dict(shipped or {}), [], []
    rows |= {label: row for label, (_, row) in searches.items()}
    walls += [f"{label} {record['wall_s'] / 60:.1f} min" for label, (record, _) in searches.items()]
    for budget in budgets:
        for seed in seeds:
            for space_label in SPACES:
                step = f"search:{pair}:{space_label}:{budget}:{seed}"
                if f"test:{step}" in done:
                    label = f"{space_label} search, {budget} trials, seed {seed}"
                    searches[label] = (done[step], done[f"test:{step}"]["row"])
                    rows[label] = done[f"test:{step}"]["row"]
                    resumed = " (resumed)" if done[step].get("resumed") else ""
                    walls.append(f"{label} {done[step]['wall_s'] / 60:.1f} min{resumed}")
    if not rows:
        return "", []
    if fixed:
        best_label = max(fixed, key=lambda k: fixed[k]["harmonic_mean"])
        best = fixed[best_label]["harmonic_mean"]
        # The issue's bar picks the best of 13 rows on the test split itself; a user who runs
        # the grid picks its row on validation, as the search does: both bars are shown.
        picked = fixed_rows(done, pair, "fixed-val")
        picked_label = max(picked, key=lambda k: picked[k]["harmonic_mean"]) if picked else None
        for label, (_, row) in searches.items():
            if label.startswith(("new", "default")) and label.split(", ")[1].startswith("40 "):
                targets.append((f"{label} >= best fixed row on test ({best_label})",
                                row["harmonic_mean"], best))  # fmt: skip
                if picked_label in fixed:
                    targets.append((f"{label} >= the fixed row best on validation "
                                    f"({picked_label})", row["harmonic_mean"],
                                    fixed[picked_label]["harmonic_mean"]))  # fmt: skip
    for budget in budgets:
        for seed in seeds:
            new = searches.get(f"new search, {budget} trials, seed {seed}")
            old = searches.get(f"old search, {budget} trials, seed {seed}")
            if new and old and pair == "sentiment-wordnet":
                targets.append((f"new >= old search, {budget} trials, seed {seed}",
                                new[1]["harmonic_mean"], old[1]["harmonic_mean"]))  # fmt: skip
    validation = {k: v["harmonic_mean"] for k, v in fixed_rows(done, pair, "fixed-val").items()}
    section = _glance(searches, fixed, validation, budgets, seeds)
    section += _table(rows, tasks, searches, validation)
    if walls:
        section += "\n\nWall times (2 CPU cores; other work may have shared them): "
        section += ", ".join(walls) + "."
    return section, targets


def _how() -> str:
    return (
        "Reproduce: `python scripts/bench_space.py`, with the models built by "
        f"`python scripts/build_benchmark_models.py --out {home_path(CACHE)}/benchmark` and "
        "`... --pair langid-digits --out "
        f"{home_path(CACHE)}/benchmark-langid-digits` (and `--validation 400 --out "
        f"{home_path(CACHE)}/benchmark-langid-digits-400`; the models built now, validation label "
        f"accuracy: {_build_facts()}). H = harmonic mean of AP (the "
        "specialist's test loss on the label token / this model's), PR = label accuracy / the "
        "specialist's, PD = max PR - min PR; search rows merge their best validation "
        "configuration in memory (bit-identical to stock mergekit on the recipe). Searches: "
        "validation split, 100-104 examples per task (400 for langid-digits-400); test: 400 "
        "per task."
    )


def _build_facts() -> str:
    """Each specialist's validation label accuracy on its own and the other task, from the
    build's check (build.json)."""
    facts = []
    for folder, tasks in PAIRS.values():
        if not (folder / "build.json").is_file():
            continue
        check = json.loads((folder / "build.json").read_text())["check"]
        for task in tasks:
            other = next(t for t in tasks if t != task)
            pairs = ((task, task), (task, other), ("base", other))
            own, off, base = (check[f"{who} on {on}"]["label_accuracy"] for who, on in pairs)
            facts.append(f"{task} specialist {own:.2f} on {task}, {off:.2f} on {other} "
                         f"(base {base:.2f})")  # fmt: skip
    return "; ".join(facts) or "-"


def _glance(searches, fixed, validation: dict[str, float], budgets, seeds) -> str:
    """Test H per budget and seed: the searches beside the fixed row best on test and the one
    best on validation (the row a user of the hand grid would pick); '' when no search."""
    kinds = ("new", "old", "default")
    cells = {}
    for label, (_, row) in searches.items():
        kind = label.split(" ")[0]
        budget, seed = label.split(", ")[1].split(" ")[0], label.rsplit(" ", 1)[1]
        cells[(int(budget), int(seed), kind)] = row["harmonic_mean"]
    if not cells or not fixed:
        return ""
    best = max(fixed, key=lambda k: fixed[k]["harmonic_mean"])
    picked = max(validation, key=validation.get) if validation else None
    lines = [
        "| trials | seed | new search | old search | default search (racing on) | best "
        "fixed row on test | fixed row best on validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in budgets:
        for seed in seeds:
            found = [cells.get((budget, seed, kind)) for kind in kinds]
            if all(v is None for v in found):
                continue
            shown = ["-" if v is None else f"{v:.4f}" for v in found]
            chosen = f"{fixed[picked]['harmonic_mean']:.4f}" if picked in fixed else "-"
            lines.append(f"| {budget} | {seed} | {' | '.join(shown)} | "
                         f"{fixed[best]['harmonic_mean']:.4f} | {chosen} |")  # fmt: skip
    names = [label.removeprefix("fixed: ") if label else "-" for label in (best, picked)]
    return (
        f"Test H at a glance (best fixed row on test: {names[0]}; on validation: "
        f"{names[1]}):\n\n" + "\n".join(lines) + "\n\nEvery row:\n\n"
    )


def _table(rows: dict[str, dict], tasks, searches, validation: dict[str, float]) -> str:
    """The test rows; the last column is the validation H a search or a fixed row had."""
    header = ["model", "H (AP)", "mean PR", "PD"]
    header += [f"{t} {k}" for t in tasks for k in ("AP", "label acc")]
    header += ["val H (best trial)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scored in rows.items():
        pd = scored["pd"]
        cells = [label, f"{scored['harmonic_mean']:.4f}", f"{mean_pr(scored):.4f}",
                 "-" if pd is None else f"{pd:.4f}"]  # fmt: skip
        for task in tasks:
            score = scored["tasks"][task]
            cells += [f"{score['preservation']:.4f}", f"{score['metrics']['label_accuracy']:.3f}"]
        if label in searches:
            record = searches[label][0]
            cells.append(f"{max(record['validation_H']):.4f} ({record['best_trial']})")
        elif label in validation:
            cells.append(f"{validation[label]:.4f}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(ISSUE_PAIRS), help=f"of {', '.join(PAIRS)}")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                        help="trials per search, comma list")  # fmt: skip
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--spaces", default=",".join(SPACES),
                        help="searches to run, of new, old (processes may split them)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=CACHE / "space-runs",
                        help="scratch sessions of the test and validation scoring (searches "
                        "run in scripts/results/runs/DIGEST/)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only write space.md")
    args = parser.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    spaces = [s for s in args.spaces.split(",") if s]
    unknown = [s for s in spaces if s not in SPACES]
    if unknown:
        raise SystemExit(f"--spaces: {', '.join(unknown)} unknown; use {', '.join(SPACES)}")
    steps_file = args.results / "space-steps.jsonl"
    # Steps count only for the models they ran on: a rebuild that differs starts over (the
    # earlier lines stay in the file, tagged with their build's digest).
    shown_digests = {pair: models_digest(*PAIRS[pair]) for pair in PAIRS
                     if (PAIRS[pair][0] / "build.json").is_file()}  # fmt: skip
    missing = [pair for pair in pairs if pair not in shown_digests]
    if missing and not args.render:
        raise SystemExit(f"{', '.join(missing)} not built: run the commands at the top of "
                         "scripts/bench_space.py")  # fmt: skip
    digests = {pair: shown_digests[pair] for pair in pairs if pair in shown_digests}
    done, _ = current_steps(steps_file, digests, _pair)

    def keep(record: dict) -> None:
        record["models"] = digests[_pair(record["step"])]
        append_step(steps_file, record)

    def write() -> None:
        builds, untagged = steps_by_build(steps_file, _pair)
        # every budget and seed the issue asks for, whichever this process runs
        shown = sorted({*budgets, *BUDGETS}), sorted({*seeds, *SEEDS})
        text = render(builds, *shown, shown_digests, untagged)
        (args.results / "space.md").write_text(text)

    scorers = {pair: TestScorer(pair, args.work) for pair in pairs}
    validation = {pair: TestScorer(pair, args.work, "validation") for pair in pairs}
    for step, pair, kind, detail in [] if args.render else plan_steps(pairs, budgets, seeds,
                                                                      spaces):  # fmt: skip
        if kind == "reference" and step not in done:
            print(f"{step}: scoring base and specialists on the test split", flush=True)
            done[step] = {"step": step, "rows": scorers[pair].references()}
            keep(done[step])
        elif kind == "fixed":
            scorer = validation[pair] if step.startswith("fixed-val:") else scorers[pair]
            for label, plan in scorer.fixed_rows().items():
                row_step = f"{step}:{label}"
                if row_step not in done:
                    print(f"{row_step}: scoring on the {scorer.split} split", flush=True)
                    row = scorer.score_plan(plan, label)
                    done[row_step] = {"step": row_step, "row": row}
                    keep(done[row_step])
        elif kind == "search":
            if step not in done:
                print(f"{step}: searching", flush=True)
                out = search_folder(digests[pair], step)
                done[step] = run_search_step(step, pair, search_settings(*detail), out,
                                             args.results)  # fmt: skip
                keep(done[step])
            if f"test:{step}" not in done:
                print(f"test:{step}: scoring its best on the test split", flush=True)
                done[f"test:{step}"] = {"step": f"test:{step}",
                                        "row": scorers[pair].score_search(done[step])}  # fmt: skip
                keep(done[f"test:{step}"])
        write()
    write()
    print((args.results / "space.md").read_text())


if __name__ == "__main__":
    main()
