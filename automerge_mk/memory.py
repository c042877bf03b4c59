"""Stage 4a: the memory plan, and the tiers it chooses between, sized before anything loads.

A search keeps three kinds of bytes: the models it merges (base and sources, in the merge
dtype), one live model (in the evaluation dtype) that each trial is copied into and scored,
and, for TIES-style methods, the magnitude rank of every task vector (4 bytes per parameter
per source). Scoring adds activations, and each merged tensor briefly needs a few tensors of
its size. `plan_memory` sizes all of it from the configs and the weight files' headers (no
tensor is read), sets it against the memory the device and the host have free, and picks
where each part lives:

- tier `resident`: the models on the device, read once (the fastest);
- tier `host`: the models in host memory (pinned), each tensor copied to the device when a
  kernel needs it (a GPU smaller than the models);
- tier `mmap`: the models memory-mapped from their safetensors files, each tensor read when a
  kernel needs it (host memory short too: the page cache holds them and can give them back);
- the rank cache on the device, in host memory (copied over per use), or off (mergekit sorts
  every task vector again on every trial).

On a CPU the device is host memory: there `host` is the same as `resident`. The estimate
counts what a search adds to the Python process (a few hundred MB of libraries come on top).
Every tier gives the kernels the same tensors, cast exactly as mergekit's LoadTensor casts
them, so its merges are bit-identical to stock mergekit's (tests/test_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import MemoryPlanError, ModelReferenceError
from .methods import is_ranked
from .weights import open_weights, weight_files

TIERS = ("resident", "host", "mmap")
RANK_CACHES = ("device", "host", "off")
# Of the memory free when the plan is made, the share a plan may fill: allocator slack,
# fragmentation and whatever else the machine runs meanwhile take the rest.
USABLE = 0.9
GIB = 2**30


def free_memory(device: str) -> tuple[int, int]:
    """(bytes free on `device`, bytes available in host memory). On a CPU both are the host's."""
    import psutil  # dask's dependency too; reads /proc/meminfo's MemAvailable on Linux

    host = psutil.virtual_memory().available
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, host
    return host, host


def tensor_elements(folder: Path, keys: Mapping[str, str]) -> dict[str, int]:
    """Elements of each merged tensor (by mergekit name), read from the weight files' headers.

    Raises:
        ModelReferenceError: naming a file that cannot be read or a tensor it lacks.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        try:
            with open_weights(file) as shard:
                shapes.update({key: shard.shape(key) for key in shard.names()})
        except Exception as error:
            raise ModelReferenceError(f"cannot read weights {file}: {error}") from error
    missing = [key for key in keys.values() if key not in shapes]
    if missing:
        raise ModelReferenceError(f"{folder} lacks tensors {missing[:3]}")
    return {name: math.prod(shapes[key]) for name, key in keys.items()}


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes of each part of a search (what the plan places)."""

    models: int  # base and sources in the merge dtype, each folder once
    largest_model: int
    live: int  # the live model in the evaluation dtype
    rank_cache: int  # 0 when no searched method ranks magnitudes
    activations: int  # scoring one batch
    merge_work: int  # the transient tensors of merging the largest tensor

    def on_device(self, tier: str, rank_cache: str) -> int:
        models = self.models if tier == "resident" else 0
        cache = self.rank_cache if rank_cache == "device" else 0
        return models + self.live + cache + self.activations + self.merge_work

    def on_host(self, tier: str, rank_cache: str) -> int:
        """Host memory beyond the device's (0 parts where the device is the host)."""
        models = self.models if tier == "host" else 0
        return models + (self.rank_cache if rank_cache == "host" else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Where a search keeps its parts, with the bytes it expects and the bytes free."""

    device: str
    tier: str
    rank_cache: str
    needs: MemoryNeeds
    device_free: int
    host_free: int

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def device_bytes(self) -> int:
        need = self.needs.on_device(self.tier, self.rank_cache)
        return need + self.needs.on_host(self.tier, self.rank_cache) if self.on_cpu else need

    def host_bytes(self) -> int:
        if self.on_cpu:
            return self.device_bytes()
        return self.needs.on_host(self.tier, self.rank_cache)

    def fits(self) -> bool:
        if self.on_cpu:
            return self.device_bytes() <= USABLE * self.device_free
        return (self.device_bytes() <= USABLE * self.device_free
                and self.host_bytes() <= USABLE * self.host_free)  # fmt: skip

    def as_record(self) -> dict:
        """The plan as memory.json keeps it: the choice, each part's bytes, the totals."""
        return {"device": self.device, "tier": self.tier, "rank_cache": self.rank_cache,
                "needs": asdict(self.needs), "device_bytes": self.device_bytes(),
                "host_bytes": self.host_bytes(), "device_free": self.device_free,
                "host_free": self.host_free}  # fmt: skip

    def describe(self) -> str:
        """The plan in a few lines, as printed at start-up."""
        n = self.needs
        where = "in memory" if self.on_cpu else f"on {self.device}"
        models = {"resident": where, "host": "in host memory (pinned), per tensor to "
                  f"{self.device}", "mmap": "memory-mapped from their weight files"}  # fmt: skip
        cache = ("none needed" if not n.rank_cache
                 else {"device": f"{_gb(n.rank_cache)} {where}",
                       "host": f"{_gb(n.rank_cache)} in host memory",
                       "off": f"off (would take {_gb(n.rank_cache)}; TIES sorts each trial)"}
                 [self.rank_cache])  # fmt: skip
        lines = [
            f"memory plan: --tier {self.tier} --rank-cache {self.rank_cache} on {self.device}",
            f"  models {_gb(n.models)} {models[self.tier]}; live model {_gb(n.live)}; "
            f"rank cache {cache}; scoring {_gb(n.activations)}; merging {_gb(n.merge_work)}",
        ]
        if self.on_cpu:
            lines.append(f"  needs {_gb(self.device_bytes())} of {_gb(self.device_free)} free")
        else:
            lines.append(f"  needs {_gb(self.device_bytes())} of {_gb(self.device_free)} free on "
                         f"{self.device}, {_gb(self.host_bytes())} of {_gb(self.host_free)} "
                         "available host memory")  # fmt: skip
        return "\n".join(lines)


def _gb(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count < 100 * GIB else f"{count / GIB:.0f} GiB"


def _activations(config, eval_itemsize: int, batch: tuple[int, int, int]) -> int:
    """Scoring one batch (padded positions, width, scored positions per vocabulary chunk):
    per position 16 hidden-size and 4 MLP-size vectors, a fit to the peaks of Llama forward
    passes measured on this CPU (hidden 512 to 2048, 1,440 to 4,096 positions: 14 to 45
    hidden-size vectors), its attention scores, and the float32 logits of one vocabulary
    chunk with their softmax."""
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 1024)
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    inner = inner or 4 * hidden
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 16)
    vocab = getattr(text, "vocab_size", 32000)
    positions, width, rows = batch
    per_position = (16 * hidden + 4 * inner + 2 * heads * width) * eval_itemsize
    return positions * per_position + 3 * min(rows, positions) * vocab * 4


def measure_needs(
    models: Sequence[Path],
    sources: int,
    live_model: Path,
    keys: Mapping[str, str],
    config,
    merge_dtype: torch.dtype,
    eval_dtype: torch.dtype,
    methods: Sequence[str],
    batch: tuple[int, int, int],
    activations: int | None = None,
) -> MemoryNeeds:
    """The bytes of a search's parts, from the weight headers of `models` (the folders whose
    tensors are merged: a PEFT source counts as its model's shapes) and `live_model`, and
    scoring's largest `batch` (padded positions, width, positions per vocabulary chunk) of a
    causal LM's `config`; or, for another model, the elements its scoring holds at once
    (`activations`)."""
    merge_size = torch.empty((), dtype=merge_dtype).element_size()
    eval_size = torch.empty((), dtype=eval_dtype).element_size()
    live = tensor_elements(live_model, keys)
    per_model = [sum(tensor_elements(folder, keys).values()) for folder in dict.fromkeys(models)]
    ranked = any(is_ranked(m) for m in methods)
    largest = max(live.values())
    return MemoryNeeds(
        models=sum(per_model) * merge_size,
        largest_model=max(per_model) * merge_size,
        live=sum(live.values()) * eval_size,
        rank_cache=4 * sum(live.values()) * sources if ranked else 0,
        activations=activations * eval_size
        if activations is not None
        else _activations(config, eval_size, batch),
        # A task-vector merge holds the inputs' deltas, their masks and the result at once;
        # ranking magnitudes (TIES, with or without the cache) sorts one task vector's
        # magnitudes in place, with int64 indices and the arange torch fills them from
        # (engine._magnitude_order).
        merge_work=(2 * len(per_model) + 4) * largest * merge_size
        + (16 + merge_size) * largest * ranked,
    )


def arrangements(device: str) -> list[tuple[str, str]]:
    """Every (tier, rank cache) that differs on `device`, fastest first (on a CPU, host
    memory is the device's: no host tier, no host rank cache)."""
    if torch.device(device).type == "cpu":
        return [(t, c) for t in ("resident", "mmap") for c in ("device", "off")]
    return [(t, c) for t in TIERS for c in RANK_CACHES]


def plan_memory(
    needs: MemoryNeeds,
    device: str,
    tier: str = "auto",
    rank_cache: str = "auto",
    free: tuple[int, int] | None = None,
    engines: int = 1,
    limit: int | None = None,
) -> MemoryPlan:
    """The fastest arrangement that fits, among those `tier` and `rank_cache` allow.

    `auto` tries, in order: everything on the device; the rank cache off (on a GPU
    mergekit's sort per trial is cheap; on a CPU it costs seconds per ties trial,
    scripts/results/bench_trial.md); the models in host memory (GPU only); memory-mapped
    models. A rank cache in host memory is used only when asked for. `free`: the bytes free
    on the device and in host memory (default: measured now), each at most `limit`
    (--memory-limit); `engines`: how many processes on this machine hold an engine each
    (local Dask workers on a CPU).

    Raises:
        MemoryPlanError: when nothing fits, or what was asked for does not, saying which
            option makes it fit.
    """
    device_free, host_free = free or free_memory(device)
    if limit is not None:
        device_free, host_free = min(device_free, limit), min(host_free, limit)
    if engines > 1:
        needs = MemoryNeeds(**{f.name: getattr(needs, f.name) * engines for f in fields(needs)})
    if torch.device(device).type == "cpu":  # host memory is the device's
        tier = "resident" if tier == "host" else tier
        rank_cache = "device" if rank_cache == "host" else rank_cache
    every = [MemoryPlan(device, t, c, needs, device_free, host_free)
             for t, c in arrangements(device)]  # fmt: skip
    allowed = [p for p in every if tier in ("auto", p.tier)
               and (p.rank_cache == rank_cache if rank_cache != "auto"
                    else p.rank_cache != "host")]  # fmt: skip
    chosen = next((p for p in allowed if p.fits()), None)
    if chosen is not None:
        return chosen
    head = f"the search does not fit: {allowed[0].describe()}"
    fitting = next((p for p in every if p.fits()), None)
    if fitting is not None:
        raise MemoryPlanError(f"{head}\n--tier {fitting.tier} --rank-cache {fitting.rank_cache} "
                              "fits")  # fmt: skip
    smallest = min(every, key=lambda p: p.device_bytes())
    raise MemoryPlanError(
        f"{head}\neven --tier {smallest.tier} --rank-cache {smallest.rank_cache} needs "
        f"{_gb(smallest.device_bytes())}: score in bfloat16 (--eval-dtype bfloat16), merge in "
        "bfloat16 (--dtype bfloat16), use a device with more memory (--device), or free memory"
    )


# --- the tiers' stores: a model's merge tensors, as the kernels get them ----------------------
# The resident tier is a plain dict of tensors on the device.


class HostTensors(Mapping):
    """The host tier: a model's merge tensors in host memory (pinned, so the copy is a DMA),
    each copied to the device when a kernel asks for it."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: str):
        self._tensors = {n: t.pin_memory() for n, t in tensors.items()}
        self._device = device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name].to(self._device, non_blocking=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class MappedModel(Mapping):
    """The mmap tier: a model's weight files kept open, memory-mapped, each merge tensor read
    from them when a kernel asks for it.

    Raises:
        ModelReferenceError: naming a file that cannot be read or a tensor it lacks.
    """

    def __init__(self, folder: Path, keys: Mapping[str, str], dtype: torch.dtype, device: str):
        self._stack = ExitStack()
        self._shards: dict[str, object] = {}
        self._keys, self._dtype, self._device = dict(keys), dtype, device
        try:
            for file in weight_files(folder):
                try:
                    shard = self._stack.enter_context(open_weights(file))
                except Exception as error:
                    raise ModelReferenceError(f"cannot read weights {file}: {error}") from error
                self._shards.update(dict.fromkeys(shard.names(), shard))
            missing = [key for key in self._keys.values() if key not in self._shards]
            if missing:
                raise ModelReferenceError(f"{folder} lacks tensors {missing[:3]}")
        except BaseException:
            self._stack.close()
            raise

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._keys[name]
        # LoadTensor's cast (`x.to(dtype)`). On the CPU, in the file's own dtype, this is a view
        # of the mapped file: it occupies page cache, not the process's memory.
        return self._shards[key].tensor(key).to(dtype=self._dtype, device=self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Close the weight files (the engine keeps them open for its whole life)."""
        self._stack.close()


# --- measuring what a process holds ------------------------------------------------------------


def anonymous_bytes() -> int | None:
    """This process's anonymous resident memory (Linux's RssAnon: heap and tensors, not the
    page cache of mapped files), or None where /proc does not tell."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("RssAnon:")), None)
    return int(line.split()[1]) * 1024 if line else None


class PeakAnonymous:
    """The peak of `anonymous_bytes()` while the block runs, sampled every `interval` seconds
    by a thread (torch's kernels release the GIL, so it samples during them too).
    psutil's memory_full_info has no anonymous share and its peak (VmHWM) counts page cache."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0, 0

    def __enter__(self) -> PeakAnonymous:
        import threading

        self.start = self.peak = anonymous_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, anonymous_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes() or 0)
