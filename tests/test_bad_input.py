"""Bad input fails fast with a message naming the problem, and leaves --out untouched.

Each rejected input is given together with `--overwrite` and a pre-existing --out folder that
holds one sentinel file: the command must stop before `RunDir.create` replaces the folder.
The last tests make every merge non-finite: its trials fail with the worst cost, the search
goes on, and the command ends with a one-line error instead of a recipe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import llama_config, save_model
from transformers import OPTConfig

from automerge_mk.cli import main
from automerge_mk.engine import MergeEngine
from automerge_mk.rundir import RunDir

SENTINEL = "results of an earlier run\n"


@pytest.fixture
def out(tmp_path) -> Path:
    """An existing --out folder holding one sentinel file."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text(SENTINEL)
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _texts(tmp_path: Path, name: str) -> Path:
    rows = [{"text": f"some validation text number {i}"} for i in range(4)]
    return _write_jsonl(tmp_path / f"{name}.jsonl", rows)


def _invoke(arguments: list) -> Result:
    return CliRunner().invoke(main, [str(a) for a in arguments])


def _demo_search(demo_models, out: Path, *extra, data: dict | None = None, base: bool = True):
    """`search arith reverse [--base base] --data ... --out out --overwrite ...extra`."""
    names = list(demo_models.specialists)
    arguments = ["search", *(demo_models.specialists[n] for n in names)]
    if base:
        arguments += ["--base", demo_models.base]
    data = {n: demo_models.validation[n] for n in names} if data is None else data
    for name, path in data.items():
        arguments += ["--data", f"{name}={path}"]
    arguments += ["--out", out, "--overwrite", "--quiet", "--trials", 4, "--initial", 2]
    return _invoke(arguments + list(extra))


def _assert_rejected(result: Result, *fragments: str) -> None:
    """A clean user error: exit 1 or 2, no traceback, a message holding every fragment."""
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def _assert_untouched(out: Path, inode: int | None = None) -> None:
    """--out still holds exactly the sentinel, unchanged, and was not deleted and re-made."""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == SENTINEL
    if inode is not None:
        assert out.stat().st_ino == inode


# --- models that cannot be merged ---


def test_different_architectures_name_both(tiny_llama, tiny_gpt2, out, tmp_path):
    inode = out.stat().st_ino
    arguments = ["search", tiny_llama, tiny_gpt2, "--methods", "linear"]
    arguments += ["--data", f"{tiny_llama.name}={_texts(tmp_path, 'a')}"]
    arguments += ["--data", f"{tiny_gpt2.name}={_texts(tmp_path, 'b')}"]
    result = _invoke(arguments + ["--out", out, "--overwrite", "--quiet"])
    _assert_rejected(result, "ArchitectureMismatchError", "LlamaForCausalLM", "GPT2LMHeadModel")
    _assert_untouched(out, inode)


def test_mismatched_shapes_name_the_first_differing_tensor(tiny_llama, out, tmp_path):
    narrow = save_model(llama_config(intermediate_size=48), tmp_path / "narrow")
    inode = out.stat().st_ino
    arguments = ["search", tiny_llama, narrow, "--methods", "linear"]
    arguments += ["--data", f"{tiny_llama.name}={_texts(tmp_path, 'a')}"]
    arguments += ["--data", f"narrow={_texts(tmp_path, 'b')}"]
    result = _invoke(arguments + ["--out", out, "--overwrite", "--quiet"])
    # Sorted names: lm_head, embed_tokens, layers.0.input_layernorm, then layers.0.mlp.down_proj.
    _assert_rejected(
        result,
        "ArchitectureMismatchError",
        "model.layers.0.mlp.down_proj.weight",
        "(32, 64)",
        "(32, 48)",
    )
    _assert_untouched(out, inode)


def test_mismatched_base_is_rejected(demo_models, tiny_llama, out):
    """A --base that is no ancestor of the sources (other shapes) is caught like a source."""
    names = list(demo_models.specialists)
    arguments = ["search", *(demo_models.specialists[n] for n in names), "--base", tiny_llama]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = _invoke(arguments + ["--out", out, "--overwrite", "--quiet"])
    _assert_rejected(result, "ArchitectureMismatchError", str(tiny_llama))
    _assert_untouched(out)


def test_architecture_mergekit_does_not_know_is_rejected_before_out_is_replaced(
    demo_models, out, tmp_path
):
    """Two compatible OPT models: mergekit has no OPT definition, so nothing can be merged."""
    folders = []
    for name in ("arith", "reverse"):
        config = OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            architectures=["OPTForCausalLM"],
        )
        folder = save_model(config, tmp_path / "opt" / name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(demo_models.base / file, folder / file)
        folders.append(folder)
    inode = out.stat().st_ino
    arguments = ["search", *folders, "--methods", "linear"]
    for name in ("arith", "reverse"):
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = _invoke(arguments + ["--out", out, "--overwrite", "--quiet"])
    _assert_rejected(result, "OPTForCausalLM")
    _assert_untouched(out, inode)


# --- methods and their parameters ---


@pytest.mark.parametrize(
    "method", ["ties", "task_arithmetic", "dare_ties", "breadcrumbs", "model_stock"]
)
def test_task_vector_method_without_base_is_rejected(demo_models, out, method):
    result = _demo_search(demo_models, out, "--methods", f"linear,{method}", base=False)
    # Names exactly the methods that need a base (not linear), and the option to add.
    _assert_rejected(result, f"MissingBaseModelError: {method} merge relative to a base", "--base")
    _assert_untouched(out)


def test_unknown_method_is_rejected_with_a_suggestion(demo_models, out):
    result = _demo_search(demo_models, out, "--methods", "linear,tiess")
    _assert_rejected(result, "SettingsError", "'tiess'", "did you mean 'ties'?")
    _assert_untouched(out)


def test_unsupported_mergekit_method_is_rejected(demo_models, out):
    """nearswap exists in mergekit but its threshold is not searched: rejected, not ignored."""
    result = _demo_search(demo_models, out, "--methods", "nearswap")
    _assert_rejected(result, "SettingsError", "'nearswap'")
    _assert_untouched(out)


@pytest.mark.parametrize("method", ["slerp", "nuslerp"])
def test_two_model_methods_refuse_three_sources(method):
    from automerge_mk.errors import SettingsError
    from automerge_mk.methods import check_methods

    check_methods((method,), has_base=True, sources=2)
    with pytest.raises(SettingsError, match=rf"{method} merges exactly 2 .*\(3 sources"):
        check_methods(("linear", method), has_base=True, sources=3)


def test_slerp_t_is_searched_as_the_weight(demo_models, out):
    result = _demo_search(demo_models, out, "--methods", "slerp", "--set", "t=0.3")
    _assert_rejected(result, "SettingsError", "'t'", "--weight-range", "second source's weight")
    _assert_untouched(out)


def test_unknown_strategy_is_rejected(demo_models, out):
    result = _demo_search(demo_models, out, "--strategy", "layerz:4")
    _assert_rejected(result, "SettingsError", "'layerz:4'")
    _assert_untouched(out)


@pytest.mark.parametrize("strategy", ["layers:0", "layers:x", "trace+blocks"])
def test_malformed_strategy_terms_are_rejected(demo_models, out, strategy):
    result = _demo_search(demo_models, out, "--strategy", strategy)
    bad_term = strategy.split("+")[-1]
    _assert_rejected(result, "SettingsError", repr(bad_term))
    _assert_untouched(out)


def test_misspelt_parameter_key_is_rejected(demo_models, out):
    """mergekit silently ignores `densty`; the search must refuse it."""
    result = _demo_search(demo_models, out, "--set", "densty=0.5")
    _assert_rejected(result, "SettingsError", "'densty'", "silently ignore")
    _assert_untouched(out)


def test_parameter_no_chosen_method_accepts_is_rejected(demo_models, out):
    """`lambda` is a task_arithmetic/ties parameter: with linear alone it would be ignored."""
    result = _demo_search(demo_models, out, "--methods", "linear", "--set", "lambda=1.0")
    _assert_rejected(result, "SettingsError", "'lambda'", "linear")
    _assert_untouched(out)


def test_fixing_a_searched_parameter_is_rejected(demo_models, out):
    result = _demo_search(demo_models, out, "--set", "weight=0.5")
    _assert_rejected(result, "SettingsError", "'weight'", "searched per block")
    _assert_untouched(out)


# --- validation data ---


def test_data_name_matching_no_model_is_rejected(demo_models, out):
    data = {"arth": demo_models.validation["arith"], "reverse": demo_models.validation["reverse"]}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", "--data arth=", "arith, reverse")
    _assert_untouched(out)


def test_model_without_data_is_rejected(demo_models, out):
    data = {"arith": demo_models.validation["arith"]}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", "no --data for reverse")
    _assert_untouched(out)


def test_missing_data_file_is_rejected(demo_models, out, tmp_path):
    missing = tmp_path / "nowhere" / "arith.jsonl"
    data = {"arith": missing, "reverse": demo_models.validation["reverse"]}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", str(missing), "does not exist")
    _assert_untouched(out)


def test_empty_data_file_is_rejected(demo_models, out, tmp_path):
    empty = tmp_path / "reverse.jsonl"
    empty.write_text("")
    data = {"arith": demo_models.validation["arith"], "reverse": empty}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", str(empty), "empty")
    _assert_untouched(out)


def test_data_file_without_any_text_is_rejected(demo_models, out, tmp_path):
    blank = _write_jsonl(tmp_path / "reverse.jsonl", [{"text": ""}, {"text": "   "}])
    data = {"arith": demo_models.validation["arith"], "reverse": blank}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", str(blank), "no non-empty text")
    _assert_untouched(out)


def test_missing_text_column_is_rejected(demo_models, out):
    result = _demo_search(demo_models, out, "--text-column", "body")
    _assert_rejected(result, "DataError", "no column 'body'", "'text'", "--text-column")
    _assert_untouched(out)


def test_unsupported_data_format_is_rejected(demo_models, out, tmp_path):
    odd = tmp_path / "arith.xml"
    odd.write_text("<texts/>")
    data = {"arith": odd, "reverse": demo_models.validation["reverse"]}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", str(odd), "unsupported data format")
    _assert_untouched(out)


def test_unreadable_data_file_is_rejected(demo_models, out, tmp_path):
    broken = tmp_path / "arith.jsonl"
    broken.write_text('{"text": "1 + 1 = 2"\nthis is not json\n')
    data = {"arith": broken, "reverse": demo_models.validation["reverse"]}
    result = _demo_search(demo_models, out, data=data)
    _assert_rejected(result, "DataError", str(broken))
    _assert_untouched(out)


# --- budgets and the run directory ---


def test_fewer_trials_than_initial_design_is_rejected(demo_models, out):
    result = _demo_search(demo_models, out, "--trials", "5", "--initial", "10")
    _assert_rejected(result, "--trials (5) is smaller than --initial (10)")
    _assert_untouched(out)


def test_unknown_dtype_is_rejected_before_out_is_replaced(demo_models, out):
    """Not a NaN problem: a dtype mergekit cannot cast to must be named before any trial."""
    result = _demo_search(demo_models, out, "--dtype", "float33")
    _assert_rejected(result, "float33")
    assert "NaN" not in result.output
    _assert_untouched(out)


def test_unavailable_device_is_rejected_before_out_is_replaced(demo_models, out):
    result = _demo_search(demo_models, out, "--device", "cuda:99")
    _assert_rejected(result, "cuda:99")
    _assert_untouched(out)


def test_existing_out_without_overwrite_is_rejected(demo_models, out):
    inode = out.stat().st_ino
    names = list(demo_models.specialists)
    arguments = ["search", *(demo_models.specialists[n] for n in names)]
    arguments += ["--base", demo_models.base, "--out", out, "--quiet"]
    for name in names:
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = _invoke(arguments + ["--trials", 4, "--initial", 2])
    _assert_rejected(result, "OutputExistsError", str(out), "--overwrite")
    _assert_untouched(out, inode)


def test_rejected_input_creates_no_out_directory(demo_models, tmp_path):
    fresh = tmp_path / "never" / "made"
    result = _demo_search(demo_models, fresh, "--set", "densty=0.5")
    _assert_rejected(result, "'densty'")
    assert not fresh.exists() and not fresh.parent.exists()


# --- a merge that gives NaN losses ---


@pytest.fixture
def nan_merges(monkeypatch):
    """Every merge comes out with one all-NaN tensor, as a float16 merge that overflows does.

    Sources with NaN weights are refused before the first trial (test_run_safety.py), so finite
    sources must give the non-finite merge: the real merge runs, then one of its tensors is
    overwritten, exactly where an overflowing kernel would leave it.
    """
    merge = MergeEngine.merge_into_model

    def overflowing(self, plan):
        model = merge(self, plan)
        with torch.no_grad():
            model.get_parameter("model.layers.1.mlp.down_proj.weight").fill_(float("nan"))
        return model

    monkeypatch.setattr(MergeEngine, "merge_into_model", overflowing)


def test_nan_trials_fail_with_worst_cost_and_the_search_goes_on(demo_models, nan_merges, tmp_path):
    out = tmp_path / "run"
    arguments = ["search", demo_models.specialists["arith"], demo_models.specialists["reverse"]]
    arguments += ["--base", demo_models.base, "--out", out, "--quiet"]
    arguments += ["--trials", 3, "--initial", 2]
    for name in ("arith", "reverse"):
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    result = _invoke(arguments)

    lines = (out / "trials.jsonl").read_text().splitlines()
    trials = [json.loads(line) for line in lines]
    assert [t["trial"] for t in trials] == [0, 1, 2]  # it went on after the first failure
    for trial in trials:
        assert trial["status"] == "failed", trial
        assert trial["cost"] == 1.0
        assert trial["harmonic_mean"] == 0.0
        assert trial["error"]
    _assert_rejected(result, "NoSuccessfulTrialError", "all 3 trials failed", "NaN")
    assert not (out / "recipe.yaml").exists()
    assert not (out / "model").exists()


def test_nan_trials_are_read_back_from_trials_jsonl(demo_models, nan_merges, tmp_path):
    """A failed trial's line is complete: RunDir.trials() must return it, not drop it as torn."""
    out = tmp_path / "run"
    arguments = ["search", demo_models.specialists["arith"], demo_models.specialists["reverse"]]
    arguments += ["--base", demo_models.base, "--out", out, "--quiet"]
    arguments += ["--trials", 2, "--initial", 2, "--methods", "linear,ties"]
    for name in ("arith", "reverse"):
        arguments += ["--data", f"{name}={demo_models.validation[name]}"]
    _assert_rejected(_invoke(arguments), "NoSuccessfulTrialError")
    assert len((out / "trials.jsonl").read_text().splitlines()) == 2
    read = RunDir(out).trials()
    assert [(t.trial, t.status, t.cost) for t in read] == [(0, "failed", 1.0), (1, "failed", 1.0)]
