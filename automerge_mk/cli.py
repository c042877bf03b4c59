"""The command line: click only; each command is one call into pipeline.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import click

from . import pipeline, rundir
from .errors import AutomergeError, StorageError
from .settings import SearchSettings, key_values
from .types import STRATEGY_HELP


class _NoteHandler(logging.Handler):
    """Notes of the stages (rows left out, a lock taken over) as `Note: ...` lines on stderr,
    through click so that the stream in use at the time gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"Note: {record.getMessage()}", err=True)


class _Group(click.Group):
    """Reports user errors as one line and exit code 1, without a traceback."""

    def invoke(self, ctx):
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
@click.argument("models", nargs=-1, required=True)
@click.option("--strategy", default="layers:4", show_default=True, help=STRATEGY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the blocks as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Accept a model that needs its own code.")
@click.option("--allow-pickle-weights", is_flag=True, help="Accept pickled .bin weights.")
@click.option(
    "--features", is_flag=True,
    help="With two or more MODELS, --base and their --data: print each block's similarity "
    "features (task-vector norms, cosine, sign conflicts, the density holding 90 % of the "
    "mass, activation distance on a probe of the validation texts) and the sources' "
    "next-token KL; no merge, no labels.",
)  # fmt: skip
@click.option("--base", help="--features: the model the sources were fine-tuned from.")
@click.option("--data", multiple=True, metavar="NAME=PATH",
              help="--features: validation data per source (as `search` takes it).")  # fmt: skip
def segment(models, strategy, as_json, trust_remote_code, allow_pickle_weights, features, base,
            data) -> None:  # fmt: skip
    """Print the blocks MODEL (a folder or Hub id) is split into; with --features, what the
    sources' weights say per block before anything is merged.

    \b
    Example:
      automerge-mk segment org/base --strategy layers:8
      automerge-mk segment org/chat org/code --base org/base --features \\
          --data chat=val_chat.jsonl --data code=val_code.jsonl
    """
    if features:
        if len(models) < 2 or not base or not data:
            raise click.UsageError("--features needs two or more MODELS, --base and their --data")
        settings = _settings(strategy=strategy, trust_remote_code=trust_remote_code,
                             allow_pickle_weights=allow_pickle_weights)  # fmt: skip
        request = pipeline.MergeRequest(list(models), base, _data(data))
        click.echo(pipeline.features_text(request, settings, as_json))
        return
    if len(models) != 1:
        raise click.UsageError("segment takes one MODEL (several only with --features)")
    click.echo(pipeline.segment_text(models[0], strategy, as_json, trust_remote_code,
                                     allow_pickle_weights))  # fmt: skip


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
    function = setting_options(SOURCE_SETTINGS)(function)
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
                "prompt + ' ' + label). A sequence classifier's: text (--text-column) and "
                "label columns; a raw PyTorch model's: .npz with pixel_values and labels "
                "arrays (every example scored; --eval-tokens is for causal LMs). Repeat per "
                "model.",
            ),
            click.option(
                "--overwrite",
                is_flag=True,
                help="Replace an existing --out run directory (never a folder that is not a "
                "run, nor one holding the inputs).",
            ),
        ],
    )


# Which settings each group of commands offers (all declared once, in settings.py).
SOURCE_SETTINGS = ("text_column", "dtype")
EVALUATION_SETTINGS = ("seed", "eval_tokens", "max_length", "tokenizer_source", "trust_remote_code",
                       "allow_pickle_weights", "metrics", "evals", "eval_arguments", "eval_dtype",
                       "device", "tier", "rank_cache", "memory_limit")  # fmt: skip
SEARCH_SETTINGS = ("methods", "strategy", "weighting", "weight_range", "density_range",
                   "initial", "baselines_first", "prior", "prior_acquisition", "prior_from",
                   "warm_start", "fidelity", "racing",
                   "race_chunk", "race_confidence", "optimizer", "objective", "method_parameters",
                   "workers", "scheduler")  # fmt: skip


def setting_options(names: tuple[str, ...], **defaults):
    """click options for these SearchSettings fields, made from the fields themselves: flag,
    help (the field's description), type, default (or `defaults[name]`)."""

    def decorate(function):
        for name in reversed(names):
            function = _setting_option(name, defaults.get(name))(function)
        return function

    return decorate


def _setting_option(name: str, default=None):
    import typing

    field = SearchSettings.model_fields[name]
    cli = (field.json_schema_extra or {}).get("cli", {})
    flag = cli.get("flag", "--" + name.replace("_", "-"))
    value = field.get_default(call_default_factory=True) if default is None else default
    common = {"help": field.description}
    if cli.get("metavar"):
        common["metavar"] = cli["metavar"]
    annotation, choices = field.annotation, typing.get_args(field.annotation)
    if annotation is bool:
        if value:
            return click.option(f"{flag}/--no-{flag[2:]}", name, default=True, show_default=True,
                                **common)  # fmt: skip
        return click.option(flag, name, is_flag=True, **common)
    folder = click.Path(path_type=Path, exists=True, file_okay=False)
    if cli.get("multiple"):
        return click.option(flag, name, multiple=True, type=folder if cli.get("folder") else None,
                            **common)  # fmt: skip
    if typing.get_origin(annotation) is typing.Literal:
        return click.option(flag, name, type=click.Choice(choices), default=value,
                            show_default=True, **common)  # fmt: skip
    if cli.get("folder"):
        return click.option(flag, name, type=folder, **common)
    if "shown" in cli:  # a tuple typed as text, e.g. MIN:MAX
        shown = cli["shown"]
        text = ",".join(value) if shown == "comma list" else shown
        if cli.get("unset"):  # the default depends on other settings: resolved in settings.py
            return click.option(flag, name, default=None, show_default=shown, **common)
        return click.option(flag, name, default=text, show_default=shown != "comma list",
                            **common)  # fmt: skip
    kind = int if (int in choices or annotation is int) and not cli.get("text") else str
    return click.option(flag, name, type=kind, default=value,
                        show_default=value is not None, **common)  # fmt: skip


def evaluation_options(function):
    """How merges are scored and where: shared by `search`, `demo` and `baselines`."""
    return setting_options(EVALUATION_SETTINGS)(function)


def search_options(initial: int):
    """Options shared by `search` and `demo`; `initial` is the default Sobol design size."""

    def decorate(function):
        function = click.option("--quiet", is_flag=True, help="No progress bar.")(function)
        function = setting_options(SEARCH_SETTINGS, initial=initial)(function)
        return evaluation_options(function)

    return decorate


def _settings(**values) -> SearchSettings:
    """SearchSettings from a command's options (the others are ignored), with a validation
    failure reported as a bad parameter (exit code 2)."""
    from pydantic import ValidationError

    try:
        return SearchSettings(
            **{k: v for k, v in values.items() if k in SearchSettings.model_fields}
        )
    except ValidationError as error:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise click.BadParameter(messages) from None


def _data(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return key_values(pairs, "--data")
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _out_option(default: str, help: str):
    return click.option(
        "--out", type=click.Path(path_type=Path), default=Path(default), show_default=True,
        help=help,
    )  # fmt: skip


@main.command("search")
@partial(source_options, required=False)
@_out_option("automerge-run", "Run directory: trials.jsonl, best.json, recipe.yaml, model/.")
@setting_options(("trials",))
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
def search_command(models, base, data, out, overwrite, quiet, push_to, resume, private, branch,
                   **options) -> None:  # fmt: skip
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
        request, settings = pipeline.resume_arguments(resume)
        out = resume
        if pipeline.finished(resume, settings):
            click.echo(
                f"{resume} is already finished: all {settings.trials} trials ran and "
                "model/ is built; nothing was run again. Its summary:\n",
                err=True,
            )
            click.echo((resume / rundir.SUMMARY).read_text())
            click.echo("To search further, start a new run with --warm-start "
                       f"{resume.resolve()} and a larger --trials.", err=True)  # fmt: skip
            return
    elif len(models) < 2 or not data:
        raise click.UsageError("give two or more MODELS and their --data (or --resume RUN_DIR)")
    else:
        request = pipeline.MergeRequest(list(models), base, _data(data))
        settings = _settings(**options)
    with _resumable(out, resumed=bool(resume)):
        run = pipeline.run_search(request, settings, out, overwrite,
                                  progress=not quiet, resume=bool(resume))  # fmt: skip
    click.echo((run / rundir.SUMMARY).read_text())
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
        settings = run / rundir.SETTINGS
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
@click.option(
    "--grid",
    is_flag=True,
    help="Also score the hand grid: slerp t=0.5 (two sources), task_arithmetic at weights "
    "0.3 and 0.7, ties at densities 0.3 and 0.7, dare_linear at weights 1 and density 0.5.",
)
@evaluation_options
def baselines(models, base, data, overwrite, out, grid, **options) -> None:
    """Score the usual fixed merges of MODELS, like search trials.

    \b
    linear, task_arithmetic: weights 0.5/0.5 (1/N each for N sources);
    ties, dare_linear, dare_ties: the same weights and density 0.5
      (the values of mergekit's README examples);
    task_arithmetic at weights 1/1 (both task vectors whole), and
      dare_ties at weights 1/1, density 0.5.
    Without --base only linear (and slerp) are scored. A search
    evaluates the same rows as its first trials (--baselines-first).
    """
    methods = ("linear",) if base is None else SearchSettings().methods
    if grid and len(models) == 2:
        methods += ("slerp",)
    settings = _settings(trials=1, initial=1, methods=methods, **options)
    request = pipeline.MergeRequest(list(models), base, _data(data))
    run, table = pipeline.run_baselines(request, settings, out, overwrite, grid)
    click.echo(table)
    click.echo(f"Saved in {run}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--base", required=True, help="The model the sources were fine-tuned from.")
@click.option("--data", multiple=True, metavar="NAME=PATH", required=True,
              help="Validation data per source (as `search` takes it): the probe.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default="suggested.yaml",
              show_default=True, help="Where the recipe goes.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@setting_options(("strategy", "methods", "weight_range", "density_range", "prior_from", "seed",
                  "max_length", "text_column", "dtype", "tokenizer_source", "trust_remote_code",
                  "allow_pickle_weights"))  # fmt: skip
def suggest(models, base, data, out, overwrite, **options) -> None:
    """Write the merge the similarity features predict for MODELS, with no evaluation at all:
    per block TIES where the task vectors interfere, task arithmetic where they do not (the
    rule is in the README), or with --prior-from what earlier runs' best trials chose for the
    blocks most alike, as a recipe plain mergekit builds.

    \b
    Example:
      automerge-mk suggest org/chat org/code --base org/base \\
          --data chat=val_chat.jsonl --data code=val_code.jsonl --out suggested.yaml
    """
    if len(models) < 2:
        raise click.UsageError("give two or more MODELS")
    request = pipeline.MergeRequest(list(models), base, _data(data))
    written, table = pipeline.run_suggest(request, _settings(**options), out.resolve(), overwrite)
    click.echo(table)
    click.echo(f"\n{written.read_text()}")
    click.echo(f"Wrote {written}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.md with PNG plots: best so far vs trial and vs tokens, AP and PR
    per task of the best vs the sources and the best baseline, the best configuration per
    block as a heat map, and the top trials. Works on a running or interrupted search too."""
    click.echo(f"Wrote {pipeline.run_report(run_dir.resolve())}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def front(run_dir: Path) -> None:
    """Write RUN_DIR/front.md and front.png: the trials no other trial beats on every task
    (the Pareto front of AP per task, full evaluations only), their hypervolume over the
    sources' point, and where the harmonic-mean pick sits. Works on a running or interrupted
    search too. Choose a point with `automerge-mk pick`."""
    written = pipeline.run_front(run_dir.resolve())
    click.echo(written.read_text())
    click.echo(f"Wrote {written} and {written.with_name('front.png')}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--trial", type=int, help="The trial to rebuild (a number from `front`).")
@click.option(
    "--prefer", multiple=True, metavar="TASK=WEIGHT",
    help="Weigh a task in the harmonic mean (others weigh 1) and take the front's best point "
    "under those weights; repeat for several tasks, e.g. --prefer code=3.",
)  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path),
              help="Where the picked run goes (default: RUN_DIR-trial-N beside it).")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace what --out holds.")
def pick(run_dir: Path, trial: int | None, prefer: tuple[str, ...], out: Path | None,
         overwrite: bool) -> None:  # fmt: skip
    """Rebuild one point of RUN_DIR's Pareto front as a run of its own: its recipe, the model
    built by stock mergekit and scored like a search's final model (AP, PR, PD), a summary,
    ready for `automerge-mk push`. RUN_DIR itself is not changed."""
    if (trial is None) == (not prefer):
        raise click.UsageError("give either --trial N or --prefer TASK=WEIGHT")
    picked = pipeline.run_pick(run_dir.resolve(), trial, prefer, out, overwrite)
    click.echo((picked / "summary.md").read_text())
    click.echo(f"Run directory: {picked}")


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
@setting_options(("trials",), trials=40)
@search_options(initial=10)
def demo(out, trials, quiet, **options) -> None:
    """Build a small base and two trained specialists offline, then search their merge.

    The models are reused on later runs; the demo's own run directory (OUT/run) is replaced.
    """
    from .demo import build_demo_models

    settings = _settings(trials=trials, **options)
    models = build_demo_models(out / "models", seed=settings.seed, progress=not quiet)
    names = list(models.specialists)
    with _resumable(out / "run"):
        request = pipeline.MergeRequest(
            [str(models.specialists[n]) for n in names],
            str(models.base),
            {n: str(models.validation[n]) for n in names},
        )
        run = pipeline.run_search(
            request,
            settings,
            out / "run",
            overwrite=True,
            progress=not quiet,
        )
    click.echo((run / rundir.SUMMARY).read_text())
    click.echo(f"Run directory: {run}")
