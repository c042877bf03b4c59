"""The command line: the only module that wires the stages together."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .errors import (
    AutomergeError,
    DataError,
    ModelReferenceError,
    NonFiniteError,
    NoSuccessfulTrialError,
    RunDirectoryError,
    SettingsError,
    StorageError,
)
from .methods import METHODS_HELP
from .types import (
    METRIC_HELP,
    STRATEGY_HELP,
    Block,
    SearchSettings,
    SourceModel,
    TaskScore,
    TrialResult,
    best_trial,
)

if TYPE_CHECKING:  # these import torch; --help should not wait for it
    from transformers import PreTrainedTokenizerBase

    from .engine import MergeEngine
    from .evaluate import Metric, TaskData
    from .rundir import Fingerprints, RunDir
    from .search import Fidelity


def _range(text: str, label: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{label} must be MIN:MAX, e.g. 0.1:1.0, not {text!r}") from None
    return low, high


FIDELITY_HELP = (
    "Multi-fidelity search, tokens[:MIN:MAX]: SMAC's Hyperband (eta 3) evaluates most "
    "configurations on a seeded subset of MIN..MAX validation tokens per task (forward-pass "
    "positions) and only the best on more; each budget's AP is relative to the specialists' "
    "loss on the same examples. --trials counts evaluations at any budget. The result is the "
    "best at the highest budget, evaluated once more on all tokens when MAX is below them. "
    "Default MAX: all of the largest task's tokens; MIN: MAX/9."
)


def _fidelity(text: str | None) -> tuple[int | None, int | None] | None:
    if text is None:
        return None
    kind, *bounds = text.split(":")
    try:
        if kind != "tokens" or len(bounds) > 2:
            raise ValueError
        low, high = [int(b) if b else None for b in bounds] + [None] * (2 - len(bounds))
    except ValueError:
        raise click.BadParameter(
            f"--fidelity takes tokens or tokens:MIN:MAX (token counts per task), not {text!r}"
        ) from None
    return low, high


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"{option} takes NAME=VALUE, not {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_value(text: str):
    """A --set / --eval-arg value as safe YAML: numbers, booleans, strings, lists."""
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise click.BadParameter(f"{text!r} is not a plain YAML value ({error})") from None


def _model_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


@dataclass(frozen=True)
class _Inputs:
    """Everything `search` needs, checked before anything is loaded or written."""

    sources: list[SourceModel]
    base: SourceModel | None
    files: dict[str, Path]
    tasks: list[TaskData]  # one per source, in source order
    blocks: tuple[Block, ...]
    dtype: str
    metrics: tuple[Metric, ...]
    tokenizer: PreTrainedTokenizerBase
    fingerprints: Fingerprints
    warm_start: tuple[TrialResult, ...] = ()
    fidelity: Fidelity | None = None
    evals: tuple = ()  # evaluation plug-ins (plugins.LmEval)

    @property
    def reference_model(self) -> Path:
        return (self.base or self.sources[0]).path


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
) -> _Inputs:
    """Resolve and check models, data, methods and parameters; tokenise the data; segment.

    `files` and `data_sha` are what `_check_paths` found, by source name.
    """
    from transformers import AutoTokenizer

    from . import evaluate, methods, plugins, segment, sources
    from .engine import check_device, check_dtype
    from .rundir import DataPrint, Fingerprints, model_print
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
    sources = [resolve(ref) for ref in model_refs]
    base = resolve(base_ref) if base_ref else None
    rows = {name: evaluate.load_rows(path, settings.text_column) for name, path in files.items()}
    reference_model = (base or sources[0]).path
    segment.check_compatible([s.path for s in sources] + ([base.path] if base else []))
    dtype = settings.dtype or _model_dtype(reference_model)
    check_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(reference_model), trust_remote_code=trust)
    except Exception as error:
        raise ModelReferenceError(
            f"cannot load a tokenizer from {reference_model}: {error}"
        ) from None
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
    unlabelled = [t.name for t in tasks if not t.labels]
    if unlabelled and any(m.name == "label_accuracy" for m in metrics):
        raise DataError(
            f"--metric label_accuracy needs prompt/label data with at most "
            f"{evaluate.MAX_LABELS} labels; {', '.join(unlabelled)} has plain texts or "
            "free-form answers"
        )
    fidelity = Fidelity.resolve(settings.fidelity, tasks)
    blocks = segment.segment_model(reference_model, settings.strategy, trust)  # meta: cheap
    prints = Fingerprints(
        models={s.name: model_print(s) for s in sources},
        base=model_print(base) if base else None,
        data={n: DataPrint(path=str(files[n]), sha256=data_sha[n]) for n in files},
    )
    warm = _warm_start_trials(settings, blocks, tuple(s.name for s in sources), prints)
    return _Inputs(sources, base, files, tasks, blocks, dtype, metrics, tokenizer, prints, warm,
                   fidelity, evals)  # fmt: skip


def _warm_start_trials(
    settings: SearchSettings,
    blocks: tuple[Block, ...],
    names: tuple[str, ...],
    prints: Fingerprints,
) -> tuple[TrialResult, ...]:
    """The finished trials of `--warm-start RUN_DIR`, once its space is checked to be ours and
    its inputs the same as ours (runs from before fingerprints cannot be checked)."""
    from . import search, space
    from .rundir import RunDir, RunRecord, check_unchanged

    if not settings.warm_start:
        return ()
    folder = Path(settings.warm_start)
    stored = RunRecord.read(folder)
    earlier = space.build_space(stored.blocks, stored.names, stored.settings)
    search.check_same_space(earlier, space.build_space(blocks, names, settings), str(folder))
    if stored.fingerprints:
        check_unchanged(stored.fingerprints, prints, folder, "warm-start from")
    else:
        _note(f"{folder} is from before input fingerprints: its models and data are taken to "
              "be the ones given here")  # fmt: skip
    return tuple(RunDir(folder).trials())


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
class _Session:
    """A run directory with resident sources and the specialists' reference scores."""

    run: RunDir
    inputs: _Inputs
    settings: SearchSettings
    engine: MergeEngine
    references: dict[str, TaskScore]  # each task under its own specialist
    sources_scored: dict[str, tuple]

    def objective(self, to_plan=None):
        """The target function on this session's engine, data, references and metrics."""
        from .search import MergeObjective

        inputs = self.inputs
        specialists = {source.name: source.path for source in inputs.sources}
        return MergeObjective(
            self.engine, inputs.tasks, self.references, to_plan, inputs.metrics,
            inputs.tokenizer, specialists, self.settings.seed, inputs.evals,
        )  # fmt: skip


def _check_space(inputs: _Inputs, out: Path, replacing: bool) -> None:
    """Refuse to start when `out` cannot hold the merged model (one source's weights in the
    merge dtype, plus a margin for the run's files), instead of failing at the end."""
    from .rundir import check_space
    from .weights import model_bytes

    model = model_bytes(inputs.reference_model, _model_dtype(inputs.reference_model), inputs.dtype)
    freed = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if replacing else 0
    # The build writes model.partial beside an earlier model/ and replaces it at the end.
    check_space(out, needed=model + 64 * 2**20, freed=freed)


def _load_sources(inputs: _Inputs, settings: SearchSettings):
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
        cache_order=settings.cache_order,
        eval_dtype=eval_dtype(settings.eval_dtype, settings.device),
        trust_remote_code=settings.trust_remote_code,
    )
    _check_finite_weights(engine, inputs)
    raw = {
        s.name: evaluate.score_model(
            engine.load_source(s.path), inputs.tasks, inputs.metrics, inputs.tokenizer
        )
        for s in inputs.sources
    }
    for source in inputs.sources:
        loss = raw[source.name][source.name].loss
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"{source.name} ({source.path}) has loss {loss} on its own task {source.name} "
                f"although its weights are finite: the reference of AP cannot be {loss}; try "
                "--eval-dtype float32 (float16 overflows) or check its data"
            )
    return engine, raw


def _check_finite_weights(engine: MergeEngine, inputs: _Inputs) -> None:
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


def _to_plan(inputs: _Inputs, settings: SearchSettings):
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


def worker_objective(model_refs, base_ref, data, settings: dict):
    """What a Dask worker process needs to run trials: the checked inputs, its own resident
    engine and the specialists' reference scores, as one MergeObjective."""
    from .search import MergeObjective

    settings = SearchSettings(**settings)
    _quiet_libraries()
    inputs = _check_inputs(model_refs, base_ref, *_check_paths(model_refs, data), settings)
    engine, raw = _load_sources(inputs, settings)
    references = {name: scores[name] for name, scores in raw.items()}
    return MergeObjective(
        engine, inputs.tasks, references, _to_plan(inputs, settings), inputs.metrics,
        inputs.tokenizer, {s.name: s.path for s in inputs.sources}, settings.seed, inputs.evals,
    )  # fmt: skip


def _protected(inputs: _Inputs, settings: SearchSettings) -> list[Path]:
    """What --out must keep apart from: the model folders and every file in them (a Hub
    snapshot's files resolve into the cache), the data files, a --warm-start run."""
    models = [m.path for m in inputs.sources + ([inputs.base] if inputs.base else [])]
    paths = models + [file for folder in models for file in folder.iterdir()]
    paths += list(inputs.files.values())
    return paths + ([Path(settings.warm_start)] if settings.warm_start else [])


def _open_session(
    model_refs: list[str],
    base_ref: str | None,
    data: dict[str, str],
    settings: SearchSettings,
    out: Path,
    overwrite: bool,
    resume: bool = False,
    command: str = "search",
) -> _Session:
    """Check every input, then create (or reopen) the run directory, load the engine, score
    the sources. The session's run directory stays locked until `session.run.release()`."""
    from .rundir import RunDir, RunRecord, check_unchanged, describe_takeover

    files, data_sha = _check_paths(model_refs, data)  # before any heavy import
    if resume:
        run = RunDir.reopen(out)
        recorded = RunRecord.read(out).fingerprints
    else:
        RunDir.check_free(out, overwrite)
        run = recorded = None
    try:
        _quiet_libraries()
        inputs = _check_inputs(model_refs, base_ref, files, data_sha, settings)
        _check_space(inputs, out, overwrite and not resume)
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
        return _start_session(run, inputs, settings)
    except BaseException:
        if run is not None:
            run.release()
        raise


def _start_session(run: RunDir, inputs: _Inputs, settings: SearchSettings) -> _Session:
    """Load the engine and score the sources into a locked run directory."""
    from . import evaluate, plugins, report

    run.write_json(
        "eval_subset.json",
        {
            t.name: {"texts": list(t.indices), "tokens": t.tokens, "computed": t.computed_tokens}
            for t in inputs.tasks
        },
    )
    engine, raw = _load_sources(inputs, settings)
    references = {name: scores[name] for name, scores in raw.items()}
    sources_scored = {
        n: evaluate.with_preservation(s, references, inputs.metrics) for n, s in raw.items()
    }
    run.write_json(
        "sources.json", {n: report.scored_json(*scored) for n, scored in sources_scored.items()}
    )
    if inputs.evals:  # the plug-ins' scores of each source, beside their AP and PR
        evals = {
            f"{s.name} alone": plugins.run_evals(
                inputs.evals, engine.load_source(s.path), inputs.tokenizer
            )
            for s in inputs.sources
        }
        run.write_json("evals.json", evals)
    return _Session(run, inputs, settings, engine, references, sources_scored)


def _score_baselines(session: _Session, objective, settings: SearchSettings) -> dict:
    """The five methods at fixed settings, scored like trials; saved as baselines.json."""
    from . import report, space

    inputs = session.inputs
    plans = space.baseline_plans(
        inputs.blocks,
        tuple(str(s.path) for s in inputs.sources),
        str(inputs.base.path) if inputs.base else None,
        inputs.dtype,
        settings.seed,
    )
    results = {
        label: objective.evaluate_plan(plan, -1, {"baseline": label})
        for label, plan in plans.items()
    }
    session.run.write_json(
        "baselines.json",
        {label: report.scored_json(r.tasks, r.harmonic_mean) for label, r in results.items()},
    )
    if session.inputs.evals:
        evals = {f"baseline: {label}": r.evals for label, r in results.items()}
        session.run.write_json("evals.json", session.run.read_json("evals.json") | evals)
    return {label: (r.tasks, r.harmonic_mean) for label, r in results.items()}


def run_baselines(
    model_refs: list[str],
    base_ref: str | None,
    data: dict[str, str],
    settings: SearchSettings,
    out: Path,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Score the five default methods at fixed settings; return the run directory and table."""
    from . import report

    session = _open_session(model_refs, base_ref, data, settings, out.resolve(), overwrite,
                            command="baselines")  # fmt: skip
    try:
        rows = _score_baselines(session, session.objective(), settings)
        rows |= {f"{name} alone": scored for name, scored in session.sources_scored.items()}
        table = report.score_table(rows)
        session.run.write_text("baselines.md", table + "\n")
    finally:
        session.run.release()
    return session.run.path, table


def run_search(
    model_refs: list[str],
    base_ref: str | None,
    data: dict[str, str],
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
    session = _open_session(model_refs, base_ref, data, settings, out.resolve(), overwrite, resume,
                            "search --resume" if resume else "search")  # fmt: skip
    try:
        return _search(session, progress, resume, started)
    finally:
        session.run.release()


def _search(session: _Session, progress: bool, resume: bool, started: float) -> Path:
    """The search of `run_search` in an open session; returns the run directory."""
    from . import plugins, recipe, report, search, space
    from .rundir import writing

    run, inputs, engine, settings = session.run, session.inputs, session.engine, session.settings
    sources_scored = session.sources_scored

    names = tuple(s.name for s in inputs.sources)
    to_plan = _to_plan(inputs, settings)
    objective = session.objective(to_plan)
    optimizer = search.make_optimizer(
        space.build_space(inputs.blocks, names, settings),
        settings.trials,
        settings.initial,
        settings.seed,
        run.path / ".smac",
        settings.optimizer,
        inputs.fidelity,
    )
    space_ = optimizer.scenario.configspace
    search.warm_start(optimizer, space_, inputs.warm_start, inputs.fidelity)
    finished = run.trials() if resume else []
    if settings.workers > 1 or settings.scheduler:
        results = _parallel_search(optimizer, session, progress, finished)
    else:
        runner = search.SerialRunner(objective)
        results = search.run_search(optimizer, runner, settings.trials, run.append_trial,
                                    progress, finished)  # fmt: skip
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
    pinned = {str(m.path): m.pinned for m in inputs.sources + [inputs.base] if m}
    command = recipe.reproduce_command(
        run.path / "recipe.yaml", run.path / "model", len(plan.methods) > 1, plan.seed
    )
    recipe_file = run.write_text("recipe.yaml", recipe.recipe_text(plan, pinned, command))
    run.write_json("best.json", best.model_dump(mode="json") | {"recipe": "recipe.yaml"})

    code = inputs.reference_model if settings.trust_remote_code else None
    recipe.build_with_mergekit(recipe_file, run.path / "model", plan.seed, settings.device, code)
    from transformers import AutoModelForCausalLM

    # Scored in the live model's dtype, so the only difference to the trial could be the merge.
    built = AutoModelForCausalLM.from_pretrained(
        str(run.path / "model"), dtype=engine.model.dtype,
        trust_remote_code=settings.trust_remote_code,
    ).to(engine.device)  # fmt: skip
    final = objective.score(built)
    run.write_json("final.json", report.scored_json(*final))
    if inputs.evals:
        built_evals = plugins.run_evals(inputs.evals, built, inputs.tokenizer)
        evals = {"search (best trial)": best.evals, "model/ (stock mergekit)": built_evals}
        run.write_json("evals.json", evals | run.read_json("evals.json"))
    baselines = _score_baselines(session, objective, settings)
    table = {
        "search (best trial)": (best.tasks, best.harmonic_mean),
        "model/ (stock mergekit)": final,
        **{f"baseline: {label}": scored for label, scored in baselines.items()},
        **sources_scored,
    }
    references = {f"{name} alone": scored[1] for name, scored in sources_scored.items()}
    label, (_, value) = max(baselines.items(), key=lambda item: item[1][1])
    references[f"best baseline ({label})"] = value
    with writing(run.path / "progress.png"):
        report.progress_plot(results, run.path / "progress.png", references)
    summary = report.summary_markdown(
        f"automerge-mk: {' + '.join(names)}",
        best,
        results,
        table,
        plan,
        command,
        time.perf_counter() - started,
        run.read_json("evals.json") if inputs.evals else None,
    )
    run.write_text("summary.md", summary)
    return run.path


def _parallel_search(optimizer, session: _Session, progress: bool, finished):
    """Trials on Dask workers (--workers / --scheduler), each with its own resident sources."""
    from .search import parallel, run_search

    inputs, settings = session.inputs, session.settings
    target = parallel.WorkerTrial(
        worker_objective,
        [str(s.path) for s in inputs.sources],
        str(inputs.base.path) if inputs.base else None,
        {k: str(v) for k, v in inputs.files.items()},
        # A warm start is told to SMAC in this process; workers only run trials.
        settings.model_copy(update={"warm_start": None}).model_dump(mode="json"),
    )
    with parallel.dask_client(settings.workers, settings.scheduler, settings.device) as client:
        runner = parallel.DaskRunner(optimizer, target, client)
        return run_search(optimizer, runner, settings.trials, session.run.append_trial,
                          progress, finished)  # fmt: skip


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
    run.write_json("budgets.json", {**fidelity._asdict(), "eta": fidelity.ETA, "levels": levels})


def run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md with its plots into `out` (default RUN_DIR), from whatever the run has
    finished so far.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory or has no successful trial.
    """
    from . import report
    from .rundir import RunDir, RunRecord, writing

    run, out = RunDir(run_dir), out or run_dir
    stored = RunRecord.read(run_dir)
    if not (run_dir / "sources.json").is_file():
        raise RunDirectoryError(f"{run_dir} has no sources.json yet: the search has not started")
    sources = run.read_json("sources.json")
    trials = run.trials()
    ok = [t for t in trials if t.status == "ok"]
    best = best_trial(trials)
    if best is None:
        raise RunDirectoryError(f"{run_dir} has no successful trial yet")
    settings, names, plan = stored.settings, stored.names, stored.plan(best.config)
    rows = {f"best trial ({best.trial})": report.scored_json(best.tasks, best.harmonic_mean)}
    if (run_dir / "baselines.json").is_file():
        label, scored = max(run.read_json("baselines.json").items(),
                            key=lambda item: item[1]["harmonic_mean"])  # fmt: skip
        rows[f"best baseline ({label})"] = scored
    rows |= {f"{name} alone": scored for name, scored in sources.items()}
    with writing(out):
        report.search_progress_plot(trials, out / "report-progress.png")
        report.task_plot(rows, out / "report-tasks.png")
        report.plan_heatmap(plan, names, out / "report-blocks.png")
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
        f"{len(trials)} of {settings.trials} trials finished ({failed} failed); best trial "
        f"{best.trial}, harmonic-mean AP {best.harmonic_mean:.4f}. {tokens:,} validation "
        f"tokens evaluated (forward-pass positions).{fidelity}",
        "## Search progress\n\n![best so far vs trial and vs tokens](report-progress.png)",
        "## Per task: AP and PR\n\nPR is from each task's metric ("
        + ", ".join(f"{n}: {s.rate_metric}" for n, s in best.tasks.items())
        + ").\n\n![AP and PR per task](report-tasks.png)",
        "## The best configuration per block\n\n![method, weights and densities per block]"
        "(report-blocks.png)\n\n" + report.plan_table(plan),
        "## Top trials\n\n" + report.top_trials_table(trials),
    ])  # fmt: skip
    return RunDir(out).write_text("report.md", text + "\n")


def resume_arguments(run_dir: Path) -> tuple[list[str], str | None, dict[str, str], SearchSettings]:
    """Models (pinned), base, data and settings of a run, as `run_search` takes them.

    Raises:
        RunDirectoryError: when `run_dir` is not a run directory.
    """
    from .rundir import RunRecord

    stored = RunRecord.read(run_dir)
    base = stored.base.pinned if stored.base else None
    return [m.pinned for m in stored.models], base, stored.data, stored.settings


class _NoteHandler(logging.Handler):
    """Notes of the stages (rows left out, a lock taken over) as `Note: ...` lines on stderr,
    through click so that the stream in use at the time gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"Note: {record.getMessage()}", err=True)


class _Group(click.Group):
    """Reports user errors as one line and exit code 1, without a traceback."""

    def invoke(self, ctx):
        import logging

        from .sources import redact_logs

        redact_logs()
        notes = logging.getLogger("automerge_mk")
        if not any(isinstance(h, _NoteHandler) for h in notes.handlers):
            notes.addHandler(_NoteHandler(logging.INFO))
        # Our own level and no propagation: SMAC sets the root logger's level and handlers.
        notes.setLevel(logging.INFO)
        notes.propagate = False
        try:
            return super().invoke(ctx)
        except AutomergeError as error:
            raise click.ClickException(f"{type(error).__name__}: {error}") from None


@click.group(cls=_Group)
@click.version_option(package_name="automerge-mk")
def main() -> None:
    """automerge-mk: search per-block merge recipes with Bayesian optimisation on mergekit."""


@main.command()
@click.argument("model")
@click.option("--strategy", default="layers:4", show_default=True, help=STRATEGY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the blocks as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Accept a model that needs its own code.")
@click.option("--allow-pickle-weights", is_flag=True, help="Accept pickled .bin weights.")
def segment(
    model: str, strategy: str, as_json: bool, trust_remote_code: bool, allow_pickle_weights: bool
) -> None:
    """Print the blocks MODEL (a folder or Hub id) is split into."""
    from .segment import blocks_to_json, describe_blocks, segment_model
    from .sources import resolve_model

    folder = resolve_model(model, trust_remote_code, allow_pickle_weights).path
    blocks = segment_model(folder, strategy, trust_remote_code)
    if as_json:
        click.echo(blocks_to_json(blocks))
        return
    rows = describe_blocks(blocks)
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    click.echo("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        click.echo("  ".join(row[k].ljust(w) for k, w in widths.items()))
    total = sum(b.parameters for b in blocks)
    click.echo(
        f"{len(blocks)} blocks, {sum(len(b.tensors) for b in blocks)} tensors, {total:,} parameters"
    )


def hub_options(function):
    """--private and --branch, shared by `push` and `search --push-to-hub`."""
    function = click.option("--branch", default=None, help="Commit to this branch.")(function)
    return click.option("--private", is_flag=True, help="Create the repo private.")(function)


def _with(function, options):
    for option in reversed(options):
        function = option(function)
    return function


def source_options(function, required: bool = True):
    """Models, base and validation data: shared by `search` and `baselines`."""
    return _with(
        function,
        [
            click.argument("models", nargs=-1, required=required),
            click.option(
                "--base", help="The model the sources were fine-tuned from (folder or Hub id)."
            ),
            click.option(
                "--data",
                multiple=True,
                metavar="NAME=PATH",
                required=required,
                help="Validation data of the source model NAME (its folder or repo name): "
                "jsonl, json, csv, parquet or txt, holding texts (--text-column) or prompt/label "
                "pairs (columns prompt and label; scored on the label only, as "
                "prompt + ' ' + label). Repeat per model.",
            ),
            click.option(
                "--text-column", default="text", show_default=True, help="Column holding the text."
            ),
            click.option(
                "--dtype",
                default=None,
                help="Merge dtype written in the recipe. Default: the base model's.",
            ),
            click.option("--overwrite", is_flag=True, help="Replace an existing --out directory."),
        ],
    )


def evaluation_options(function):
    """How merges are scored and where: shared by `search`, `demo` and `baselines`."""
    return _with(
        function,
        [
            click.option(
                "--seed",
                default=0,
                show_default=True,
                help="Seed of the evaluation subset, DARE draws and (search) the optimiser.",
            ),
            click.option(
                "--eval-tokens",
                type=int,
                default=None,
                help="Validation tokens per task (a fixed seeded subset). Default: all.",
            ),
            click.option(
                "--max-length",
                default=512,
                show_default=True,
                help="Truncate validation texts to this many tokens.",
            ),
            click.option(
                "--trust-remote-code",
                is_flag=True,
                help="Accept models whose config needs code from their repository (off: such "
                "models are refused and no code of theirs is downloaded or run). Only for "
                "repositories you trust.",
            ),
            click.option(
                "--allow-pickle-weights",
                is_flag=True,
                help="Accept models that have only pickled pytorch_model*.bin weights (off: "
                "safetensors only). They are read with torch's weights-only unpickler, but a "
                "pickle is still code: only for models you trust.",
            ),
            click.option("--metric", "metrics", multiple=True, metavar="SPEC", help=METRIC_HELP),
            click.option(
                "--eval",
                "evals",
                multiple=True,
                metavar="lm-eval:TASK[,TASK]",
                help="Also score lm-evaluation-harness tasks (optional extra: pip install "
                "'automerge-mk[lm-eval]') on every trial scored on all validation tokens, the "
                "sources, the baselines and the final model; recorded beside AP and PR "
                "(trials.jsonl, evals.json, summary.md), not optimised.",
            ),
            click.option(
                "--eval-arg",
                "eval_arguments",
                multiple=True,
                metavar="KEY=VALUE",
                callback=lambda _, __, pairs: {
                    k: _parse_value(v) for k, v in _key_values(pairs, "--eval-arg").items()
                },
                help="Passed through to lm_eval.simple_evaluate, e.g. --eval-arg limit=100 "
                "--eval-arg num_fewshot=0 --eval-arg batch_size=8; include_path=FOLDER adds "
                "your own task YAMLs. Repeatable; unknown keys are refused.",
            ),
            click.option(
                "--eval-dtype",
                type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                default="auto",
                show_default=True,
                help="dtype of the live model that is scored: auto = float32 on CPU (the most "
                "precise losses; on AVX512 CPUs bfloat16 can be about 2x faster, see "
                "scripts/results/bench_search.md) and bfloat16 on a GPU. Losses are summed in "
                "float32 either way.",
            ),
            click.option(
                "--device",
                default="cpu",
                show_default=True,
                help="Where sources stay resident and kernels run: auto, cpu, cuda, cuda:N.",
            ),
        ],
    )


def search_options(initial: int):
    """Options shared by `search` and `demo`; `initial` is the default Sobol design size."""
    return partial(_add_search_options, initial=initial)


def _add_search_options(function, initial: int):
    options = [
        click.option("--methods", default=",".join(SearchSettings().methods), help=METHODS_HELP),
        click.option(
            "--strategy",
            default="layers:4",
            show_default=True,
            help=STRATEGY_HELP,
        ),
        click.option(
            "--weight-range",
            default="0:1",
            show_default=True,
            help="MIN:MAX of each source's weight (two sources: w and 1-w).",
        ),
        click.option(
            "--density-range",
            default="0.1:1",
            show_default=True,
            help="MIN:MAX of each source's density for sparsifying methods.",
        ),
        click.option(
            "--initial",
            default=initial,
            show_default=True,
            help="Configurations in SMAC's Sobol initial design.",
        ),
        click.option(
            "--warm-start",
            type=click.Path(path_type=Path, exists=True, file_okay=False),
            metavar="RUN_DIR",
            help="Tell the optimiser the finished trials of an earlier run over the same space "
            "(same models, --strategy, --methods and ranges; checked, and refused otherwise) "
            "before it proposes anything. Its costs are taken as they are: use the same data.",
        ),
        click.option("--fidelity", metavar="tokens[:MIN:MAX]", help=FIDELITY_HELP),
        click.option(
            "--optimizer",
            type=click.Choice(["smac", "random"]),
            default="smac",
            show_default=True,
            help="smac: random-forest Bayesian optimisation; random: uniform random search of "
            "the same space (a baseline for the optimiser).",
        ),
        click.option(
            "--set",
            "fixed",
            multiple=True,
            metavar="KEY=VALUE",
            help="Fix a merge parameter for every trial, e.g. --set lambda=1.0 "
            "--set int8_mask=true. Unknown keys are rejected.",
        ),
        click.option(
            "--cache-order/--no-cache-order",
            default=True,
            show_default=True,
            help="Keep TIES's magnitude order of every task vector between trials instead of "
            "sorting again each trial: much faster ties trials for 4 bytes of memory per "
            "parameter per source model (about 1.1 GB for two 135M-parameter sources).",
        ),
        click.option(
            "--workers",
            type=int,
            default=1,
            show_default=True,
            help="Run trials in parallel on a local Dask cluster of this many worker processes "
            "(one per GPU, pinned with CUDA_VISIBLE_DEVICES, when --device is a GPU); each "
            "loads the sources once and keeps them resident. 1: trials run in this process.",
        ),
        click.option(
            "--scheduler",
            metavar="tcp://HOST:PORT",
            help="Run trials on the workers of an existing Dask cluster (e.g. dask-jobqueue on "
            "SLURM, see the README); each worker loads the sources once.",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return evaluation_options(_with(function, options))


def _validated(**values) -> SearchSettings:
    """SearchSettings, with a validation failure reported as a bad parameter."""
    from pydantic import ValidationError

    try:
        return SearchSettings(**values)
    except ValidationError as error:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise click.BadParameter(messages) from None


def _settings(
    trials,
    methods,
    strategy,
    weight_range,
    density_range,
    initial,
    warm_start,
    fidelity,
    optimizer,
    workers,
    scheduler,
    seed,
    eval_tokens,
    max_length,
    fixed,
    device,
    cache_order,
    eval_dtype,
    trust_remote_code,
    allow_pickle_weights,
    metrics=(),
    evals=(),
    eval_arguments=None,
    text_column="text",
    dtype=None,
):
    return _validated(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        strategy=strategy,
        weight_range=_range(weight_range, "--weight-range"),
        density_range=_range(density_range, "--density-range"),
        trials=trials,
        initial=initial,
        warm_start=str(warm_start.resolve()) if warm_start else None,
        optimizer=optimizer,
        fidelity=_fidelity(fidelity),
        workers=workers,
        scheduler=scheduler,
        seed=seed,
        eval_tokens=eval_tokens,
        max_length=max_length,
        text_column=text_column,
        dtype=dtype,
        device=device,
        cache_order=cache_order,
        eval_dtype=eval_dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle_weights=allow_pickle_weights,
        metrics=tuple(metrics),
        evals=tuple(evals),
        eval_arguments=eval_arguments or {},
        method_parameters={k: _parse_value(v) for k, v in _key_values(fixed, "--set").items()},
    )


def _out_option(default: str, help: str):
    return click.option(
        "--out", type=click.Path(path_type=Path), default=Path(default), show_default=True,
        help=help,
    )  # fmt: skip


@main.command("search")
@partial(source_options, required=False)
@_out_option("automerge-run", "Run directory: trials.jsonl, best.json, recipe.yaml, model/.")
@click.option("--trials", default=200, show_default=True, help="Trials in total.")
@click.option("--push-to-hub", "push_to", metavar="REPO", help="Publish the result to this repo.")
@click.option(
    "--resume",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="RUN_DIR",
    help="Continue an interrupted search in RUN_DIR (killed, crashed, power loss): its finished "
    "trials are replayed to the optimiser, not run again, and the search goes on to the "
    "run's --trials. Everything else is taken from RUN_DIR/settings.json; give no MODELS "
    "or --data.",
)
@hub_options
@search_options(initial=20)
def search_command(
    models,
    base,
    data,
    text_column,
    out,
    trials,
    dtype,
    overwrite,
    quiet,
    push_to,
    resume,
    private,
    branch,
    **options,
) -> None:
    """Search the best per-block merge of MODELS and build it with stock mergekit.

    \b
    Example:
      automerge-mk search org/chat org/code --base org/base \\
          --data chat=val_chat.jsonl --data code=val_code.jsonl --trials 200
      automerge-mk search --resume automerge-run     # after an interruption
    """
    if resume:
        if models or data:
            raise click.UsageError("--resume takes the models and data from RUN_DIR; drop them")
        model_refs, base, files, settings = resume_arguments(resume)
        out = resume
        if _finished(resume, settings):
            click.echo(
                f"{resume} is already finished: all {settings.trials} trials ran and "
                "model/ is built; nothing was run again. Its summary:\n",
                err=True,
            )
            click.echo((resume / "summary.md").read_text())
            click.echo("To search further, start a new run with --warm-start "
                       f"{resume.resolve()} and a larger --trials.", err=True)  # fmt: skip
            return
    elif len(models) < 2 or not data:
        raise click.UsageError("give two or more MODELS and their --data (or --resume RUN_DIR)")
    else:
        model_refs, files = list(models), _key_values(data, "--data")
        settings = _settings(trials, text_column=text_column, dtype=dtype, **options)
    with _resumable(out, resumed=bool(resume)):
        run = run_search(model_refs, base, files, settings, out, overwrite, progress=not quiet,
                         resume=bool(resume))  # fmt: skip
    click.echo((run / "summary.md").read_text())
    click.echo(f"Run directory: {run}")
    if push_to:
        _push(run, push_to, private, branch)


def _finished(run_dir: Path, settings: SearchSettings) -> bool:
    """Whether a run has all its trials, its model and its summary (written last)."""
    from .rundir import RunDir

    done = (run_dir / "summary.md").is_file() and (run_dir / "model" / "config.json").is_file()
    return done and len(RunDir(run_dir).trials()) >= settings.trials


class _Terminated(KeyboardInterrupt):
    """SIGTERM, a scheduler's polite kill (SLURM at the time limit, systemd, docker stop)."""


def _terminate(signum, frame):
    raise _Terminated


@contextmanager
def _resumable(out: Path, resumed: bool = False) -> Iterator[None]:
    """Ctrl-C, SIGTERM or a full disk stops a search with one message saying how to go on.

    Every finished trial is already in trials.jsonl (appended and fsynced one by one); only the
    trial being evaluated is dropped, and `--resume` runs it again.
    """
    import signal

    from .rundir import RunDir

    run, started = out.resolve(), time.time()

    def this_run() -> bool:  # not an earlier run that --overwrite has not replaced yet
        settings = run / "settings.json"
        return resumed or (settings.is_file() and settings.stat().st_mtime >= started - 1)

    follow = f"continue with: automerge-mk search --resume {run}"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt as stop:
        if this_run():
            count = len(RunDir(run).trials())
            click.echo(f"\nInterrupted: {count} finished trials are saved in {run}; {follow}",
                       err=True)  # fmt: skip
        else:
            click.echo("\nInterrupted before the search started; nothing was written.", err=True)
        # The shell's convention: 128 + the signal's number.
        number = signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT
        raise SystemExit(128 + number) from None
    except StorageError as error:
        hint = f"; {follow}" if this_run() else ""
        raise click.ClickException(f"StorageError: {error}{hint}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _push(run: Path, repo: str, private: bool, branch: str | None) -> None:
    import tempfile

    from .publish import publish
    from .rundir import RunLock

    RunLock.check_free(run)  # a search still writing it would publish half a run
    click.echo(f"Publishing {run} to {repo} ...")
    # The card shows the report's plots; they are drawn aside, so the run stays as it was.
    with tempfile.TemporaryDirectory() as plots:
        run_report(run, Path(plots))
        url = publish(run, repo, private=private, branch=branch, plots=Path(plots))
    click.echo(f"Published: {url}")


@main.command()
@source_options
@_out_option("automerge-baselines", "Where baselines.json / baselines.md go.")
@evaluation_options
def baselines(models, base, data, text_column, dtype, overwrite, out, **evaluation) -> None:
    """Score the five usual merges of MODELS at fixed settings, like search trials.

    \b
    linear, task_arithmetic: weights 0.5/0.5 (1/N each for N sources);
    ties, dare_linear, dare_ties: the same weights and density 0.5 --
    the values of mergekit's README examples. Without --base only linear is scored.
    """
    settings = _validated(
        trials=1,
        initial=1,
        text_column=text_column,
        dtype=dtype,
        methods=("linear",) if base is None else SearchSettings().methods,
        **evaluation,
    )
    run, table = run_baselines(list(models), base, _key_values(data, "--data"), settings, out,
                               overwrite)  # fmt: skip
    click.echo(table)
    click.echo(f"Saved in {run}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.md with PNG plots: best so far vs trial and vs tokens, AP and PR
    per task of the best vs the sources and the best baseline, the best configuration per
    block as a heat map, and the top trials. Works on a running or interrupted search too."""
    click.echo(f"Wrote {run_report(run_dir.resolve())}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo")
@hub_options
def push(run_dir: Path, repo: str, private: bool, branch: str | None) -> None:
    """Publish a finished run to the Hub repo REPO (org/name) in one commit.

    Uploads model/ (safetensors, config, tokenizer), recipe.yaml, trials.jsonl, progress.png,
    summary.md and a model card. The token comes from HF_TOKEN or `hf auth login`, the server
    from HF_ENDPOINT. A failed upload changes nothing locally; run the command again.
    """
    _push(run_dir.resolve(), repo, private, branch)


@main.command()
@_out_option("automerge-demo", "Where the demo models and the demo run go.")
@click.option("--trials", default=40, show_default=True, help="Trials of the demo search.")
@search_options(initial=10)
def demo(out, trials, quiet, **options) -> None:
    """Build a small base and two trained specialists offline, then search their merge.

    The models are reused on later runs; the demo's own run directory (OUT/run) is replaced.
    """
    from .demo import build_demo_models

    settings = _settings(trials, **options)
    models = build_demo_models(out / "models", seed=settings.seed, progress=not quiet)
    names = list(models.specialists)
    with _resumable(out / "run"):
        run = run_search(
            [str(models.specialists[n]) for n in names],
            str(models.base),
            {n: str(models.validation[n]) for n in names},
            settings,
            out / "run",
            overwrite=True,
            progress=not quiet,
        )
    click.echo((run / "summary.md").read_text())
    click.echo(f"Run directory: {run}")
