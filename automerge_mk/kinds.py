"""The kinds of model automerge-mk merges, behind one interface.

A kind says how a model folder is loaded (a source, the live model, the model stock mergekit
built), how segmentation's trace runs it (built on the meta device, with a forward call on
example inputs), how its tasks are scored, and which stock mergekit tool rebuilds its recipe:

| kind | models | tasks | recipe |
|---|---|---|---|
| `causal-lm` | transformers `AutoModelForCausalLM` | texts, prompt/label rows (evaluate.py) | mergekit-yaml / -multi |
| `sequence-classifier` | transformers `*ForSequenceClassification` that mergekit has an architecture file for (BERT, RoBERTa, DistilBERT) | texts with class labels (classify.py) | mergekit-yaml / -multi |
| `raw-module` | any `torch.nn.Module`: module.json + a state dict (modules.py) | images with class labels (classify.py) | mergekit-pytorch |

transformers' Auto classes load each transformers kind, modules.py the raw one; what this
module adds is only the choice between them, by what a folder holds.
"""  # noqa: E501

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelReferenceError
from .modules import build_module, example_input, is_module_folder, live_module

if TYPE_CHECKING:
    import torch

CAUSAL_LM, SEQUENCE_CLASSIFIER, RAW_MODULE = "causal-lm", "sequence-classifier", "raw-module"


class ModelKind:
    """A causal LM: transformers' AutoModelForCausalLM, scored on token losses."""

    name = CAUSAL_LM
    tool = "mergekit-yaml"  # mergekit-multi for a recipe of several documents
    classifies = False  # scored by cross-entropy over classes (classify.py), not tokens

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load(
        self, folder: Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False
    ) -> torch.nn.Module:
        """The folder's model with its weights, in `dtype` on `device`, in eval mode."""
        model = self.auto_class().from_pretrained(
            str(folder), dtype=dtype, trust_remote_code=trust_remote_code
        )
        return model.to(device).eval()

    def traced(self, folder: Path, trust_remote_code: bool = False) -> tuple[torch.nn.Module,
                                                                            Callable]:  # fmt: skip
        """The folder's architecture built on the meta device, and a forward call of it on
        example inputs (what segmentation's trace hooks record)."""
        import torch
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = self.auto_class().from_config(config, trust_remote_code=trust_remote_code)
        ids = torch.zeros((1, 4), dtype=torch.long, device="meta")
        return model, lambda m: m(input_ids=ids)


class SequenceClassifier(ModelKind):
    """A transformers sequence classifier, scored on its class logits."""

    name = SEQUENCE_CLASSIFIER
    classifies = True

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification


class RawModule(ModelKind):
    """A raw PyTorch module (modules.py), merged by mergekit-pytorch."""

    name = RAW_MODULE
    tool = "mergekit-pytorch"
    classifies = True

    def load(self, folder, dtype, device, trust_remote_code=False):
        return live_module(folder, dtype, device, trust_remote_code)

    def traced(self, folder, trust_remote_code=False):
        module, spec = build_module(folder, trust_remote_code)
        return module, lambda m: m(example_input(spec))


def kind_of(folder: Path) -> ModelKind:
    """The kind of a model folder: module.json is a raw module; a config.json whose
    architecture is a `*ForSequenceClassification` a sequence classifier; else a causal LM.

    Raises:
        ModelReferenceError: when config.json is unreadable.
    """
    folder = Path(folder)
    if is_module_folder(folder):
        return RawModule()
    config = folder / "config.json"
    if not config.is_file():
        return ModelKind()  # a PEFT adapter or a model not yet checked: sources.py says why
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as error:
        raise ModelReferenceError(f"cannot read {config}: {error}") from None
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return SequenceClassifier()
    return ModelKind()
