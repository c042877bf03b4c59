"""Issue 24: classifiers merged per block vs baselines vs a whole-model search (offline).

    OMP_NUM_THREADS=1 python scripts/build_cct_models.py                   # ~10 s, once
    OMP_NUM_THREADS=1 python scripts/bench_classifiers.py --pair cct       # minutes
    python scripts/build_encoder_models.py                                 # ~5 min, once
    OMP_NUM_THREADS=1 python scripts/bench_classifiers.py --pair minilm    # tens of minutes

Pairs:

- `cct`, the paper's CCT experiment: scripts/build_cct_models.py's small CCT (conv
  tokenizer, two transformer layers, sequence pooling, a 10-way head) trained on a few of
  scikit-learn's digits as the base, specialists "low" (digits 0-4) and "high" (5-9)
  fine-tuned from it (raw PyTorch models, merged by mergekit-pytorch);
- `minilm`: scripts/build_encoder_models.py's all-MiniLM-L6-v2 sequence classifier with one
  10-way head, specialists "sentiment" (Rotten Tomatoes) and "wordnet" (noun classes) fully
  fine-tuned from it (transformers BERT, merged by mergekit-yaml / mergekit-multi).

Per seed:

- `block`: the default per-block search (trace + layers:4; the CCT's blocks are tokenizer |
  L0 | L1 | pool | head), `--trials` trials, on the validation split;
- `whole`: the same search over one block (`--strategy whole`: one method and one set of
  weights for the whole model, what a search over fixed recipes can find);
- each search's model/ (built by stock mergekit-pytorch) scored on the disjoint test split.

Once: the five baselines and the ten rows of the hand grid, and the sources, scored on the
test split (`automerge-mk baselines --grid`). Each finished step is appended to
scripts/results/{pair}-steps.jsonl with the models' digest; a rerun skips finished steps.
Writes scripts/results/{pair}.md from whatever is finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchmark import append_step  # noqa: E402

from automerge_mk import evaluate, kinds, pipeline, report, rundir  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
# pair -> (models folder, tasks, data suffix, title, build command)
PAIRS = {
    "cct": (CACHE / "cct", ("low", "high"), ".npz",
            "CCT on scikit-learn's digits", "scripts/build_cct_models.py"),
    "minilm": (CACHE / "minilm", ("sentiment", "wordnet"), ".jsonl",
               "all-MiniLM-L6-v2 sequence classifiers", "scripts/build_encoder_models.py"),
}  # fmt: skip
STRATEGIES = {"block": "layers:4", "whole": "whole"}
BASELINES = ("linear w=0.5", "task_arithmetic w=0.5", "ties w=0.5 d=0.5",
             "dare_linear w=0.5 d=0.5", "dare_ties w=0.5 d=0.5")  # fmt: skip
# The paper's CCT table (AutoMerge, arXiv 2601.22748, as quoted in issue 24): top-1 accuracy
# of the two sources and the best fixed methods on its two tasks.
PAPER = """| model (paper, CCT) | task A top-1 | task B top-1 |
|---|---|---|
| sources | 51.48 | 40.86 |
| linear (best fixed method) | 38.02 | 32.49 |
| TIES | 30.55 | 27.69 |"""


def digest(pair: str) -> str:
    """sha256 over the models' weights and the data: steps of another build are not ours."""
    folder, tasks, suffix, *_ = PAIRS[pair]
    hashed = hashlib.sha256()
    for path in [folder / n / "model.safetensors" for n in ("base", *tasks)] + sorted(
        (folder / "data").glob(f"*{suffix}")
    ):
        hashed.update(path.name.encode() + path.read_bytes())
    return hashed.hexdigest()[:16]


def request(pair: str, split: str) -> pipeline.MergeRequest:
    folder, tasks, suffix, *_ = PAIRS[pair]
    return pipeline.MergeRequest(
        [str(folder / t) for t in tasks],
        str(folder / "base"),
        {t: str(folder / "data" / f"{t}-{split}{suffix}") for t in tasks},
    )


def test_scores(pair: str, model_folder: Path) -> dict:
    """A model folder's scores on each task's test split, with AP and PR against each
    specialist on its own test split, as report.scored_json stores them (the tasks read
    and checked as a search reads its validation data)."""
    folder, names, *_ = PAIRS[pair]
    test = request(pair, "test")
    settings = SearchSettings(trust_remote_code=True)
    tasks = pipeline._check_inputs(
        test.models, test.base, *pipeline._check_paths(test.models, test.data), settings
    ).tasks

    def scored(path: Path) -> dict:
        model = kinds.kind_of(path).load(path, torch.float32, "cpu", True)
        return {task.name: evaluate.score_task(model, task) for task in tasks}

    references = {t: scored(folder / t)[t] for t in names}
    return report.scored_json(*evaluate.with_preservation(scored(model_folder), references))


def run_step(step: str, pair: str, work: Path, trials: int, initial: int) -> dict:
    """One step: `baselines` or `{block|whole}-{seed}`; returns its record."""
    started = time.perf_counter()
    if step == "baselines":
        settings = SearchSettings(trust_remote_code=True, seed=0)
        out = work / "baselines-test"
        pipeline.run_baselines(request(pair, "test"), settings, out, overwrite=True, grid=True)
        return {
            "step": step,
            "baselines": json.loads((out / rundir.BASELINES).read_text()),
            "sources": json.loads((out / rundir.SOURCES).read_text()),
            "seconds": time.perf_counter() - started,
        }
    kind, seed = step.rsplit("-", 1)
    settings = SearchSettings(trust_remote_code=True, seed=int(seed), trials=trials,
                              initial=initial, strategy=STRATEGIES[kind])  # fmt: skip
    out = work / step
    if not ((out / rundir.FINAL).is_file() and pipeline.finished(out, settings)):
        resume = (out / rundir.TRIALS).is_file()  # an interrupted search goes on
        pipeline.run_search(request(pair, "validation"), settings, out, overwrite=not resume,
                            progress=False, resume=resume)  # fmt: skip
    best = json.loads((out / rundir.BEST).read_text())
    trials_seen = [json.loads(line) for line in (out / rundir.TRIALS).read_text().splitlines()]
    return {
        "step": step,
        "validation_h": best["harmonic_mean"],
        "best_trial": best["trial"],
        "trials": len(trials_seen),
        "plan": plan_rows(out),
        "test": test_scores(pair, out / rundir.MODEL),
        "seconds": time.perf_counter() - started,
    }


def plan_rows(out: Path) -> list[dict]:
    """The best trial's plan: per block its method, weights and densities."""
    request_, stored = pipeline.resume_arguments(out)
    best = json.loads((out / rundir.BEST).read_text())
    inputs = pipeline._check_inputs(request_.models, request_.base,
                                    *pipeline._check_paths(request_.models, request_.data),
                                    stored)  # fmt: skip
    plan = pipeline._to_plan(inputs, stored)(best["config"])
    return [
        {"block": block.name, "filters": list(block.filters), "method": choice.method,
         "weights": [round(w, 3) for w in choice.weights],
         "densities": [round(d, 3) for d in choice.densities] if choice.densities else None}
        for block, choice in zip(plan.blocks, plan.choices)
    ]  # fmt: skip


def _accuracy(scored: dict, task: str) -> float:
    return scored["tasks"][task]["metrics"]["label_accuracy"]


def _row(label: str, scored: dict, names: tuple[str, ...]) -> str:
    tasks = scored["tasks"]
    cells = [f"{_accuracy(scored, t):.3f}" for t in names]
    cells += [f"{tasks[t]['preservation']:.3f}" if tasks[t].get("preservation") is not None
              else "-" for t in names]  # fmt: skip
    cells += [f"{tasks[t]['rate']:.3f}" if tasks[t].get("rate") is not None else "-"
              for t in names]  # fmt: skip
    pd = scored.get("pd")
    return (f"| {label} | {' | '.join(cells)} | {scored['harmonic_mean']:.3f} | "
            f"{'-' if pd is None else f'{pd:.3f}'} |")  # fmt: skip


NOTES = "## Reading"  # a hand-written section at the end of the results, kept on rewrites


def write_markdown(steps: dict, pair: str, seeds: list[int], trials: int, out: Path,
                   build: str) -> None:  # fmt: skip
    _, names, _, title, builder = PAIRS[pair]
    counts = sorted({str(r["threads"]) for r in steps.values() if "threads" in r})
    threads = f"torch threads: {', '.join(counts)}" if counts else "threads not recorded"
    columns = [f"{t} acc" for t in names] + [f"{t} AP" for t in names]
    columns += [f"{t} PR" for t in names] + ["H (AP)", "PD"]
    header = f"| model | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}"
    lines = [f"# {title}: per-block search vs baselines vs whole-model search", "",
             f"Made by `python scripts/bench_classifiers.py --pair {pair} "
             f"--seeds {','.join(map(str, seeds))} --trials {trials}` ({threads}) on the models of "
             f"`{builder}` (digest {build}). Accuracy is top-1 on each task's test split "
             "(disjoint from the validation split the searches scored); AP = the specialist's "
             "test loss / the model's, PR = accuracy / the specialist's, both against each "
             "task's own specialist; H = harmonic mean of AP; PD = max PR - min PR.", "",
             "## Test split", "", header]  # fmt: skip
    if "baselines" in steps:
        for name, scored in steps["baselines"]["sources"].items():
            lines.append(_row(f"{name} alone (source)", scored, names))
        for label, scored in steps["baselines"]["baselines"].items():
            mark = "" if label in BASELINES else " (grid)"
            lines.append(_row(f"baseline: {label}{mark}", scored, names))
    for kind, what in (("whole", "whole-model search"), ("block", "per-block search")):
        for seed in seeds:
            if f"{kind}-{seed}" in steps:
                lines.append(_row(f"{what}, seed {seed}", steps[f"{kind}-{seed}"]["test"], names))
    accuracies = " | ".join(f"test {t} acc" for t in names)
    lines += ["", "## Means over seeds", "",
              f"| search | seeds | validation H | test H | {accuracies} | best found at trial |",
              f"|---|---|---|---|{'---|' * len(names)}---|"]  # fmt: skip
    mean = statistics.mean
    for kind in ("whole", "block"):
        done = [steps[f"{kind}-{s}"] for s in seeds if f"{kind}-{s}" in steps]
        if done:
            cells = [f"{mean(_accuracy(d['test'], t) for d in done):.3f}" for t in names]
            lines.append(
                f"| {kind} | {len(done)} | {mean(d['validation_h'] for d in done):.3f} | "
                f"{mean(d['test']['harmonic_mean'] for d in done):.3f} | {' | '.join(cells)} | "
                f"{', '.join(str(d['best_trial']) for d in done)} |"
            )
    lines += ["", "## What the per-block search chose", ""]
    for seed in seeds:
        if f"block-{seed}" in steps:
            lines += [f"Seed {seed}:", "", "| block | filters | method | weights | densities |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for row in steps[f"block-{seed}"]["plan"]:
                lines.append(f"| {row['block']} | {', '.join(row['filters'])} | {row['method']} "
                             f"| {row['weights']} | {row['densities'] or '-'} |")  # fmt: skip
            lines.append("")
    if pair == "cct":
        lines += ["## The paper's table, for shape", "", PAPER, ""]
    text = "\n".join(lines) + "\n"
    if out.is_file() and f"\n{NOTES}" in out.read_text():
        text += "\n" + NOTES + out.read_text().split(f"\n{NOTES}", 1)[1]
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="cct")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None,
                        help="run directories (default /tmp/automerge-mk-PAIR)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    folder, *_, builder = PAIRS[args.pair]
    if not (folder / "base" / "model.safetensors").is_file():
        raise SystemExit(f"{folder} has no models: run {builder}")
    work = args.work or Path(f"/tmp/automerge-mk-{args.pair}")
    build = digest(args.pair)
    steps_file = args.results / f"{args.pair}-steps.jsonl"
    out = args.results / f"{args.pair}.md"
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    steps = {r["step"]: r for r in map(json.loads, lines) if r.get("models") == build
             and r.get("trials_asked", args.trials) == args.trials}  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    for step in ["baselines"] + [f"{k}-{s}" for s in seeds for k in ("whole", "block")]:
        if step in steps:
            continue
        print(f"{step} ...", flush=True)
        record = run_step(step, args.pair, work, args.trials, args.initial)
        record |= {"models": build, "trials_asked": args.trials,
                   "threads": torch.get_num_threads()}  # fmt: skip
        append_step(steps_file, record)
        steps[step] = record
        print(f"{step}: {record.get('validation_h', '')} in {record['seconds']:.0f} s", flush=True)
        write_markdown(steps, args.pair, seeds, args.trials, out, build)
    write_markdown(steps, args.pair, seeds, args.trials, out, build)


if __name__ == "__main__":
    main()
