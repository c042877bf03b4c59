"""Raw PyTorch models: a folder with a state dict and the module class that holds it.

Beside causal LMs (a transformers folder: config.json + weights), a model can be any
`torch.nn.Module` (a CCT image classifier, a convolutional net): a folder with

- `model.safetensors`: the module's state dict (`safetensors.torch.save_file`), the file
  `mergekit-pytorch` merges as it is;
- `module.json`: how to build the module, `{"module": "NAME:Class", "kwargs": {...},
  "input_shape": [C, H, W], "input_dtype": "float32"}`. `NAME` is a Python file `NAME.py` in
  the folder (code that comes with the model, run only with --trust-remote-code, as
  transformers runs a repository's modelling code) or an importable module (`pkg.models`);
  `kwargs` are the constructor's; `input_shape` is one example's shape (no batch axis),
  which the trace of segment.py feeds zeros of on the meta device. An importable module is
  imported without --trust-remote-code, like any package the user installed and names.

transformers' `PreTrainedModel` needs a config class and a registered architecture per model
and mergekit's architecture files describe transformers models only; timm and torchvision
know their own zoos. None of them builds an arbitrary class from a name and keyword
arguments, so this module does, in a few lines.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import ModelReferenceError

if TYPE_CHECKING:  # torch is imported where a module is built: `search`'s cheap checks run first
    import torch

MODULE_SPEC = "module.json"
STATE_DICT = "model.safetensors"


class ModuleSpec(BaseModel):
    """What module.json says (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str
    kwargs: dict[str, Any] = {}
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"

    @field_validator("module")
    @classmethod
    def _module(cls, value: str) -> str:
        if not _MODULE.match(value):
            raise ValueError(f"module must be NAME:Class (NAME a dotted module name): {value!r}")
        return value

    @field_validator("input_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        import torch

        if not isinstance(getattr(torch, value, None), torch.dtype):
            raise ValueError(f"input_dtype must be a torch dtype such as float32, not {value!r}")
        return value


# A dotted module name and a class: no path separators, so a folder's NAME.py stays in it.
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_module_folder(folder: Path) -> bool:
    """Whether `folder` holds a raw PyTorch model (module.json) rather than a transformers one."""
    return (Path(folder) / MODULE_SPEC).is_file() and not (Path(folder) / "config.json").is_file()


def read_spec(folder: Path) -> ModuleSpec:
    """The folder's module.json.

    Raises:
        ModelReferenceError: when it is unreadable or not a module spec, or the state dict
            file is missing.
    """
    file = Path(folder) / MODULE_SPEC
    try:
        spec = ModuleSpec.model_validate(json.loads(file.read_text()))
    except (OSError, ValueError, ValidationError) as error:
        raise ModelReferenceError(
            f'cannot read {file} ({error}); it needs {{"module": "NAME:Class", "kwargs": '
            '{...}, "input_shape": [C, H, W]}'
        ) from None
    if not (Path(folder) / STATE_DICT).is_file():
        raise ModelReferenceError(f"{folder} has {MODULE_SPEC} but no {STATE_DICT} state dict")
    return spec


def module_class(folder: Path, spec: ModuleSpec, trust_remote_code: bool = False) -> type:
    """The class module.json names: from `NAME.py` in the folder, or an importable module.

    Raises:
        ModelReferenceError: when the code is the folder's own and trust_remote_code is off,
            the module cannot be imported, or the name is not a torch.nn.Module class.
    """
    name, _, attribute = spec.module.partition(":")
    local = Path(folder) / f"{name}.py"
    if local.is_file():
        if not trust_remote_code:
            raise ModelReferenceError(
                f"{folder} brings its own code ({local.name}); run it with --trust-remote-code "
                "if you trust it"
            )
        # One module per file content: two folders with different NAME.py never share one.
        digest = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
        key = f"automerge_mk_module_{name}_{digest}"
        if key not in sys.modules:
            loader = importlib.util.spec_from_file_location(key, local)
            loaded = importlib.util.module_from_spec(loader)
            sys.modules[key] = loaded
            try:
                loader.loader.exec_module(loaded)
            except Exception as error:
                del sys.modules[key]
                raise ModelReferenceError(f"cannot run {local}: {error!r}") from None
        code = sys.modules[key]
    else:  # an installed module: code the user has already chosen to install
        try:
            code = importlib.import_module(name)
        except Exception as error:  # ImportError, or whatever the module raises on import
            raise ModelReferenceError(
                f"{folder / MODULE_SPEC} names module {name!r}, which is neither {local.name} "
                f"in the folder nor importable ({error!r})"
            ) from None
    import torch

    found = getattr(code, attribute, None)
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ModelReferenceError(f"{spec.module} is not a torch.nn.Module class")
    return found


def build_module(
    folder: Path, trust_remote_code: bool = False, device: str | torch.device = "meta"
) -> tuple[torch.nn.Module, ModuleSpec]:
    """The folder's module, built (not loaded) on `device`, and its spec.

    Raises:
        ModelReferenceError: as read_spec and module_class, or when the constructor refuses
            the kwargs.
    """
    import torch

    spec = read_spec(folder)
    cls = module_class(folder, spec, trust_remote_code)
    try:
        with torch.device(device):
            return cls(**spec.kwargs), spec
    except Exception as error:  # the user's constructor: anything it raises
        raise ModelReferenceError(
            f"{spec.module}(**kwargs of {folder / MODULE_SPEC}) failed: {error!r}"
        ) from None


def example_input(spec: ModuleSpec, device: str | torch.device = "meta") -> torch.Tensor:
    """A batch of two zero examples of the spec's input shape (two: a batch axis that a
    squeeze cannot remove)."""
    import torch

    return torch.zeros((2, *spec.input_shape), dtype=getattr(torch, spec.input_dtype),
                       device=device)  # fmt: skip


def stored_dtype(folder: Path) -> str:
    """The dtype of the folder's first floating tensor, as a mergekit dtype name (float32 ...),
    read from the safetensors header."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / STATE_DICT), framework="pt") as weights:
        for name in weights.keys():
            dtype = weights.get_slice(name).get_dtype()  # "F32", "BF16", "I64" ...
            if dtype.startswith(("F", "BF")):
                return {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                        "F64": "float64"}.get(dtype, "float32")  # fmt: skip
    return "float32"


def merged_names(folder: Path) -> dict[str, str]:
    """Name -> key of every floating tensor of the state dict, in file order: what a merge
    merges (a non-floating buffer such as BatchNorm's `num_batches_tracked` is copied from the
    live model's own folder; mergekit-pytorch refuses to merge one that differs)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / STATE_DICT), framework="pt") as weights:
        return {
            name: name
            for name in weights.keys()
            if weights.get_slice(name).get_dtype().startswith(("F", "BF"))
        }


def live_module(
    folder: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The folder's module with its state dict loaded, in `dtype` on `device`, in eval mode.

    Raises:
        ModelReferenceError: as build_module, or when the state dict does not fit the module.
    """
    from safetensors.torch import load_file

    module, spec = build_module(folder, trust_remote_code, device="cpu")
    try:
        module.load_state_dict(load_file(str(Path(folder) / STATE_DICT)))
    except RuntimeError as error:
        raise ModelReferenceError(
            f"the state dict of {folder} does not fit {spec.module}: {error}"
        ) from None
    return module.to(device=device, dtype=dtype).eval()


def forward_facts(folder: Path, trust_remote_code: bool = False) -> tuple[int, int]:
    """From one forward pass on the meta device: how many logits the module gives per example
    (its output's last axis), and the elements per example a forward holds at its peak,
    estimated as the two largest outputs of its submodules (an input and an output alive at
    once; a rough figure: what a module computes inside its forward, such as attention
    scores, is not an output and is not seen).

    Raises:
        ModelReferenceError: as build_module, or when the output is not a (batch, classes)
            tensor.
    """
    import torch

    module, spec = build_module(folder, trust_remote_code)
    sizes: list[int] = []

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() // output.shape[0] if output.dim() else 1)

    hooks = [m.register_forward_hook(record) for m in module.modules()]
    try:
        output = module(example_input(spec))
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelReferenceError(
            f"{spec.module} returns {shape}; a classifier's forward returns logits (batch, classes)"
        )
    return int(output.shape[-1]), sum(sorted(sizes, reverse=True)[:2])
