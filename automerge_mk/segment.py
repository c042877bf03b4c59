"""Stage 1: split a model's tensors into blocks that get their own merge configuration.

The base segmentation traces one forward pass on the meta device (no weights are loaded) with
hooks on the top-level sub-modules and starts a new block wherever the output's shape
signature changes (its rank and the sizes past the batch and sequence or channel axes): in a
conv + transformer model such as CCT, the convolutional tokenizer's 4-D activations end where
the transformer's 3-D ones begin. Finer strategies split further: `layers:K` cuts the layer
stack into K contiguous groups, `components` separates attention tensors from the rest; they
combine as `layers:4+components`. Tensor names are mergekit's own (its architecture
definitions decide what a merge touches; of a raw PyTorch model, every tensor of its state
dict, as `mergekit-pytorch` merges them), so every block is exactly a set of tensors mergekit
will merge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mergekit.architecture import ConfiguredModelArchitecture, arch_info_for_config
from transformers import AutoConfig, PretrainedConfig

from .errors import ArchitectureMismatchError, ModelReferenceError, SettingsError
from .kinds import kind_of
from .modules import build_module, example_input, is_module_folder, read_spec
from .types import STRATEGY_HELP, Block, Component
from .weights import open_weights, weight_files

# Checked against llama/mistral/qwen2 (self_attn.), gpt2 (attn.), bert (attention.), falcon
# (self_attention.) module names; norms named after attention (post_attention_layernorm) are not
# attention tensors.
_ATTENTION = re.compile(r"(^|\.)(?!\w*norm)\w*(attn|attention)\w*\.")


def parse_strategy(strategy: str) -> tuple[int | None, bool, bool]:
    """Parse a strategy string into (layer groups or None, split components, whole model).

    Raises:
        SettingsError: on an unknown term or a non-positive K.
    """
    groups: int | None = None
    components = whole = False
    for term in filter(None, (t.strip() for t in strategy.split("+"))):
        if term == "trace":
            continue
        if term == "whole":
            whole = True
        elif term == "components":
            components = True
        elif term.startswith("layers:") and term[7:].isdigit() and int(term[7:]) > 0:
            groups = int(term[7:])
        else:
            raise SettingsError(f"unknown segmentation strategy {term!r}; use {STRATEGY_HELP}")
    if whole and groups:
        raise SettingsError(f"strategy {strategy!r}: 'whole' is one block; drop 'layers:K'")
    return groups, components, whole


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Read tensor names and shapes from a folder's safetensors headers, loading no data.

    Raises:
        ModelReferenceError: when the folder holds no readable safetensors weights.
    """
    files = weight_files(folder)
    if not files:
        raise ModelReferenceError(
            f"{folder} holds no *.safetensors weights; convert pickled weights with "
            "`model.save_pretrained(folder, safe_serialization=True)`"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with open_weights(file) as shard:
                for name in shard.names():
                    shapes[name] = shard.shape(name)
        except Exception as error:  # safetensors and torch raise several types for a bad file
            raise ModelReferenceError(f"cannot read {file}: {error}") from error
    return shapes


def load_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """Load a model's config.json.

    Raises:
        ModelReferenceError: when config.json is missing or unreadable.
    """
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelReferenceError(f"cannot read the config of {folder}: {error}") from error


def merge_tensor_keys(folder: Path, config: PretrainedConfig) -> dict[str, str]:
    """mergekit's name -> checkpoint key of every tensor mergekit merges, in mergekit's order.

    Absent optional tensors (a tied lm_head) are skipped, as mergekit skips them.

    Raises:
        ModelReferenceError: when mergekit does not know the architecture or a tensor is missing.
    """
    arch = arch_info_for_config(config)
    if arch is None:
        raise ModelReferenceError(
            f"mergekit has no definition for architecture {config.architectures} of {folder}"
        )
    present = set(tensor_shapes(folder))
    keys = {}
    for weight in ConfiguredModelArchitecture(info=arch, config=config).all_weights():
        key = next((k for k in (weight.name, *(weight.aliases or ())) if k in present), None)
        if key is not None:
            keys[weight.name] = key
        elif not weight.optional:
            raise ModelReferenceError(f"{folder} lacks tensor {weight.name}")
    return keys


def vocabulary_axes(config: PretrainedConfig) -> dict[str, int]:
    """mergekit's name -> vocabulary axis of every tensor indexed by token id (embeddings,
    head), from mergekit's architecture definition."""
    arch = arch_info_for_config(config)
    weights = ConfiguredModelArchitecture(info=arch, config=config).all_weights() if arch else []
    return {w.name: w.vocabulary_axis for w in weights if w.vocabulary_axis is not None}


def merge_tensor_names(folder: Path, config: PretrainedConfig) -> list[str]:
    """Tensor names mergekit merges for this model, in its order."""
    return list(merge_tensor_keys(folder, config))


def check_compatible(folders: list[Path], vocabularies_differ: bool = False) -> None:
    """Check that all models share architecture, tensor names and shapes; with
    `vocabularies_differ` (a --tokenizer-source aligns them), the embedding and head tensors
    may differ in their number of tokens.

    Raises:
        ArchitectureMismatchError: naming the first model and tensor that differ.
    """
    first = folders[0]

    def architecture(folder: Path):  # a raw PyTorch model's is its class and kwargs
        if is_module_folder(folder):
            spec = read_spec(folder)
            return f"{spec.module}(**{spec.kwargs})"
        return load_config(folder).architectures

    first_arch = architecture(first)
    first_shapes = tensor_shapes(first)
    axes = {}
    if vocabularies_differ and not is_module_folder(first):
        first_config = load_config(first)
        keys = merge_tensor_keys(first, first_config)
        axes = {keys[n]: axis for n, axis in vocabulary_axes(first_config).items() if n in keys}

    def shape(shapes: dict, name: str):
        found = shapes.get(name)
        if found is None or name not in axes:
            return found
        return found[: axes[name]] + found[axes[name] + 1 :]  # without the token axis

    for other in folders[1:]:
        arch = architecture(other)
        if arch != first_arch:
            raise ArchitectureMismatchError(
                f"{other} is {arch} but {first} is {first_arch}: merge models of one architecture"
            )
        shapes = tensor_shapes(other)
        for name in sorted(set(first_shapes) | set(shapes)):
            if shape(first_shapes, name) != shape(shapes, name):
                raise ArchitectureMismatchError(
                    f"tensor {name} is {first_shapes.get(name, 'missing')} in {first} but "
                    f"{shapes.get(name, 'missing')} in {other}: the models do not share a base"
                )


@dataclass
class _Unit:
    """A top-level sub-module: an embedding, one layer, a final norm, a head."""

    path: str
    layer: int | None
    stack: str | None = None  # a raw PyTorch model's layer stack (ModuleList) it belongs to
    signature: tuple | None = None
    order: int = 1 << 30
    tensors: list[str] = field(default_factory=list)


def _top_level_units(
    module: torch.nn.Module, prefix: str = ""
) -> Iterator[tuple[str, object, int | None]]:
    # Descend through wrappers (LlamaForCausalLM.model, GPT2LMHeadModel.transformer) until the
    # layer stack (a ModuleList) and its siblings are reached; a stack's element has its index.
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, torch.nn.ModuleList):
            for index, element in child.named_children():
                yield f"{path}.{index}", element, int(index)
        elif any(isinstance(m, torch.nn.ModuleList) for m in child.modules()):
            yield from _top_level_units(child, f"{path}.")
        elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            yield path, child, None


def _signature(output: object) -> tuple | None:
    if isinstance(output, dict):
        output = next(iter(output.values()), None)
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, torch.Tensor)), None)
    if not isinstance(output, torch.Tensor):
        return None
    # Batch and sequence axes vary with the input; the rest is the block's "type".
    return (output.dim(), tuple(output.shape[2:] if output.dim() >= 3 else output.shape[1:]))


def _traced(model: torch.nn.Module, run, stack_layers: bool = False) -> list[_Unit]:
    """The model's top-level units in the order a forward pass (`run(model)`, on the meta
    device) reaches them, each with its output's shape signature; with `stack_layers` (raw
    PyTorch models, which mergekit does not describe), a layer stack's elements are numbered
    by their index and a forward that fails is an error rather than module order.

    Raises:
        ModelReferenceError: with `stack_layers`, when the forward pass fails.
    """
    units: list[_Unit] = []
    hooks = []
    calls = iter(range(1 << 30))

    def record(unit: _Unit):
        def hook(_module, _inputs, output):
            if unit.signature is None:
                unit.signature, unit.order = _signature(output), next(calls)

        return hook

    for path, module, index in _top_level_units(model):
        stack = path.rsplit(".", 1)[0] if stack_layers and index is not None else None
        unit = _Unit(path=path, layer=index if stack_layers else None, stack=stack)
        units.append(unit)
        hooks.append(module.register_forward_hook(record(unit)))
    try:
        with torch.no_grad():
            run(model)
    except Exception as error:  # noqa: BLE001 - a model that cannot run on meta keeps module order
        if stack_layers:
            raise ModelReferenceError(
                f"the forward pass of {type(model).__name__} on zeros of module.json's "
                f"input_shape failed ({error!r}); check input_shape and input_dtype"
            ) from None
    finally:
        for hook in hooks:
            hook.remove()
    units.sort(key=lambda u: u.order)  # stable: units that never ran keep module order
    return units


def _trace_units(folder: Path, trust_remote_code: bool = False) -> list[_Unit]:
    """A transformers model's traced units (its kind's model on the meta device: kinds.py)."""
    return _traced(*kind_of(folder).traced(folder, trust_remote_code))


def _module_units(folder: Path, trust_remote_code: bool) -> tuple[list[_Unit], list[str]]:
    """A raw PyTorch model's traced units and tensor names (modules.py), its state dict
    checked against the module's.

    Raises:
        ModelReferenceError: as modules.build_module.
        ArchitectureMismatchError: when the state dict does not fit the module.
    """
    module, spec = build_module(folder, trust_remote_code)
    shapes = tensor_shapes(folder)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    wrong = sorted(set(expected) ^ set(shapes)) + sorted(
        k for k in set(expected) & set(shapes) if expected[k] != shapes[k]
    )
    if wrong:
        raise ArchitectureMismatchError(
            f"the state dict of {folder} does not fit {spec.module}(**kwargs): "
            f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} missing, unexpected or "
            "of another shape"
        )
    units = _traced(module, lambda m: m(example_input(spec)), stack_layers=True)
    return units, list(expected)


def module_trace(folder: Path, trust_remote_code: bool = False) -> list[tuple[str, tuple | None]]:
    """A raw PyTorch model's top-level units and their output signatures (rank, shape past the
    batch and first axes) in forward order: what segmentation splits on."""
    units, _ = _module_units(folder, trust_remote_code)
    return [(u.path, u.signature) for u in units]


def _assign_tensors(units: list[_Unit], names: list[str], layer_of: dict[str, int]) -> list[_Unit]:
    by_length = sorted(units, key=lambda u: -len(u.path))
    leftovers = _Unit(path="other", layer=None)
    for name in names:
        owner = next((u for u in by_length if name.startswith(u.path + ".")), leftovers)
        owner.tensors.append(name)
        if name in layer_of:
            owner.layer = layer_of[name]
    return [u for u in units + [leftovers] if u.tensors]


def _layer_index(config: PretrainedConfig) -> dict[str, int]:
    arch = arch_info_for_config(config)
    layer_of: dict[str, int] = {}
    for module_name in arch.modules:
        module = ConfiguredModelArchitecture(info=arch, config=config).get_module(module_name)
        for index in range(module.num_layers()):
            for weight in module.layer_weights(index):
                layer_of[weight.name] = index
    return layer_of


def _split_layers(group: list[_Unit], parts: int) -> list[list[_Unit]]:
    layered = [i for i, u in enumerate(group) if u.layer is not None]
    if not layered:
        return [group]
    parts = min(parts, len(layered))
    size, extra = divmod(len(layered), parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        bounds.append((layered[start], layered[end - 1]))
        start = end
    # Non-layer units before the stack join the first group, those after it the last.
    chunks = []
    for part, (first, last) in enumerate(bounds):
        lo = 0 if part == 0 else first
        hi = len(group) - 1 if part == parts - 1 else last
        chunks.append(group[lo : hi + 1])
    return chunks


def _filters(tensors: set[str], all_names: list[str]) -> tuple[str, ...]:
    """Shortest name prefixes that, as mergekit substring filters, match only these tensors."""
    chosen: list[str] = []
    for name in sorted(tensors):
        if any(f in name for f in chosen):
            continue
        parts = name.split(".")
        candidates = [".".join(parts[:i]) + "." for i in range(1, len(parts))] + [name]
        for candidate in candidates:
            if all(n in tensors for n in all_names if candidate in n):
                chosen.append(candidate)
                break
        else:  # pragma: no cover - only when a full name is a substring of another block's name
            raise SettingsError(f"tensor {name} cannot be selected by a mergekit filter alone")
    return tuple(chosen)


def _block_name(units: list[_Unit], component: Component, stacks: int = 1) -> str:
    layers = [u.layer for u in units if u.layer is not None]
    if layers:
        name = f"L{min(layers)}-{max(layers)}" if len(set(layers)) > 1 else f"L{layers[0]}"
        if stacks > 1:  # a raw model with several layer stacks: "convs.0-1", "blocks.0-1"
            named = next(u.stack for u in units if u.layer is not None)
            name = f"{named}.{name[1:]}"
    else:
        name = "+".join(u.path.rsplit(".", 1)[-1] for u in units)
    return name if component == "all" else f"{name}_{'attn' if component == 'attention' else 'mlp'}"


def segment_model(
    folder: Path, strategy: str = "trace", trust_remote_code: bool = False
) -> tuple[Block, ...]:
    """Segment a model folder into blocks.

    Args:
        folder: a transformers model folder (config.json + safetensors), or a raw PyTorch
            model's (module.json + model.safetensors: modules.py).
        strategy: see `STRATEGY_HELP`.
        trust_remote_code: trace the model class of the folder's own code (auto_map).

    Returns:
        Blocks in forward order; every merged tensor is in exactly one block.

    Raises:
        SettingsError: on an unknown strategy.
        ModelReferenceError: when the folder or its architecture cannot be read.
        ArchitectureMismatchError: when a raw PyTorch model's state dict does not fit its
            module.
    """
    groups, components, whole = parse_strategy(strategy)
    shapes = tensor_shapes(folder)
    if is_module_folder(folder):  # a raw PyTorch model: its own module, every tensor merged
        traced, names = _module_units(folder, trust_remote_code)
        units = _assign_tensors(traced, names, {})
    else:
        config = load_config(folder, trust_remote_code)
        names = merge_tensor_names(folder, config)
        layer_of = _layer_index(config)
        units = _assign_tensors(_trace_units(folder, trust_remote_code), names, layer_of)

    trace_groups: list[list[_Unit]] = []
    for unit in units:
        if trace_groups and trace_groups[-1][-1].signature == unit.signature:
            trace_groups[-1].append(unit)
        else:
            trace_groups.append([unit])
    if groups:
        trace_groups = [chunk for g in trace_groups for chunk in _split_layers(g, groups)]
    if whole:  # one block: one method and one set of weights for the whole model
        trace_groups = [[unit for group in trace_groups for unit in group]]

    def count(tensors: list[str]) -> int:
        total = 0
        for name in tensors:
            shape = shapes.get(name, ())
            size = 1
            for dim in shape:
                size *= dim
            total += size
        return total

    stacks = len({u.stack for u in units if u.stack})
    blocks: list[Block] = []
    for group in trace_groups:
        tensors = [t for u in group for t in u.tensors]
        layers = [u.layer for u in group if u.layer is not None]
        span = (min(layers), max(layers) + 1) if layers else None
        parts: list[tuple[Component, list[str]]] = [("all", tensors)]
        if components:
            attention = [t for t in tensors if _ATTENTION.search(t)]
            rest = [t for t in tensors if not _ATTENTION.search(t)]
            if attention and rest:
                parts = [("attention", attention), ("mlp", rest)]
        for component, part in parts:
            blocks.append(
                Block(
                    name="model"
                    if whole and component == "all"
                    else _block_name(group, component, stacks),
                    tensors=tuple(part),
                    filters=_filters(set(part), names),
                    layers=span,
                    component=component,
                    parameters=count(part),
                )
            )
    names_seen = [b.name for b in blocks]
    if len(set(names_seen)) < len(names_seen):  # block names key the search space
        raise SettingsError(
            f"segmenting {folder} with {strategy!r} gives blocks of one name "
            f"({', '.join(sorted({n for n in names_seen if names_seen.count(n) > 1}))}); "
            "try another --strategy"
        )
    return tuple(blocks)


def describe_blocks(blocks: tuple[Block, ...]) -> list[dict[str, str]]:
    """Rows for the `segment` table: block, layers, component, filters, tensors, parameters."""
    rows = []
    for block in blocks:
        filters = ", ".join(block.filters)
        rows.append(
            {
                "block": block.name,
                "layers": f"{block.layers[0]}-{block.layers[1] - 1}" if block.layers else "-",
                "component": block.component,
                "filters": filters if len(filters) <= 60 else filters[:57] + "...",
                "tensors": str(len(block.tensors)),
                "parameters": f"{block.parameters:,}",
            }
        )
    return rows


def blocks_to_json(blocks: tuple[Block, ...]) -> str:
    return json.dumps([b.model_dump(mode="json") for b in blocks], indent=1)
