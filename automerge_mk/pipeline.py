"""The only wiring of the stages: a session, search, baselines, resume, build, report, publish.

Each function here is one thing a user asks for; `cli.py` turns a command line into one of
these calls, and scripts and tests call them directly:

- `open_session`: check every input (cheap checks first), lock and create or reopen the run
  directory, load the sources, score the specialists; `Session.objective()` scores merges.
- `run_search`: a session, the SMAC loop, the recipe, the model built by stock mergekit,
  scored again, the baselines, the plots and summary.md.
- `run_baselines`, `run_report`, `run_front` / `run_pick` (trade-offs between tasks),
  `features_text` / `run_suggest` / `predicted_plans` (what the weights predict),
  `publish_run`, `resume_arguments`, `finished`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import rundir
from .errors import (
    AutomergeError,
    DataError,
    ModelReferenceError,
    NonFiniteError,
    NoSuccessfulTrialError,
    RunDirectoryError,
    SettingsError,
)
from .rundir import (
    DataPrint,
    Fingerprints,
    RunDir,
    RunLock,
    RunRecord,
    check_space,
    check_unchanged,
    describe_takeover,
    model_print,
    writing,
)
from .settings import SearchSettings
from .types import Block, SourceModel, TaskScore, TrialResult, best_trial, top_budget

if TYPE_CHECKING:  # these import torch: the cheap checks must not wait for them
    from transformers import PreTrainedTokenizerBase

    from .engine import MergeEngine
    from .evaluate import Metric, TaskData
    from .memory import MemoryPlan
    from .search import Fidelity


class MergeRequest(NamedTuple):
    """What to merge: the source model references (folders or Hub ids), the base, and each
    source's validation data file by source name."""

    models: list[str]
    base: str | None
    data: dict[str, str]


def _model_dtype(folder: Path) -> str:
    from . import modules

    if modules.is_module_folder(folder):
        return modules.stored_dtype(folder)
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


@dataclass(frozen=True)
class Inputs:
    """Everything `search` needs, checked before anything is loaded or written."""

    sources: list[SourceModel]
    base: SourceModel | None
    files: dict[str, Path]
    tasks: list[TaskData]  # one per source, in source order
    blocks: tuple[Block, ...]
    dtype: str
    metrics: tuple[Metric, ...]
    tokenizer: PreTrainedTokenizerBase | None  # None: raw PyTorch models' image tasks
    fingerprints: Fingerprints
    warm_start: tuple[TrialResult, ...] = ()
    fidelity: Fidelity | None = None
    evals: tuple = ()  # evaluation plug-ins (plugins.LmEval)
    # Where the merged model's tokenizer differs (--tokenizer-source): per source name, its
    # own tokenizer and every task tokenised with it, for its reference scores.
    own: dict[str, tuple[PreTrainedTokenizerBase, list[TaskData]]] | None = None
    memory: MemoryPlan | None = None  # where the engine keeps what (memory.py)
    kind: str = "causal-lm"  # kinds.py: causal-lm, sequence-classifier or raw-module

    @property
    def reference_model(self) -> Path:
        return (self.base or self.sources[0]).model_folder

    @property
    def raw_module(self) -> bool:
        """Raw PyTorch models (modules.py) with image tasks (classify.py)."""
        return self.kind == "raw-module"

    @property
    def classifies(self) -> bool:
        """Classifiers scored on class labels (classify.py), not causal LMs on tokens."""
        return self.kind != "causal-lm"

    @property
    def adapters(self) -> dict[Path, Path]:
        """Adapter folder -> the model folder it applies to, for the sources that are adapters."""
        return {s.path: s.adapter_of.path for s in self.sources if s.adapter_of}

    def scoring(self, name: str) -> tuple[PreTrainedTokenizerBase, list[TaskData]]:
        """How source `name` is scored on every task: its own tokenizer and tokenisation."""
        return (self.own or {}).get(name, (self.tokenizer, self.tasks))


def _check_paths(
    model_refs: list[str], data: dict[str, str]
) -> tuple[dict[str, Path], dict[str, str]]:
    """The checks that need no model and no heavy import: the data files by source name (see
    `inputs.data_files`), and their sha256."""
    from . import inputs

    if len(model_refs) < 2:
        raise ModelReferenceError("give at least two source models to merge")
    return inputs.data_files(data, model_refs)


def _check_inputs(
    model_refs: list[str],
    base_ref: str | None,
    files: dict[str, Path],
    data_sha: dict[str, str],
    settings: SearchSettings,
) -> Inputs:
    """Resolve and check models, data, methods and parameters; tokenise the data; segment.

    `files` and `data_sha` are what `_check_paths` found, by source name (so a missing data
    file is named before the libraries below are imported: seconds).
    """
    _quiet_libraries()
    from . import evaluate, kinds, methods, plugins, segment, sources, vocab
    from .engine import check_device, check_dtype
    from .search import Fidelity

    segment.parse_strategy(settings.strategy)
    methods.check_methods(settings.methods, base_ref is not None, len(model_refs))
    methods.check_method_parameters(settings.methods, settings.method_parameters)
    check_device(settings.device)
    metrics = tuple(evaluate.parse_metric(spec) for spec in settings.metrics)
    if len({m.name for m in metrics}) < len(metrics):
        raise SettingsError(f"--metric names repeat: {', '.join(m.name for m in metrics)}")
    evals = plugins.parse_evals(settings.evals, settings.eval_arguments)
    trust = settings.trust_remote_code
    resolve = partial(
        sources.resolve_model, trust_remote_code=trust, allow_pickle=settings.allow_pickle_weights
    )
    base = resolve(base_ref) if base_ref else None
    sources = [resolve(ref, base=base) for ref in model_refs]
    kind = kinds.kind_of((base or sources[0]).model_folder)
    if kind.classifies or any(kinds.kind_of(m.path).classifies for m in sources):
        return _class_inputs(kind, sources, base, files, data_sha, settings, metrics, evals)
    rows = {name: evaluate.load_rows(path, settings.text_column) for name, path in files.items()}
    reference_model = (base or sources[0]).model_folder
    folders = [s.model_folder for s in sources] + ([base.path] if base else [])
    segment.check_compatible(folders, vocabularies_differ=True)  # all but the token axis
    tokenizer_source = _check_vocabularies(sources, base, settings)
    if tokenizer_source is None:
        segment.check_compatible(folders)  # the token axis too
    dtype = settings.dtype or _model_dtype(reference_model)
    check_dtype(dtype)
    tokenizer = _tokenizer(reference_model, trust)
    if tokenizer_source:
        local = {str(m.path): _local_reference(m) for m in sources + ([base] if base else [])}
        tokenizer = vocab.run_tokenizer(
            [local[str(s.path)] for s in sources],
            local[str(base.path)] if base else None,
            local.get(tokenizer_source, tokenizer_source),
            trust,
        )
    tasks = [
        evaluate.tokenize_task(
            s.name,
            rows[s.name],
            tokenizer,
            settings.max_length,
            settings.eval_tokens,
            settings.seed,
        )
        for s in sources
    ]
    own = None
    if tokenizer_source:  # each specialist's references in its own tokenisation
        own = {}
        for s in sources:
            theirs = _tokenizer(s.model_folder, trust)
            own[s.name] = theirs, [evaluate.retokenize(t, theirs, settings.max_length)
                                   for t in tasks]  # fmt: skip
    unlabelled = [t.name for t in tasks if not t.labels]
    if unlabelled and any(m.name == "label_accuracy" for m in metrics):
        raise DataError(
            f"--metric label_accuracy needs prompt/label data with at most "
            f"{evaluate.MAX_LABELS} labels; {', '.join(unlabelled)} has plain texts or "
            "free-form answers"
        )
    if settings.prior and (base is None or any(s.adapter_of for s in sources)):
        raise SettingsError(
            "--prior reads task vectors (each source minus --base) from full weights: give "
            "--base, and full models rather than adapters (or drop --prior)"
        )
    if settings.prior and tokenizer_source:
        raise SettingsError(
            "--prior compares the sources token by token: their vocabularies differ "
            f"(--tokenizer-source {tokenizer_source}); drop --prior"
        )
    for earlier in settings.prior_from:  # records, trials, prior.json: before any model loads
        _learned_from(Path(earlier), len(sources))
    fidelity = Fidelity.resolve(settings.fidelity, tasks)
    blocks = segment.segment_model(reference_model, settings.strategy, trust)  # meta: cheap
    prints = Fingerprints(
        models={s.name: model_print(s) for s in sources},
        base=model_print(base) if base else None,
        data={n: DataPrint(path=str(files[n]), sha256=data_sha[n]) for n in files},
    )
    warm = _warm_start_trials(settings, blocks, tuple(s.name for s in sources), prints)
    batch = (*evaluate.largest_batch(tasks), evaluate.CHUNK_ROWS)
    memory = _plan_memory(sources, base, reference_model, dtype, batch, settings)
    return Inputs(sources, base, files, tasks, blocks, dtype, metrics, tokenizer, prints, warm,
                   fidelity, evals, own, memory)  # fmt: skip


_KIND_WORDS = {"raw-module": "raw PyTorch models (module.json)",
               "sequence-classifier": "transformers sequence classifiers",
               "causal-lm": "transformers causal LMs"}  # fmt: skip


def _class_inputs(kind, sources, base, files, data_sha, settings: SearchSettings, metrics, evals):
    """`_check_inputs` for classifiers (kinds.py) and their tasks (classify.py): every model
    of one kind and one layout; a raw PyTorch model's tasks are images of its module's input
    shape, a sequence classifier's texts with labels of its id2label; labels among the
    model's logits."""
    from . import classify, kinds, modules, segment
    from .engine import check_dtype

    models = sources + ([base] if base else [])
    if others := [m.name for m in models if kinds.kind_of(m.path).name != kind.name]:
        raise ModelReferenceError(
            f"{', '.join(others)}: not {_KIND_WORDS[kind.name]}, merged here with "
            f"{_KIND_WORDS[kind.name]} such as {(base or sources[0]).name}; merge models of one "
            "kind (raw PyTorch models only with raw PyTorch models of one module)"
        )
    given = {"--fidelity": settings.fidelity, "--tokenizer-source": settings.tokenizer_source,
             "--metric": metrics, "--eval": evals,
             "adapters": any(s.adapter_of for s in sources)}  # fmt: skip
    if named := [option for option, value in given.items() if value]:
        raise SettingsError(
            f"{', '.join(named)}: not available for {_KIND_WORDS[kind.name]} yet, whose tasks "
            "are scored by cross-entropy over classes (AP) and top-1 accuracy (PR); drop them"
        )
    if settings.prior and base is None:
        raise SettingsError(
            "--prior (and suggest, segment --features) reads task vectors (each source minus "
            "--base): give --base"
        )
    for earlier in settings.prior_from:  # records, trials, prior.json: before any model loads
        _learned_from(Path(earlier), len(sources))
    reference = (base or sources[0]).path
    trust = settings.trust_remote_code
    segment.check_compatible([m.path for m in models])
    dtype = settings.dtype or _model_dtype(reference)
    check_dtype(dtype)
    tokenizer, tasks = None, []
    if kind.name == kinds.RAW_MODULE:
        spec = modules.read_spec(reference)
        classes, peak = modules.forward_facts(reference, trust)
        for source in sources:
            task = classify.load_image_task(source.name, files[source.name], spec.input_shape)
            classify.check_classes(task, classes, files[source.name])
            tasks.append(task)
        batch, activations = (classify.BATCH, 0, 0), classify.BATCH * peak
    else:
        _check_vocabularies(sources, base, settings)  # one vocabulary: no tokenizer to choose
        tokenizer = _tokenizer(reference, trust)
        config = segment.load_config(reference, trust)
        for source in sources:
            tasks.append(classify.load_text_task(source.name, files[source.name], tokenizer,
                                                 dict(config.label2id), settings.max_length,
                                                 settings.text_column))  # fmt: skip
        width = max(next(iter(t.inputs.values())).shape[1] for t in tasks)
        batch = (classify.BATCH * width, width, 0)  # padded positions, width, no vocab logits
        activations = None  # from the config, as a causal LM's
    blocks = segment.segment_model(reference, settings.strategy, trust)
    prints = Fingerprints(
        models={s.name: model_print(s) for s in sources},
        base=model_print(base) if base else None,
        data={n: DataPrint(path=str(files[n]), sha256=data_sha[n]) for n in files},
    )
    warm = _warm_start_trials(settings, blocks, tuple(s.name for s in sources), prints)
    memory = _plan_memory(sources, base, reference, dtype, batch, settings, activations)
    return Inputs(sources, base, files, tasks, blocks, dtype, (), tokenizer, prints, warm,
                  memory=memory, kind=kind.name)  # fmt: skip


def _plan_memory(sources, base, reference_model: Path, dtype: str, batch: tuple[int, int, int],
                 settings: SearchSettings, activations: int | None = None):  # fmt: skip
    """The memory plan (memory.py) from the models' headers: raises MemoryPlanError, naming
    the option that fits, when --tier / --rank-cache (or anything) cannot fit. With local
    --workers on a CPU, every worker holds an engine of its own beside this process's.
    `activations`: the elements scoring holds at once, where no config says (a raw module)."""
    from mergekit.common import dtype_from_name

    from . import modules
    from .engine import eval_dtype, resolve_device
    from .memory import measure_needs, plan_memory
    from .segment import load_config, merge_tensor_keys

    if modules.is_module_folder(reference_model):  # every floating tensor; no config
        config, keys = None, modules.merged_names(reference_model)
    else:
        config = load_config(reference_model, settings.trust_remote_code)
        keys = merge_tensor_keys(reference_model, config)
    needs = measure_needs(
        [s.model_folder for s in sources] + ([base.path] if base else []),
        len(sources),
        reference_model,
        keys,
        config,
        dtype_from_name(dtype),
        eval_dtype(settings.eval_dtype, settings.device),
        settings.methods,
        batch,
        activations,
    )
    device = resolve_device(settings.device)
    local = device == "cpu" and settings.workers > 1 and not settings.scheduler
    engines = settings.workers + 1 if local else 1
    return plan_memory(needs, device, settings.tier, settings.rank_cache, engines=engines,
                       limit=settings.memory_limit)  # fmt: skip


def _tokenizer(folder: Path, trust: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
    except Exception as error:
        raise ModelReferenceError(f"cannot load a tokenizer from {folder}: {error}") from None


def _check_vocabularies(
    sources: list[SourceModel], base: SourceModel | None, settings: SearchSettings
) -> str | None:
    """Compare the models' vocabularies (an adapter's is its model's, as in mergekit); return
    the plan's tokenizer source (None: one vocabulary, nothing to choose), with a note on what
    differs.

    Raises:
        TokenizerMismatchError: when they differ and --tokenizer-source is not given, or names
            no source.
    """
    from . import vocab

    names = [s.name for s in sources]
    models = ([("the base", base)] if base else []) + [(f"source {s.name}", s) for s in sources]
    vocabularies = [vocab.read_vocabulary(label, m.model_folder, settings.trust_remote_code)
                    for label, m in models]  # fmt: skip
    found = vocab.check_vocabularies(vocabularies, settings.tokenizer_source, names)
    choice = vocab.plan_tokenizer(settings.tokenizer_source, tuple(str(s.path) for s in sources),
                                  tuple(names), str(base.path) if base else None)  # fmt: skip
    if choice:
        what = "the union of the models' tokens" if choice == vocab.UNION else choice
        differ = f": {'. '.join(found)}" if found else " (the models' vocabularies are the same)"
        _note(f"tokenizer: --tokenizer-source {settings.tokenizer_source} ({what}){differ}")
    for source in sources:
        if source.adapter_of:
            _note(f"source {source.name} is a PEFT adapter applied to {source.adapter_of.name} "
                  f"({source.pinned}), once, in memory")  # fmt: skip
    return choice


def _local_reference(model: SourceModel) -> str:
    """How a document names a model's local folder: mergekit's model+adapter for adapters."""
    return f"{model.adapter_of.path}+{model.path}" if model.adapter_of else str(model.path)


def _warm_start_trials(
    settings: SearchSettings,
    blocks: tuple[Block, ...],
    names: tuple[str, ...],
    prints: Fingerprints,
) -> tuple[TrialResult, ...]:
    """The finished trials of `--warm-start RUN_DIR`, once its space is checked to be ours and
    its inputs the same as ours (runs from before fingerprints cannot be checked)."""
    from . import search, space

    if not settings.warm_start:
        return ()
    folder = Path(settings.warm_start)
    stored = RunRecord.read(folder)
    ours = space.build_space(blocks, names, settings)
    weighting = {"weighting": settings.weighting, "weight_range": settings.weight_range}
    reweighted = stored.settings.model_copy(update=weighting)
    translate = stored.settings.weighting != settings.weighting and ours == space.build_space(
        stored.blocks, stored.names, reweighted
    )
    if not translate:
        earlier = space.build_space(stored.blocks, stored.names, stored.settings)
        search.check_same_space(earlier, ours, str(folder))
    if stored.fingerprints:
        check_unchanged(stored.fingerprints, prints, folder, "warm-start from")
    else:
        _note(f"{folder} is from before input fingerprints: its models and data are taken to "
              "be the ones given here")  # fmt: skip
    trials = tuple(RunDir(folder).trials())
    if translate:
        trials = _reweighted_trials(stored, trials, ours, settings, folder)
    partial = sum(t.partial for t in trials)
    estimates = f" ({partial} of them stopped early by racing: their estimates)" if partial else ""
    _note(f"warm start: told the optimiser {len(trials)} trials of {folder}{estimates}")
    return trials


def _reweighted_trials(stored: RunRecord, trials, ours, settings: SearchSettings, folder: Path):
    """An earlier run's trials from another --weighting (e.g. automerge-mk 0.1's convex space),
    as the configurations of our space that give the same merges; those it cannot express
    (weights out of our --weight-range) are left out, with a note."""
    from . import space

    kept = []
    for trial in trials:
        plan = space.plan_from_record(stored, trial.config)
        config = space.config_from_plan(plan, ours, stored.names, settings)
        if config is not None:
            kept.append(trial.model_copy(update={"config": space.plain_values(config)}))
    _note(f"{folder} searched --weighting {stored.settings.weighting}: {len(kept)} of its "
          f"{len(trials)} trials are told as the same merges in this --weighting "
          f"{settings.weighting} space")  # fmt: skip
    return tuple(kept)


def _note(message: str) -> None:
    """A line for the user beside the progress (stderr), not an error."""
    logging.getLogger("automerge_mk").warning(message)


def _quiet_libraries() -> None:
    """Our own bars show progress; per-file bars of datasets and transformers only add noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class Session:
    """A run directory with resident sources and the specialists' reference scores."""

    run: RunDir
    inputs: Inputs
    settings: SearchSettings
    engine: MergeEngine
    references: dict[str, TaskScore]  # each task under its own specialist
    sources_scored: dict[str, tuple]

    def objective(self, to_plan=None, unraced=()):
        """The target function on this session's engine, data, references and metrics;
        `unraced`: configurations scored on every example even when racing (the --prior's)."""
        from .search import MergeObjective

        inputs = self.inputs
        specialists = {source.name: source.path for source in inputs.sources}
        return MergeObjective(
            self.engine, inputs.tasks, self.references, to_plan, inputs.metrics,
            inputs.tokenizer, specialists, self.settings.seed, inputs.evals, _own_tasks(inputs),
            _race(inputs, self.settings), unraced,
        )  # fmt: skip


def _race(inputs: Inputs, settings: SearchSettings):
    """How trials race (--racing), or None: not with --fidelity, whose budgets decide instead,
    nor with --objective pareto (a trial off the best harmonic mean may be on the front)."""
    from .search import Race

    if not settings.racing or inputs.fidelity or settings.objective == "pareto":
        return None
    if inputs.classifies:  # class tasks are scored in a few batched passes: little to save
        return None
    return Race(settings.race_chunk, settings.race_confidence, settings.seed)


def _own_tasks(inputs: Inputs) -> dict:
    """Per task, its specialist's own tokenizer and tokenisation of it (where they differ)."""
    return {
        name: (tokenizer, next(t for t in tasks if t.name == name))
        for name, (tokenizer, tasks) in (inputs.own or {}).items()
    }


def _check_space(inputs: Inputs, out: Path, replacing: bool) -> None:
    """Refuse to start when `out` cannot hold the merged model (one source's weights in the
    merge dtype, plus a margin for the run's files), instead of failing at the end."""
    from .weights import model_bytes

    model = model_bytes(inputs.reference_model, _model_dtype(inputs.reference_model), inputs.dtype)
    freed = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if replacing else 0
    # The build writes model.partial beside an earlier model/ and replaces it at the end.
    check_space(out, needed=model + 64 * 2**20, freed=freed)


def _load_sources(inputs: Inputs, settings: SearchSettings):
    """The engine with the sources resident, and each source's scores on every task (each
    specialist's on its own task are the reference of AP and PR)."""
    from . import evaluate
    from .engine import MergeEngine, eval_dtype

    engine = MergeEngine(
        [s.path for s in inputs.sources],
        inputs.base.path if inputs.base else None,
        inputs.reference_model,
        dtype=inputs.dtype,
        device=settings.device,
        tier=inputs.memory.tier,
        rank_cache=inputs.memory.rank_cache,
        eval_dtype=eval_dtype(settings.eval_dtype, settings.device),
        trust_remote_code=settings.trust_remote_code,
        adapters=inputs.adapters,
    )
    _check_finite_weights(engine, inputs)
    raw = {}
    for s in inputs.sources:
        tokenizer, tasks = inputs.scoring(s.name)
        raw[s.name] = evaluate.score_model(
            engine.load_source(s.path), tasks, inputs.metrics, tokenizer
        )
    for source in inputs.sources:
        loss = raw[source.name][source.name].loss
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"{source.name} ({source.path}) has loss {loss} on its own task {source.name} "
                f"although its weights are finite: the reference of AP cannot be {loss}; try "
                "--eval-dtype float32 (float16 overflows) or check its data"
            )
    return engine, raw


def _check_finite_weights(engine: MergeEngine, inputs: Inputs) -> None:
    """Raises NonFiniteError naming the model and the first tensor with NaN/inf values (one
    pass over the resident tensors, before any trial)."""
    bad = engine.non_finite_tensors()
    if not bad:
        return
    names = {m.path: f"{'base model' if m is inputs.base else 'source model'} {m.name}"
             for m in inputs.sources + ([inputs.base] if inputs.base else [])}  # fmt: skip
    folder, tensor, count = bad[0]
    more = f" ({len(bad)} tensors in all)" if len(bad) > 1 else ""
    raise NonFiniteError(
        f"{names.get(folder, folder)} ({folder}): tensor {tensor} has {count:,} NaN/inf values "
        f"as read in the merge dtype {inputs.dtype}{more}; every merge with it would fail. "
        "Fix or re-export the model (or choose a wider --dtype if the cast overflows)"
    )


def _to_plan(inputs: Inputs, settings: SearchSettings):
    """configuration -> MergePlan for these sources, blocks and settings."""
    from . import space

    return partial(
        space.plan_from_config,
        blocks=inputs.blocks,
        sources=tuple(str(s.path) for s in inputs.sources),
        source_names=tuple(s.name for s in inputs.sources),
        base=str(inputs.base.path) if inputs.base else None,
        settings=settings,
        dtype=inputs.dtype,
    )


def worker_objective(model_refs, base_ref, data, settings: dict, prior: tuple = ()):
    """What a Dask worker process needs to run trials: the checked inputs, its own resident
    engine and the specialists' reference scores, as one MergeObjective (`prior`: the --prior
    configurations, never raced)."""
    from .search import MergeObjective

    settings = SearchSettings(**settings)
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data), settings)
    engine, raw = _load_sources(inputs, settings)
    references = {name: scores[name] for name, scores in raw.items()}
    return MergeObjective(
        engine, inputs.tasks, references, _to_plan(inputs, settings), inputs.metrics,
        inputs.tokenizer, {s.name: s.path for s in inputs.sources}, settings.seed, inputs.evals,
        _own_tasks(inputs), _race(inputs, settings), tuple(prior),
    )  # fmt: skip


def _protected(inputs: Inputs, settings: SearchSettings) -> list[Path]:
    """What --out must keep apart from: the model folders and every file in them (a Hub
    snapshot's files resolve into the cache), the data files, --warm-start and --prior-from
    runs."""
    models = [m.path for m in inputs.sources + ([inputs.base] if inputs.base else [])]
    paths = models + [file for folder in models for file in folder.iterdir()]
    paths += list(inputs.files.values())
    earlier = [settings.warm_start] if settings.warm_start else []
    return paths + [Path(p) for p in earlier + list(settings.prior_from)]


def open_session(
    request: MergeRequest,
    settings: SearchSettings,
    out: Path,
    overwrite: bool,
    resume: bool = False,
    command: str = "search",
) -> Session:
    """Check every input, then create (or reopen) the run directory, load the engine, score
    the sources. The session's run directory stays locked until `session.run.release()`."""

    model_refs, base_ref, data = request
    files, data_sha = _check_paths(model_refs, data)  # before any heavy import
    if resume:
        run = RunDir.reopen(out)
        recorded = RunRecord.read(out).fingerprints
    else:
        RunDir.check_free(out, overwrite)
        run = recorded = None
    try:
        # A resumed --prior-from run has its prediction in prior.json: the earlier runs it
        # learned from need not be there any more.
        predicted = resume and (out / rundir.PRIOR).is_file()
        checked = settings.model_copy(update={"prior_from": ()}) if predicted else settings
        inputs = _check_inputs(model_refs, base_ref, files, data_sha, checked)
        _check_space(inputs, out, overwrite and not resume)
        _note(inputs.memory.describe())
        if recorded:
            check_unchanged(recorded, inputs.fingerprints, out, "resume")
        elif resume:
            _note(f"{out} is from before input fingerprints: from now on it records them")
        # --- expensive work from here on ---
        if run is None:
            run = RunDir.create(out, overwrite, _protected(inputs, settings), command)
        if taken := describe_takeover(run.lock):
            _note(taken.capitalize())
        if recorded is None:
            run.write_record(RunRecord(
                models=inputs.sources, base=inputs.base,
                data={k: str(v) for k, v in inputs.files.items()}, settings=settings,
                dtype=inputs.dtype, blocks=inputs.blocks, fingerprints=inputs.fingerprints,
            ))  # fmt: skip
        return _start_session(run, inputs, _session_eval_dtype(inputs, settings, out, resume))
    except BaseException:
        if run is not None:
            run.release()
        raise


# How much faster bfloat16 must be to be chosen over float32's more precise losses: a wide
# margin, so that one machine's choice does not flip with its load (bfloat16 is about 2x
# faster where it is faster at all, scripts/results/bench_search.md).
FASTER = 1.5


def _session_eval_dtype(inputs: Inputs, settings: SearchSettings, out: Path, resume: bool):
    """The settings with --eval-dtype auto made concrete, so that workers and a resumed run
    score in the dtype of the first trials. On a CPU, auto takes bfloat16 when a forward
    pass of this architecture on one batch of the data is FASTER times faster in it here
    than in float32 (on some CPUs it is 2x faster, on others several times slower:
    scripts/results/racing.md measures how well it ranks merges), else float32; on a GPU,
    bfloat16. A resumed run keeps the dtype it recorded in memory.json, and the timing is
    done once per machine and architecture (evaluate.timed_eval_dtype)."""
    from . import evaluate
    from .engine import eval_dtype, resolve_device
    from .segment import load_config

    if settings.eval_dtype != "auto":
        return settings
    chosen = None
    if resume and (out / rundir.MEMORY).is_file():
        chosen = json.loads((out / rundir.MEMORY).read_text()).get("eval_dtype")
    device = resolve_device(settings.device)
    if chosen is None and device == "cpu" and not inputs.classifies:
        config = load_config(inputs.reference_model, settings.trust_remote_code)
        positions = min(512, evaluate.largest_batch(inputs.tasks)[0])
        chosen, note = evaluate.timed_eval_dtype(config, positions, device, FASTER)
        _note(note)
    if chosen is None:
        chosen = str(eval_dtype("auto", device)).removeprefix("torch.")
    return settings.model_copy(update={"eval_dtype": chosen})


def _start_session(run: RunDir, inputs: Inputs, settings: SearchSettings) -> Session:
    """Load the engine and score the sources into a locked run directory."""
    from . import evaluate, plugins, report

    run.write_json(
        rundir.EVAL_SUBSET,
        {
            t.name: {"texts": list(t.indices), "tokens": t.tokens, "computed": t.computed_tokens}
            for t in inputs.tasks
        },
    )
    run.write_json(rundir.MEMORY, inputs.memory.as_record() | {"eval_dtype": settings.eval_dtype})
    engine, raw = _load_sources(inputs, settings)
    references = {name: scores[name] for name, scores in raw.items()}
    for caveat in evaluate.error_free_references(references, inputs.tasks):
        _note(caveat)
    sources_scored = {
        n: evaluate.with_preservation(s, references, inputs.metrics) for n, s in raw.items()
    }
    run.write_json(
        rundir.SOURCES, {n: report.scored_json(*scored) for n, scored in sources_scored.items()}
    )
    if inputs.evals:  # the plug-ins' scores of each source, beside their AP and PR
        evals = {
            f"{s.name} alone": plugins.run_evals(
                inputs.evals, engine.load_source(s.path), inputs.scoring(s.name)[0]
            )
            for s in inputs.sources
        }
        run.write_json(rundir.EVALS, evals)
    return Session(run, inputs, settings, engine, references, sources_scored)


def _baseline_plans(inputs: Inputs, settings: SearchSettings, grid: bool = False) -> dict:
    from . import space, vocab

    sources = tuple(str(s.path) for s in inputs.sources)
    base = str(inputs.base.path) if inputs.base else None
    names = tuple(s.name for s in inputs.sources)
    tokenizer = vocab.plan_tokenizer(settings.tokenizer_source, sources, names, base)
    plans = space.baseline_plans(inputs.blocks, sources, base, inputs.dtype, settings.seed, grid)
    return {label: p.model_copy(update={"tokenizer": tokenizer}) for label, p in plans.items()}


def _known_configs(inputs: Inputs, settings: SearchSettings, space_) -> dict:
    """The baselines that start the search (--baselines-first), as configurations of its space."""
    from . import space

    if not settings.baselines_first:
        return {}
    names = tuple(s.name for s in inputs.sources)
    plans = _baseline_plans(inputs, settings)
    known = space.known_configs(plans, space_, names, settings)
    left_out = [label for label in plans if label not in known]
    if left_out:
        _note(f"not in the searched space (--methods, --weight-range, --density-range), so "
              f"scored after the search only: {', '.join(left_out)}")  # fmt: skip
    return known


PROBE_TOKENS = 256  # the features' probe: one forward pass per source, a few hundred tokens


def _probe(tasks: list[TaskData]) -> list[int]:
    """The first PROBE_TOKENS tokens of the validation sequences, one of each task in turn."""
    ids: list[int] = []
    for row in itertools.zip_longest(*(t.sequences for t in tasks), fillvalue=()):
        for sequence in row:
            ids.extend(sequence)
        if len(ids) >= PROBE_TOKENS:
            break
    return ids[:PROBE_TOKENS]


def _features(inputs: Inputs, settings: SearchSettings):
    """The sources' per-block similarity features (features.py) with the validation probe."""
    from .features import model_features

    # A classifier's features are its weights' alone: the probe runs a causal LM on tokens.
    probe = None if inputs.classifies else _probe(inputs.tasks)
    return model_features([s.path for s in inputs.sources], inputs.base.path, inputs.blocks,
                          probe, settings.trust_remote_code)  # fmt: skip


PRIOR_FROM_TRIALS = 3  # --prior-from learns from each earlier run's best trials


def _learned_from(run_dir: Path, sources: int) -> tuple:
    """An earlier run --prior-from learns from, checked: its record, its PRIOR_FROM_TRIALS best
    trials scored on all of its data, and the features it kept (None: computed later from
    its models' weights). Reads records, trials and prior.json only.

    Raises:
        RunDirectoryError: when it is not a run, merged another number of sources or without
            a base (no task vectors), has no full trial yet, or neither kept its features nor
            has the models it searched where it found them (gone, or changed since).
    """
    from . import front
    from .features import ModelFeatures

    record = RunRecord.read(run_dir)
    if record.base is None or len(record.models) != sources:
        why = "without a base (no task vectors)" if record.base is None else \
            f"{len(record.models)} sources, this search {sources}"  # fmt: skip
        raise RunDirectoryError(f"--prior-from {run_dir} merged {why}: give runs of "
                                f"{sources} sources and a base")  # fmt: skip
    trials = front.candidates(RunDir(run_dir).trials(), list(record.names))
    best = sorted(trials, key=lambda t: -t.harmonic_mean)[:PRIOR_FROM_TRIALS]
    if not best:
        raise RunDirectoryError(f"--prior-from {run_dir} has no trial scored on all of its "
                                "data yet")  # fmt: skip
    features = None
    if (run_dir / rundir.PRIOR).is_file():  # a --prior run kept its features
        try:
            features = ModelFeatures.model_validate(
                RunDir(run_dir).read_json(rundir.PRIOR)["features"]
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RunDirectoryError(
                f"--prior-from {run_dir}: unreadable prior.json ({error!r})"
            ) from None
    gone = [str(m.path) for m in [*record.models, record.base] if not Path(m.path).is_dir()]
    if gone and features is None:
        raise RunDirectoryError(
            f"--prior-from {run_dir}: its models are no longer where it found them "
            f"({', '.join(gone)}), and it was searched without --prior, which keeps the "
            "features in prior.json; give runs whose models are still there"
        )
    if features is None and record.fingerprints:  # features of weights retrained in place
        # would pair other models' features with these trials
        now = rundir.Fingerprints(
            models={m.name: rundir.model_print(m) for m in record.models},
            base=rundir.model_print(record.base), data={})  # fmt: skip
        changes = rundir.input_changes(record.fingerprints, now, data=False)
        if changes:
            raise RunDirectoryError(
                f"--prior-from {run_dir}: its models are not the ones it searched ("
                + "; ".join(changes)
                + "), and it was searched without --prior, which keeps "
                "the features in prior.json; give runs whose models are unchanged"
            )
    return record, best, features


def _examples(settings: SearchSettings, sources: int) -> list:
    """--prior-from: (block features, best trial's merge of that block) pairs of the earlier
    runs' PRIOR_FROM_TRIALS best trials scored on all of their data."""
    from . import space
    from .features import model_features

    examples = []
    for earlier in map(Path, settings.prior_from):
        record, best, features = _learned_from(earlier, sources)
        if features is None:
            try:  # weights only: the features the neighbours are found by
                models = [m.path for m in record.models]
                features = model_features(models, record.base.path, record.blocks, None,
                                          settings.trust_remote_code)  # fmt: skip
            except (OSError, ValueError, AutomergeError) as error:
                raise RunDirectoryError(
                    f"--prior-from {earlier}: its models are no longer readable where it found "
                    f"them ({error}); only runs searched with --prior keep their features"
                ) from None
        by_block = {f.block: f for f in features.blocks}
        for trial in best:
            plan = space.plan_from_record(record, trial.config)
            examples += [(by_block[b.name], c) for b, c in zip(plan.blocks, plan.choices)
                         if b.name in by_block]  # fmt: skip
    if settings.prior_from:
        _note(f"--prior-from: {len(examples)} block merges from {len(settings.prior_from)} "
              "earlier run(s)")  # fmt: skip
    return examples


def predicted_plans(inputs: Inputs, settings: SearchSettings):
    """The sources' features and the plans the prior's rule predicts from them (prior.py), by
    label: "prior" and its variants (prior.prior_plans)."""
    from . import prior, vocab

    features = _features(inputs, settings)
    sources = tuple(str(s.path) for s in inputs.sources)
    names = tuple(s.name for s in inputs.sources)
    tokenizer = vocab.plan_tokenizer(settings.tokenizer_source, sources, names,
                                     str(inputs.base.path))  # fmt: skip
    examples = _examples(settings, len(sources))
    plans = prior.prior_plans(features, inputs.blocks, sources, str(inputs.base.path), settings,
                              inputs.dtype, examples)  # fmt: skip
    return features, {k: p.model_copy(update={"tokenizer": tokenizer}) for k, p in plans.items()}


CORRECTED = "prior, by the baselines"  # the start prior.by_baselines gives
# --prior's last two starts: the best merge so far rescaled, then again or the other way
RESCALED = ("prior, best so far rescaled", "prior, rescaled again")


def _prior_configs(session: Session, space_, known: dict) -> tuple[dict, dict]:
    """--prior: the predicted configurations of the search's space, computed once and kept in
    prior.json, from which a resumed run reads them: all of them (the first, "prior", is the
    centre of --prior-acquisition's prior) and those the search adds after the baselines.
    With baselines (and no --fidelity, whose baselines are scored on a part of the data) the
    first added is CORRECTED, here the rule before the baselines correct it (_Correction).
    Without --fidelity the last two are RESCALED, here stand-ins (_rescale_stand_ins) for the
    line search _Rescale chooses."""
    from ConfigSpace import Configuration

    from . import prior, space

    run, inputs, settings = session.run, session.inputs, session.settings
    if (run.path / rundir.PRIOR).is_file():
        stored = run.read_json(rundir.PRIOR)["configs"]
        configs = {label: Configuration(space_, values=v) for label, v in stored.items()}
    else:
        features, plans = predicted_plans(inputs, settings)
        names = tuple(s.name for s in inputs.sources)
        configs = space.known_configs(plans, space_, names, settings)
        if known and not inputs.fidelity:  # its place, even where it stands in for a config
            first = next(iter(plans.values()))  # already here: it is chosen when read
            stand_in = prior.by_baselines(features, inputs.blocks, first.sources, first.base,
                                          settings, inputs.dtype)  # fmt: skip
            config = space.config_from_plan(stand_in, space_, names, settings)
            configs |= {CORRECTED: config} if config is not None else {}
        configs |= _rescale_stand_ins(configs, known, space_, inputs, settings)
        run.write_json(rundir.PRIOR, {
            "features": features.model_dump(mode="json"),
            "configs": {label: space.plain_values(c) for label, c in configs.items()},
            "learned_from": list(settings.prior_from),
        })  # fmt: skip
    chosen_later = (CORRECTED, *RESCALED)  # stand-ins: kept even where one is a baseline's
    added = {k: c for k, c in configs.items() if k in chosen_later or c not in known.values()}
    # CORRECTED first (the best start on two of bench_prior's three pairs), RESCALED last
    order = sorted(added, key=lambda k: (k != CORRECTED) + (k in RESCALED))  # stable
    added = {k: added[k] for k in order}
    among = ", ".join(added) or "none: they are among them or outside the space"
    _note(f"--prior: {len(added)} starts follow the baselines ({among})")
    return configs, added


class _LateStart:
    """A --prior start chosen when SMAC reads its slot (make_optimizer's `late`), from the
    trials scored by then (`observe`; a --warm-start run's count, its inputs checked the
    same), and kept in prior.json, which a resumed run reads. `told`: functions called with
    (label, configuration) once it is chosen (the belief, the objective's unraced list)."""

    def __init__(self, session: Session, space_, told=()):
        self.session, self.space = session, space_
        self.told, self.results = list(told), list(session.inputs.warm_start)

    def observe(self, results: list[TrialResult]) -> None:
        self.results = [*self.session.inputs.warm_start, *results]

    def _keep(self, label: str, config, key: str, why, by_label: bool = False):
        """Record `config` as `label` and `why` as prior.json's `key` (`by_label`: as its
        entry for `label`), tell, and return `config`."""
        from . import space

        stored = self.session.run.read_json(rundir.PRIOR)
        stored["configs"][label] = space.plain_values(config)
        stored[key] = {**stored.get(key, {}), label: why} if by_label else why
        self.session.run.write_json(rundir.PRIOR, stored)
        for tell in self.told:
            tell(label, config)
        return config


class _Correction(_LateStart):
    """--prior's start CORRECTED: the rule corrected by the scored baselines (prior.py,
    by_baselines), chosen when SMAC reads its slot, right after the baselines (make_optimizer's
    `late`; on Dask workers, from the baselines finished by then; _LateStart), kept in
    prior.json with `corrected_by`. On Dask workers the chosen one races
    like any trial (the workers' list of whole-scored predictions is sent before it exists),
    so a stopped one cannot be the belief's centre; with more workers than baselines it is
    read before any is scored, and stays uncorrected."""

    def __init__(self, session: Session, space_, known: dict, stand_in, told=()):
        super().__init__(session, space_, told)
        self.known, self.stand_in = known, stand_in

    def __call__(self):
        from ConfigSpace import Configuration

        from . import prior, space
        from .features import ModelFeatures

        run, inputs, settings = self.session.run, self.session.inputs, self.session.settings
        names = tuple(s.name for s in inputs.sources)
        scores = _baseline_scores(self.known, self.results)
        finished = {k: r for k, r in scores.items() if r is not None}
        best = max(finished, key=lambda label: finished[label].harmonic_mean, default=None)
        tasks = finished[best].tasks if best else {}
        if any(n not in tasks or tasks[n].preservation is None for n in names):
            _note(f"--prior: no baseline scored on all of the data yet: {CORRECTED} is the rule "
                  "without its norm balance, uncorrected")  # fmt: skip
            return self._tell(self.stand_in, None)
        preservation = [tasks[n].preservation for n in names]
        features = ModelFeatures.model_validate(run.read_json(rundir.PRIOR)["features"])
        ties_lost = _ties_lost(len(names), _baseline_scores(self.known, self.results, full=False))
        sources = tuple(str(s.path) for s in inputs.sources)
        plan = prior.by_baselines(features, inputs.blocks, sources, str(inputs.base.path),
                                  settings, inputs.dtype, preservation, ties_lost)  # fmt: skip
        config = space.config_from_plan(plan, self.space, names, settings) or self.stand_in
        config = Configuration(self.space, values=space.plain_values(config))
        lowest = min(preservation)
        factors = ", ".join(f"{n} x{(lowest / p) ** prior.PRESERVATION_POWER:.2f}"
                            for n, p in zip(names, preservation) if p > 0)  # fmt: skip
        kept = ", ".join(f"{n} {p:.2f}" for n, p in zip(names, preservation))
        _note(
            f"--prior: {CORRECTED}: the best baseline ({best}) kept {kept}, so the rule's "
            f"weights are {factors} (x{prior.SCALE:g} each)"
            + ("; TIES lost to task arithmetic at the same weights: none" if ties_lost else "")
        )
        why = {"baseline": best, "preservation": dict(zip(names, preservation)),
               "ties_lost": ties_lost}  # fmt: skip
        return self._tell(config, why)

    def _tell(self, config, why):
        return self._keep(CORRECTED, config, "corrected_by", why)


def _rescale_stand_ins(configs: dict, known: dict, space_, inputs, settings) -> dict:
    """RESCALED's stand-ins (_prior_configs): the first start the prior adds that has task
    vectors to scale, x each of prior.RESCALE; none with --fidelity (whose trials are not
    scored whole) or where no start has any (TIES in every block, --weighting convex)."""
    from ConfigSpace import Configuration

    from . import prior, space

    names = tuple(s.name for s in inputs.sources)
    starts = [c for k, c in configs.items() if k != CORRECTED and c not in known.values()]
    corrected = [configs[CORRECTED]] if CORRECTED in configs else []
    for start in [] if inputs.fidelity else corrected + starts:
        values = [space.rescaled(space.plain_values(start), factor, inputs.blocks, names,
                                 settings) for factor in prior.RESCALE]  # fmt: skip
        if all(v is not None for v in values):
            return {k: Configuration(space_, values=v) for k, v in zip(RESCALED, values)}
    return {}


class _Rescale(_LateStart):
    """--prior's last two starts RESCALED, a line search on how far the task vectors go (the
    starts' least certain guess; prior.py): the best merge scored whole so far that has task
    vectors to scale (space.rescaled) x RESCALE[0] (x RESCALE[1] where that changes nothing
    or was scored), then the first step x RESCALE[0] again where it beat that best, else the
    best x RESCALE[1]. Each is chosen when SMAC reads its slot (make_optimizer's `late`), kept
    in prior.json (`rescaled`: what it scaled and why) and read back by a resumed run. A step
    with nothing left to scale keeps its stand-in. On Dask workers the steps race and are
    chosen from the trials finished by then."""

    def __init__(self, session: Session, space_, stand_ins: dict, told=()):
        super().__init__(session, space_, told)
        self.stand_ins = stand_ins

    def _scaled(self, values: dict, factor: float) -> dict | None:
        """`values` x factor, or None where that changes nothing or was scored already."""
        from . import space

        inputs = self.session.inputs
        names = tuple(s.name for s in inputs.sources)
        out = space.rescaled(values, factor, inputs.blocks, names, self.session.settings)
        return None if out is None or any(r.config == out for r in self.results) else out

    def first(self):
        from . import prior

        ranked = sorted(top_budget(self.results), key=lambda r: -r.harmonic_mean)  # whole
        for best, factor in itertools.product(ranked, prior.RESCALE):  # best first, up first
            values = self._scaled(best.config, factor)
            if values is not None:
                why = {"from": best.config, "from_H": best.harmonic_mean, "factor": factor,
                       "trial": best.trial}  # fmt: skip
                return self._tell(RESCALED[0], values, why)
        return self._tell(RESCALED[0], None, None)

    def second(self):
        from . import prior

        up, down = prior.RESCALE
        stored = self.session.run.read_json(rundir.PRIOR)
        step = stored.get("rescaled", {}).get(RESCALED[0])
        if not step:
            return self._tell(RESCALED[1], None, None)
        chosen = stored["configs"][RESCALED[0]]
        scored = [r.harmonic_mean for r in top_budget(self.results) if r.config == chosen]
        won = bool(scored) and max(scored) > step["from_H"]
        back = down if step["factor"] == up else up
        # (configuration to scale, by, how far from the best that is)
        tries = [(chosen, step["factor"], step["factor"] ** 2)] if won else []
        tries += [(step["from"], back, back)]
        for base, factor, total in tries:
            values = self._scaled(base, factor)
            if values is not None:
                why = {"from": step["from"], "from_H": step["from_H"], "factor": total,
                       "trial": step["trial"], "first_won": won}  # fmt: skip
                return self._tell(RESCALED[1], values, why)
        return self._tell(RESCALED[1], None, None)

    def _tell(self, label: str, values: dict | None, why: dict | None):
        from ConfigSpace import Configuration

        config = (
            self.stand_ins[label] if values is None else Configuration(self.space, values=values)
        )
        if why is None:
            _note(f"--prior: {label}: nothing to rescale, its stand-in is scored instead")
        else:
            after = {
                True: " (the first step won: once more)",
                False: " (the first step lost: the other way)",
            }.get(why.get("first_won"), "")
            _note(f"--prior: {label}: trial {why['trial']} (H {why['from_H']:.4f}) with its "
                  f"task vectors x{why['factor']:.4g}{after}")  # fmt: skip
        return self._keep(label, config, "rescaled", why, by_label=True)


def _baseline_scores(known: dict, results: list[TrialResult], full: bool = True) -> dict:
    """Baseline label -> its best result (`full`: on all of the data, None where racing
    stopped it, below the best so far; else racing's estimate counts too); baselines not
    finished yet are left out."""
    from . import space

    scores = {}
    for label, config in known.items():
        values = space.plain_values(config)
        found = [r for r in results if r.config == values and r.status == "ok"]
        kept = [r for r in found if not (full and r.partial)]
        if found:
            scores[label] = max(kept, key=lambda r: r.harmonic_mean) if kept else None
    return scores


def _ties_lost(sources: int, scores: dict) -> bool:
    """Whether a TIES baseline (space.BASELINES) scored below task arithmetic at the same
    weights (`scores`: label -> its best result, racing's estimate where racing stopped it)."""
    from . import space

    arith = {b.each_weight(sources): scores.get(b.label(sources)) for b in space.BASELINES
             if b.method == "task_arithmetic"}  # fmt: skip
    for row in space.BASELINES:
        ours, other = scores.get(row.label(sources)), arith.get(row.each_weight(sources))
        if row.method == "ties" and ours is not None and other is not None:
            if ours.harmonic_mean < other.harmonic_mean:
                return True
    return False


def _belief(space_, predicted: dict, known: dict, settings: SearchSettings):
    """--prior-acquisition's belief (πBO, search.Belief): centred on the predicted
    configuration, then on the best scored of it and its variants where that beat the
    baselines (`known`; the initial design ends there), else dropped; or None (said why) where
    the acquisition cannot take it."""
    from . import search, space

    if not (settings.prior and settings.prior_acquisition):
        return None
    why = None
    if settings.optimizer == "random":
        why = "random search has no acquisition"
    elif settings.fidelity:  # SMAC counts πBO's trials at the highest budget only
        why = "with --fidelity, Hyperband's budgets would keep the prior from fading"
    elif "prior" not in predicted:
        why = "the prediction is outside the searched space"
    if why:
        _note(f"--prior-acquisition is off: {why}; the prediction only starts the search")
        return None
    return search.Belief(
        space_,
        {label: space.plain_values(c) for label, c in predicted.items()},
        {label: space.plain_values(c) for label, c in known.items()},
        settings.seed,
    )


def _settled(belief) -> str:
    """Where a settled πBO belief (search.Belief) sent the search."""
    if belief.label:
        return (
            f"The best prediction ({belief.label}) beat every baseline: the search went on "
            "around it (πBO's belief, in place of the rest of the Sobol design)."
        )
    return (
        "A baseline beat every prediction: πBO's belief was dropped, and the search went on "
        "with the Sobol design and plain expected improvement."
    )


def _noting(belief):
    """belief.observe, with a note to the user the moment it settles: the search changes
    course there (a resumed run settles, and says so, again)."""

    def observe(results: list[TrialResult]) -> None:
        if not belief.settled:
            belief.observe(results)
            if belief.settled:
                _note(f"--prior: {_settled(belief)}")

    return observe


def _prior_sentence(results: list[TrialResult], prior: dict, belief=None) -> str:
    """summary.md: which trials the prior's configurations were and how they scored, and
    where πBO's belief settled (search.Belief)."""
    from . import space

    where = f" {_settled(belief)}" if belief is not None and belief.settled else ""

    wanted = {json.dumps(space.plain_values(c), sort_keys=True): k for k, c in prior.items()}
    found = [(wanted[key], t) for t in results
             if (key := json.dumps(t.config, sort_keys=True)) in wanted]  # fmt: skip
    if not found:
        return ""
    label, trial = max(found, key=lambda item: item[1].harmonic_mean)
    numbers = ", ".join(str(t.trial) for _, t in found)
    return (f" The --prior configurations were trials {numbers}; the best of them ({label}, "
            f"trial {trial.trial}) scored {trial.harmonic_mean:.4f}.{where}")  # fmt: skip


def features_text(request: MergeRequest, settings: SearchSettings, as_json: bool = False) -> str:
    """`segment --features`: the per-block similarity features of the sources, as a table
    (or JSON).

    Raises:
        AutomergeError: (a subclass) for any problem with the input; SettingsError without a
            base.
    """
    model_refs, base_ref, data = request
    if base_ref is None:
        raise SettingsError("--features needs --base: task vectors are each source minus it")
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data),
                           settings.model_copy(update={"prior": True}))  # its checks  # fmt: skip
    from .features import features_table  # torch: after the checks that need none

    features = _features(inputs, settings)
    if as_json:
        return features.model_dump_json(indent=1)
    return features_table(features, [s.name for s in inputs.sources])


def run_suggest(request: MergeRequest, settings: SearchSettings, out: Path,
                overwrite: bool = False) -> tuple[Path, str]:  # fmt: skip
    """`suggest`: the prior's predicted recipe, with no evaluation, written to `out` (a YAML
    file); returns it and the features table it came from.

    Raises:
        OutputExistsError: when `out` exists and `overwrite` is false.
        AutomergeError: (a subclass) for any problem with the input.
    """
    from .errors import OutputExistsError

    model_refs, base_ref, data = request
    if base_ref is None:
        raise SettingsError("suggest needs --base: task vectors are each source minus it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; choose another --out or pass --overwrite")
    if "task_arithmetic" not in settings.methods:
        raise SettingsError("suggest's rule merges with task_arithmetic (and ties where task "
                            "vectors interfere): keep task_arithmetic in --methods")  # fmt: skip
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data),
                           settings.model_copy(update={"prior": True}))  # fmt: skip
    from . import recipe  # mergekit and torch: after the checks that need neither
    from .features import features_table

    features, plans = predicted_plans(inputs, settings)
    plan = plans["prior"]
    out.parent.mkdir(parents=True, exist_ok=True)
    table = features_table(features, [s.name for s in inputs.sources])
    if inputs.raw_module:  # mergekit-pytorch runs: OUT and OUT-METHOD_part.yaml beside it
        texts, _ = recipe.pytorch_recipe_texts(plan, out, out.parent / "merged")
        for file, text in texts.items():
            file.write_text(text)
        return out, table
    pinned = {str(m.path): m.pinned for m in inputs.sources + [inputs.base]}
    command = recipe.reproduce_command(out, out.parent / "merged", len(plan.methods) > 1,
                                       plan.seed, False)  # fmt: skip
    out.write_text(recipe.recipe_text(plan, pinned, command))
    return out, table


def _score_baselines(
    session: Session, objective, settings: SearchSettings, trials=(), known=None, grid=False
) -> dict:
    """The baselines (with `grid` the hand grid too), scored like trials; saved as
    baselines.json. One that was a trial of the search (`known`: label -> configuration, all
    of the data scored) is taken from that trial, with its number, not scored again; one that
    racing stopped keeps its estimate, marked partial. Returns label -> its TrialResult."""
    from . import report, space

    by_config = {}
    for trial in trials:
        if trial.budget is None:
            by_config.setdefault(json.dumps(trial.config, sort_keys=True), trial)
    done = {}
    for label, config in (known or {}).items():
        trial = by_config.get(json.dumps(space.plain_values(config), sort_keys=True))
        if trial is not None:
            done[label] = trial
    results = {
        label: done.get(label) or objective.evaluate_plan(plan, -1, {"baseline": label}, race=False)
        for label, plan in _baseline_plans(session.inputs, settings, grid).items()
    }
    session.run.write_json(
        rundir.BASELINES,
        {
            label: report.scored_json(r.tasks, r.harmonic_mean)
            | ({"trial": r.trial} if label in done else {})
            | ({"partial": True, "computed_tokens": r.computed_tokens} if r.partial else {})
            for label, r in results.items()
        },
    )
    if session.inputs.evals:
        evals = {f"baseline: {label}": r.evals for label, r in results.items() if not r.partial}
        session.run.add_evals(evals)
    return results


# A baseline's label in summary.md when racing stopped it: its scores are on the examples it saw.
STOPPED = " (stopped early by racing: an estimate)"


def run_baselines(
    request: MergeRequest,
    settings: SearchSettings,
    out: Path,
    overwrite: bool = False,
    grid: bool = False,
) -> tuple[Path, str]:
    """Score the baselines (with `grid`, the hand grid too) at their fixed settings; return the
    run directory and the table."""
    from . import report

    session = open_session(request, settings, out.resolve(), overwrite, command="baselines")
    try:
        scored = _score_baselines(session, session.objective(), settings, grid=grid)
        rows = {label: (r.tasks, r.harmonic_mean) for label, r in scored.items()}
        rows |= {f"{name} alone": scored for name, scored in session.sources_scored.items()}
        table = report.score_table(rows)
        session.run.write_text(rundir.BASELINES_TABLE, table + "\n")
    finally:
        session.run.release()
    return session.run.path, table


def run_search(
    request: MergeRequest,
    settings: SearchSettings,
    out: Path,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Check every input, then search, write the recipe and build the model with mergekit.

    With `resume`, `out` is an interrupted run: its finished trials are replayed, not run
    again, and the search goes on to `settings.trials` (see `resume_arguments`).

    Returns:
        The run directory.

    Raises:
        AutomergeError: (a subclass) for any problem with the input, before `out` is touched.
    """
    started = time.perf_counter()
    # Recipes and rebuild commands must not depend on the working directory.
    session = open_session(request, settings, out.resolve(), overwrite, resume,
                           "search --resume" if resume else "search")  # fmt: skip
    try:
        return _search(session, progress, resume, started)
    finally:
        session.run.release()


def _search(session: Session, progress: bool, resume: bool, started: float) -> Path:
    """The search of `run_search` in an open session; returns the run directory."""
    from . import evaluate, plugins, report, search, space

    run, inputs, engine, settings = session.run, session.inputs, session.engine, session.settings
    sources_scored = session.sources_scored

    names = tuple(s.name for s in inputs.sources)
    to_plan = _to_plan(inputs, settings)
    space_ = space.build_space(inputs.blocks, names, settings)
    known = _known_configs(inputs, settings, space_)
    predicted, prior = _prior_configs(session, space_, known) if settings.prior else ({}, {})
    belief = _belief(space_, predicted, known, settings)
    first = {**known, **prior}  # the baselines, then the prior's configurations
    # The baselines race like any trial (scripts/results/racing.md: a third fewer tokens, no
    # stop that mattered); the prior's predictions are scored whole, as bench_prior measured.
    objective = session.objective(to_plan, tuple(space.plain_values(c) for c in prior.values()))
    late, observers = {}, [_noting(belief)] if belief else []

    def chosen(label, config) -> None:  # a late start (_LateStart): serial, it is scored whole
        prior[label] = config
        objective.unraced.append(space.plain_values(config))
        if belief:
            belief.place(label, space.plain_values(config))

    stored = run.read_json(rundir.PRIOR) if prior else {}  # what a resumed run chose already
    if CORRECTED in prior and "corrected_by" not in stored:
        correction = _Correction(session, space_, known, prior[CORRECTED], [chosen])
        late, observers = {len(known): correction}, [correction.observe, *observers]
    chosen_steps = stored.get("rescaled", {})
    if all(label in prior for label in RESCALED) and RESCALED[1] not in chosen_steps:
        rescale = _Rescale(session, space_, {k: prior[k] for k in RESCALED}, [chosen])
        slots = {label: len(known) + list(prior).index(label) for label in RESCALED}
        late |= {slots[label]: get for label, get in zip(RESCALED, (rescale.first, rescale.second))
                 if label not in chosen_steps}  # fmt: skip
        observers = [rescale.observe, *observers]
    optimizer = search.make_optimizer(
        space_,
        settings.trials,
        settings.initial,
        settings.seed,
        run.path / ".smac",
        settings.optimizer,
        inputs.fidelity,
        tuple(first.values()),
        names if settings.objective == "pareto" else (),
        belief,
        late,
    )
    search.warm_start(optimizer, space_, inputs.warm_start, inputs.fidelity)
    finished = run.trials() if resume else []

    def observe(results: list[TrialResult]) -> None:
        for seen in observers:
            seen(results)

    if settings.workers > 1 or settings.scheduler:
        predictions = [space.plain_values(c) for c in prior.values()]
        results = _parallel_search(optimizer, session, progress, finished, predictions, observe)
    else:
        runner = search.SerialRunner(objective)
        results = search.run_search(optimizer, runner, settings.trials, run.append_trial,
                                    progress, finished, _full_tokens(session), observe)  # fmt: skip
    results = search.reevaluate_best(
        results, objective, inputs.fidelity, run.append_trial, finished
    )
    if inputs.fidelity:
        for budget in {r.budget for r in results if r.budget is not None}:
            objective.at_budget(budget)  # scored here already, unless trials ran elsewhere
        _write_budgets(run, objective, inputs.fidelity)
    best = best_trial(results)
    if best is None:
        raise NoSuccessfulTrialError(
            f"all {len(results)} trials failed (their errors are in {run.path / 'trials.jsonl'}): "
            "the sources are finite, so the merges overflowed (NaN/inf losses) or the kernels "
            "failed; try --dtype float32, or narrow --methods / --weight-range"
        )
    plan = to_plan(best.config)
    run.write_json(rundir.BEST, best.model_dump(mode="json") | {"recipe": rundir.RECIPE})
    command = _write_and_build(run, inputs, settings, plan)
    # Scored in the live model's dtype, so the only difference to the trial could be the merge.
    built = _built_model(run, engine.eval_dtype, engine.device, settings.trust_remote_code)
    final = objective.score(built)
    run.write_json(rundir.FINAL, report.scored_json(*final))
    if inputs.evals:
        built_evals = plugins.run_evals(inputs.evals, built, inputs.tokenizer)
        evals = {"search (best trial)": best.evals, "model/ (stock mergekit)": built_evals}
        run.add_evals(evals)
    baselines = _score_baselines(session, objective, settings, results, known)
    table = {
        "search (best trial)": (best.tasks, best.harmonic_mean),
        "model/ (stock mergekit)": final,
        **{
            f"baseline: {label}{STOPPED if r.partial else ''}": (r.tasks, r.harmonic_mean)
            for label, r in baselines.items()
        },  # fmt: skip
        **sources_scored,
    }
    references = {f"{name} alone": scored[1] for name, scored in sources_scored.items()}
    # Compared: the baselines scored on every example (a warm start's incumbent may stop all).
    full = {label: r.harmonic_mean for label, r in baselines.items() if not r.partial}
    if full:
        label = max(full, key=full.get)
        references[f"best baseline ({label})"] = full[label]
    with writing(run.path / rundir.PROGRESS):
        report.progress_plot(results, run.path / rundir.PROGRESS, references)
    summary = report.summary_markdown(
        f"automerge-mk: {' + '.join(names)}",
        best,
        results,
        table,
        plan,
        command,
        time.perf_counter() - started,
        run.read_json(rundir.EVALS) if inputs.evals else None,
        report.baseline_margin(best, full, list(known), len(baselines) - len(full))  # fmt: skip
        + _prior_sentence(results, prior, belief),
        evaluate.error_free_references(session.references, inputs.tasks),
    )
    if settings.objective == "pareto":  # the front is what such a search is for
        front = _front_body(run.path, run.path / rundir.FRONT_PLOT)
        summary += f"\n## Trade-offs between tasks (--objective pareto)\n\n{front}\n\n" \
            f"Choose a point of it: `automerge-mk pick {run.path} --trial N`.\n"  # fmt: skip
    run.write_text(rundir.SUMMARY, summary)
    return run.path


def _parallel_search(optimizer, session: Session, progress: bool, finished, prior: list,
                     observe=None):  # fmt: skip
    """Trials on Dask workers (--workers / --scheduler), each with its own resident sources."""
    from .search import parallel, run_search

    inputs, settings = session.inputs, session.settings
    names = tuple(s.name for s in inputs.sources)
    target = parallel.WorkerTrial(
        worker_objective,
        [str(s.path) for s in inputs.sources],
        str(inputs.base.path) if inputs.base else None,
        {k: str(v) for k, v in inputs.files.items()},
        # A warm start is told to SMAC in this process; workers only run trials.
        # So is the prior (`prior`, predicted here): workers need no --prior-from runs.
        settings.model_copy(update={"warm_start": None, "prior_from": ()}).model_dump(mode="json"),
        prior,
        objectives=names if settings.objective == "pareto" else (),
    )
    with parallel.dask_client(settings.workers, settings.scheduler, settings.device) as client:
        runner = parallel.DaskRunner(optimizer, target, client)
        return run_search(optimizer, runner, settings.trials, session.run.append_trial,
                          progress, finished, _full_tokens(session), observe)  # fmt: skip


def _full_tokens(session: Session) -> int | None:
    """Forward positions of one trial on all of the data, when trials may compute fewer."""
    if (session.settings.racing and not session.inputs.classifies) or session.inputs.fidelity:
        return sum(task.computed_tokens for task in session.inputs.tasks)
    return None


def _write_budgets(run: RunDir, objective, fidelity: Fidelity) -> None:
    """budgets.json: the Hyperband budgets, and per budget used the examples and tokens of each
    task's subset and its specialist's reference loss on them."""
    levels = {
        str(budget): {
            task.name: {
                "examples": len(task.sequences),
                "computed_tokens": task.computed_tokens,
                "reference_loss": references[task.name].loss,
            }
            for task in tasks
        }
        for budget, (tasks, references) in sorted(objective.levels.items())
    }
    run.write_json(rundir.BUDGETS, {**fidelity._asdict(), "eta": fidelity.ETA, "levels": levels})


def run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md with its plots into `out` (default RUN_DIR), from whatever the run has
    finished so far.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory or has no successful trial.
    """
    from . import report, space

    run, out = RunDir(run_dir), out or run_dir
    stored = RunRecord.read(run_dir)
    if not (run_dir / rundir.SOURCES).is_file():
        raise RunDirectoryError(f"{run_dir} has no sources.json yet: the search has not started")
    sources = run.read_json(rundir.SOURCES)
    trials = run.trials()
    ok = [t for t in trials if t.status == "ok"]
    best = published_trial(run, trials)
    if best is None:
        raise RunDirectoryError(f"{run_dir} has no successful trial yet")
    picked = best.trial != best_trial(trials).trial
    settings, names, plan = (
        stored.settings,
        stored.names,
        space.plan_from_record(stored, best.config),
    )
    label = f"picked trial ({best.trial})" if picked else f"best trial ({best.trial})"
    rows = {label: report.scored_json(best.tasks, best.harmonic_mean)}
    if (run_dir / rundir.BASELINES).is_file():
        full = {k: v for k, v in run.read_json(rundir.BASELINES).items() if not v.get("partial")}
        if full:
            label, scored = max(full.items(), key=lambda item: item[1]["harmonic_mean"])
            rows[f"best baseline ({label})"] = scored
    rows |= {f"{name} alone": scored for name, scored in sources.items()}
    with writing(out):
        report.search_progress_plot(trials, out / rundir.REPORT_PROGRESS)
        report.task_plot(rows, out / rundir.REPORT_TASKS)
        report.plan_heatmap(plan, names, out / rundir.REPORT_BLOCKS)
    front = _front_body(run_dir, out / rundir.REPORT_FRONT)
    failed = len(trials) - len(ok)
    tokens = sum(report.computed_tokens(t) for t in trials)
    budgets = sorted({t.budget for t in trials if t.budget is not None})
    fidelity = (
        f" Multi-fidelity: trials at {', '.join(map(str, budgets))} validation tokens per task; "
        "the best is taken from the highest budget only."
        if budgets else ""
    )  # fmt: skip
    text = "\n\n".join([
        f"# automerge-mk report: {' + '.join(names)}",
        f"{len(trials)} of {settings.trials} trials finished ({failed} failed); "
        f"{'picked' if picked else 'best'} trial {best.trial}, harmonic-mean AP "
        f"{best.harmonic_mean:.4f}. {tokens:,} validation "
        f"tokens evaluated (forward-pass positions).{fidelity} {report.tokens_sentence(trials)}",
        "## Search progress\n\n![best so far vs trial and vs tokens](report-progress.png)",
        "## Per task: AP and PR\n\nPR is from each task's metric ("
        + ", ".join(f"{n}: {s.rate_metric}" for n, s in best.tasks.items())
        + ").\n\n![AP and PR per task](report-tasks.png)",
        "## The best configuration per block\n\n![method, weights and densities per block]"
        "(report-blocks.png)\n\n" + report.plan_table(plan),
        "## Top trials\n\n" + report.top_trials_table(trials),
        "## Trade-offs between tasks\n\n" + front,
    ])  # fmt: skip
    return RunDir(out).write_text(rundir.REPORT, text + "\n")


def published_trial(run: RunDir, trials: list[TrialResult]) -> TrialResult | None:
    """The trial a run's model is built from: the one `pick` chose (best.json), else the best."""
    if (run.path / rundir.BEST).is_file() and "picked_from" in (best := run.read_json(rundir.BEST)):
        return next((t for t in trials if t.trial == best["trial"]), None)
    return best_trial(trials)


def _front_points(run_dir: Path):
    """A run, its tasks, trials, full-evaluation trials, front and each source's AP point."""
    from . import front

    run, stored = RunDir(run_dir), RunRecord.read(run_dir)
    tasks, trials = list(stored.names), run.trials()
    pool = front.candidates(trials, tasks)
    if not pool:
        raise RunDirectoryError(
            f"{run_dir} has no trial evaluated on all of the validation data yet; wait for the "
            "search's first trials (the baselines come first)"
        )
    sources = run.read_json(rundir.SOURCES) if (run_dir / rundir.SOURCES).is_file() else {}
    points = {n: front.task_point(s["tasks"], tasks) for n, s in sources.items()}
    return run, tasks, trials, pool, front.pareto_front(trials, tasks), points


def _front_body(run_dir: Path, plot: Path) -> str:
    """The front of a run as markdown (a sentence with its hypervolume, the table) with its
    plot drawn at `plot`."""
    from . import front, report

    run, tasks, trials, pool, points, sources = _front_points(run_dir)
    at = {t.trial: front.task_point(t.tasks, tasks) for t in pool}
    best, published = best_trial(trials), published_trial(run, trials)
    marks = {best.trial: "H pick (the search's result)"}
    marked = {f"H pick (trial {best.trial})": at[best.trial]}
    if published and published.trial != best.trial:
        marks[published.trial] = "picked: this run's model"
        marked[f"picked (trial {published.trial})"] = at[published.trial]
    groups = {f"{n} alone": [p] for n, p in sources.items() if p}
    baselines = run.read_json(rundir.BASELINES) if (run_dir / rundir.BASELINES).is_file() else {}
    scored = [front.task_point(b["tasks"], tasks) for b in baselines.values()
              if b.get("tasks") and not b.get("partial")]  # fmt: skip
    shown = {"trials": list(at.values()), "baselines": [p for p in scored if p], **groups}
    with writing(plot):
        report.front_plot(shown, [at[t.trial] for t in points], marked, tasks, plot)
    left = len(trials) - len(pool)
    left_out = f" ({left} failed, stopped early by racing or at a lower budget)" if left else ""
    scored = "all of the validation data"
    if pool[0].budget is not None:  # a multi-fidelity search with no full evaluation yet
        scored = f"its highest budget so far ({pool[0].budget} tokens per task)"
    volume = ""
    if len(groups) == len(tasks):  # every source scored: their point is the reference
        reference = front.nadir([p for (p,) in groups.values()])
        corner = ", ".join(f"AP {t} {v:.3f}" for t, v in zip(tasks, reference))
        hv = front.hypervolume([at[t.trial] for t in points], reference)
        volume = (f" Hypervolume over the sources' point ({corner}: per task, the least a "
                  f"source alone keeps of it): **{hv:.4f}**.")  # fmt: skip
    return "\n\n".join([
        f"{len(pool)} of {len(trials)} trials were scored on {scored}"
        f"{left_out}; **{len(points)}** of them {'is' if len(points) == 1 else 'are'} on the "
        "Pareto front: no other trial keeps as much of every task and more of one."
        f"{volume}",
        report.front_table(points, tasks, marks),
        f"![AP per task: every trial, the Pareto front, the sources, the picks]({plot.name})",
    ])  # fmt: skip


def run_front(run_dir: Path, out: Path | None = None) -> Path:
    """Write front.md and front.png into `out` (default RUN_DIR): the Pareto front of the
    run's trials over AP per task, from whatever the search has finished so far (it may still
    be running, or interrupted), with its hypervolume over the sources' point.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory or has no trial evaluated on
            all of the data.
    """
    out = out or run_dir
    body = _front_body(run_dir, out / rundir.FRONT_PLOT)
    text = "\n\n".join([
        f"# Trade-offs between tasks: {' + '.join(RunRecord.read(run_dir).names)}",
        body,
        f"Choose another point: `automerge-mk pick {run_dir} --trial N`, or "
        "`--prefer TASK=WEIGHT` for the front's point with the highest weighted harmonic mean "
        "of AP. It writes that point's recipe, builds it with stock mergekit and scores it, "
        "ready for `automerge-mk push`.",
    ])  # fmt: skip
    return RunDir(out).write_text(rundir.FRONT, text + "\n")


def _chosen_trial(run_dir: Path, trial: int | None, prefer: tuple[str, ...]):
    """The trial `pick` rebuilds (`trial`, or the front's best under `prefer`'s weights),
    whether it is on the front, and how many trials the run has."""
    from . import front

    _, tasks, trials, pool, points, _ = _front_points(run_dir)
    on_front = {t.trial for t in points}
    if trial is None:
        chosen = front.preferred(points, tasks, front.parse_preferences(prefer, tasks))
        return chosen, True, len(trials)
    chosen = next((t for t in pool if t.trial == trial), None)
    if chosen is None:
        why = "it failed, was stopped early by racing or was scored on fewer tokens"
        if trial not in {t.trial for t in trials}:
            why = "it has no such trial"
        raise SettingsError(
            f"--trial {trial}: {why}; pick one scored on all of the data "
            f"(`automerge-mk front {run_dir}` lists the front)"
        )
    return chosen, chosen.trial in on_front, len(trials)


def _write_and_build(run: RunDir, inputs: Inputs, settings: SearchSettings, plan) -> str:
    """Write recipe.yaml for `plan` and build model/ from it with stock mergekit; returns the
    command that rebuilds it."""
    from . import recipe

    if inputs.raw_module:
        return _write_and_build_module(run, inputs, settings, plan)
    pinned = {str(m.path): m.pinned for m in inputs.sources + [inputs.base] if m}
    command = recipe.reproduce_command(
        run.path / rundir.RECIPE, run.path / rundir.MODEL, len(plan.methods) > 1, plan.seed,
        bool(inputs.adapters),
    )  # fmt: skip
    recipe_file = run.write_text(rundir.RECIPE, recipe.recipe_text(plan, pinned, command))
    code = inputs.reference_model if settings.trust_remote_code else None
    recipe.build_with_mergekit(recipe_file, run.path / rundir.MODEL, plan.seed, settings.device,
                               code)  # fmt: skip
    return command


def _write_and_build_module(run: RunDir, inputs: Inputs, settings: SearchSettings, plan) -> str:
    """`_write_and_build` for raw PyTorch models: recipe.yaml and one recipe-METHOD_part.yaml
    per method of a mixed plan, built with stock mergekit-pytorch."""
    from . import recipe

    target, model = run.path / rundir.RECIPE, run.path / rundir.MODEL
    for stale in run.path.glob(f"{target.stem}-*{recipe.PART_SUFFIX}{target.suffix}"):
        stale.unlink()  # a stage of an earlier plan (a resumed or re-picked run)
    texts, command = recipe.pytorch_recipe_texts(plan, target, model)
    for file, text in texts.items():
        run.write_text(file.name, text)
    recipe.build_with_mergekit_pytorch(target, model, plan.seed, settings.device,
                                       inputs.reference_model)  # fmt: skip
    return command


def _built_model(run: RunDir, dtype, device: str, trust: bool):
    """model/ loaded in the live model's dtype, on `device`."""
    from . import kinds

    model = run.path / rundir.MODEL
    return kinds.kind_of(model).load(model, dtype, device, trust)


def run_pick(
    run_dir: Path,
    trial: int | None = None,
    prefer: tuple[str, ...] = (),
    out: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Rebuild one point of a run's front as a run of its own, ready for `push`: its recipe,
    the model built by stock mergekit, scored like a search's final model (final.json, in the
    run's evaluation dtype), and a summary. `out` defaults to RUN_DIR-trial-N beside the run,
    which is not changed (it may still be searching).

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory or has no full trial.
        SettingsError: for a trial that cannot be picked or a bad `prefer`.
        OutputExistsError: when `out` holds something and `overwrite` is false.
    """
    from . import evaluate, plugins, report, space
    from .engine import eval_dtype, resolve_device

    run_dir = run_dir.resolve()
    chosen, on_front, finished_trials = _chosen_trial(run_dir, trial, prefer)
    out = (out or run_dir.parent / f"{run_dir.name}-trial-{chosen.trial}").resolve()
    if out == run_dir:
        raise SettingsError(f"--out {out} is the run itself; a pick goes into a new folder")
    RunDir.check_free(out, overwrite)
    source, stored = RunDir(run_dir), RunRecord.read(run_dir)
    if not (run_dir / rundir.SOURCES).is_file():
        raise RunDirectoryError(f"{run_dir} has no sources.json: its search has not started")
    (model_refs, base_ref, data), settings = resume_arguments(run_dir)
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data), settings)
    if stored.fingerprints:
        check_unchanged(stored.fingerprints, inputs.fingerprints, run_dir, "pick")
    _check_space(inputs, out, overwrite)
    picked = RunDir.create(out, overwrite, _protected(inputs, settings) + [run_dir], "pick")
    try:
        picked.copy_from(source, rundir.PICKED_FROM_RUN)
        # A finished run of the trials it has (a pick of a running search is not resumed).
        settings = settings.model_copy(update={"trials": finished_trials})
        picked.write_record(stored.model_copy(update={"settings": settings}))
        origin = {"recipe": rundir.RECIPE, "picked_from": str(run_dir), "prefer": list(prefer),
                  "on_front": on_front}  # fmt: skip
        picked.write_json(rundir.BEST, chosen.model_dump(mode="json") | origin)
        plan = space.plan_from_record(stored, chosen.config)
        command = _write_and_build(picked, inputs, settings, plan)
        recorded = picked.read_json(rundir.MEMORY) if (out / rundir.MEMORY).is_file() else {}
        dtype = eval_dtype(recorded.get("eval_dtype", settings.eval_dtype), settings.device)
        built = _built_model(picked, dtype, resolve_device(settings.device),
                             settings.trust_remote_code)  # fmt: skip
        sources = picked.read_json(rundir.SOURCES)
        references = {t.name: TaskScore(**sources[t.name]["tasks"][t.name]) for t in inputs.tasks}
        scores = evaluate.score_model(built, inputs.tasks, inputs.metrics, inputs.tokenizer)
        final = evaluate.with_preservation(scores, references, inputs.metrics)
        picked.write_json(rundir.FINAL, report.scored_json(*final))
        if inputs.evals:
            built_evals = plugins.run_evals(inputs.evals, built, inputs.tokenizer)
            picked.add_evals({"search (best trial)": chosen.evals,
                              "model/ (stock mergekit)": built_evals})  # fmt: skip
        best = best_trial(picked.trials())
        table = {
            f"picked: trial {chosen.trial} (search time)": (chosen.tasks, chosen.harmonic_mean),
            "model/ (stock mergekit)": final,
            f"H pick: trial {best.trial}": (best.tasks, best.harmonic_mean),
            **{f"{n} alone": report.scored_from_json(v, sources) for n, v in sources.items()},
        }
        why = f"preferring {', '.join(prefer)}" if trial is None else "chosen by number"
        summary = "\n\n".join([
            f"# automerge-mk pick: trial {chosen.trial} of {run_dir.name}",
            f"{'A point of the Pareto front' if on_front else 'A trial (off the Pareto front)'}"
            f" of {run_dir} ({why}), rebuilt by stock mergekit and scored again on every "
            f"example in one pass; the search's harmonic-mean pick is trial {best.trial}.",
            "## Scores\n\n" + report.score_table(table),
            "## Recipe\n\n" + report.plan_table(plan),
            f"Rebuild with plain mergekit:\n\n```\n{command}\n```",
        ])  # fmt: skip
        picked.write_text(rundir.SUMMARY, summary + "\n")
    finally:
        picked.release()
    return out


def resume_arguments(run_dir: Path) -> tuple[MergeRequest, SearchSettings]:
    """What a run merges (models pinned) and its settings, as `run_search` takes them.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory.
    """

    stored = RunRecord.read(run_dir)
    base = stored.base.pinned if stored.base else None
    return MergeRequest([m.pinned for m in stored.models], base, stored.data), stored.settings


def run_tasks(run_dir: Path) -> tuple[list[TaskData], dict[str, TaskScore]]:
    """A run's validation tasks, tokenised as its trials saw them, and each task's reference
    (its specialist's scores, from sources.json); no weights are loaded.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory or has no sources.json yet.
    """
    (model_refs, base_ref, data), settings = resume_arguments(run_dir)
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data), settings)
    if not (run_dir / rundir.SOURCES).is_file():
        raise RunDirectoryError(f"{run_dir} has no sources.json yet: the search has not started")
    sources = RunDir(run_dir).read_json(rundir.SOURCES)
    references = {t.name: TaskScore(**sources[t.name]["tasks"][t.name]) for t in inputs.tasks}
    return inputs.tasks, references


def finished(run_dir: Path, settings: SearchSettings) -> bool:
    """Whether a run has all its trials, its model and its summary (written last)."""

    done = (run_dir / rundir.SUMMARY).is_file() and (
        run_dir / rundir.MODEL / "config.json"
    ).is_file()
    return done and len(RunDir(run_dir).trials()) >= settings.trials


def publish_run(run: Path, repo: str, private: bool = False, branch: str | None = None) -> str:
    """Publish a finished run to the Hub repo `repo` in one commit; returns the commit URL.

    Raises:
        RunInUseError: when a search is still writing the run.
        RunDirectoryError: when the run has no built model.
        PublishError: when the Hub refuses or cannot be reached (nothing local changed).
    """
    import tempfile

    from .publish import publish

    RunLock.check_free(run)  # a search still writing it would publish half a run
    # The card shows the report's plots; they are drawn aside, so the run stays as it was.
    with tempfile.TemporaryDirectory() as plots:
        run_report(run, Path(plots))
        return publish(run, repo, private=private, branch=branch, plots=Path(plots))


def segment_text(
    model: str,
    strategy: str = "layers:4",
    as_json: bool = False,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
) -> str:
    """The blocks a model (folder or Hub id, or a raw PyTorch model's folder) is split into:
    a table with totals, or JSON."""
    from .modules import is_module_folder
    from .segment import blocks_to_json, segment_model
    from .sources import resolve_model

    raw = is_module_folder(Path(model).expanduser())
    resolved = None if raw else resolve_model(model, trust_remote_code, allow_pickle_weights)
    folder = Path(model).expanduser().resolve() if raw else resolved.model_folder
    blocks = segment_model(folder, strategy, trust_remote_code)
    if as_json:
        return blocks_to_json(blocks)
    lines = _blocks_table(blocks)
    if raw:
        return "\n".join(lines + [_module_trace_line(folder, trust_remote_code)])
    from .vocab import read_vocabulary

    lines.append(read_vocabulary(resolved.name, folder, trust_remote_code).summary())
    if resolved.adapter_of:
        lines.append(f"adapter: {resolved.name} (PEFT) applied to {resolved.adapter_of.name}; "
                     f"merges read it as {resolved.pinned}")  # fmt: skip
    return "\n".join(lines)


def _module_trace_line(folder: Path, trust_remote_code: bool) -> str:
    """`segment` of a raw PyTorch model: the trace it was split on, unit by unit."""
    from .segment import module_trace

    def shown(signature) -> str:
        if signature is None:
            return "not reached"
        rank, rest = signature
        return f"{rank}-D {tuple(rest)}"

    trace = module_trace(folder, trust_remote_code)
    return "trace (output rank and shape past the batch and first axes): " + " → ".join(
        f"{path} {shown(signature)}" for path, signature in trace
    )


def _blocks_table(blocks) -> list[str]:
    """`segment`'s table of blocks and its totals line."""
    from .segment import describe_blocks

    rows = describe_blocks(blocks)
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    lines += ["  ".join(row[k].ljust(w) for k, w in widths.items()) for row in rows]
    tensors, total = sum(len(b.tensors) for b in blocks), sum(b.parameters for b in blocks)
    lines.append(f"{len(blocks)} blocks, {tensors} tensors, {total:,} parameters")
    return lines
