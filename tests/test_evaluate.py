"""The evaluator: bucketed, chunked losses equal plain ones; seeded evaluation subsets."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from automerge_mk.evaluate import load_texts, score_task, subset_task, tokenize_task


@pytest.fixture(scope="module")
def model_and_texts(demo_models):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base))
    model = AutoModelForCausalLM.from_pretrained(str(demo_models.base), dtype=torch.float32)
    texts = load_texts(demo_models.validation["arith"]) + load_texts(
        demo_models.validation["reverse"]
    )
    # Very different lengths: 1 to 8 validation texts joined into one.
    varied = [" ".join(texts[i : i + 1 + i % 8]) for i in range(0, 120, 3)]
    return model.eval(), tokenizer, varied


def _one_at_a_time(model, sequences) -> tuple[float, int]:
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence])
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss_sum += torch.nn.functional.cross_entropy(
                logits, ids[0, 1:], reduction="sum"
            ).item()
            count += len(sequence) - 1
    return loss_sum / count, count


def test_bucketed_chunked_loss_equals_the_plain_one_example_at_a_time_loss(model_and_texts):
    model, tokenizer, texts = model_and_texts
    task = tokenize_task("mixed", texts, tokenizer, max_length=512)
    lengths = [len(s) for s in task.sequences]
    assert max(lengths) > 5 * min(lengths)
    plain, count = _one_at_a_time(model, task.sequences)
    score = score_task(model, task, batch_tokens=256, chunk_rows=7)  # many batches and chunks
    assert score.tokens == count
    assert score.loss == pytest.approx(plain, abs=1e-5)


def test_eval_token_subset_is_fixed_by_the_seed(model_and_texts):
    _, tokenizer, texts = model_and_texts
    first = tokenize_task("t", texts, tokenizer, 512, eval_tokens=200, seed=0)
    again = tokenize_task("t", texts, tokenizer, 512, eval_tokens=200, seed=0)
    other = tokenize_task("t", texts, tokenizer, 512, eval_tokens=200, seed=1)
    assert first.indices == again.indices and first.sequences == again.sequences
    assert first.indices != other.indices
    assert 200 <= first.computed_tokens < 200 + max(len(s) for s in first.sequences)
    assert len(first.indices) < len(texts)


def test_smaller_budgets_keep_a_subset_of_a_larger_ones_examples(model_and_texts):
    _, tokenizer, texts = model_and_texts
    task = tokenize_task("t", texts, tokenizer, 512)
    sizes = [subset_task(task, tokens, seed=0) for tokens in (50, 150, 400)]
    for small, large in zip(sizes, sizes[1:]):
        assert set(small.indices) < set(large.indices)
        kept = {i: s for i, s in zip(large.indices, large.sequences)}
        assert all(kept[i] == s for i, s in zip(small.indices, small.sequences))
    assert sizes[0].indices and sizes[0].computed_tokens >= 50
    assert subset_task(task, task.computed_tokens, seed=0) is task  # all of it: unchanged
    assert subset_task(task, 150, seed=1).indices != sizes[1].indices


def test_forward_seconds_times_a_small_model_of_the_architecture_in_each_dtype(tiny_llama):
    from transformers import AutoConfig

    from automerge_mk.evaluate import forward_seconds

    config = AutoConfig.from_pretrained(tiny_llama)
    for dtype in (torch.float32, torch.bfloat16):
        seconds = forward_seconds(config, 256, dtype, "cpu")
        assert seconds is not None and 0 < seconds < 5
    assert config.num_hidden_layers == 4  # the caller's config is left as it was


def test_auto_eval_dtype_is_timed_once_per_machine_and_architecture(tiny_llama, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    import json

    from transformers import AutoConfig

    from automerge_mk.evaluate import timed_eval_dtype

    monkeypatch.setenv("AUTOMERGE_MK_CACHE", str(tmp_path / "cache"))
    config = AutoConfig.from_pretrained(tiny_llama)
    chosen, note = timed_eval_dtype(config, 128, "cpu", 1.5)
    assert chosen in ("float32", "bfloat16") and "one forward pass of 128 tokens" in note
    record = tmp_path / "cache" / "eval-dtype.json"
    ((key, timed),) = json.loads(record.read_text()).items()
    assert timed["chosen"] == chosen and timed["float32"] > 0 and "128 positions" in key
    other = "float32" if chosen == "bfloat16" else "bfloat16"
    record.write_text(json.dumps({key: timed | {"chosen": other}}))  # as if timed otherwise
    again, note = timed_eval_dtype(config, 128, "cpu", 1.5)
    assert again == other and "timed earlier" in note  # reused, not timed again
    assert timed_eval_dtype(config, 64, "cpu", 1.5)[1].startswith("--eval-dtype auto: ")
    assert len(json.loads(record.read_text())) == 2  # another batch size is another entry
    record.write_text("{not json")
    assert timed_eval_dtype(config, 128, "cpu", 1.5)[0] in ("float32", "bfloat16")
    assert len(json.loads(record.read_text())) == 1  # a damaged record is timed again
