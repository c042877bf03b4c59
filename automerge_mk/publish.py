"""Publishing a finished run to the Hub: the model card and a one-commit upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import report, rundir
from .errors import PublishError, RunDirectoryError
from .kinds import RAW_MODULE, SEQUENCE_CLASSIFIER, kind_of
from .methods import is_random
from .recipe import PART_SUFFIX, pytorch_command, reproduce_command
from .rundir import RunRecord
from .sources import redact

# What a published repo holds besides the model folder's own files.
RUN_FILES = (rundir.RECIPE, rundir.TRIALS, rundir.PROGRESS, rundir.SUMMARY)


def _run_json(run_dir: Path, name: str) -> dict:
    try:
        return json.loads((run_dir / name).read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(
            f"{run_dir} is not a finished automerge-mk run ({name}: {error}); run "
            "`automerge-mk search` to completion first"
        ) from None


REPORT_PLOTS = {
    rundir.REPORT_TASKS: "AP and PR per task: this merge, the best baseline, each source alone",
    rundir.REPORT_BLOCKS: "the merge method, weights and densities chosen per block",
    rundir.REPORT_FRONT: "AP per task of every trial, the Pareto front and this model on it",
}


def recipe_files(run_dir: Path) -> list[Path]:
    """recipe.yaml, after the mergekit-pytorch runs it selects from (recipe-METHOD_part.yaml,
    a raw PyTorch model's) when there are any."""
    stages = sorted(run_dir.glob(f"recipe-*{PART_SUFFIX}.yaml"))
    return [*stages, run_dir / rundir.RECIPE]


def card_text(run_dir: Path, repo_id: str, plots: Path | None = None) -> str:
    """The model card (README.md) of a run: metadata, scores, plot, recipe, how to rebuild it.

    Raises:
        RunDirectoryError: when the run is not finished.
    """
    from huggingface_hub import ModelCard, ModelCardData

    record = RunRecord.read(run_dir)
    stored_sources = _run_json(run_dir, rundir.SOURCES)
    final = report.scored_from_json(_run_json(run_dir, rundir.FINAL), stored_sources)
    sources = {n: report.scored_from_json(v, stored_sources) for n, v in stored_sources.items()}
    trials = (run_dir / rundir.TRIALS).read_text().count("\n")
    kind = kind_of(run_dir / rundir.MODEL)
    recipe = "\n---\n".join(p.read_text() for p in recipe_files(run_dir))
    models, base = record.models, record.base
    pinned = [m.pinned for m in models + ([base] if base else [])]
    discrepancy = report.discrepancy(final[0])
    metric = " / ".join(sorted({s.rate_metric or "token_accuracy" for s in final[0].values()}))
    table = report.score_table(
        {"this merge": final} | {f"{n} alone": v for n, v in sources.items()}
    )
    local = [m.reference for m in models + ([base] if base else []) if not m.repo_id]
    local_note = (
        f"\n\nThe recipe names local folders ({', '.join(local)}); replace them with the "
        "models' Hub ids to rebuild elsewhere."
        if local
        else ""
    )
    report_plots = "".join(
        f"\n![{text}]({name})\n"
        for name, text in REPORT_PLOTS.items()
        if plots and (plots / name).is_file()
    )
    best = _run_json(run_dir, rundir.BEST)
    picked = (
        f"\n\nThis model is trial {best['trial']} of the search"
        + ("'s Pareto front" if best.get("on_front", True) else " (off its Pareto front)")
        + (f" (preferring {', '.join(best['prefer'])})" if best.get("prefer") else "")
        + ", chosen with `automerge-mk pick` instead of the harmonic-mean pick."
        if "picked_from" in best
        else ""
    )
    multi = "\n---\n" in recipe
    tool = "mergekit-pytorch" if kind.name == RAW_MODULE else "mergekit"
    merged = Path("$PWD/merged")  # mergekit-multi's --intermediate-dir must be absolute
    adapters = any(m.adapter_of for m in record.models)
    rebuild = reproduce_command(Path(rundir.RECIPE), merged, multi, record.settings.seed, adapters)
    if kind.name == RAW_MODULE:  # its runs name the run's absolute intermediate folders
        stages = [p.stem.removeprefix("recipe-") for p in recipe_files(run_dir)[:-1]]
        random = any(is_random(s.removesuffix(PART_SUFFIX)) for s in stages)
        rebuild = pytorch_command(run_dir / rundir.RECIPE, run_dir / rundir.MODEL, stages,
                                  record.settings.seed, random)  # fmt: skip
        rebuild = rebuild.replace(" && ", " \\\n  && ")
        local_note += (" The runs name the intermediate folders of the run that made them "
                       f"({run_dir}); edit both paths to rebuild elsewhere.")  # fmt: skip
    body = f"""# {repo_id.split("/")[-1]}

A merge of {", ".join(f"`{p}`" for p in pinned[: len(models)])}
{f"(base `{pinned[-1]}`) " if base else ""}found by automerge-mk on top of
[mergekit](https://github.com/arcee-ai/mergekit):
SMAC's Bayesian optimisation chose a merge method, weights and densities for every block of the
network over {trials} trials, and stock {tool} built this model from the recipe below.{picked}

## Preservation on the validation data

AP = a specialist's validation loss on its own task / this model's loss on it; H is the harmonic
mean of AP over tasks. PR = {metric.replace("_", " ")} of this model / of the task's specialist;
preservation discrepancy PD = max PR - min PR = **{discrepancy:.4f}**.

{table}

![best harmonic-mean AP so far vs trial](progress.png)
{report_plots}
## Recipe

```yaml
{recipe.rstrip()}
```

## Reproduce with plain mergekit

```bash
pip install mergekit
{rebuild}
```{local_note}
"""
    data = ModelCardData(
        # Hub metadata names repos; local folders are named in the text instead.
        base_model=[m.pinned for m in models + ([base] if base else []) if m.repo_id] or None,
        tags=["merge", "mergekit", "automerge-mk"],
        library_name="pytorch" if kind.name == RAW_MODULE else "transformers",
        pipeline_tag={
            RAW_MODULE: "image-classification",
            SEQUENCE_CLASSIFIER: "text-classification",
        }.get(kind.name, "text-generation"),
        base_model_relation="merge",
    )
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def publish(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    plots: Path | None = None,
) -> str:
    """Create (or reuse) a Hub model repo and upload model, recipe, trials, plots and card in
    one commit.

    Args:
        run_dir: a finished run directory (with `model/`).
        repo_id: `org/name` of the target repo.
        private: create the repo private.
        branch: commit to this branch (created from main when missing).
        token: a Hub token; default: HF_TOKEN or the stored login.
        endpoint: the Hub URL; default: HF_ENDPOINT or huggingface.co.
        plots: a folder with the report's plots (`automerge-mk report`) for the card.

    Returns:
        The commit URL.

    Raises:
        RunDirectoryError: when the run has no built model.
        PublishError: when the Hub refuses or cannot be reached; nothing local was changed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model = run_dir / rundir.MODEL
    described = (model / "config.json").is_file() or (model / "module.json").is_file()
    if not described or not any(model.glob("*.safetensors")):
        raise RunDirectoryError(f"{model} holds no built model; finish `automerge-mk search` first")
    card = card_text(run_dir, repo_id, plots).encode()
    operations = [
        CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        for path in sorted(model.iterdir())
        if path.is_file() and path.name not in ("README.md", "mergekit_config.yml")
    ]
    stages = [p.name for p in recipe_files(run_dir)[:-1]]  # a raw PyTorch recipe's runs
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run_dir / name))
        for name in [*RUN_FILES, *stages]
        if (run_dir / name).is_file()
    ]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plots / name))
        for name in REPORT_PLOTS
        if plots and (plots / name).is_file()
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    # HF_ENDPOINT is read here, not only when huggingface_hub was imported.
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message="automerge-mk: merged model, recipe, trials and card",
            revision=branch,
        )
    except Exception as error:  # huggingface_hub and httpx raise many types for one cause
        message = redact(f"{type(error).__name__}: {error}", token)
        raise PublishError(
            f"upload of {run_dir} to {repo_id} failed ({message}). The run directory is "
            f"unchanged; retry with: automerge-mk push {run_dir} {repo_id}"
        ) from None
    return commit.commit_url
