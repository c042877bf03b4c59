"""Issue 24: the paper's CCT experiment, offline: per-block search vs baselines vs whole model.

    OMP_NUM_THREADS=1 python scripts/build_cct_models.py          # ~10 s, once
    OMP_NUM_THREADS=1 python scripts/bench_cct.py --seeds 0,1,2   # minutes

The models are scripts/build_cct_models.py's: a small CCT (conv tokenizer, two transformer
layers, sequence pooling, a 10-way head) trained on a few of scikit-learn's digits as the
base, and specialists "low" (digits 0-4) and "high" (5-9) fine-tuned from it. Per seed:

- `block`: the default per-block search (trace + layers:4: tokenizer | L0 | L1 | pool | head),
  `--trials` trials, on the validation split;
- `whole`: the same search over one block (`--strategy whole`: one method and one set of
  weights for the whole model, what a search over fixed recipes can find);
- each search's model/ (built by stock mergekit-pytorch) scored on the disjoint test split.

Once: the five baselines (and the ten rows of the hand grid, `baselines --grid`) and the
sources scored on the test split (`automerge-mk baselines --grid`). Each finished step is appended to
scripts/results/cct-steps.jsonl with the models' digest; a rerun skips finished steps. Writes
scripts/results/cct.md from whatever is finished.
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

from automerge_mk import evaluate, images, modules, pipeline, report, rundir  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path.home() / ".cache" / "automerge-mk" / "cct"
TASKS = ("low", "high")
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


def digest(folder: Path) -> str:
    """sha256 over the models' state dicts and the data: steps of another build are not ours."""
    hashed = hashlib.sha256()
    for path in [folder / n / "model.safetensors" for n in ("base", *TASKS)] + sorted(
        (folder / "data").glob("*.npz")
    ):
        hashed.update(path.name.encode() + path.read_bytes())
    return hashed.hexdigest()[:16]


def request(folder: Path, split: str) -> pipeline.MergeRequest:
    return pipeline.MergeRequest(
        [str(folder / t) for t in TASKS],
        str(folder / "base"),
        {t: str(folder / "data" / f"{t}-{split}.npz") for t in TASKS},
    )


def test_scores(folder: Path, model_folder: Path) -> dict:
    """A model folder's scores on each task's test split, with AP and PR against each
    specialist on its own test split, as report.scored_json stores them."""
    spec = modules.read_spec(folder / "base")

    def scored(path: Path) -> dict:
        model = modules.live_module(path, torch.float32, "cpu", True)
        return {t: evaluate.score_task(model, tasks[t]) for t in TASKS}

    tasks = {t: images.load_image_task(t, folder / "data" / f"{t}-test.npz", spec.input_shape)
             for t in TASKS}  # fmt: skip
    references = {t: scored(folder / t)[t] for t in TASKS}
    return report.scored_json(*evaluate.with_preservation(scored(model_folder), references))


def run_step(step: str, folder: Path, work: Path, trials: int, initial: int) -> dict:
    """One step: `baselines` or `{block|whole}-{seed}`; returns its record."""
    started = time.perf_counter()
    if step == "baselines":
        settings = SearchSettings(trust_remote_code=True, seed=0)
        out = work / "baselines-test"
        pipeline.run_baselines(request(folder, "test"), settings, out, overwrite=True, grid=True)
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
        pipeline.run_search(request(folder, "validation"), settings, out, overwrite=not resume,
                            progress=False, resume=resume)  # fmt: skip
    best = json.loads((out / rundir.BEST).read_text())
    trials_seen = [json.loads(line) for line in (out / rundir.TRIALS).read_text().splitlines()]
    return {
        "step": step,
        "validation_h": best["harmonic_mean"],
        "best_trial": best["trial"],
        "trials": len(trials_seen),
        "plan": plan_rows(out),
        "test": test_scores(folder, out / rundir.MODEL),
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


def _row(label: str, scored: dict) -> str:
    tasks = scored["tasks"]
    cells = [f"{_accuracy(scored, t):.3f}" for t in TASKS]
    cells += [f"{tasks[t]['preservation']:.3f}" if tasks[t].get("preservation") is not None
              else "-" for t in TASKS]  # fmt: skip
    cells += [f"{tasks[t]['rate']:.3f}" if tasks[t].get("rate") is not None else "-"
              for t in TASKS]  # fmt: skip
    pd = scored.get("pd")
    return (f"| {label} | {' | '.join(cells)} | {scored['harmonic_mean']:.3f} | "
            f"{'-' if pd is None else f'{pd:.3f}'} |")  # fmt: skip


def write_markdown(steps: dict, seeds: list[int], trials: int, out: Path, build: str) -> None:
    header = ("| model | low acc | high acc | low AP | high AP | low PR | high PR | H (AP) | PD |\n"
              "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = ["# CCT on scikit-learn's digits: per-block search vs baselines vs whole-model search",
             "", "Made by `OMP_NUM_THREADS=1 python scripts/bench_cct.py --seeds "
             f"{','.join(map(str, seeds))} --trials {trials}` on the models of "
             f"`scripts/build_cct_models.py` (digest {build}). Accuracy is top-1 on the test "
             "split (40 images per digit, disjoint from the validation split the searches "
             "scored); AP = specialist's test loss / the model's, PR = accuracy / the "
             "specialist's, both on each task's own specialist; H = harmonic mean of AP; PD = "
             "max PR - min PR.", "", "## Test split", "", header]  # fmt: skip
    if "baselines" in steps:
        for name, scored in steps["baselines"]["sources"].items():
            lines.append(_row(f"{name} alone (source)", scored))
        for label, scored in steps["baselines"]["baselines"].items():
            mark = "" if label in BASELINES else " (grid)"
            lines.append(_row(f"baseline: {label}{mark}", scored))
    for kind, title in (("whole", "whole-model search"), ("block", "per-block search")):
        for seed in seeds:
            if f"{kind}-{seed}" in steps:
                lines.append(_row(f"{title}, seed {seed}", steps[f"{kind}-{seed}"]["test"]))
    lines += ["", "## Means over seeds", "",
              "| search | seeds | validation H | test H | test low acc | test high acc | "
              "best found at trial |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("whole", "block"):
        done = [steps[f"{kind}-{s}"] for s in seeds if f"{kind}-{s}" in steps]
        if done:
            mean = statistics.mean
            lines.append(
                f"| {kind} | {len(done)} | {mean(d['validation_h'] for d in done):.3f} | "
                f"{mean(d['test']['harmonic_mean'] for d in done):.3f} | "
                f"{mean(_accuracy(d['test'], 'low') for d in done):.3f} | "
                f"{mean(_accuracy(d['test'], 'high') for d in done):.3f} | "
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
    lines += ["## The paper's table, for shape", "", PAPER, ""]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/automerge-mk-cct"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not (args.models / "base" / "model.safetensors").is_file():
        raise SystemExit(f"{args.models} has no CCT models: run scripts/build_cct_models.py")
    build = digest(args.models)
    steps_file = args.results / "cct-steps.jsonl"
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    steps = {r["step"]: r for r in map(json.loads, lines) if r.get("models") == build
             and r.get("trials_asked", args.trials) == args.trials}  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    for step in ["baselines"] + [f"{k}-{s}" for s in seeds for k in ("whole", "block")]:
        if step in steps:
            continue
        print(f"{step} ...", flush=True)
        record = run_step(step, args.models, args.work, args.trials, args.initial)
        record |= {"models": build, "trials_asked": args.trials}
        append_step(steps_file, record)
        steps[step] = record
        print(f"{step}: {record.get('validation_h', '')} in {record['seconds']:.0f} s", flush=True)
        write_markdown(steps, seeds, args.trials, args.results / "cct.md", build)
    write_markdown(steps, seeds, args.trials, args.results / "cct.md", build)


if __name__ == "__main__":
    main()
