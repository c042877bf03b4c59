"""The command line: click only; each command is one call into pipeline.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import click

from . import pipeline
from .errors import AutomergeError, StorageError
from .methods import METHODS_HELP
from .types import METRIC_HELP, STRATEGY_HELP, SearchSettings


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
        model_refs, base, files, settings = pipeline.resume_arguments(resume)
        out = resume
        if pipeline.finished(resume, settings):
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
        run = pipeline.run_search(model_refs, base, files, settings, out, overwrite,
                                  progress=not quiet, resume=bool(resume))  # fmt: skip
    click.echo((run / "summary.md").read_text())
    click.echo(f"Run directory: {run}")
    if push_to:
        _push(run, push_to, private, branch)


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
    click.echo(f"Publishing {run} to {repo} ...")
    click.echo(f"Published: {pipeline.publish_run(run, repo, private, branch)}")


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
    run, table = pipeline.run_baselines(list(models), base, _key_values(data, "--data"),
                                        settings, out, overwrite)  # fmt: skip
    click.echo(table)
    click.echo(f"Saved in {run}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.md with PNG plots: best so far vs trial and vs tokens, AP and PR
    per task of the best vs the sources and the best baseline, the best configuration per
    block as a heat map, and the top trials. Works on a running or interrupted search too."""
    click.echo(f"Wrote {pipeline.run_report(run_dir.resolve())}")


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
        run = pipeline.run_search(
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
