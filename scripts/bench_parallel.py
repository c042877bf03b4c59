"""Trials per minute with 1 and 2 Dask workers on the same search (issue 7).

    python scripts/bench_parallel.py [--models benchmark|demo] [--trials 16] [--workers 1,2]

Runs the same per-block search (seed 0, the same trial count) with `--workers 1` (trials in the
search's own process, all cores to torch: what a user gets without Dask) and `--workers 2` …:
a local Dask cluster of that many single-threaded worker processes, each holding its own
resident sources (torch threads per worker = cores / workers). Throughput is measured in the
steady state, from the first recorded trial to the last (worker start-up, loading the sources
and scoring the specialists come before that and are reported apart as the wall time). On
`benchmark` (SmolLM2-135M-Instruct and its two specialists, from build_benchmark_models.py)
the evaluation is cut to --eval-tokens per task so one trial is a few seconds; `demo` uses the
demo's tiny models, where a trial is far shorter than SMAC's own ask.

Each finished run is appended to scripts/results/bench_parallel-steps.jsonl (a rerun skips it);
the table goes to scripts/results/bench_parallel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import RESULTS, append_step, benchmark_models, done_steps  # noqa: E402
from build_benchmark_models import DEFAULT_DIR  # noqa: E402

from automerge_mk import pipeline  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402


def _inputs(kind: str, work: Path):
    if kind == "demo":
        from automerge_mk.demo import build_demo_models

        models = build_demo_models(work / "demo-models", seed=0, progress=False)
        names = list(models.specialists)
        sources = [str(models.specialists[n]) for n in names]
        return sources, str(models.base), {n: str(models.validation[n]) for n in names}
    sources, base, data = benchmark_models(DEFAULT_DIR)
    return sources, base, data["validation"]


def run_step(kind: str, workers: int, args) -> dict:
    sources, base, data = _inputs(kind, args.work)
    settings = SearchSettings(trials=args.trials, initial=args.initial, seed=0,
                              eval_tokens=args.eval_tokens, workers=workers)  # fmt: skip
    started = time.perf_counter()
    out = args.work / f"parallel-{kind}-{workers}"
    run = pipeline.run_search(
        pipeline.MergeRequest(sources, base, data), settings, out, overwrite=True, progress=False
    )
    wall = time.perf_counter() - started
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    stamps = sorted(t["finished_at"] for t in trials)
    return {
        "step": f"{kind}:{workers}",
        "workers": workers,
        "trials": len(trials),
        "failed": sum(t["status"] != "ok" for t in trials),
        "steady_s": stamps[-1] - stamps[0],
        "trials_per_min": 60 * (len(trials) - 1) / (stamps[-1] - stamps[0]),
        "wall_s": wall,
        # --workers 1 runs trials in this process, which loaded the sources once.
        "pids": sorted({t["worker"]["pid"] if t["worker"] else os.getpid() for t in trials}),
        "loads": sorted({t["worker"]["loads"] if t["worker"] else 1 for t in trials}),
        "best_H": max(t["harmonic_mean"] for t in trials),
        "mean_trial_s": {
            k: sum(t["seconds"].get(k, 0) for t in trials) / len(trials)
            for k in ("ask", "merge", "evaluate")
        },  # fmt: skip
        "eval_tokens": args.eval_tokens,
    }


def render(done: dict, kind: str, counts: list[int], args) -> str:
    lines = ["| workers | trials | trials/min (steady state) | speed-up vs 1 | wall incl. start-up "
             "| worker processes | source loads per worker | mean merge s | mean evaluate s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    one = done.get(f"{kind}:1")
    for count in counts:
        step = done.get(f"{kind}:{count}")
        if not step:
            continue
        ratio = step["trials_per_min"] / one["trials_per_min"] if one else float("nan")
        lines.append(
            f"| {count} | {step['trials']} | {step['trials_per_min']:.1f} | {ratio:.2f}x | "
            f"{step['wall_s']:.0f} s | {len(step['pids'])} | {max(step['loads'])} | "
            f"{step['mean_trial_s']['merge']:.2f} | {step['mean_trial_s']['evaluate']:.2f} |"
        )
    cpus = os.cpu_count()
    return f"""# Parallel search: trials per minute with 1 and 2 Dask workers

```bash
python scripts/bench_parallel.py --models {kind} --trials {args.trials} \\
    --eval-tokens {args.eval_tokens} --workers {",".join(map(str, counts))}
```

Models: {kind} ({
        "SmolLM2-135M-Instruct + sentiment and WordNet specialists"
        if kind == "benchmark"
        else "the demo's tiny models"
    }), per-block search (layers:4), {args.trials} trials,
{args.initial} initial, seed 0, --eval-tokens {args.eval_tokens}. Machine: {cpus} CPU cores,
{platform.processor() or platform.machine()}, no GPU; each worker is one process with one Dask
thread and {cpus} / workers torch threads; `--workers 1` runs trials in the search's own process
with all {cpus} cores.

{chr(10).join(lines)}

Steady state: from the first recorded trial to the last. Wall: the whole command, including
starting the workers, each worker loading the sources and scoring the specialists, the final
mergekit build and the baselines in the main process.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=["benchmark", "demo"], default="benchmark")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--initial", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--work", type=Path, default=DEFAULT_DIR / "runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    steps_file = args.results / "bench_parallel-steps.jsonl"
    done = done_steps(steps_file)
    for count in counts:
        step = f"{args.models}:{count}"
        if step in done and done[step]["trials"] == args.trials:
            print(f"{step}: done, skipped")
            continue
        print(f"{step}: running", flush=True)
        done[step] = run_step(args.models, count, args)
        append_step(steps_file, done[step])
    text = render(done, args.models, counts, args)
    (args.results / "bench_parallel.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
