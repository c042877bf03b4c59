"""Reports: the best-so-far curve."""

from __future__ import annotations

from automerge_mk.report import best_so_far


def test_best_so_far_never_falls_and_tracks_each_new_best():
    values = [0.2, 0.5, 0.4, 0.0, 0.7, 0.6]
    curve = best_so_far(values)
    assert curve == [0.2, 0.5, 0.5, 0.5, 0.7, 0.7]


def test_report_command_writes_markdown_and_plots_of_a_run(demo_run, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from automerge_mk.cli import main

    demo_run = shutil.copytree(demo_run, tmp_path / "run")  # the shared run stays as it was
    result = CliRunner().invoke(main, ["report", str(demo_run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    text = (demo_run / "report.md").read_text()
    best = json.loads((demo_run / "best.json").read_text())
    assert f"best trial {best['trial']}, harmonic-mean AP {best['harmonic_mean']:.4f}" in text
    top = text.split("## Top trials")[1].splitlines()[4]  # first row after the header
    assert top.startswith(f"| {best['trial']} | all | {best['harmonic_mean']:.4f} |")
    assert "## Trade-offs between tasks" in text and "on the Pareto front" in text
    for name in (
        "report-progress.png",
        "report-tasks.png",
        "report-blocks.png",
        "report-front.png",
    ):
        assert f"]({name})" in text
        assert (demo_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    from click.testing import CliRunner

    from automerge_mk.cli import main

    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not an automerge-mk run directory" in result.output


def test_a_one_trial_search_summary_counts_one_trial(demo_models, tmp_path):
    from click.testing import CliRunner
    from conftest import short_search_arguments

    from automerge_mk.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, short_search_arguments(demo_models, out, 1))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "summary.md").read_text().split("\n\n")[1].startswith("1 trial (0 failed) in ")
