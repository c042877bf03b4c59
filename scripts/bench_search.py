"""Benchmark whole search trials: a naive loop vs automerge-mk's search vs the evaluator's bound.

    python scripts/bench_search.py [--naive-trials 4] [--trials 12] [--eval-tokens 1000]

On SmolLM2-135M-Instruct (scripts/smollm2.py) and two short full fine-tunes of it built here
(cached), one on Python's own reference documentation (`pydoc_data.topics`) and one on the
docstrings of standard-library modules, with the same validation data and seed for every loop:

- naive loop, as a user would write it from the paper: per trial ask SMAC's default HPO facade,
  write the mergekit YAML, `run_merge` to disk, `from_pretrained` in the model's dtype (bf16),
  evaluate in padded batches of 10 in that dtype, tell;
- automerge-mk's default search (`run_search`, resident engine, float32 bucketed evaluator);
- the evaluator's bound: a bare float32 forward over the same tokens packed without padding;
- the optimiser's own cost at trials 150-200: 200 ask/tell rounds of automerge-mk's optimiser
  on the same space with a synthetic cost, set against the measured trial time.

Writes scripts/results/bench_search.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path.home() / ".cache" / "automerge-mk" / "bench-search"


def task_texts() -> dict[str, list[str]]:
    """Two real, offline text tasks from the standard library."""
    import importlib
    import pkgutil
    from pydoc_data.topics import topics

    pydoc = [" ".join(t.split())[:400] for _, t in sorted(topics.items()) if len(t) > 200]
    docstrings = []
    for module in sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_")):
        try:
            doc = inspect.getdoc(importlib.import_module(module))
        except Exception:  # noqa: BLE001 - some stdlib modules refuse to import here
            continue
        if doc and len(doc) > 200:
            docstrings.append(" ".join(doc.split())[:400])
        if len(docstrings) >= 160:
            break
    return {"pydoc": pydoc[:160], "docstrings": docstrings}


def build(work: Path, steps: int) -> dict:
    """Base, two fine-tuned specialists and train/validation files (cached in `work`)."""
    from smollm2 import build_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_smollm2(work / "base")
    texts = task_texts()
    data = {}
    for name, items in texts.items():
        validation = work / f"{name}-validation.jsonl"
        validation.write_text("".join(json.dumps({"text": t}) + "\n" for t in items[:60]))
        data[name] = validation
        folder = work / name
        if (folder / "model.safetensors").is_file():
            continue
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        torch.manual_seed(0)
        train = items[60:]
        for step in range(steps):
            batch = [train[(step * 8 + i) % len(train)] for i in range(8)]
            encoded = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=64
            )
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"fine-tune {name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return {"base": base, "sources": [work / n for n in texts], "data": data}


def padded_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    """The naive evaluator: padded batches of 10 in the model's own dtype."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), 10):
            batch = tokenizer(
                texts[start : start + 10],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += model(**batch, labels=labels).loss.item() * n
            count += n
    return total / count


def naive_loop(models: dict, trials: int, eval_tokens: int, work: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from smac import HyperparameterOptimizationFacade, Scenario
    from smac.runhistory.dataclasses import TrialValue
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automerge_mk.evaluate import load_texts, tokenize_task
    from automerge_mk.recipe import load_recipe, recipe_text
    from automerge_mk.segment import segment_model
    from automerge_mk.settings import SearchSettings
    from automerge_mk.space import build_space, plan_from_config
    from automerge_mk.types import harmonic_mean

    settings = SearchSettings(trials=trials, initial=min(trials, 20), eval_tokens=eval_tokens)
    blocks = segment_model(models["base"], settings.strategy)
    names = tuple(p.name for p in models["sources"])
    tokenizer = AutoTokenizer.from_pretrained(str(models["base"]))
    texts = {}
    for name in names:
        all_texts = load_texts(models["data"][name])
        subset = tokenize_task(name, all_texts, tokenizer, 512, eval_tokens, settings.seed)
        texts[name] = [all_texts[i] for i in subset.indices]  # the same subset as automerge-mk
    references = {}
    for source in models["sources"]:
        model = AutoModelForCausalLM.from_pretrained(str(source))
        references[source.name] = padded_loss(model, tokenizer, texts[source.name], 512)
    space = build_space(blocks, names, settings)
    scenario = Scenario(space, deterministic=True, n_trials=trials, seed=0,
                        output_directory=work / "naive-smac")  # fmt: skip
    smac = HyperparameterOptimizationFacade(scenario, None, overwrite=True, logging_level=40)
    phases: dict[str, list[float]] = {k: [] for k in ("ask", "merge", "load", "evaluate", "tell")}
    started = time.perf_counter()
    for _ in range(trials):
        t0 = time.perf_counter()
        info = smac.ask()
        t1 = time.perf_counter()
        plan = plan_from_config(dict(info.config), blocks, tuple(str(s) for s in models["sources"]),
                                names, str(models["base"]), settings, "bfloat16")  # fmt: skip
        out = Path(tempfile.mkdtemp(prefix="naive-", dir=work))
        (out / "recipe.yaml").write_text(recipe_text(plan))
        documents = load_recipe((out / "recipe.yaml").read_text())
        options = MergeOptions(random_seed=0, quiet=True)
        for document in documents:  # what mergekit-multi does, parts first
            name = document.pop("name", None)
            target = out / (name or "model")
            for model_ref in document.get("models", []):
                if model_ref["model"].endswith("_part"):
                    model_ref["model"] = str(out / model_ref["model"])
            run_merge(MergeConfiguration.model_validate(document), str(target), options)
        t2 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
        t3 = time.perf_counter()
        aps = [references[n] / padded_loss(model, tokenizer, texts[n], 512) for n in names]
        t4 = time.perf_counter()
        smac.tell(info, TrialValue(cost=1 - harmonic_mean(aps)))
        t5 = time.perf_counter()
        for phase, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[phase].append(seconds)
        shutil.rmtree(out)
        print(f"naive trial: {t5 - t0:.1f} s", flush=True)
    wall = time.perf_counter() - started
    return {"trials": trials, "wall": wall, "phases": phases}


def our_search(models: dict, trials: int, eval_tokens: int, work: Path) -> dict:
    from automerge_mk.pipeline import MergeRequest, run_search
    from automerge_mk.rundir import RunDir
    from automerge_mk.settings import SearchSettings

    settings = SearchSettings(trials=trials, initial=min(trials, 20), eval_tokens=eval_tokens)
    started = time.perf_counter()
    request = MergeRequest(
        [str(s) for s in models["sources"]],
        str(models["base"]),
        {n: str(p) for n, p in models["data"].items()},
    )
    run = run_search(
        request,
        settings,
        work / "ours",
        overwrite=True,
        progress=False,
    )
    wall = time.perf_counter() - started
    lines = RunDir(run).trials()
    phases = {
        k: [t.seconds.get(k, 0.0) for t in lines] for k in ("ask", "merge", "evaluate", "record")
    }
    tokens = sum(s["tokens"] for s in json.loads((run / "eval_subset.json").read_text()).values())
    loop = sum(sum(v) for v in phases.values())
    return {"trials": len(lines), "wall": wall, "loop": loop, "phases": phases, "tokens": tokens}


def bare_forward(models: dict, eval_tokens: int) -> dict:
    """Tokens/s of a float32 forward over the evaluation tokens packed into 512-token rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automerge_mk.evaluate import load_texts, tokenize_task

    tokenizer = AutoTokenizer.from_pretrained(str(models["base"]))
    model = AutoModelForCausalLM.from_pretrained(str(models["base"]), dtype=torch.float32).eval()
    flat = []
    for name, path in models["data"].items():
        task = tokenize_task(name, load_texts(path), tokenizer, 512, eval_tokens, 0)
        flat += [t for s in task.sequences for t in s]
    rows = [flat[i : i + 512] for i in range(0, len(flat), 512)]
    with torch.inference_mode():
        model(input_ids=torch.tensor([rows[0][:16]]))
        started = time.perf_counter()
        for row in rows:
            model(input_ids=torch.tensor([row]))
        seconds = time.perf_counter() - started
    return {"tokens": len(flat), "seconds": seconds}


def optimiser_cost(models: dict, trials: int = 200) -> dict:
    """Mean ask + tell seconds over trials 150-200 of automerge-mk's optimiser, synthetic cost."""
    from smac.runhistory.dataclasses import TrialValue

    from automerge_mk.search import make_optimizer
    from automerge_mk.segment import segment_model
    from automerge_mk.settings import SearchSettings
    from automerge_mk.space import build_space

    settings = SearchSettings()
    names = tuple(p.name for p in models["sources"])
    space = build_space(segment_model(models["base"], settings.strategy), names, settings)
    optimizer = make_optimizer(space, trials, settings.initial, 0, Path(tempfile.mkdtemp()))
    costs = []
    for _ in range(trials):
        started = time.perf_counter()
        info = optimizer.ask()
        values = [v for v in dict(info.config).values() if isinstance(v, float)]
        optimizer.tell(info, TrialValue(cost=sum((v - 0.3) ** 2 for v in values)))
        costs.append(time.perf_counter() - started)
    return {"late_mean": statistics.mean(costs[150:]), "late_max": max(costs[150:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-trials", type=int, default=4)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--eval-tokens", type=int, default=1000)
    parser.add_argument("--fine-tune-steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_search.md"
    )
    arguments = parser.parse_args()
    arguments.work.mkdir(parents=True, exist_ok=True)
    models = build(arguments.work, arguments.fine_tune_steps)
    bound = bare_forward(models, arguments.eval_tokens)
    print("bound", bound, flush=True)
    ours = our_search(models, arguments.trials, arguments.eval_tokens, arguments.work)
    print("ours", ours["wall"], flush=True)
    naive = naive_loop(models, arguments.naive_trials, arguments.eval_tokens, arguments.work)
    optimiser = optimiser_cost(models)
    write(arguments, naive, ours, bound, optimiser)


def write(arguments, naive, ours, bound, optimiser) -> None:
    from bench_trial import machine

    naive_per_h = 3600 * naive["trials"] / naive["wall"]
    ours_per_trial = ours["loop"] / ours["trials"]
    ours_per_h = 3600 / ours_per_trial
    evaluate = statistics.mean(ours["phases"]["evaluate"])
    evaluator_rate = ours["tokens"] / evaluate
    bound_rate = bound["tokens"] / bound["seconds"]
    trial_seconds = ours_per_trial
    lines = [
        "# Search benchmark: naive loop vs automerge-mk",
        "",
        f"Machine: {machine('cpu')}.",
        "Models: SmolLM2-135M-Instruct (bf16) and two short full fine-tunes of it "
        f"({arguments.fine_tune_steps} steps of 8 texts each): Python reference documentation "
        "(`pydoc_data.topics`) and standard-library module docstrings; 60 validation texts "
        f"per task, `--eval-tokens {arguments.eval_tokens}` ({ours['tokens']} predicted tokens "
        "in all), seed 0, strategy layers:4, the default five methods.",
        "",
        f"Command: `python scripts/bench_search.py --naive-trials {arguments.naive_trials} "
        f"--trials {arguments.trials} --eval-tokens {arguments.eval_tokens}`",
        "",
        "| loop | trials | seconds per trial | trials per hour |",
        "|---|---|---|---|",
        f"| naive (mergekit to disk, from_pretrained, padded bf16 eval, SMAC defaults) | "
        f"{naive['trials']} | {naive['wall'] / naive['trials']:.1f} | {naive_per_h:.0f} |",
        f"| automerge-mk search | {ours['trials']} | {ours_per_trial:.1f} | {ours_per_h:.0f} |",
        "",
        f"Ratio: **{ours_per_h / naive_per_h:.1f}x** the naive loop's trials per hour.",
        "",
        "Per-phase mean seconds per trial:",
        "",
        "| loop | " + " | ".join(["ask", "merge", "load", "evaluate", "tell / record"]) + " |",
        "|---|---|---|---|---|---|",
        "| naive | " + " | ".join(
            f"{statistics.mean(naive['phases'][k]):.2f}"
            for k in ("ask", "merge", "load", "evaluate", "tell")
        ) + " |",
        "| automerge-mk | " + " | ".join(
            [f"{statistics.mean(ours['phases'][k]):.2f}" if k in ours["phases"] else "-"
             for k in ("ask", "merge", "load", "evaluate", "record")]
        ) + " |",
        "",
        f"Evaluator: {evaluator_rate:.0f} tokens/s against the bare float32 forward's "
        f"{bound_rate:.0f} tokens/s ({bound['tokens']} tokens packed in 512-token rows): "
        f"**{100 * evaluator_rate / bound_rate:.0f} %** of the bound.",
        "",
        f"Optimiser (ask + tell) at trials 150-200 of a 200-trial run of the same space: mean "
        f"{optimiser['late_mean']:.2f} s, max {optimiser['late_max']:.2f} s, i.e. "
        f"**{100 * optimiser['late_mean'] / (trial_seconds + optimiser['late_mean']):.0f} %** of "
        f"a trial's wall time at this trial cost ({trial_seconds:.1f} s).",
        "",
    ]  # fmt: skip
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
