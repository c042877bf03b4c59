"""A full fine-tuned specialist merged with a LoRA-adapter specialist (resumable).

    python scripts/build_benchmark_models.py --pair langid-digits \
        --out ~/.cache/automerge-mk/benchmark-langid-digits
    python scripts/bench_adapter.py

On the langid-digits pair of scripts/build_benchmark_models.py (SmolLM2-135M-Instruct), the
langid specialist is trained again as a PEFT LoRA adapter of the base, with the recipe of the
full fine-tunes (build_benchmark_models.fine_tune: loss on the label token only, batch 8,
AdamW, the same seed and data order), and saved with peft's `save_pretrained`. The adapter is
scored alone on both validation splits; then a search merges the full `digits` specialist
with the adapter folder (applied to `--base`, as automerge-mk reads an adapter given alone)
on the validation split, and the base, the specialists (the full langid one for comparison),
every default baseline of the search and the search's best configuration are scored on the
disjoint test split, as scripts/bench_space.py scores its rows.

Each finished step is appended to scripts/results/adapter-steps.jsonl; a rerun skips finished
steps and resumes an interrupted search from its trials.jsonl. Writes
scripts/results/adapter.md from whatever is finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_space import TestScorer  # noqa: E402
from benchmark import append_step, done_steps, home_path  # noqa: E402
from build_benchmark_models import fine_tune  # noqa: E402

from automerge_mk import pipeline, report, rundir, space  # noqa: E402
from automerge_mk.settings import SearchSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
CACHE = Path.home() / ".cache" / "automerge-mk"
MODELS = CACHE / "benchmark-langid-digits"
ADAPTER = CACHE / "benchmark-adapter" / "langid-lora"
LORA = {  # peft.LoraConfig: every linear projection of the attention and the MLP
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],  # fmt: skip
}
STEPS, LR, SEED = 150, 1e-3, 0  # the full langid fine-tune's 150 steps; a LoRA's usual higher lr


def train_adapter(base: Path, train: Path, out: Path, steps: int, lr: float, seed: int) -> dict:
    """The langid LoRA adapter, trained by fine_tune with its model wrapped by peft's
    get_peft_model; reused when out/training.json records the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    wanted = {"steps": steps, "lr": lr, "seed": seed, "lora": LORA}
    if (out / "adapter_config.json").is_file() and (out / "training.json").is_file():
        record = json.loads((out / "training.json").read_text())
        if {key: record.get(key) for key in wanted} == wanted:
            return record
        print(f"{out.name}: built with other training settings; training again", flush=True)
    load = AutoModelForCausalLM.from_pretrained

    def with_lora(*args, **kwargs):
        return get_peft_model(load(*args, **kwargs), LoraConfig(**LORA))

    # fine_tune is the full fine-tunes' loop (batching, label-token loss, seed, save via a
    # .partial folder); wrapping the model it loads trains and saves only the adapter.
    (out / "model.safetensors").unlink(missing_ok=True)  # fine_tune reuses a folder with one
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", with_lora):
        record = fine_tune(base, train, out, steps, lr, seed)
    made_for = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    if Path(made_for).name != base.name:
        raise SystemExit(f"{out}: adapter_config.json names {made_for}, not a model {base.name}")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        shapes = [weights.get_slice(name).get_shape() for name in weights.keys()]
    record |= {"lora": LORA, "adapter_parameters": sum(a * b for a, b in shapes)}
    record |= {"load_avg_1min": os.getloadavg()[0], "other_work": other_work(),
               "torch_threads": torch_threads()}  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def score_adapter(models: Path, adapter: Path, data: dict[str, str]) -> dict:
    """Validation label accuracy and label loss of the adapter applied to the base, on each
    task, as build_benchmark_models.check scores the full specialists."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automerge_mk.evaluate import load_rows, score_task, tokenize_task

    tokenizer = AutoTokenizer.from_pretrained(str(models / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(models / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    scores = {}
    for task, path in data.items():
        score = score_task(model, tokenize_task(task, load_rows(Path(path)), tokenizer, 512))
        scores[f"{adapter.name} on {task}"] = {
            "label_accuracy": score.metrics["label_accuracy"],
            "label_loss": score.loss,
        }
    return scores


class AdapterScorer(TestScorer):
    """bench_space's test-split scorer on this benchmark's sources: the full digits specialist
    and the LoRA adapter; the full langid specialist is scored by the same objective."""

    def __init__(self, request: pipeline.MergeRequest, work: Path):
        super().__init__("adapter", work)
        self.request = request

    def open(self):
        if self.session is None:
            settings = SearchSettings(trials=1, initial=1)
            self.session = pipeline.open_session(self.request, settings, self.work / "test",
                                                 True)  # fmt: skip
            self.session.run.release()
        return self.session

    def baseline_rows(self) -> dict:
        """The default baselines (those a search scores into baselines.json), as plans."""
        inputs = self.open().inputs
        return space.baseline_plans(
            inputs.blocks, tuple(str(s.path) for s in inputs.sources), str(inputs.base.path),
            inputs.dtype, 0,
        )  # fmt: skip

    def score_model(self, folder: Path) -> dict:
        """A model that is no source, read as the engine reads a source, scored like one."""
        from mergekit.common import dtype_from_name

        from automerge_mk.engine import load_merge_tensors

        session = self.open()
        engine = session.engine
        tensors = load_merge_tensors(folder, engine.keys, dtype_from_name(session.inputs.dtype),
                                     engine.device)  # fmt: skip
        return report.scored_json(*session.objective().score(engine.load(tensors)))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def other_work() -> list[str]:
    """The other Python processes running now (what shared the CPU cores)."""
    lines = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    mine = {os.getpid(), os.getppid()}
    return [
        args[:120]
        for pid, _, args in (line.strip().partition(" ") for line in lines.splitlines())
        if "python" in args and int(pid) not in mine and "ps -eo" not in args
    ]


def data_files(models: Path, adapter: Path, split: str, work: Path, limit: int | None) -> dict:
    """Each source's data file of `split` by source name; with `limit`, copies of its first
    `limit` lines under `work` (for smoke runs)."""
    files = {"digits": models / "data" / f"digits-{split}.jsonl",
             adapter.name: models / "data" / f"langid-{split}.jsonl"}  # fmt: skip
    if limit is None:
        return {name: str(path) for name, path in files.items()}
    (work / "data").mkdir(parents=True, exist_ok=True)
    out = {}
    for name, path in files.items():
        copy = work / "data" / f"{name}-{split}-{limit}.jsonl"
        copy.write_text("".join(path.read_text().splitlines(keepends=True)[:limit]))
        out[name] = str(copy)
    return out


def run_search_step(request: pipeline.MergeRequest, settings: SearchSettings, out: Path) -> dict:
    """The search on the validation split; an interrupted one resumes from its trials."""
    resume = (out / rundir.SETTINGS).is_file() and not pipeline.finished(out, settings)
    started = time.perf_counter()
    run = pipeline.run_search(request, settings, out, overwrite=not resume, resume=resume)
    trials = rundir.RunDir(run).trials()
    best = json.loads((run / rundir.BEST).read_text())
    baselines = json.loads((run / rundir.BASELINES).read_text())
    return {
        "step": "search",
        "settings": settings.model_dump(mode="json"),
        "wall_s": time.perf_counter() - started,
        "resumed": resume,
        "examples": {n: len(Path(f).read_text().splitlines()) for n, f in request.data.items()},
        "trials": len(trials),
        "failed": sum(t.status != "ok" for t in trials),
        "validation_H": [t.harmonic_mean for t in trials],
        "best_config": best["config"],
        "best_trial": best["trial"],
        "validation_baselines": {k: v["harmonic_mean"] for k, v in baselines.items()},
        "validation_sources": json.loads((run / rundir.SOURCES).read_text()),
        "run_dir": str(run),
        "load_avg_1min": os.getloadavg()[0],
        "other_work": other_work(),
        "torch_threads": torch_threads(),
    }


def rebuild_check(run: Path) -> dict:
    """The best configuration merged in memory (as tests/test_adapters.py does) against
    model/, the recipe built by stock mergekit: tensors that differ, and by how much."""
    import torch
    from safetensors.torch import load_file

    from automerge_mk.engine import MergeEngine
    from automerge_mk.rundir import RunRecord
    from automerge_mk.space import plan_from_record

    record = RunRecord.read(run)
    best = json.loads((run / rundir.BEST).read_text())
    adapters = {m.path: m.adapter_of.path for m in record.models if m.adapter_of}
    engine = MergeEngine([m.path for m in record.models], record.base.path, record.base.path,
                         dtype=record.dtype, adapters=adapters)  # fmt: skip
    merged = engine.merge(plan_from_record(record, best["config"]))
    built = load_file(str(run / rundir.MODEL / "model.safetensors"))
    differ = {n: float((t.float() - built[n].float()).abs().max()) for n, t in merged.items()
              if not torch.equal(t, built[n])}  # fmt: skip
    final = json.loads((run / "final.json").read_text())
    return {
        "tensors": len(merged),
        "differ": len(differ),
        "max_abs_diff": max(differ.values(), default=0.0),
        "differing": sorted(differ)[:10],
        "model_validation_H": final["harmonic_mean"],
        "torch_threads": torch_threads(),
    }


def test_rows(done: dict[str, dict]) -> dict[str, dict]:
    """The test rows finished so far, by label, in table order."""
    rows = dict(done.get("test:reference", {}).get("rows", {}))
    order = ["base", "specialist: digits", f"specialist: {ADAPTER.name}"]
    rows = {k: rows[k] for k in order if k in rows} | rows
    if "test:langid-full" in done:
        rows["langid full fine-tune (not a source)"] = done["test:langid-full"]["row"]
    rows |= {f"baseline: {k.removeprefix('test:baseline:')}": v["row"]
             for k, v in done.items() if k.startswith("test:baseline:")}  # fmt: skip
    if "test:search" in done:
        rows["search best"] = done["test:search"]["row"]
    return rows


def render(done: dict[str, dict], tasks: tuple[str, ...], command: str) -> str:
    paragraphs = __doc__.split("\n\n")
    parts = ["# A full specialist merged with a LoRA-adapter specialist", paragraphs[2]]
    parts.append(f"Reproduce: `{command}`.")
    if "train" in done:
        parts.append("## The LoRA adapter\n\n" + _training(done["train"], done))
    if "search" in done:
        parts.append("## The search (validation split)\n\n" + _search(done["search"]))
        if "rebuild-check" in done:
            parts.append(_rebuild(done["rebuild-check"], done["search"]))
    rows = test_rows(done)
    if rows:
        how = _how_scored(done["test:reference"]["examples"], _test_wall(done))
        parts.append("## Test split\n\n" + how + "\n\n" + _table(rows, tasks))
        examples = "/".join(str(n) for n in done["test:reference"]["examples"].values())
        parts.append(_findings(rows, tasks, examples))
    pending = [s for s in ("train", "adapter-alone", "search", "rebuild-check", "test:reference",
                           "test:langid-full", "test:search") if s not in done]  # fmt: skip
    parts.append(f"Not finished yet (a rerun goes on from here): {', '.join(pending)}."
                 if pending else "All steps finished.")  # fmt: skip
    return "\n\n".join(parts) + "\n"


def _training(record: dict, done: dict) -> str:
    lora = record["lora"]
    full = json.loads((MODELS / "build.json").read_text())
    full_training, check = full["training"]["langid"], full["check"]
    alone = done.get("adapter-alone", {}).get("scores", {})
    lines = [
        f"peft LoraConfig r={lora['r']}, lora_alpha={lora['lora_alpha']}, "
        f"lora_dropout={lora['lora_dropout']}, target_modules {', '.join(lora['target_modules'])}"
        f" ({record['adapter_parameters']:,} adapter parameters, saved in bfloat16); "
        f"{record['steps']} steps of batch {record['batch']} ({record['steps'] * record['batch']}"
        f" of {record['train_examples']} langid training examples), AdamW lr {record['lr']}, "
        f"seed {record['seed']}: {record['seconds'] / 60:.1f} min ({record['torch_threads']} torch "
        f"thread, cores shared: 1-minute load average {record['load_avg_1min']:.1f}, other "
        f"Python processes: {'; '.join(record['other_work']) or 'none'}), label-token loss "
        f"{record['loss_first10']:.3f} (first 10 steps) -> {record['loss_last10']:.3f} (last 10)."
        f" The full langid fine-tune: {full_training['steps']} steps at lr {full_training['lr']}, "
        f"{full_training['seconds'] / 60:.1f} min, loss {full_training['loss_first10']:.3f} -> "
        f"{full_training['loss_last10']:.3f}.",
        "",
        "| validation split | langid label acc | langid label loss "
        "| digits label acc | digits label loss |",
        "|---|---|---|---|---|",
    ]
    who = {"base": "base", "langid": "langid full fine-tune", "digits": "digits full fine-tune"}
    scores = {label: [check[f"{name} on {t}"] for t in ("langid", "digits")]
              for name, label in who.items()}  # fmt: skip
    if alone:
        scores[f"{ADAPTER.name} (LoRA on base)"] = [
            alone[f"{ADAPTER.name} on {t}"] for t in ("langid", "digits")
        ]
    for label, cells in scores.items():
        values = [f"{c['label_accuracy']:.3f} | {c['label_loss']:.3f}" for c in cells]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _search(record: dict) -> str:
    settings = record["settings"]
    best = max(record["validation_H"])
    baselines = record["validation_baselines"]
    wall = f"{record['wall_s'] / 60:.1f} min" + (" (resumed)" if record["resumed"] else "")
    others = "; ".join(record["other_work"]) or "nothing"
    return (
        f"Validation examples: {', '.join(f'{k} {v}' for k, v in record['examples'].items())}. "
        f"{record['trials']} trials ({record['failed']} failed), {settings['initial']} from the "
        f"initial design, seed {settings['seed']}, strategy {settings['strategy']}, weighting "
        f"{settings['weighting']}, baselines first: {settings['baselines_first']}, methods "
        f"{', '.join(settings['methods'])}; every other setting the default. Wall time {wall} "
        f"on 2 CPU cores shared with other work (1-minute load average at the end "
        f"{record['load_avg_1min']:.1f}; other Python processes then: {others}), so it is not a "
        f"clean timing. Best validation H {best:.4f} at trial {record['best_trial']} (0-based, "
        f"so the {record['best_trial'] + 1}th trial); the "
        f"default baselines on validation: "
        + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items())
        + "."
    )


def _test_wall(done: dict[str, dict]) -> str:
    walls = [r["wall_s"] for k, r in done.items() if k.startswith("test:")]
    return f"{sum(walls) / 60:.1f} min for {len(walls)} steps"


def _rebuild(check: dict, search: dict) -> str:
    text = (
        f"Stock mergekit's build of the best recipe (model/, mergekit-multi with "
        f"--lora-merge-cache) scores validation H {check['model_validation_H']:.4f} vs the "
        f"in-memory merge's {max(search['validation_H']):.4f}; the in-memory merge at "
        f"{check['torch_threads']} torch thread(s) differs from it in {check['differ']} of "
        f"{check['tensors']} tensors (max |difference| {check['max_abs_diff']:.3g})."
    )
    if check["differ"] and search.get("torch_threads") == 1:
        text += (
            " These merges ran with --threads 1 while mergekit's subprocess used torch's "
            "default; rerun by hand at 2 threads, the same in-memory merge equals model/ bit "
            "for bit, so the gap is CPU rounding that depends on the thread count."
        )
    return text


def _how_scored(examples: dict[str, int], wall: str) -> str:
    return (
        f"Examples: {', '.join(f'{k} {v}' for k, v in examples.items())} (wall time {wall}, "
        "on the same shared cores). AP = the source specialist's test loss on the label token / "
        f"this model's, so for the langid task ({ADAPTER.name}) the reference is the LoRA "
        "adapter, and the full langid fine-tune (no source of the merge) can score AP > 1; "
        "H = harmonic mean of AP over both tasks; label acc = share of test prompts whose most "
        "likely label is right. Baseline and search rows are merged in memory (adapter applied "
        "to the base as mergekit applies `base+adapter`)."
    )


def _table(rows: dict[str, dict], tasks: tuple[str, ...]) -> str:
    header = ["model", "H (AP)"] + [f"{t} {k}" for t in tasks for k in ("AP", "label acc")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scored in rows.items():
        cells = [label, f"{scored['harmonic_mean']:.4f}"]
        for task in tasks:
            score = scored["tasks"][task]
            cells += [f"{score['preservation']:.4f}", f"{score['metrics']['label_accuracy']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _findings(rows: dict[str, dict], tasks: tuple[str, ...], examples: str) -> str:
    """What the table says, computed from it."""
    baselines = {k: v for k, v in rows.items() if k.startswith("baseline: ")}
    if "search best" not in rows or not baselines:
        return ""
    best_label = max(baselines, key=lambda k: baselines[k]["harmonic_mean"])
    search, best = rows["search best"], baselines[best_label]

    def accuracies(scored: dict) -> str:
        return ", ".join(f"{t} {scored['tasks'][t]['metrics']['label_accuracy']:.3f}"
                         for t in tasks)  # fmt: skip

    full = rows["langid full fine-tune (not a source)"]["tasks"][tasks[1]]
    lora_acc = rows[f"specialist: {ADAPTER.name}"]["tasks"][tasks[1]]["metrics"]["label_accuracy"]
    order = "above" if search["harmonic_mean"] > best["harmonic_mean"] else "not above"
    return (
        f"The search's best configuration scores test H {search['harmonic_mean']:.4f}, {order} "
        f"the best default baseline ({best_label.removeprefix('baseline: ')}, "
        f"{best['harmonic_mean']:.4f}); label accuracy {accuracies(search)} vs "
        f"{accuracies(best)} (the specialists alone: digits "
        f"{rows['specialist: digits']['tasks']['digits']['metrics']['label_accuracy']:.3f}, "
        f"{ADAPTER.name} "
        f"{rows[f'specialist: {ADAPTER.name}']['tasks'][tasks[1]]['metrics']['label_accuracy']:.3f}"
        f"). One search, one seed, {examples} test examples per task. The LoRA specialist is "
        f"the weaker langid specialist: test label accuracy {lora_acc:.3f} vs the full "
        f"fine-tune's {full['metrics']['label_accuracy']:.3f}, its label loss "
        f"{full['preservation']:.2f}x the full one's."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--adapter", type=Path, default=ADAPTER,
                        help="its folder (its name: the langid source's)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=CACHE / "adapter-runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=STEPS, help="LoRA training steps")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--initial", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--examples",
        type=int,
        default=None,
        help="the first N examples of each data file only (smoke runs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 avoids oversubscribing cores other work uses)",
    )
    parser.add_argument("--render", action="store_true", help="only write adapter.md")
    args = parser.parse_args()
    models, adapter, work = (p.expanduser() for p in (args.models, args.adapter, args.work))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = ("digits", adapter.name)
    args.results.mkdir(parents=True, exist_ok=True)
    steps_file = args.results / "adapter-steps.jsonl"
    done = done_steps(steps_file)
    command = "python scripts/bench_adapter.py" + "".join(
        f" {flag} {value}" for flag, value, default in (
            ("--steps", args.steps, STEPS), ("--lr", args.lr, LR), ("--trials", args.trials, 40),
            ("--initial", args.initial, 10), ("--seed", args.seed, 0),
            ("--threads", args.threads, None),
        ) if value != default
    )  # fmt: skip

    clock = [time.perf_counter()]

    def finish(step: str, record: dict) -> None:
        """Record a finished step (with its wall time unless it has one) and the note."""
        now = time.perf_counter()
        done[step] = {"step": step, "wall_s": now - clock[0]} | record
        clock[0] = now
        append_step(steps_file, done[step])
        (args.results / "adapter.md").write_text(render(done, tasks, command))

    base = models / "base"
    if not args.render:
        if "train" not in done:
            print(f"train: LoRA adapter {home_path(adapter)}", flush=True)
            adapter.parent.mkdir(parents=True, exist_ok=True)
            train = models / "data" / "langid-train.jsonl"
            finish("train", train_adapter(base, train, adapter, args.steps, args.lr, SEED))
        if "adapter-alone" not in done:
            print("adapter-alone: scoring the adapter on the validation splits", flush=True)
            data = {t: str(models / "data" / f"{t}-validation.jsonl") for t in ("langid", "digits")}
            finish("adapter-alone", {"scores": score_adapter(models, adapter, data)})
        sources = [str(models / "digits"), str(adapter)]
        validation = pipeline.MergeRequest(
            sources, str(base), data_files(models, adapter, "validation", work, args.examples)
        )
        if "search" not in done:
            print("search: digits + the LoRA adapter on the validation split", flush=True)
            settings = SearchSettings(trials=args.trials, initial=args.initial, seed=args.seed)
            record = run_search_step(validation, settings, work / "search")
            finish("search", record)
        test = pipeline.MergeRequest(
            sources, str(base), data_files(models, adapter, "test", work, args.examples)
        )
        scorer = AdapterScorer(test, work)
        if "rebuild-check" not in done:
            print("rebuild-check: the best merge in memory vs stock mergekit's", flush=True)
            finish("rebuild-check", rebuild_check(Path(done["search"]["run_dir"])))
        if "test:reference" not in done:
            print("test:reference: base and specialists on the test split", flush=True)
            rows = scorer.references()
            examples = {t.name: len(t.sequences) for t in scorer.open().inputs.tasks}
            finish("test:reference", {"rows": rows, "examples": examples})
        if "test:langid-full" not in done:
            print("test:langid-full: the full langid specialist on the test split", flush=True)
            finish("test:langid-full", {"row": scorer.score_model(models / "langid")})
        plans = scorer.baseline_rows() if any(
            f"test:baseline:{k}" not in done for k in done["search"]["validation_baselines"]
        ) else {}  # fmt: skip
        for label in done["search"]["validation_baselines"]:
            if f"test:baseline:{label}" not in done:
                print(f"test:baseline:{label}: scoring on the test split", flush=True)
                finish(f"test:baseline:{label}", {"row": scorer.score_plan(plans[label], label)})
        if "test:search" not in done:
            print("test:search: the search's best configuration on the test split", flush=True)
            finish("test:search", {"row": scorer.score_search(done["search"])})
    (args.results / "adapter.md").write_text(render(done, tasks, command))
    print((args.results / "adapter.md").read_text())


if __name__ == "__main__":
    main()
