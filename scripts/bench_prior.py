"""Issue 23: does the similarity prior save trials? `--prior` vs the default search (resumable).

    python scripts/bench_prior.py --pairs demo                      # minutes
    python scripts/build_benchmark_models.py                        # the real benchmark
    python scripts/bench_prior.py --pairs sentiment-wordnet,langid-digits   # hours per pair

Per pair and seed, the default search (every default: baselines first, racing, but racing's
confidence pinned at RACE_CONFIDENCE, what these runs were measured at) at `--trials`
(50, the issue's) and four searches with a prior: `--prior --no-prior-acquisition` (the
rule's predicted configuration and two variants right after the baselines, nothing else),
`--prior` (the same, first the rule corrected by the scored baselines, prior.by_baselines,
last the best merge so far rescaled twice, pipeline._Rescale; where the best of them beat
every baseline, the Sobol design ends there and SMAC's acquisition is weighted toward it: πBO),
`--prior-from` the default searches of the pair's other seeds (the rule learned from earlier
runs: here of the same models, as for a user who merges a pair again, so an upper bound of
what learning across pairs gives), and `--prior-from` the default searches of the other
pairs (what a user who merged other models first gets). Measured: the trials and the minutes
(merge + scoring + optimiser, summed over trials) each search took to reach the default
search's final best validation H, each final best, and the best H after 10-50 trials.
Then `automerge-mk suggest`'s recipe (the prior alone, no evaluation; and the rule at full
balance and without balance) and --prior's corrected start on the disjoint test split next
to the search's baselines and the default search's result.

Pairs: `demo` (the demo's models, built here when missing) and scripts/bench_space.py's two
SmolLM2-135M pairs. Each finished step is appended to scripts/results/prior-steps.jsonl with
the models' digest and the prior's rule (RULE); a rerun skips the steps finished on these
builds with these settings and this rule, and resumes an interrupted search (its folder is
under scripts/results/runs/, committed as far as it went). Writes scripts/results/prior.md
from whatever is finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_racing import RULE as RACING_RULE  # noqa: E402
from bench_space import PAIRS, TestScorer, pair_inputs  # noqa: E402
from benchmark import (  # noqa: E402
    append_step,
    models_digest,
    recorded_path,
    search_folder,
    steps_by_build,
    stored_path,
)

from automerge_mk import pipeline, prior, rundir, space  # noqa: E402
from automerge_mk.demo import build_demo_models  # noqa: E402
from automerge_mk.errors import RunDirectoryError  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
DEMO = CACHE / "demo-models"
PAIRS["demo"] = (DEMO, ("arith", "reverse"))  # the demo's layout is the benchmark's
# Where πBO's belief is (the modes that weight the acquisition, WEIGHTED): since 2026-12-06
# (search.Belief) on the best scored of the prediction and its variants where it beat every
# baseline, and the Sobol design ends there; dropped, the design kept, where a baseline beat
# them. Steps of an earlier belief are shown, never run, as MODE-SUFFIX (EARLIER, SHOWN): the
# belief on the prediction throughout ("before"); on the best prediction or dropped, the Sobol
# design kept either way ("checked"); on the best start, a baseline too, the design ended
# ("start"); since 2026-12-06 (2) the rule corrected by the baselines (prior.by_baselines)
# starts first, and steps without it are "rule"; since 2026-12-06 (5) the best merge so far
# rescaled (pipeline._Rescale) starts last, and steps without it are "corrected".
BELIEF = (
    "the rule corrected by the baselines first, the best so far rescaled last; confirmed "
    "prediction, design ended"
)
EARLIER = {
    None: "before",
    "best prediction, dropped below the baselines": "checked",
    "best start, design ended": "start",
    "confirmed prediction, design ended; dropped below the baselines": "rule",
    "the rule corrected by the baselines first; confirmed prediction, design ended": "corrected",
}
SHOWN = {
    "before": "belief on the prediction",
    "checked": "belief checked, Sobol design",
    "start": "best start, baselines too",
    "rule": "the rule's starts only",
    "corrected": "corrected start, not rescaled",
}
# the modes that weight the acquisition -> their column; "learned" and "pairs" add
# --prior-from (learned_from)
WEIGHTED = {
    "pibo": "--prior (πBO)",
    "learned": "--prior-from other seeds",
    "pairs": "--prior-from other pairs",
}
# mode -> (its settings, its column), in the order of prior.md's columns
MODES = {
    "default": ({}, "default"),
    "prior": ({"prior": True, "prior_acquisition": False}, "--prior, design only"),
}
for _mode, _column in WEIGHTED.items():
    for _suffix, _how in SHOWN.items():
        MODES[f"{_mode}-{_suffix}"] = ({"prior": True}, f"{_column}, {_how}")
    MODES[_mode] = ({"prior": True}, _column)
# The prior's rule the steps of the modes above but "default" (and suggest) were measured
# with: a step of another rule is run again. "balanced": prior.py's rule with each task
# vector scaled to the weakest one's norm (before: weights from cosine and relative norm only).
RULE = "balanced"
# Racing as these searches ran it (2026-12-05/06): --race-confidence 0.95 and a bound per task,
# no stop before 16 examples. Racing changed since (one bound on the harmonic mean, 0.975:
# scripts/results/racing.md); the confidence is pinned so that the finished searches stay
# comparable, and each step records the racing rule it ran under (RACING_BEFORE when absent).
RACE_CONFIDENCE = 0.95
RACING_BEFORE = "a bound per task, no stop before 16 examples"
BASELINES = tuple(b.label(2) for b in space.BASELINES)  # the search's first trials
SPLITS = ("test", "validation")  # suggest's rows are scored on both
ISSUE_SEEDS = (0, 1, 2)  # the seeds issue 23's target is stated on


def learned_from(pair: str, mode: str, trials: int, seed: int, done: dict) -> list[str]:
    """--prior-from for `mode`: the finished default searches of the pair's other seeds
    ("learned") or of the other pairs, every seed ("pairs")."""
    found = [r for k, r in done.items() if k.startswith("search:") and ":default:" in k
             and k.split(":")[3] == str(trials)]  # fmt: skip
    if mode == "learned":
        found = [r for r in found if r["step"].split(":")[1] == pair
                 and r["step"].split(":")[4] != str(seed)]  # fmt: skip
    else:
        found = [r for r in found if r["step"].split(":")[1] != pair]
    return sorted(str(recorded_path(r["run"])) for r in found)


def built(folder: Path, tasks: tuple[str, ...]) -> bool:
    """Whether a pair's models are all there (a build still running has the base only)."""
    return all((folder / name / "model.safetensors").is_file() for name in ("base", *tasks))


def _settings(mode: str, trials: int, seed: int, prior_from: list[str]) -> SearchSettings:
    extra = {"prior_from": prior_from} if mode in ("learned", "pairs") else {}
    return SearchSettings(trials=trials, seed=seed, race_confidence=RACE_CONFIDENCE,
                          **MODES[mode][0], **extra)  # fmt: skip


def current(record: dict) -> bool:
    """Whether a finished step was measured the way this script measures it now: the same
    settings (but --prior-from's folders) and, where a prior is used, the same rule."""
    if not record["step"].startswith("search:"):
        return record.get("rule") == RULE
    _, _, mode, trials, seed = record["step"].split(":")
    ours = _settings(mode.split("-")[0], int(trials), int(seed), [])
    theirs = dict(record.get("settings", {}), prior_from=[])
    return theirs == ours.model_dump(mode="json") and (
        mode == "default" or record.get("rule") == RULE
    )


def as_run(record: dict) -> dict:
    """A step of a weighted mode from before BELIEF, named MODE-SUFFIX (EARLIER; shown, never
    resumed)."""
    if not record["step"].startswith("search:"):
        return record
    _, pair, mode, trials, seed = record["step"].split(":")
    if mode in WEIGHTED and record.get("belief") != BELIEF:
        earlier = EARLIER[record.get("belief")]
        return dict(record, step=f"search:{pair}:{mode}-{earlier}:{trials}:{seed}")
    return record


def search_step(pair: str, mode: str, trials: int, seed: int, digest: str, done: dict) -> dict:
    """One search on the validation split (resumed when interrupted; a folder of another
    rule or other settings is replaced)."""
    settings = _settings(mode, trials, seed, learned_from(pair, mode, trials, seed, done))
    ruled = mode if mode == "default" else f"{mode}-{RULE}"  # another rule: another folder
    ruled += "-rescaled" if mode in WEIGHTED else ""  # the belief of BELIEF: another folder
    out = search_folder(digest, f"prior:{pair}:{ruled}:{trials}:{seed}")
    same = (out / rundir.SETTINGS).is_file() and rundir.RunRecord.read(
        out).settings.model_dump(mode="json") == settings.model_dump(mode="json")  # fmt: skip
    resume = same and not pipeline.finished(out, settings)
    if not (same and pipeline.finished(out, settings)):
        pipeline.run_search(pair_inputs(pair, "validation"), settings, out,
                            overwrite=not resume, resume=resume, progress=False)  # fmt: skip
    best = rundir.RunDir(out).read_json(rundir.BEST)
    return {
        "rule": RULE,
        "racing": RACING_RULE,
        **({"belief": BELIEF} if mode in WEIGHTED else {}),
        "run": stored_path(out),
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


def best_after(record: dict, count: int) -> float | None:
    """The best validation H of a search's first `count` trials scored on all of the data."""
    scored = [h for h, partial, _ in record["trials"][:count] if not partial]
    return max(scored, default=None)


ANYTIME = (10, 15, 20, 30, 50)  # prior.md: the best H after this many trials


def _anytime(pair: str, done: dict, modes: list[str], seeds, trials: int) -> str:
    """The best H so far after ANYTIME trials: the default search's (mean over its seeds) and
    each mode's minus the default's (mean over the seeds the mode ran): how far a search got
    by then, not only when it passed the default's final best."""
    counts = [n for n in ANYTIME if n <= trials]
    runs = {}
    for mode in ["default", *modes]:
        steps = {s: f"search:{pair}:{mode}:{trials}:{s}" for s in seeds}
        runs[mode] = {s: done[step] for s, step in steps.items() if step in done}
    if not runs["default"]:
        return ""

    def after(record: dict, n: int) -> float:
        return best_after(record, n) or 0.0

    rows = ["| best validation H after … trials | seeds | " + " | ".join(map(str, counts)) + " |",
            "|---" * (len(counts) + 2) + "|"]  # fmt: skip
    default = runs["default"]
    rows.append(
        f"| default (mean) | {', '.join(map(str, default))} | "
        + " | ".join(
            f"{statistics.mean(after(r, n) for r in default.values()):.4f}" for n in counts
        )
        + " |"
    )
    for mode in modes:
        ours = {s: r for s, r in runs[mode].items() if s in default}
        if not ours:
            continue
        cells = [statistics.mean(after(r, n) - after(default[s], n) for s, r in ours.items())
                 for n in counts]  # fmt: skip
        rows.append(f"| {MODES[mode][1]} − default | {', '.join(map(str, ours))} | "
                    + " | ".join(f"{c:+.4f}" for c in cells) + " |")  # fmt: skip
    return "\n".join(rows)


CORRECTED_ROW = "--prior's first start: the rule corrected by the baselines"


def rescaled_starts(searched: Path | None) -> dict:
    """A --prior search's rescaled starts (pipeline._Rescale) as rows: label -> configuration."""
    stored = rundir.RunDir(searched).read_json(rundir.PRIOR) if searched else {}
    steps = {label: why for label, why in stored.get("rescaled", {}).items() if why}
    return {f"--prior's {label.removeprefix('prior, ')}: trial {why['trial']} x{why['factor']:.4g}":
            stored["configs"][label] for label, why in steps.items()}  # fmt: skip


def suggest_step(pair: str, work: Path, scorers: dict, learned: list[str],
                 searched: Path | None = None, before: dict | None = None) -> dict:  # fmt: skip
    """suggest's recipe (validation probe, no evaluation) scored on the test split, with the
    baselines beside it; with `learned` runs, also `suggest --prior-from` them. The rule's
    plans (the prediction, full balance, no balance) are scored on the validation split too:
    what the balance's exponent was chosen on. With a --prior search `searched`, also the
    start the baselines corrected there (prior.json's corrected_by), on both splits: its
    power was chosen on the validation split; and the starts it rescaled (pipeline._Rescale),
    chosen on the validation split by that search."""
    request = pair_inputs(pair, "validation")
    out = work / f"{pair}-suggested.yaml"
    settings = SearchSettings()
    pipeline.run_suggest(request, settings, out, overwrite=True)
    inputs = scorers["test"].open().inputs
    features, plans = pipeline.predicted_plans(inputs, settings)  # the rule suggest applied
    # the rule before RULE: every task vector at its own length (equal norms: balance 1)
    level = [b.model_copy(update={"norms": (1.0,) * len(b.norms)}) for b in features.blocks]
    level = features.model_copy(update={"blocks": tuple(level)})
    ruled = {
        f"suggest (balance ^{prior.BALANCE:g})": plans["prior"],
        f"suggest, full balance (^{prior.FULL_BALANCE:g})": plans["prior, full balance"],
        "suggest, unbalanced (^0)": prior.prior_plans(
            level, inputs.blocks, plans["prior"].sources, plans["prior"].base, settings,
            inputs.dtype)["prior"],
    }  # fmt: skip
    corrected = searched and rundir.RunDir(searched).read_json(rundir.PRIOR).get("corrected_by")
    if corrected:
        names = [s.name for s in inputs.sources]
        ruled[CORRECTED_ROW] = prior.by_baselines(
            features,
            inputs.blocks,
            plans["prior"].sources,
            plans["prior"].base,
            settings,
            inputs.dtype,
            [corrected["preservation"][n] for n in names],
            corrected["ties_lost"],
        )
    names = tuple(s.name for s in inputs.sources)
    for label, config in rescaled_starts(searched).items():  # the search's, on the test split
        first = plans["prior"]
        ruled[label] = space.plan_from_config(config, inputs.blocks, first.sources, names,
                                              first.base, settings, inputs.dtype)  # fmt: skip
    rows = {label: scorers["test"].score_plan(plan, label) for label, plan in ruled.items()}
    validation = {label: scorers["validation"].score_plan(plan, label)["harmonic_mean"]
                  for label, plan in ruled.items()}  # fmt: skip
    if learned:
        label = f"suggest --prior-from (seeds {', '.join(r.rsplit('-', 1)[1] for r in learned)})"
        try:
            _, plans = pipeline.predicted_plans(inputs, SearchSettings(prior_from=learned))
            rows[label] = scorers["test"].score_plan(plans["prior"], label)
        except RunDirectoryError as error:  # e.g. models rebuilt since (their fingerprints)
            print(f"suggest:{pair}: {error}; the row measured before is kept", flush=True)
            rows.update({k: v for k, v in (before or {}).get("rows", {}).items()
                         if k.startswith("suggest --prior-from")})  # fmt: skip
    for label, plan in scorers["test"].fixed_rows().items():
        if label in BASELINES:
            rows[label] = scorers["test"].score_plan(plan, label)
    return {"rows": rows, "validation": validation, "recipe": str(out)}


def _learned_rows(steps_file: Path, pair: str, digest: str) -> dict:
    """The last `suggest --prior-from` rows recorded for this build, kept where the runs they
    learned from are refused now (suggest_step)."""
    found = {}
    for line in steps_file.read_text().splitlines() if steps_file.is_file() else ():
        record = json.loads(line)
        if record["step"] == f"suggest:{pair}" and record.get("models") == digest:
            rows = {k: v for k, v in record.get("rows", {}).items()
                    if k.startswith("suggest --prior-from")}  # fmt: skip
            found = rows or found
    return {"rows": found}


def render(builds: dict, pairs, seeds, trials: int, digests: dict) -> str:
    """prior.md: per pair, every build its steps were measured on (`builds`: (pair, models
    digest) -> its current steps, in the order first measured), the one built now last."""
    searched = [r for done in builds.values() for k, r in done.items() if k.startswith("search:")]
    lines = [
        "# A prior from similarity features: trials saved (issue 23)",
        __doc__.split("\n\n", 2)[2].split("\n\nPairs:")[0],
        f"Reproduce: `python scripts/bench_prior.py --pairs {','.join(pairs)} --trials {trials}`."
        " Each pair's section names the models it ran on (sha256 of weights and data); a "
        "rebuild on another CPU gives other models (README: the benchmark builds), measured "
        "again in a section of their own. Seconds are the trials' own (merge, scoring, "
        "optimiser), summed; other work may have shared the 2 cores. Racing at "
        f"--race-confidence {RACE_CONFIDENCE}; the searches shown ran under the racing rule(s): "
        + "; ".join(sorted({r.get("racing", RACING_BEFORE) for r in searched}))
        + ".",
    ]
    for pair in pairs:
        order = [d for p, d in builds if p == pair]
        if digests.get(pair) in order:  # the build here now goes last
            order.remove(digests[pair])
            order.append(digests[pair])
        for digest in order:
            ran = {k.split(":")[2] for k in builds[(pair, digest)] if k.startswith("search:")}
            if digests.get(pair) != digest and not ran - {"default"}:
                continue  # an earlier build's default searches alone compare nothing
            now = " (built on this machine now)" if digests.get(pair) == digest else ""
            title = f"{pair}, models {digest}{now}"
            lines.append(_pair_section(pair, title, builds[(pair, digest)], seeds, trials))
    return "\n\n".join(lines) + "\n"


def _pair_section(pair: str, title: str, done: dict, seeds, trials: int) -> str:
    ran = {k.split(":")[2] for k in done if k.startswith("search:")}
    others = [m for m in MODES if m != "default" and m in ran]
    columns = [MODES[m][1] for m in others]
    rows = ["| seed | default best H | trials to reach it: default | "
            + " | ".join(columns) + " | minutes: default | " + " | ".join(columns)
            + " | final best H − default's: " + " | ".join(columns) + " |"]  # fmt: skip
    rows.append("|---" * (len(rows[0].split("|")) - 2) + "|")
    ratios = {m: [] for m in others}
    finals = {m: [] for m in others}
    compared = {m: 0 for m in others}  # seeds the mode ran, whose default best came late
    by_baseline = []  # seeds whose default best is a baseline: no search reaches it sooner
    # ISSUE_SEEDS: (trials to reach, never: trials + 1; the default's; their seconds)
    issue = {m: [] for m in others}
    for seed in seeds:
        default = done.get(f"search:{pair}:default:{trials}:{seed}")
        if not default:
            rows.append(f"| {seed} | not finished yet |" + " |" * (len(rows[1]) // 4 - 2))
            continue
        target = default["best_H"]
        n_default, s_default = reach(default, target)
        if n_default <= len(BASELINES):
            by_baseline.append(seed)
        counts, minutes, deltas = [], [], []
        for mode in others:
            found = done.get(f"search:{pair}:{mode}:{trials}:{seed}")
            if not found:
                counts.append("-"), minutes.append("-"), deltas.append("-")
                continue
            n, took = reach(found, target)
            compared[mode] += n_default > len(BASELINES)
            finals[mode].append(found["best_H"] - target)
            if n and n_default > len(BASELINES):
                ratios[mode].append(n / n_default)
            if seed in ISSUE_SEEDS and n_default > len(BASELINES):
                issue[mode].append((n or trials + 1, n_default, took if n else None, s_default))
            counts.append(str(n or "never"))
            minutes.append(f"{took / 60:.1f}")
            deltas.append(f"{found['best_H'] - target:+.4f}")
        rows.append(f"| {seed} | {target:.4f} | {n_default} | " + " | ".join(counts)
                    + f" | {s_default / 60:.1f} | " + " | ".join(minutes) + " | "
                    + " | ".join(deltas) + " |")  # fmt: skip
    racing = {r.get("racing", RACING_BEFORE) for k, r in done.items() if k.startswith("search:")}
    text = [
        f"## {title}",
        "\n".join(rows),
        f"Racing rule of these searches: {'; '.join(sorted(racing))}.",
    ]
    anytime = _anytime(pair, done, others, seeds, trials)
    text += [anytime] if anytime else []
    for mode in others:
        if finals[mode]:
            share = f"{statistics.mean(ratios[mode]):.0%}" if ratios[mode] else "-"
            text.append(
                f"{MODES[mode][1]}: of the {compared[mode]} seeds whose "
                f"default best came after the baselines, it reached that best in "
                f"{len(ratios[mode])}, with {share} of the default's trials on average where "
                f"it did (the issue asks for at most 50 %); final best H minus the "
                f"default's, every seed, mean "
                f"{statistics.mean(finals[mode]):+.4f}."
            )
    for mode in others:
        counted = issue[mode]
        if counted and all(done.get(f"search:{pair}:{mode}:{trials}:{s}") for s in ISSUE_SEEDS):
            ours, theirs = sum(c[0] for c in counted), sum(c[1] for c in counted)
            mean = statistics.mean(c[0] / c[1] for c in counted)
            minutes = ""
            if all(c[2] is not None for c in counted):
                took, default_took = sum(c[2] for c in counted), sum(c[3] for c in counted)
                minutes = (f"; {took / 60:.1f} minutes against {default_took / 60:.1f} "
                           f"({took / default_took:.0%})")  # fmt: skip
            text.append(
                f"{MODES[mode][1]}, seeds {', '.join(map(str, ISSUE_SEEDS))} (the issue's), "
                f"those whose default best came after the baselines: {ours} trials in all "
                f"against the default's {theirs} ({ours / theirs:.0%}); the mean of the "
                f"per-seed ratios {mean:.0%} ('never' counted as {trials + 1}, a bound)"
                f"{minutes}."
            )
    if by_baseline:
        text.append(
            f"Seeds {', '.join(map(str, by_baseline))}: the default search's best is one of "
            f"its {len(BASELINES)} baselines, which every search here runs first (the "
            "prior's predictions follow them), so no search can reach it sooner: those "
            "seeds are left out of the trial ratios above and count in the final best H."
        )
    text.append(
        "--prior (πBO): first the rule corrected by the baselines, then the prediction and its "
        "variants, last the best merge so far with its task vectors x1.15, then x1.15 again "
        "where that won, else x0.85; where the best scored of them beat every "
        "baseline, the Sobol design ends there and the acquisition is multiplied by a prior "
        "centred on it; where a baseline beat them, the prior is dropped and the design goes "
        "on. Earlier columns: 'corrected start, not rescaled' did as now without the last two; "
        "'the rule's starts only' did that without the corrected "
        "start; 'belief on the prediction' kept the prior on the prediction; "
        "'belief checked, Sobol design' did as now but kept the Sobol design; 'best start, "
        "baselines too' ended the design at the best of baselines and predictions, and "
        "centred the prior on it even where a baseline had won. Compare the `suggest` rows "
        "below with the baselines (the predictions scored alone). --prior-from other seeds "
        "learns from runs of the same models, the most a user who merges again can expect; "
        "from other pairs it can only be as good as their blocks are alike."
    )
    suggested = done.get(f"suggest:{pair}")
    if suggested:
        table = [
            "| test split | H (AP) | "
            + " | ".join(f"{t} AP" for t in next(iter(suggested["rows"].values()))["tasks"])
            + " | validation H |"
        ]
        table.append("|---" * (len(table[0].split("|")) - 2) + "|")
        searched = done.get(f"test:{pair}:default:{trials}:{seeds[0]}")
        shown = dict(suggested["rows"])
        if searched:
            shown[f"default search (seed {seeds[0]}, {trials} trials)"] = searched["row"]
        for label, row in shown.items():
            aps = " | ".join(f"{s['preservation']:.4f}" for s in row["tasks"].values())
            valid = suggested.get("validation", {}).get(label)
            valid = "" if valid is None else f"{valid:.4f}"
            table.append(f"| {label} | {row['harmonic_mean']:.4f} | {aps} | {valid} |")
        text.append(
            "`suggest` (no evaluation) and --prior's corrected start on the test split:\n\n"
            + "\n".join(table)
        )
    return "\n\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="demo")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--modes",
        default=",".join(m for m in MODES if "-" not in m),
        help="which searches to run, in this order",
    )
    parser.add_argument("--work", type=Path, default=CACHE / "prior-runs",
                        help="the test split's session and suggest's recipes")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only write prior.md")
    args = parser.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    runnable = [m for m in MODES if "-" not in m]
    if unknown := [m for m in modes if m not in runnable]:
        parser.error(f"--modes: no such mode {', '.join(unknown)} (modes: {', '.join(runnable)})")
    if "demo" in pairs and not args.render:
        build_demo_models(DEMO, seed=0, progress=False)
    steps_file = args.results / "prior-steps.jsonl"
    # the pairs built here now (every one, not only --pairs: "pairs" learns from the other
    # pairs' default searches, even when another process runs them)
    digests = {p: models_digest(*PAIRS[p]) for p in PAIRS if built(*PAIRS[p])}
    missing = [p for p in pairs if p not in digests]
    if missing and not args.render:
        parser.error(f"not built here: {', '.join(missing)} (scripts/build_benchmark_models.py)")

    def load() -> tuple[dict, dict]:
        """Every build's current steps, and those of the builds here now that this process
        may skip (a search whose folder is gone, an earlier session's under ~/.cache, is run
        again: --prior-from needs its trials). Read again before each step: the default
        searches "learned" and "pairs" learn from may be another process's."""
        builds, _ = steps_by_build(steps_file, lambda s: s.split(":")[1], as_run)
        builds = {key: {k: r for k, r in found.items() if current(r)}
                  for key, found in builds.items()}  # fmt: skip
        done = {k: r for (pair, digest), found in builds.items() if digests.get(pair) == digest
                for k, r in found.items()
                if not k.startswith("search:") or recorded_path(r["run"]).is_dir()}  # fmt: skip
        return builds, done

    builds, done = load()
    scorers = {pair: {split: TestScorer(pair, args.work, split) for split in SPLITS}
               for pair in ([] if args.render else pairs)}  # fmt: skip

    def write() -> None:
        text = render(builds, pairs, seeds, args.trials, digests)
        (args.results / "prior.md").write_text(text)

    def record(step: str, pair: str, fields: dict) -> None:
        done[step] = {"step": step, **fields, "models": digests[pair]}
        append_step(steps_file, done[step])
        builds.setdefault((pair, digests[pair]), {})[step] = done[step]
        write()

    # in --modes' order; the defaults first: --prior-from learns from them ("learned", "pairs")
    for mode, pair, seed in [] if args.render else [(m, p, s) for m in modes for p in pairs
                                                    for s in seeds]:  # fmt: skip
        step = f"search:{pair}:{mode}:{args.trials}:{seed}"
        builds, done = load()
        if step in done:
            continue
        if mode in ("learned", "pairs") and not learned_from(pair, mode, args.trials, seed, done):
            print(f"{step}: no earlier default search to learn from yet", flush=True)
            continue
        print(f"{step}: running", flush=True)
        record(step, pair, search_step(pair, mode, args.trials, seed, digests[pair], done))
    builds, done = load()
    for pair in [] if args.render else pairs:
        searched = done.get(f"search:{pair}:default:{args.trials}:{seeds[0]}")
        test_step = f"test:{pair}:default:{args.trials}:{seeds[0]}"
        if searched and test_step not in done:
            row = scorers[pair]["test"].score_search(searched)
            record(test_step, pair, {"row": row, "rule": RULE})
        learned = learned_from(pair, "learned", args.trials, seeds[0], done)
        rows = len(done.get(f"suggest:{pair}", {}).get("rows", ()))
        prior_search = done.get(f"search:{pair}:pibo:{args.trials}:{seeds[0]}")
        searched = recorded_path(prior_search["run"]) if prior_search else None
        # the rule's 3, baselines, learned, the corrected start, the rescaled ones
        wanted = 3 + len(BASELINES) + bool(learned) + bool(searched)
        if rows < wanted + len(rescaled_starts(searched)):
            print(f"suggest:{pair}: running", flush=True)
            row = suggest_step(pair, args.work, scorers[pair], learned, searched,
                               _learned_rows(steps_file, pair, digests[pair]))  # fmt: skip
            record(f"suggest:{pair}", pair, row | {"rule": RULE})
    write()
    print((args.results / "prior.md").read_text())


if __name__ == "__main__":
    main()
