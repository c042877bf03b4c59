"""A search session in a fresh process, trials of the baseline merges: prints its memory plan
and the measured peak of anonymous memory (JSON).

    python tests/memory_probe.py '{"sources": [...], "base": ..., "data": {...}, "out": ...,
                                   "settings": {...}}'

The libraries a search uses are imported, and a forward pass run, before the baseline is
taken, so the peak above the baseline is what the search itself holds (tests/test_memory.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mergekit.merge  # noqa: F401 - loaded before the baseline
import smac  # noqa: F401
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from automerge_mk import engine, evaluate, pipeline, search, space  # noqa: F401
from automerge_mk.memory import PeakAnonymous
from automerge_mk.settings import SearchSettings


def main() -> None:
    spec = json.loads(sys.argv[1])
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                        num_attention_heads=2, vocab_size=64))  # fmt: skip
    with torch.no_grad():
        tiny(input_ids=torch.ones((1, 8), dtype=torch.long))  # the thread pools, once
    del tiny
    request = pipeline.MergeRequest(spec["sources"], spec["base"], spec["data"])
    settings = SearchSettings(**spec["settings"])
    with PeakAnonymous() as peak:
        session = pipeline.open_session(request, settings, Path(spec["out"]), overwrite=False)
        inputs, objective = session.inputs, session.objective()
        plans = space.baseline_plans(inputs.blocks, tuple(str(s.path) for s in inputs.sources),
                                     str(inputs.base.path), inputs.dtype, 0)  # fmt: skip
        for label in ("ties w=0.5 d=0.5", "task_arithmetic w=1", "dare_ties w=0.5 d=0.5"):
            objective.evaluate_plan(plans[label], -1, {"row": label})
        session.run.release()
    plan = json.loads((Path(spec["out"]) / "memory.json").read_text())
    print(json.dumps({"baseline": peak.start, "peak": peak.peak, "plan": plan}))


if __name__ == "__main__":
    main()
