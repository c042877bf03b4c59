"""Stage 3: a MergePlan <-> mergekit YAML, and building a model from it with stock mergekit.

mergekit's `merge_method` is global to a document, so a plan that uses one method becomes one
`mergekit-yaml` document with per-block parameters as filter lists. A plan that mixes methods
becomes a `mergekit-multi` set: one named intermediate merge per method, then an unnamed final
`linear` merge with `normalize: false` whose 0/1 weights pick each tensor from its method's
intermediate (mergekit-multi writes only the unnamed document to `--out-path`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mergekit.merge_methods import registry

from .errors import NO_SPACE, RecipeError, StorageError
from .methods import SOURCE_AS_BASE, is_random, is_sparsifying, method_accepts, uses_base
from .rundir import writing
from .types import MergePlan
from .vocab import UNION, union_chat_template

PART_SUFFIX = "_part"


def _values(plan: MergePlan, method: str, pick, fallback: bool) -> list[dict[str, Any]]:
    entries = [
        {"filter": f, "value": pick(choice)}
        for block, choice in zip(plan.blocks, plan.choices)
        if choice.method == method
        for f in block.filters
    ]
    if fallback:
        # Tensors of other methods' blocks are computed by this intermediate but never selected;
        # they still need a value because mergekit requires `weight` for every tensor.
        entries.append({"value": entries[0]["value"]})
    return entries


def method_document(
    plan: MergePlan, method: str, name: str | None, references: Mapping[str, str]
) -> dict[str, Any]:
    """The mergekit document that merges every block assigned to `method`."""
    partial = name is not None
    document: dict[str, Any] = {"name": name} if partial else {}
    document["merge_method"] = method
    if uses_base(method, plan.base is not None):
        document["base_model"] = references.get(plan.base, plan.base)
    elif method in SOURCE_AS_BASE:
        document["base_model"] = references.get(plan.sources[0], plan.sources[0])
    document["dtype"] = plan.dtype
    if plan.tokenizer:
        document["tokenizer_source"] = references.get(plan.tokenizer, plan.tokenizer)
    if plan.tokenizer == UNION and (template := union_chat_template([plan.base, *plan.sources])):
        document["chat_template"] = template  # else mergekit's set order picks one
    shared = {k: v for k, v in plan.method_parameters.items() if method_accepts(method, k)}
    if method_accepts(method, "t"):
        shared["t"] = _values(plan, method, lambda c: c.weights[1], partial)
    if shared:
        document["parameters"] = shared
    models = []
    for index, source in enumerate(plan.sources):
        parameters = {}
        if method_accepts(method, "weight"):
            parameters["weight"] = _values(plan, method, lambda c, i=index: c.weights[i], partial)
        if is_sparsifying(method):
            parameters["density"] = _values(
                plan, method, lambda c, i=index: c.densities[i], partial
            )
        model = {"model": references.get(source, source)}
        models.append(model | ({"parameters": parameters} if parameters else {}))
    document["models"] = models
    return document


def selection_document(plan: MergePlan) -> dict[str, Any]:
    """The final unnamed merge that picks each tensor from its method's intermediate."""
    models = []
    for method in plan.methods:
        weight = [
            {"filter": f, "value": 1.0}
            for block, choice in zip(plan.blocks, plan.choices)
            if choice.method == method
            for f in block.filters
        ]
        weight.append({"value": 0.0})
        models.append({"model": method + PART_SUFFIX, "parameters": {"weight": weight}})
    return {
        "merge_method": "linear",
        "dtype": plan.dtype,
        "parameters": {"normalize": False},
        "models": models,
    }


def plan_documents(
    plan: MergePlan, references: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The mergekit documents for a plan; `references` maps local paths to pinned ids."""
    references = references or {}
    if len(plan.methods) == 1:
        return [method_document(plan, plan.methods[0], None, references)]
    parts = [method_document(plan, m, m + PART_SUFFIX, references) for m in plan.methods]
    return parts + [selection_document(plan)]


def is_multi(documents: list[dict[str, Any]]) -> bool:
    return len(documents) > 1


def documents_yaml(documents: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def adapters_named(documents: list[dict[str, Any]]) -> list:
    """The PEFT adapters a recipe names (mergekit's model+adapter references), which mergekit
    applies into a --lora-merge-cache folder first."""
    from mergekit.config import MergeConfiguration

    models = {
        m for d in documents for m in MergeConfiguration.model_validate(d).referenced_models()
    }
    return sorted((m for m in models if m.lora), key=str)


def apply_adapters(documents: list[dict[str, Any]], cache: Path, trust: bool = False) -> None:
    """Apply every adapter a recipe names into mergekit's --lora-merge-cache folder, with
    mergekit's own `ModelReference.merged`, before mergekit runs.

    mergekit applies an adapter missing from the cache while it merges, after --random-seed
    has seeded torch, and peft's initialisation of the adapter layers draws from torch's RNG,
    which shifts every DARE/DELLA draw: a fresh cache and a filled one give different models.
    The in-memory merge applies adapters once at load, so it matches a filled cache.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # mergekit passes the deprecated torch_dtype
    try:
        for model in adapters_named(documents):
            model.merged(cache_dir=str(cache), trust_remote_code=trust)
    finally:
        transformers.logging.set_verbosity(verbosity)


def adapter_cache(out: Path) -> Path:
    """Where mergekit writes the sources with their adapters applied, beside `out`."""
    return out.parent / (out.name + "-adapters")


def reproduce_command(
    recipe: Path, out: Path, multi: bool, seed: int | None, adapters: bool = False
) -> str:
    """The plain-mergekit command line that rebuilds a recipe."""
    seed_option = f" --random-seed {seed}" if seed is not None else ""
    if adapters:
        seed_option += f" --lora-merge-cache {adapter_cache(out)}"
    if multi:
        return (
            f"mergekit-multi {recipe} --out-path {out} "
            f"--intermediate-dir {out.parent / (out.name + '-intermediate')}{seed_option}"
        )
    return f"mergekit-yaml {recipe} {out}{seed_option}"


def recipe_text(
    plan: MergePlan, references: Mapping[str, str] | None = None, header: str = ""
) -> str:
    """The recipe file: a comment header (how to run it, the seed) and the documents."""
    documents = plan_documents(plan, references)
    uses_random = any(is_random(m) for m in plan.methods)
    tool = "mergekit-multi" if is_multi(documents) else "mergekit-yaml"
    lines = [f"# automerge-mk recipe: run with plain {tool} (see README)."]
    if plan.seed is not None:
        note = "DARE/DELLA draws depend on it" if uses_random else "only random methods use it"
        lines.append(f"# random seed: {plan.seed} (pass --random-seed {plan.seed}; {note})")
    if uses_random and adapters_named(documents):
        lines.append("# adapters + DARE/DELLA: build with a --lora-merge-cache that already holds "
                     "the applied adapters (run once to fill it): mergekit applies a missing one "
                     "after seeding torch, which shifts the draws")  # fmt: skip
    lines += [f"# {line}" for line in header.splitlines() if line]
    return "\n".join(lines) + "\n" + documents_yaml(documents)


def check_document_parameters(document: Mapping[str, Any]) -> None:
    """Reject parameter keys that mergekit would silently ignore for the document's method.

    Raises:
        RecipeError: naming the method and the unknown key.
    """
    method = document.get("merge_method")
    try:
        spec = registry.get(method).spec
    except RuntimeError as error:
        raise RecipeError(f"unknown merge_method {method!r}") from error
    known = {p.name for p in spec.parameters}
    scopes = [document.get("parameters") or {}]
    scopes += [(m.get("parameters") or {}) for m in document.get("models") or []]
    for scope in scopes:
        for key in scope:
            if key not in known:
                raise RecipeError(
                    f"parameter {key!r} is not a parameter of {method} (mergekit would ignore "
                    f"it silently); known: {', '.join(sorted(known))}"
                )


def load_recipe(text: str) -> list[dict[str, Any]]:
    """Parse a recipe with safe YAML (no tags that build objects or run code), validate every
    document with mergekit's own MergeConfiguration, and check its parameter keys.

    Raises:
        RecipeError: when the text is not YAML, not one or more mapping documents, not a
            mergekit configuration, or has unknown parameter keys.
    """
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as error:
        raise RecipeError(f"recipe is not valid YAML: {error}") from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise RecipeError("a recipe holds one or more YAML mapping documents")
    for number, document in enumerate(documents, 1):
        try:
            MergeConfiguration.model_validate(document)
        # mergekit validators also raise RuntimeError (e.g. neither models nor slices).
        except (ValidationError, ValueError, TypeError, RuntimeError, RecursionError) as error:
            first = error.errors()[0] if isinstance(error, ValidationError) else {}
            where = ".".join(map(str, first.get("loc", ()))) or "?"
            raise RecipeError(
                f"recipe document {number} is not a mergekit configuration ({where}: "
                f"{first.get('msg', error)})"
            ) from None
        check_document_parameters(document)
    return documents


def _mergekit_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RecipeError(f"{name} is not installed; `pip install mergekit`")
    return found


# How a failed write for lack of space reads in mergekit's output: Python's OSError or the
# Rust io::Error of safetensors, both quoting strerror and the errno.
_NO_SPACE = re.compile(
    "|".join(re.escape(os.strerror(code)) for code in NO_SPACE)
    + rf"|([Ee]rrno|os error) ({'|'.join(map(str, NO_SPACE))})\b"
)


def build_with_mergekit(
    recipe: Path, out: Path, seed: int | None, device: str = "cpu", code_from: Path | None = None
) -> None:
    """Build the model of a recipe with stock `mergekit-yaml` / `mergekit-multi` in a subprocess.

    The model is written to `out` through a temporary sibling folder renamed at the end, so a
    half-written model never sits at `out`; a failed build removes its partial files.
    `code_from` (models trusted with --trust-remote-code) is the folder whose *.py model code
    the merged model needs: mergekit runs with --trust-remote-code and the code is copied.

    Raises:
        StorageError: when mergekit ran out of disk space (or hit a file size limit).
        RecipeError: when mergekit fails otherwise; its last output lines are included.
    """
    documents = load_recipe(recipe.read_text())
    partial = out.parent / (out.name + ".partial")
    intermediate = out.parent / (out.name + "-intermediate")
    adapters = adapter_cache(out)
    for stale in (partial, intermediate, adapters):
        shutil.rmtree(stale, ignore_errors=True)
    common = ["--no-write-model-card", "--quiet", "--device", device]
    if adapters_named(documents):
        apply_adapters(documents, adapters, trust=code_from is not None)
        common += ["--lora-merge-cache", str(adapters.resolve())]
    if seed is not None:
        common += ["--random-seed", str(seed)]
    if code_from:
        common.append("--trust-remote-code")
    if is_multi(documents):
        command = [_mergekit_script("mergekit-multi"), str(recipe), "--out-path", str(partial)]
        command += ["--intermediate-dir", str(intermediate.resolve()), *common]
    else:
        command = [_mergekit_script("mergekit-yaml"), str(recipe), str(partial), *common]
    env = dict(os.environ, TQDM_DISABLE="1")
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    except BaseException:  # Ctrl-C, SIGTERM: run() has killed mergekit; drop its half model
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(intermediate, ignore_errors=True)
        shutil.rmtree(adapters, ignore_errors=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)  # never leave half a model behind
        raise _failure(result, "mergekit", recipe, command, out)
    # mergekit copies config, not the model's code
    _install(partial, out, sorted(code_from.glob("*.py")) if code_from else [])


def _failure(result, tool: str, recipe: Path, command: list[str], out: Path) -> Exception:
    """The error of a failed mergekit run, with its last output lines: StorageError when it
    ran out of disk space (or hit a file size limit), else RecipeError."""
    output = result.stdout + result.stderr
    tail = "\n".join(output.splitlines()[-15:])
    if _NO_SPACE.search(output):
        return StorageError(
            f"out of disk space while {tool} wrote the model to {out.parent} (partial "
            f"files removed; {out} is unchanged):\n{tail}"
        )
    return RecipeError(f"{tool} failed on {recipe} ({' '.join(command)}):\n{tail}")


def _install(partial: Path, out: Path, extras: list[Path]) -> None:
    """A finished build at `out`: `extras` copied beside its weights, then renamed over it."""
    with writing(out):
        for extra in extras:
            shutil.copy2(extra, partial / extra.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)


# --- raw PyTorch models (modules.py): mergekit-pytorch, one run per method ---
#
# mergekit-pytorch (mergekit.scripts.merge_raw_pytorch) merges state-dict files with one
# merge_method per run and has no multi-document form, so a plan that mixes methods is one
# run per method into an intermediate folder, then the same 0/1 linear selection as
# mergekit-multi's last document, each run its own file: recipe-<method>_part.yaml beside
# recipe.yaml (docs/design/raw-pytorch-merges.md has the facts this rests on).


def _state_dict(reference: str, intermediate: Path) -> str:
    """A model reference of a mergekit-yaml document as a mergekit-pytorch input: a model
    folder's state dict file, an intermediate merge's output file (absolute paths: it
    resolves relative ones against the working directory)."""
    if reference.endswith(PART_SUFFIX):
        return str(Path(intermediate).absolute() / reference / "model.safetensors")
    return str(Path(reference).absolute() / "model.safetensors")


def pytorch_documents(plan: MergePlan, intermediate: Path) -> list[tuple[str | None, dict]]:
    """(stage name, mergekit-pytorch document) per run of a raw PyTorch plan, the unnamed
    final one last; a stage writes `intermediate/<name>/model.safetensors`."""
    stages = []
    for document in plan_documents(plan):
        converted = {k: v for k, v in document.items()
                     if k not in ("name", "tokenizer_source", "chat_template")}  # fmt: skip
        if "base_model" in converted:
            converted["base_model"] = _state_dict(converted["base_model"], intermediate)
        converted["models"] = [
            m | {"model": _state_dict(m["model"], intermediate)} for m in document["models"]
        ]
        stages.append((document.get("name"), converted))
    return stages


def stage_file(recipe: Path, stage: str) -> Path:
    """Where a raw PyTorch recipe's intermediate run is written: beside recipe.yaml."""
    return recipe.with_name(f"{recipe.stem}-{stage}{recipe.suffix}")


def pytorch_command(recipe: Path, out: Path, stages: list[str], seed: int | None,
                    random_methods: bool) -> str:  # fmt: skip
    """The plain mergekit-pytorch command lines (joined by &&) that rebuild a raw PyTorch
    recipe. DARE/DELLA draw tensors in set order, which Python's string hash decides: they
    need PYTHONHASHSEED=0 as well as --random-seed to draw the same masks."""
    prefix = "PYTHONHASHSEED=0 " if random_methods and seed is not None else ""
    seed_option = f" --random-seed {seed}" if seed is not None else ""
    intermediate = out.parent / (out.name + "-intermediate")
    runs = [f"{prefix}mergekit-pytorch {stage_file(recipe, s)} {intermediate / s}{seed_option}"
            for s in stages]  # fmt: skip
    return " && ".join(runs + [f"{prefix}mergekit-pytorch {recipe} {out}{seed_option}"])


def pytorch_recipe_texts(
    plan: MergePlan, recipe: Path, out: Path, header: str = ""
) -> tuple[dict[Path, str], str]:
    """File -> text of a raw PyTorch plan's recipe: recipe.yaml (the final run) and one
    recipe-<method>_part.yaml per method when it mixes them; and the commands that build it
    into `out`."""
    intermediate = out.parent / (out.name + "-intermediate")
    stages = pytorch_documents(plan, intermediate)
    random_methods = any(is_random(m) for m in plan.methods)
    command = pytorch_command(recipe, out, [s for s, _ in stages if s], plan.seed, random_methods)
    lines = ["# automerge-mk recipe for a raw PyTorch model: run with plain mergekit-pytorch:",
             f"#   {command}",
             "# (it writes the state dict only: copy module.json and the module's code from a "
             "source beside it)"]  # fmt: skip
    if plan.seed is not None and random_methods:
        lines.append(f"# random seed {plan.seed} and PYTHONHASHSEED=0: DARE/DELLA draws depend "
                     "on both")  # fmt: skip
    lines += [f"# {line}" for line in header.splitlines() if line]
    texts = {}
    for stage, document in stages:
        file = stage_file(recipe, stage) if stage else recipe
        texts[file] = "\n".join(lines) + "\n" + yaml.safe_dump(document, sort_keys=False)
    return texts, command


def build_with_mergekit_pytorch(
    recipe: Path, out: Path, seed: int | None, device: str, model_folder: Path
) -> None:
    """Build a raw PyTorch recipe (recipe.yaml and its stage files) with stock
    mergekit-pytorch in subprocesses, into `out` through a temporary sibling renamed at the
    end; the module's module.json and code are copied from `model_folder`, so that `out` is a
    model folder of its own.

    Raises:
        StorageError, RecipeError: as build_with_mergekit.
    """
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig
    from pydantic import ValidationError

    partial = out.parent / (out.name + ".partial")
    intermediate = out.parent / (out.name + "-intermediate")
    runs = []
    for file in [*sorted(recipe.parent.glob(f"{recipe.stem}-*{PART_SUFFIX}{recipe.suffix}")),
                 recipe]:  # fmt: skip
        try:
            document = yaml.safe_load(file.read_text())
            config = RawPyTorchMergeConfig.model_validate(document)
        except (OSError, yaml.YAMLError, ValidationError) as error:
            raise RecipeError(f"{file} is not a mergekit-pytorch configuration: {error}") from None
        check_document_parameters(document)
        stage = file.stem.removeprefix(recipe.stem + "-")
        runs.append((file, partial if file == recipe else intermediate / stage, config))
    for stale in (partial, intermediate):
        shutil.rmtree(stale, ignore_errors=True)
    env = dict(os.environ, TQDM_DISABLE="1")
    if any(is_random(config.merge_method) for *_, config in runs):
        env["PYTHONHASHSEED"] = "0"
    common = ["--quiet", "--device", device] + (["--random-seed", str(seed)] if seed is not None
                                                 else [])  # fmt: skip
    try:
        for file, target, _ in runs:
            command = [_mergekit_script("mergekit-pytorch"), str(file), str(target), *common]
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise _failure(result, "mergekit-pytorch", file, command, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # never leave half a model behind
        raise
    finally:
        shutil.rmtree(intermediate, ignore_errors=True)
    _install(partial, out, [model_folder / "module.json", *sorted(model_folder.glob("*.py"))])
