"""Stage 7: tables and the run's summary.md."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from .types import MergePlan, TaskScore, TrialResult, budget_rank, top_budget

ScoredModel = tuple[dict[str, TaskScore], float]


def score_table(rows: dict[str, ScoredModel]) -> str:
    """A markdown table: per model H and PD, then loss / AP / metric / PR per task.

    The metric is the one PR is computed from (label or next-token accuracy, or the first
    `--metric`); rows without AP or PR (no reference) show "-".
    """
    names: dict[str, str] = {}
    for scores, _ in rows.values():  # a failed row may have no task scores
        for task, score in scores.items():
            names.setdefault(task, score.rate_metric or "token_accuracy")
    header = ["model", "H (AP)", "PD"] + [
        f"{t} {k}" for t in names for k in ("loss", "AP", names[t], "PR")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, (scores, mean) in rows.items():
        pd = discrepancy(scores)
        cells = [name, f"{mean:.4f}", "-" if math.isnan(pd) else f"{pd:.4f}"]
        for task in names:
            score = scores.get(task)
            if score is None:
                cells += ["-"] * 4
                continue
            cells += [
                f"{score.loss:.4f}",
                _number(score.preservation),
                _number(score.value(names[task])),
                _number(score.rate),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def discrepancy(scores: dict[str, TaskScore]) -> float:
    """PD = max PR - min PR over tasks (NaN when PR is unknown)."""
    rates = [s.rate for s in scores.values() if s.rate is not None]
    return max(rates) - min(rates) if rates else math.nan


def scored_from_json(stored: dict, sources: dict | None = None) -> ScoredModel:
    """A sources.json / final.json / baselines.json entry back as (task scores, H).

    Runs from before PR was stored get it from next-token accuracy against each task's own
    source in `sources` (their sources.json).
    """
    scores = {}
    for task, score in stored["tasks"].items():
        score = TaskScore(**score)
        if score.rate is None and sources:
            own = sources[task]["tasks"][task]["accuracy"]
            rate = score.accuracy / own if own > 0 else 0.0
            score = score.model_copy(update={"rate": rate, "rate_metric": "token_accuracy"})
        scores[task] = score
    return scores, stored["harmonic_mean"]


def scored_json(scores: dict[str, TaskScore], harmonic_mean: float) -> dict:
    """A model's scores as stored in sources.json / final.json / baselines.json."""
    pd = discrepancy(scores)
    return {
        "harmonic_mean": harmonic_mean,
        "pd": None if math.isnan(pd) else pd,
        "tasks": {
            task: score.model_dump(exclude={"example_losses"}) for task, score in scores.items()
        },
    }


def plan_table(plan: MergePlan) -> str:
    """The chosen method, weights and densities per block."""
    lines = ["| block | method | weights | densities |", "|---|---|---|---|"]
    for block, choice in zip(plan.blocks, plan.choices):
        weights = ", ".join(f"{w:.3f}" for w in choice.weights)
        densities = ", ".join(f"{d:.3f}" for d in choice.densities) if choice.densities else "-"
        lines.append(f"| {block.name} | {choice.method} | {weights} | {densities} |")
    return "\n".join(lines)


def best_so_far(values: Iterable[float]) -> list[float]:
    """The best value (harmonic mean of a trial) found up to and including each trial."""
    best, curve = 0.0, []
    for value in values:
        best = max(best, value)
        curve.append(best)
    return curve


def result_curve(trials: list[TrialResult]) -> list[float]:
    """Best so far over the trials that can be the result: those at the highest budget
    (every trial of a full-fidelity search); lower-budget trials add nothing to it."""
    result = {id(t) for t in top_budget(trials)}
    return best_so_far(t.harmonic_mean if id(t) in result else 0.0 for t in trials)


def computed_tokens(trial: TrialResult) -> int:
    """Forward-pass positions a trial evaluated (scored tokens for runs that predate them)."""
    if trial.computed_tokens is not None:
        return trial.computed_tokens
    return sum(score.tokens for score in trial.tasks.values())


def tokens_sentence(trials: list[TrialResult]) -> str:
    """Validation tokens spent, against scoring every trial on all of them, and how many
    trials racing stopped early ("" when every trial saw every example)."""
    spent = [computed_tokens(t) for t in trials if t.status == "ok"]
    partial = sum(t.partial for t in trials)
    if not spent or (not partial and all(t.budget is None for t in trials)):
        return ""
    share = sum(spent) / (max(spent) * len(spent))
    racing = f"; {len(spent) - partial} trials scored on every example, {partial} stopped early " \
        "by racing (their H is an estimate)" if partial else ""  # fmt: skip
    return (f"{sum(spent):,} validation tokens computed, {share:.0%} of scoring every trial on "
            f"all of them{racing}.")  # fmt: skip


def progress_plot(trials: list[TrialResult], path: Path, references: dict[str, float]) -> Path:
    """Best-so-far harmonic-mean AP vs trial as a PNG, with horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=120)
    for partial, label, marker in ((False, "trial", "o"), (True, "stopped early (estimate)", "x")):
        shown = [t for t in trials if t.partial == partial]
        if shown:
            numbers, values = [t.trial + 1 for t in shown], [t.harmonic_mean for t in shown]
            axes.scatter(numbers, values, s=8, alpha=0.4, marker=marker, label=label)
    numbers = [t.trial + 1 for t in trials]
    axes.step(numbers, result_curve(trials), where="post", color="C1", label="best so far")
    for index, (name, value) in enumerate(references.items()):
        axes.axhline(value, linestyle="--", linewidth=1, color=f"C{index + 2}", label=name)
    axes.set_xlabel("trial")
    axes.set_ylabel("harmonic mean of AP")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def time_breakdown(trials: list[TrialResult]) -> str:
    """Total and mean seconds per trial phase."""
    phases = sorted({k for t in trials for k in t.seconds})
    lines = ["| phase | total s | mean s/trial |", "|---|---|---|"]
    for phase in phases:
        values = [t.seconds.get(phase, 0.0) for t in trials]
        lines.append(f"| {phase} | {sum(values):.1f} | {statistics.mean(values):.3f} |")
    return "\n".join(lines)


def summary_markdown(
    title: str,
    best: TrialResult,
    trials: list[TrialResult],
    table: dict[str, ScoredModel],
    plan: MergePlan,
    reproduce: str,
    wall_seconds: float,
    evals: dict[str, dict[str, float]] | None = None,
    versus_baselines: str = "",
    caveats: Iterable[str] = (),
) -> str:
    """The run's summary.md: what won, how it scores next to the sources, how to rebuild it,
    and `caveats` on reading its scores."""
    failed = sum(t.status == "failed" for t in trials)
    plugins = ["## Evaluation plug-ins (--eval)\n\n" + evals_table(evals)] if evals else []
    caveats = [f"- {caveat}." for caveat in caveats]
    warned = ["## Caveats\n\n" + "\n".join(caveats)] if caveats else []
    return (
        "\n\n".join(
            [
                f"# {title}",
                f"{len(trials)} trial{'s' * (len(trials) != 1)} ({failed} failed) in "
                f"{wall_seconds:.0f} s; best trial "
                f"{best.trial} with harmonic-mean AP {best.harmonic_mean:.4f} at search time."
                + (f" {versus_baselines}" if versus_baselines else "")
                + (f" {tokens}" if (tokens := tokens_sentence(trials)) else ""),
                "## Scores\n\n`search` is the best trial's in-memory merge; `model/` is the same "
                "recipe built by stock mergekit and scored again.\n\n" + score_table(table),
                *warned,
                *plugins,
                "## Best recipe\n\n" + plan_table(plan),
                "![best harmonic-mean AP so far vs trial](progress.png)",
                f"Rebuild with plain mergekit:\n\n```\n{reproduce}\n```",
                "## Where the time went\n\n" + time_breakdown(trials),
            ]
        )
        + "\n"
    )


def baseline_margin(
    best: TrialResult, baselines: dict[str, float], first: list[str], stopped: int = 0
) -> str:
    """One sentence: by how much the best trial beats the best baseline (validation H, of
    those scored on every example), and whether the baselines were the search's first trials
    (`first`: their labels; `stopped`: how many of them racing stopped early)."""
    if not baselines:
        return ""
    label, value = max(baselines.items(), key=lambda item: item[1])
    gain = best.harmonic_mean - value
    relative = f" ({gain / value:+.1%})" if value > 0 else ""
    how = (
        f"{len(first)} of the {len(baselines) + stopped} baselines were its first trials, told "
        "to the optimiser"
        if first
        else "the baselines were scored after the search"
    )
    if stopped:
        how += f"; racing stopped {stopped} of them early, below the best trial of their time"
    return (
        f"It beats the best baseline ({label}, {value:.4f}) by {gain:+.4f}{relative}; {how}."
        if gain > 0
        else f"The best baseline ({label}, {value:.4f}) is as good: {how}."
    )


def evals_table(rows: dict[str, dict[str, float]]) -> str:
    """The evaluation plug-ins' scores (TASK/METRIC columns) of each row."""
    columns = sorted({key for scores in rows.values() for key in scores})
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, scores in rows.items():
        cells = [f"{scores[c]:.4g}" if c in scores else "-" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    from matplotlib import pyplot

    return pyplot


def search_progress_plot(trials: list[TrialResult], path: Path) -> Path:
    """Best-so-far harmonic-mean AP vs trial and vs validation tokens evaluated."""
    pyplot = _pyplot()
    figure, (by_trial, by_tokens) = pyplot.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    curve = result_curve(trials)
    tokens = list(itertools.accumulate(computed_tokens(t) for t in trials))
    by_trial.step([t.trial + 1 for t in trials], curve, where="post")
    by_trial.set_xlabel("trial")
    budgets = sorted({t.budget for t in trials if t.budget is not None})
    for index, budget in enumerate(budgets):  # multi-fidelity: each budget's own scores
        at = [t for t in trials if t.budget == budget and t.status == "ok"]
        x, y = [t.trial + 1 for t in at], [t.harmonic_mean for t in at]
        by_trial.scatter(x, y, s=8, alpha=0.5, color=f"C{index + 2}", label=f"{budget} tokens/task")
    if budgets:
        by_trial.legend(fontsize=7, loc="lower right")
    by_tokens.step(tokens, curve, where="post", color="C1")
    by_tokens.set_xlabel("validation tokens evaluated (forward-pass positions)")
    for axes in (by_trial, by_tokens):
        axes.set_ylabel("best harmonic mean of AP")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def task_plot(rows: dict[str, dict], path: Path) -> Path:
    """Per task, AP and PR of each row (scored_json dicts) as grouped bars."""
    pyplot = _pyplot()
    tasks = list(next(iter(rows.values()))["tasks"])
    figure, panels = pyplot.subplots(1, 2, figsize=(11, 3.5), dpi=120, sharey=True)
    width = 0.8 / len(rows)
    for panel, (key, title) in zip(panels, (("preservation", "AP"), ("rate", "PR"))):
        for index, (label, scored) in enumerate(rows.items()):
            values = [scored["tasks"][t].get(key) or 0.0 for t in tasks]
            panel.bar([i + index * width for i in range(len(tasks))], values, width, label=label)
        panel.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
        panel.set_title(title)
        panel.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    panels[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def plan_heatmap(plan: MergePlan, source_names: tuple[str, ...], path: Path) -> Path:
    """The chosen method (row label), weights and densities per block as a heat map."""
    pyplot = _pyplot()
    columns = [f"weight {n}" for n in source_names] + [f"density {n}" for n in source_names]
    values = [
        list(c.weights) + list(c.densities or (float("nan"),) * len(source_names))
        for c in plan.choices
    ]
    figure, axes = pyplot.subplots(figsize=(1.5 + 1.3 * len(columns), 1 + 0.45 * len(values)))
    image = axes.imshow(values, cmap="viridis", aspect="auto", vmin=0.0)
    for row, line in enumerate(values):
        for column, value in enumerate(line):
            if not math.isnan(value):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", color="w")
    axes.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    labels = [f"{b.name}: {c.method}" for b, c in zip(plan.blocks, plan.choices)]
    axes.set_yticks(range(len(labels)), labels)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def top_trials_table(trials: list[TrialResult], count: int = 10) -> str:
    """The best trials with their harmonic mean, per-task AP and methods per block."""
    ok = sorted((t for t in trials if t.status == "ok"),
                key=lambda t: (-budget_rank(t), -t.harmonic_mean))  # fmt: skip
    lines = ["| trial | tokens/task | H (AP) | AP per task | methods per block |",
             "|---|---|---|---|---|"]  # fmt: skip
    for trial in ok[:count]:
        aps = ", ".join(f"{n} {s.preservation:.3f}" for n, s in trial.tasks.items())
        methods = ", ".join(f"{k.split(':')[0]} {v}" for k, v in trial.config.items()
                            if k.endswith(":method"))  # fmt: skip
        budget = "all" if trial.budget is None else trial.budget
        lines.append(
            f"| {trial.trial} | {budget} | {trial.harmonic_mean:.4f} | {aps} | {methods} |"
        )
    return "\n".join(lines)


def _methods(trial: TrialResult) -> str:
    """The methods of a trial's configuration, with how many blocks use each."""
    counts: dict[str, int] = {}
    for key, value in trial.config.items():
        if key.endswith(":method"):
            counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{method} x{count}" for method, count in counts.items())


def front_table(front: list[TrialResult], tasks: list[str], marks: dict[int, str]) -> str:
    """The front's trials: AP per task, H and the methods used; `marks` labels some trials
    (e.g. the harmonic-mean pick)."""
    header = ["trial", *(f"{t} AP" for t in tasks), "H (AP)", "methods (blocks)", ""]
    lines = ["| " + " | ".join(header).rstrip() + " |", "|" + "---|" * len(header)]
    for trial in sorted(front, key=lambda t: -t.tasks[tasks[0]].preservation):
        aps = [f"{trial.tasks[t].preservation:.4f}" for t in tasks]
        cells = [str(trial.trial), *aps, f"{trial.harmonic_mean:.4f}", _methods(trial),
                 marks.get(trial.trial, "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def front_plot(
    points: dict[str, list[tuple[float, ...]]],
    front: list[tuple[float, ...]],
    marked: dict[str, tuple[float, ...]],
    tasks: list[str],
    path: Path,
) -> Path:
    """Two tasks: AP of one vs the other, every trial (grey), the front joined as a staircase,
    the named `points` groups (sources, baselines) and `marked` points (picks) with labels.
    Three or more: parallel coordinates, one line per front point, sources and picks drawn
    over them."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5), dpi=120)
    if len(tasks) == 2:
        for index, (label, group) in enumerate(points.items()):
            if group:
                xs, ys = zip(*group)
                style = {"color": "0.7", "s": 10}  # every trial
                if index:  # the baselines, the sources
                    style = {"s": 50, "marker": "xsD^v"[(index - 1) % 5], "color": f"C{index + 2}"}
                axes.scatter(xs, ys, label=label, **style)
        ordered = sorted(front)  # the edge of what the front dominates: a staircase
        axes.step([p[0] for p in ordered], [p[1] for p in ordered], where="pre", color="C1")
        axes.scatter([p[0] for p in ordered], [p[1] for p in ordered], color="C1", s=18,
                     label="Pareto front")  # fmt: skip
        for index, (label, point) in enumerate(marked.items()):
            axes.scatter(*point, marker="*", s=200, color=("gold", "C2")[index % 2],
                         edgecolors="k", zorder=5, label=label)  # fmt: skip
        axes.set_xlabel(f"AP {tasks[0]}")
        axes.set_ylabel(f"AP {tasks[1]}")
    else:
        positions = list(range(len(tasks)))
        for point in front:
            axes.plot(positions, point, color="C1", alpha=0.5, linewidth=1)
        for index, (label, group) in enumerate(list(points.items())[1:]):
            for number, point in enumerate(group):
                axes.plot(positions, point, linestyle="--", color=f"C{index + 2}",
                          label=label if number == 0 else None)  # fmt: skip
        for label, point in marked.items():
            axes.plot(positions, point, linewidth=2.5, label=label)
        axes.plot([], [], color="C1", label="Pareto front")
        axes.set_xticks(positions, [f"AP {t}" for t in tasks])
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
