"""Stage 4: merge in memory with mergekit's own planner and kernels, into one live model.

The sources are read once and kept resident; mergekit's `LoaderCache` is given loaders that
serve those tensors, so each trial runs exactly the graph that `mergekit-yaml` /
`mergekit-multi` would run on the same recipe (same planner, same kernels, same dtype casts,
same seeding), minus the disk. Named intermediate documents are served to the final selecting
document the same way, from memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.io.tasks import LoaderCache
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.scripts.multimerge import load_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from .errors import ModelReferenceError, SettingsError

Tensors = dict[str, torch.Tensor]


class ResidentLoader:
    """Serves in-memory tensors through the interface of mergekit's LazyTensorLoader.

    Checked in mergekit 0.1.5: LoadTensor and the planner use only `index.tensor_paths`,
    `get_tensor` and `flush`.
    """

    def __init__(self, tensors: Tensors, folder: Path):
        self.tensors = tensors
        self.index = ShardedTensorIndex(
            base_path=str(folder),
            is_safetensors=True,
            tensor_paths={name: "resident" for name in tensors},
            shards=[],
        )

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: list[str] | None = None,
        raise_on_missing: bool = True,
    ) -> torch.Tensor | None:
        for name in [key, *(aliases or [])]:
            if name in self.tensors:
                return self.tensors[name].to(device)
        if raise_on_missing:
            raise KeyError(key)
        return None

    def flush(self) -> None:
        pass


def load_folder_tensors(folder: Path, device: str) -> Tensors:
    """Read every safetensors shard of a model folder onto `device`.

    Raises:
        ModelReferenceError: naming a shard that cannot be read.
    """
    tensors: Tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(shard), device=device))
        except Exception as error:
            raise ModelReferenceError(f"cannot read weights {shard}: {error}") from error
    return tensors


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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


def check_dtype(dtype: str) -> None:
    """Raises SettingsError unless mergekit knows the dtype name (float32, bfloat16, ...)."""
    try:
        known = dtype_from_name(dtype)
    except RuntimeError:
        known = None
    if not isinstance(known, torch.dtype) or not known.is_floating_point:
        raise SettingsError(f"unknown merge dtype {dtype!r}; use float32, bfloat16 or float16")


class MergeEngine:
    """Resident sources, an in-memory mergekit executor and a live model to evaluate.

    Args:
        folders: every model a recipe may reference (sources and base), as local folders.
        live_model: the folder whose architecture and non-merged buffers the live model takes.
        scratch: a folder for the config.json files that name in-memory intermediates.
        device: where sources stay and kernels run.
        eval_dtype: dtype of the live model (float32 on CPU, where bf16 matmuls are slower).
    """

    def __init__(
        self,
        folders: Iterable[Path],
        live_model: Path,
        scratch: Path,
        device: str = "cpu",
        eval_dtype: torch.dtype = torch.float32,
    ):
        self.device = resolve_device(device)
        self.scratch = scratch
        self.config_source = live_model
        self.options = MergeOptions(device=self.device, quiet=True)
        self.sources: dict[Path, Tensors] = {}
        for folder in dict.fromkeys(Path(f) for f in folders):
            self.sources[folder] = load_folder_tensors(folder, self.device)
            self._register(str(folder), self.sources[folder], folder)
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            str(live_model), dtype=eval_dtype
        ).to(self.device)
        self.model.eval()
        self._parameters = dict(self.model.named_parameters())

    def _register(self, reference: str, tensors: Tensors, folder: Path) -> None:
        LoaderCache().loaders[ModelReference.parse(reference)] = ResidentLoader(tensors, folder)

    def _run_document(self, config: MergeConfiguration, seed: int | None) -> Tensors:
        if seed is not None:
            transformers.trainer_utils.set_seed(seed)  # as mergekit's run_merge does per document
        arch_info = get_architecture_info(config, self.options)
        out_config = _model_out_config(config, arch_info, trust_remote_code=False)
        planner = MergePlanner(config, arch_info, self.options, out_model_config=out_config)
        planner._plan()  # plan_in_memory() raises TypeError in mergekit 0.1.5
        # ReturnTensor cannot be constructed in mergekit 0.1.5 (the reason plan_in_memory
        # raises), so the merge tasks are the targets and the output cast is SaveTensor's.
        weights = {task: weight for weight, task in planner._tensors}
        executor = Executor(list(weights), math_device=self.device, storage_device=self.device)
        merged: Tensors = {}
        for task, value in executor.run(quiet=True):
            weight = weights[task]
            dtype = dtype_from_name(weight.force_dtype or config.out_dtype)
            merged[weight.name] = value.to(dtype) if dtype else value
        return merged

    def merge(self, recipe_yaml: str, seed: int | None = None) -> Tensors:
        """Run a recipe (one document or a mergekit-multi set) in memory.

        Returns:
            The final document's tensors, by mergekit tensor name.
        """
        configs, dependencies = load_config(recipe_yaml, str(self.scratch))
        done: dict[str | None, Tensors] = {}
        while len(done) < len(configs):
            for name, config in configs.items():
                if name in done or not dependencies[name] <= set(done):
                    continue
                done[name] = self._run_document(config, seed)
                if name is not None:
                    folder = self.scratch / name
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(self.config_source / "config.json", folder / "config.json")
                    self._register(str(folder), done[name], folder)
        return done[None] if None in done else done[next(iter(done))]

    def load(self, tensors: Tensors) -> PreTrainedModel:
        """Write merged tensors into the live model in place and return it."""
        unknown = set(tensors) - set(self._parameters)
        if unknown:
            raise ModelReferenceError(
                f"mergekit produced tensors the model lacks: {sorted(unknown)[:3]}; this "
                "architecture's mergekit definition and transformers class disagree"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                self._parameters[name].copy_(tensor)
        return self.model
