"""Stage 4: resident sources, mergekit's kernels called per tensor, one live model.

The base and sources are read once, cast to the merge dtype exactly as mergekit's LoadTensor
does, and stay on the device for the whole search (or, where the memory plan says they do not
fit, in host memory or memory-mapped: memory.py). A trial calls each block's mergekit merge
method directly (its public `method([TensorGroup], parameters=...)` API) on those tensors and
copies every result straight into one live transformers model: no planning graph, no disk, no
reload. What never changes between trials is computed once:

- the magnitude order TIES needs (an argsort of every task vector, the dominant cost of stock
  mergekit's ties) is kept as a rank per element, so a trial's mask is `rank < k`, which
  selects exactly the elements `argsort(...)[:k]` selects (`--rank-cache`, 4 bytes per
  parameter per source). Without the cache each trial sorts, in the merge dtype rather than
  mergekit's float32 copy where that gives the same order (`_magnitude_order`);
- the order in which stock mergekit executes tensors, which randomised methods (DARE, DELLA)
  need to draw the same masks for the same `--random-seed`.

Every output equals what stock `mergekit-yaml` / `mergekit-multi` writes for the recipe of the
same plan (tests compare them tensor by tensor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from mergekit.architecture import get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MergeMethod, TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.generalized_task_arithmetic import (
    GeneralizedTaskArithmeticMerge,
    get_mask,
)
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.sparsify import RescaleNorm, SparsificationMethod, rescaled_masked_tensor
from transformers import PreTrainedModel

from .errors import AdapterError, ModelReferenceError, SettingsError
from .kinds import RAW_MODULE, kind_of
from .memory import HostTensors, MappedModel
from .methods import SOURCE_AS_BASE, is_random, method_accepts, uses_base
from .modules import merged_names
from .recipe import plan_documents, pytorch_documents
from .segment import load_config, merge_tensor_keys, vocabulary_axes
from .types import BlockChoice, MergePlan
from .vocab import permuted_inputs
from .weights import open_weights, weight_files

Tensors = dict[str, torch.Tensor]
Sink = Callable[[str, torch.Tensor], None]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def release_memory(device: str) -> None:
    """Return a failed trial's cached GPU blocks, so the next trial starts with the memory the
    resident sources leave free rather than failing too."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def check_device(device: str) -> None:
    """Raises SettingsError unless `device` is auto, cpu, or a visible CUDA device."""
    resolved = resolve_device(device)
    if resolved == "cpu":
        return
    try:
        parsed = torch.device(resolved)
    except RuntimeError as error:
        raise SettingsError(
            f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N"
        ) from error
    if parsed.type != "cuda" or not torch.cuda.is_available():
        raise SettingsError(f"--device {device!r} is not available here; use --device cpu or auto")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SettingsError(
            f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )


def eval_dtype(name: str, device: str) -> torch.dtype:
    """The live model's dtype: 'auto' is float32 on CPU, for precise losses (bfloat16 is faster
    on some CPUs, slower on others), and bfloat16 on a GPU."""
    if name == "auto":
        return torch.float32 if resolve_device(device) == "cpu" else torch.bfloat16
    return dtype_from_name(name)


def check_dtype(dtype: str) -> None:
    """Raises SettingsError unless mergekit knows the dtype name (float32, bfloat16, ...)."""
    try:
        known = dtype_from_name(dtype)
    except RuntimeError:
        known = None
    if not isinstance(known, torch.dtype) or not known.is_floating_point:
        raise SettingsError(f"unknown merge dtype {dtype!r}; use float32, bfloat16 or float16")


def load_merge_tensors(
    folder: Path, keys: dict[str, str], dtype: torch.dtype, device: str
) -> Tensors:
    """Read the tensors mergekit merges, by mergekit name, cast to the merge dtype on `device`.

    Raises:
        ModelReferenceError: naming a file that cannot be read.
    """
    where: dict[str, Path] = {}
    for file in weight_files(folder):
        try:
            with open_weights(file) as shard:
                where.update(dict.fromkeys(shard.names(), file))
        except Exception as error:
            raise ModelReferenceError(f"cannot read weights {file}: {error}") from error
    tensors: Tensors = {}
    for file in dict.fromkeys(where.values()):
        wanted = {name: key for name, key in keys.items() if where.get(key) == file}
        try:
            with open_weights(file) as shard:
                for name, key in wanted.items():
                    # The same cast as mergekit's LoadTensor (`x.to(dtype)`); copy=True so the
                    # tensor owns its memory instead of viewing the memory-mapped file, which a
                    # later rewrite of the file or page-cache eviction would reach into.
                    tensor = shard.tensor(key)
                    tensors[name] = tensor.to(dtype=dtype, device=device, copy=True)
        except Exception as error:
            raise ModelReferenceError(f"cannot read weights {file}: {error}") from error
    missing = [name for name, key in keys.items() if key not in where]
    if missing:
        raise ModelReferenceError(f"{folder} lacks tensors {missing[:3]}")
    return tensors


def load_adapter_tensors(
    model: Path,
    adapter: Path,
    keys: dict[str, str],
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
) -> Tensors:
    """A PEFT adapter applied to its model, read like a source's tensors.

    The adapter is applied exactly as stock mergekit applies `model+adapter`
    (mergekit.common.ModelReference.merged: the model class of its config loaded with no dtype
    override, peft's PeftModel.from_pretrained, merge_and_unload), but once, in memory,
    instead of into a full copy on disk; then cast to the merge dtype like LoadTensor.

    Raises:
        AdapterError: when peft cannot apply the adapter to the model.
    """
    from mergekit.common import get_auto_cls
    from peft import PeftModel

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # mergekit's call passes the deprecated torch_dtype
    try:
        config = load_config(model, trust_remote_code)
        merged = get_auto_cls(config.architectures[0]).from_pretrained(
            str(model), torch_dtype=None, low_cpu_mem_usage=True,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        merged = PeftModel.from_pretrained(merged, str(adapter), is_trainable=False)
        state = merged.merge_and_unload().state_dict()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise AdapterError(f"peft cannot apply the adapter {adapter} to {model}: {error}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [key for key in keys.values() if key not in state]
    if missing:
        raise AdapterError(f"{model} with the adapter {adapter} lacks tensors {missing[:3]}")
    return {n: state[key].to(dtype=dtype, device=device, copy=True) for n, key in keys.items()}


@functools.cache
def _sorts_alike(dtype: torch.dtype) -> bool:
    """Whether torch's CPU argsort of magnitudes in `dtype` gives the same order as of their
    float32 copy, ties included (checked once per process on a million tie-heavy values).

    It does in the builds checked (torch 2.13 CPU: bfloat16 on default, AVX2 and AVX512
    kernels, up to 20 M elements): the CPU sort of every floating dtype is one std::sort over
    a key-value comparator (ATen's SortingKernel.cpp), widening to float32 is exact and keeps
    every comparison's outcome, so the sort makes the same moves. A build that sorts float32
    another way (x86-simd-sort) would fail this check, and mergekit's float32 copy is kept."""
    sample = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(dtype).abs()
    order = torch.argsort(sample, descending=True)
    return torch.equal(order, torch.argsort(sample.float(), descending=True))


def _magnitude_order(delta: torch.Tensor) -> torch.Tensor:
    """mergekit's magnitude order of a task vector (mergekit.sparsify.magnitude:
    `argsort(|delta|, descending=True)`, of a float32 copy on a CPU), sorted leaner on a CPU:
    bfloat16 in its own dtype where `_sorts_alike` holds, and in place (the same sort, into
    the magnitudes' own tensor). Measured on a 49152 x 2048 bfloat16 embedding, the largest
    tensor and the peak of a TIES trial in the memory-mapped tier: mergekit's sort holds 2.81
    GiB beside the inputs, this one 2.25 (the int64 indices and the arange torch fills them
    from are most of both)."""
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type != "cpu":
        return torch.argsort(magnitudes, descending=True)  # what mergekit does on a GPU
    if not _sorts_alike(magnitudes.dtype):
        magnitudes = magnitudes.float()  # as mergekit.sparsify.magnitude does on CPU
    order = torch.empty(magnitudes.numel(), dtype=torch.int64)
    torch.sort(magnitudes, descending=True, out=(magnitudes, order))  # argsort's sort
    return order


def _magnitude_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each element's position in mergekit's magnitude order, as int32."""
    order = _magnitude_order(delta)
    rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return rank


@dataclass(frozen=True)
class RankedMagnitudeMerge(GeneralizedTaskArithmeticMerge):
    """mergekit's TIES with the magnitude order looked up instead of sorted again, or (no
    `rank_of`: --rank-cache off) sorted as `_magnitude_order` sorts.

    `merge_group` mirrors mergekit 0.1.5's GeneralizedTaskArithmeticMerge.merge_group line for
    line; only `magnitude()`'s `argsort(...)[:k]` becomes `rank < k`, which marks the same
    elements. tests/test_engine.py compares the result with stock mergekit.
    """

    rank_of: Callable[[str, Hashable, torch.Tensor], torch.Tensor] | None = None

    def _sparsify(self, name: str, entry_id: Hashable, delta, density: float, rescale: bool):
        if density >= 1:
            return delta
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        k = max(1, int(density * delta.numel()))
        if self.rank_of is None:  # mergekit.sparsify.magnitude's mask, sorted leaner
            mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
            mask[_magnitude_order(delta)[:k]] = 1
            mask = mask.reshape_as(delta)
        else:
            mask = (self.rank_of(name, entry_id, delta) < k).to(delta.dtype).reshape_as(delta)
        return rescaled_masked_tensor(delta, mask, RescaleNorm.l1 if rescale else None)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        deltas = base.new_empty((len(entries), *base.shape))
        for index, entry in enumerate(entries):
            delta = entry.tensor - base
            delta = self._sparsify(
                group.metadata.name,
                entry.id,
                delta,
                parameters["density"][entry.id],
                parameters["rescale"],
            )
            deltas[index] = delta
            del delta
        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in entries],
            dtype=deltas.dtype,
            device=deltas.device,
        )
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if self.consensus_method:
            mask_dtype = torch.int8 if parameters["int8_mask"] else base.dtype
            mask = get_mask(deltas, method=self.consensus_method, mask_dtype=mask_dtype)
            mixed_delta = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed_delta = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if parameters["normalize"]:
            mixed_delta /= divisor
        if parameters["lambda"] != 1:
            mixed_delta *= parameters["lambda"]
        return (base + mixed_delta).to(base.dtype)


# What mergekit-pytorch runs, in a fresh interpreter with the string hash seed a recipe of
# random methods pins (PYTHONHASHSEED=0): it plans tensors in `list(set(names))` order, which
# that seed decides, and this process's own seed is whatever it started with.
_PYTORCH_SCHEDULE = """
import json, sys
from mergekit.graph import Executor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, plan_flat_merge
config = RawPyTorchMergeConfig.model_validate(json.load(sys.stdin))
tasks = plan_flat_merge(config, "unused", False, False, MergeOptions(quiet=True))
print(json.dumps([h.task().output_weight.name for h in Executor(tasks).schedule.tasks
                  if isinstance(h.task(), ExecuteMergeMethodTask)]))
"""


def pytorch_schedule(document: dict[str, Any]) -> list[str]:
    """Tensor names in the order stock mergekit-pytorch executes a document, under
    PYTHONHASHSEED=0 (one interpreter start and mergekit import, about 3 s).

    Raises:
        RuntimeError: with mergekit's message, when it cannot plan the document.
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONHASHSEED="0", TQDM_DISABLE="1")
    result = subprocess.run([sys.executable, "-c", _PYTORCH_SCHEDULE], input=json.dumps(document),
                            capture_output=True, text=True, env=env)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"mergekit-pytorch cannot plan {document['merge_method']}: "
                           f"{result.stderr.strip().splitlines()[-1:]}")  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


class MergeEngine:
    """Resident sources on a device, per-trial merges with mergekit's kernels, a live model.

    Args:
        sources: the source model folders, in the order a plan lists them.
        base: the base model folder, or None.
        live_model: the folder whose architecture and buffers the live model takes.
        dtype: the merge dtype (a recipe's `dtype`).
        device: where tensors stay and kernels run (auto, cpu, cuda, cuda:N).
        tier: where the models' tensors stay (memory.TIERS): resident on the device, in host
            memory copied over per tensor, or memory-mapped from their weight files.
        rank_cache: where TIES's magnitude order is kept between trials (memory.RANK_CACHES;
            4 bytes per parameter per source): on the device, in host memory, or off (every
            task vector sorted again on every trial, as stock mergekit does).
        eval_dtype: dtype of the live model that is scored.
        adapters: PEFT adapter folder -> the model folder it applies to, for the sources that
            are adapters (recipes name them `model+adapter`).
    """

    def __init__(
        self,
        sources: Iterable[Path],
        base: Path | None,
        live_model: Path,
        dtype: str = "float32",
        device: str = "cpu",
        tier: str = "resident",
        rank_cache: str = "device",
        eval_dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        adapters: Mapping[Path, Path] | None = None,
    ):
        self.device = resolve_device(device)
        self.tier, self.rank_cache = tier, rank_cache
        self.trust_remote_code = trust_remote_code
        self.source_folders = [Path(s) for s in sources]
        self.base_folder = Path(base) if base else None
        self.adapters = {Path(a): Path(m) for a, m in (adapters or {}).items()}
        # How the documents the engine plans name the adapters: mergekit's model+adapter.
        self.references = {str(a): f"{m}+{a}" for a, m in self.adapters.items()}
        # A raw PyTorch model (modules.py) merges every floating tensor of its state dict
        # and is recipe'd for mergekit-pytorch; a transformers model merges what mergekit's
        # architecture definition names.
        self.kind = kind_of(live_model)
        self.raw_module = self.kind.name == RAW_MODULE
        if self.raw_module:
            self.keys, self.vocabulary = merged_names(live_model), {}
        else:
            config = load_config(live_model, trust_remote_code)
            self.keys = merge_tensor_keys(live_model, config)
            self.vocabulary = {n: a for n, a in vocabulary_axes(config).items() if n in self.keys}
        merge_dtype = dtype_from_name(dtype)
        self.resident: dict[Path, Mapping[str, torch.Tensor]] = {
            folder: self._read(folder, merge_dtype)
            for folder in dict.fromkeys(self.source_folders + [self.base_folder] * bool(base))
        }
        self.eval_dtype = eval_dtype
        self.model = self.kind.load(live_model, eval_dtype, self.device, trust_remote_code)
        if self.raw_module:  # floating buffers (BatchNorm's statistics) merge like parameters
            self._parameters = dict(self.model.state_dict(keep_vars=True))
        else:
            self._parameters = dict(self.model.named_parameters())
        unknown = set(self.keys) - set(self._parameters)
        if unknown:
            raise ModelReferenceError(
                f"mergekit merges tensors the model lacks: {sorted(unknown)[:3]}; this "
                "architecture's mergekit definition and transformers class disagree"
            )
        self._ranks: dict[tuple[str, Hashable], torch.Tensor] = {}
        self._schedules: dict[str, list[str]] = {}
        self._methods: dict[str, MergeMethod] = {}
        self._permuted: dict[tuple[str, str], dict[str, dict[Path, torch.Tensor]]] = {}

    def _read(self, folder: Path, dtype: torch.dtype) -> Mapping[str, torch.Tensor]:
        """A model's merge tensors in this engine's tier (a PEFT source, applied in memory,
        has no file to map: it stays in host memory under the mmap tier)."""
        if self.tier == "mmap" and folder not in self.adapters:
            return MappedModel(folder, self.keys, dtype, self.device)
        on_gpu = torch.device(self.device).type == "cuda"
        where = "cpu" if self.tier != "resident" and on_gpu else self.device
        if folder in self.adapters:
            tensors = load_adapter_tensors(self.adapters[folder], folder, self.keys, dtype,
                                           where, self.trust_remote_code)  # fmt: skip
        else:
            tensors = load_merge_tensors(folder, self.keys, dtype, where)
        return HostTensors(tensors, self.device) if where != self.device else tensors

    def non_finite_tensors(self) -> list[tuple[Path, str, int]]:
        """(folder, tensor, count) of every resident tensor holding NaN/inf values, as cast
        to the merge dtype: one pass over the sources and the base."""
        found = []
        for folder, tensors in self.resident.items():
            for name, tensor in tensors.items():
                if not bool(torch.isfinite(tensor).all()):
                    found.append((folder, name, int((~torch.isfinite(tensor)).sum())))
        return found

    # --- what never changes between trials ---

    def _rank(self, name: str, entry_id: Hashable, delta: torch.Tensor) -> torch.Tensor:
        key = (name, entry_id)
        if key not in self._ranks:
            rank = _magnitude_rank(delta)
            if self.rank_cache == "host" and rank.device.type == "cuda":
                rank = rank.cpu().pin_memory()
            self._ranks[key] = rank
        return self._ranks[key].to(delta.device, non_blocking=True)

    def _method(self, name: str) -> MergeMethod:
        if name not in self._methods:
            method = registry.get(name)
            sparsification = getattr(method, "sparsification_method", None)
            if sparsification == SparsificationMethod.magnitude:
                values = {f.name: getattr(method, f.name) for f in fields(method)}
                rank_of = self._rank if self.rank_cache != "off" else None
                method = RankedMagnitudeMerge(**values, rank_of=rank_of)
            self._methods[name] = method
        return self._methods[name]

    def _document(self, plan: MergePlan, method: str) -> dict[str, Any]:
        """The recipe document of `method` for a plan whose every block uses it."""
        choice = next(c for c in plan.choices if c.method == method)
        uniform = plan.model_copy(update={"choices": (choice,) * len(plan.blocks)})
        if self.raw_module:
            return pytorch_documents(uniform, Path("intermediate"))[0][1]
        return plan_documents(uniform, self.references)[0]

    def _vocabulary_inputs(self, plan: MergePlan, method: str) -> dict[str, dict[Path, Any]]:
        """Every model's embedding and head, permuted into the plan's merged vocabulary as
        stock mergekit permutes them for `method`'s document (computed once per method)."""
        key = (method, plan.tokenizer)
        if key not in self._permuted:
            self._permuted[key] = permuted_inputs(
                self._document(plan, method), self.resident, self.vocabulary,
                self.trust_remote_code,
            )  # fmt: skip
        return self._permuted[key]

    def _stock_schedule(self, plan: MergePlan, method: str) -> list[str]:
        """Tensor names in the order stock mergekit executes a document of `method`."""
        if method not in self._schedules and self.raw_module:
            self._schedules[method] = pytorch_schedule(self._document(plan, method))
        if method not in self._schedules:
            config = MergeConfiguration.model_validate(self._document(plan, method))
            for model in config.referenced_models():
                if model.lora:  # planning reads tensor names only, which an adapter keeps
                    LoaderCache().loaders.setdefault(
                        model, LoaderCache().get(model.model_copy(update={"lora": None}))
                    )
            options = MergeOptions(device=self.device, quiet=True)
            arch_info = get_architecture_info(config, options)
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # mergekit sets the deprecated torch_dtype
            try:
                out_config = _model_out_config(config, arch_info, self.trust_remote_code)
            finally:
                transformers.logging.set_verbosity(verbosity)
            planner = MergePlanner(config, arch_info, options, out_model_config=out_config)
            planner._plan()
            executor = Executor([t for _, t in planner._tensors])
            self._schedules[method] = [
                handle.task().output_weight.name
                for handle in executor.schedule.tasks
                if isinstance(handle.task(), ExecuteMergeMethodTask)
            ]
        return self._schedules[method]

    # --- one trial ---

    def _merge_tensor(self, plan: MergePlan, name: str, choice: BlockChoice) -> torch.Tensor:
        method = self._method(choice.method)
        # The same inputs as stock mergekit's recipe: slerp's first source is its base.
        source_base = choice.method in SOURCE_AS_BASE
        inputs = {folder: tensors[name] for folder, tensors in self.resident.items()}
        if plan.tokenizer and name in self.vocabulary:
            inputs = self._vocabulary_inputs(plan, choice.method)[name]
        entries = [
            TensorEntry(id=index, tensor=inputs[Path(source)], is_base=source_base and not index)
            for index, source in enumerate(plan.sources)
        ]
        if uses_base(choice.method, plan.base is not None):
            entries.append(TensorEntry(id="base", tensor=inputs[Path(plan.base)], is_base=True))
        parameters: dict[str, Any] = {
            k: v for k, v in plan.method_parameters.items() if method_accepts(choice.method, k)
        }
        if method_accepts(choice.method, "weight"):
            parameters["weight"] = dict(enumerate(choice.weights))
        if method_accepts(choice.method, "t"):
            parameters["t"] = choice.weights[1]
        if choice.densities is not None:
            parameters["density"] = dict(enumerate(choice.densities))
        group = TensorGroup(entries=tuple(entries), metadata=TensorMetadata(name=name))
        (merged,) = method((group,), parameters=parameters)
        return merged

    def merge(self, plan: MergePlan, sink: Sink | None = None) -> Tensors:
        """Merge a plan; each tensor goes to `sink` (default: kept and returned).

        Randomised methods reproduce stock mergekit's draws: the global RNG is seeded per
        method document as `run_merge` does, and every tensor of that document is computed in
        stock order, selected or not.
        """
        kept: Tensors = {}
        sink = sink or kept.__setitem__
        selecting = len(plan.methods) > 1
        for method in plan.methods:
            chosen = {
                name: choice
                for block, choice in zip(plan.blocks, plan.choices)
                if choice.method == method
                for name in block.tensors
            }
            if is_random(method):
                if plan.seed is not None:  # run_merge seeds only when given --random-seed
                    transformers.trainer_utils.set_seed(plan.seed)
                # Unselected tensors take the document's fallback (its first block's values).
                fallback = next(iter(chosen.values()))
                order = [(n, chosen.get(n, fallback)) for n in self._stock_schedule(plan, method)]
            else:
                order = list(chosen.items())
            for name, choice in order:
                merged = self._merge_tensor(plan, name, choice)
                if name in chosen:
                    # The final 0/1 linear merge of a multi-method recipe adds +0.0 in float32,
                    # which turns -0.0 into +0.0; do the same so the values match bit for bit.
                    sink(name, merged + 0.0 if selecting else merged)
        return kept

    def load(self, tensors: Tensors) -> PreTrainedModel:
        """Copy tensors (by mergekit name) into the live model in place and return it."""
        with torch.no_grad():
            for name, tensor in tensors.items():
                self._copy(name, tensor)
        return self.model

    def _copy(self, name: str, tensor: torch.Tensor) -> None:
        """One tensor into the live model; a merged vocabulary of another size (a
        --tokenizer-source) resizes the live model's embedding and head first."""
        if self._parameters[name].shape != tensor.shape and name in self.vocabulary:
            rows = tensor.shape[self.vocabulary[name]]
            self.model.resize_token_embeddings(rows, mean_resizing=False)
            self._parameters = dict(self.model.named_parameters())
        self._parameters[name].copy_(tensor)

    def merge_into_model(self, plan: MergePlan) -> PreTrainedModel:
        """Merge a plan straight into the live model, one tensor at a time."""
        with torch.no_grad():
            self.merge(plan, sink=self._copy)
        return self.model

    def load_source(self, folder: Path) -> PreTrainedModel:
        """A resident source (as cast to the merge dtype) as a model: the live model, or,
        when its vocabulary has another size than the live model's, a model of its own."""
        tensors = self.resident[Path(folder)]
        if all(self._parameters[n].shape == t.shape for n, t in tensors.items()):
            return self.load(tensors)
        own = self.kind.load(self.adapters.get(Path(folder), Path(folder)), self.eval_dtype,
                             self.device, self.trust_remote_code)  # fmt: skip
        parameters = dict(own.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)
        return own.eval()
