"""What the sources' weights and one small probe say before anything is merged: per-block
similarity features (SimMerge, arXiv 2601.09473; SIP-BMM's task-vector and activation
differences), computed once, with no merge and no labels.

Per block, over its tensors (task vector τ_i = source_i − base, in float32):

- `norms`: ‖τ_i‖ per source, `norm_ratio` = largest / smallest, and `relative_norm` = the
  mean of ‖τ_i‖ / ‖base‖ (how far fine-tuning moved the block: task arithmetic's linear
  regime is where it is small);
- `cosine`: cos(τ_i, τ_j), averaged over the pairs of sources;
- `sign_conflict`: among the coordinates where both task vectors are in their tensor's top
  20 % by magnitude (what TIES keeps at density 0.2), the share whose signs differ (pairs
  averaged); independent task vectors give about 0.5;
- `density_90`: the fraction of a tensor's largest-magnitude entries that holds 90 % of its
  task vector's L1 mass (what a density can drop; mergekit sparsifies per tensor), averaged
  over tensors weighted by mass, then over sources;
- `activation_distance` (causal LMs only): on a probe of a few hundred tokens,
  ‖h_i − h_j‖ / mean(‖h_i‖, ‖h_j‖) of the hidden states after the block's last layer (blocks
  of layers only), pairs averaged;

and for the whole model, `kl`: the symmetric KL divergence between the sources' next-token
distributions on the probe, per token, pairs averaged.

Hand-written: mergekit computes task vectors inside its kernels but exposes no statistics of
them, and neither SMAC nor peft offers such features.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from .memory import MappedModel
from .modules import is_module_folder, merged_names
from .segment import load_config, merge_tensor_keys
from .types import Block

TOP = 0.2  # the density at which sign conflicts are counted
MASS = 0.9  # the share of L1 mass `density_90` asks for


class BlockFeatures(BaseModel):
    """The similarity features of one block (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    block: str
    norms: tuple[float, ...]
    norm_ratio: float
    relative_norm: float
    cosine: float
    sign_conflict: float
    density_90: float
    activation_distance: float | None = None


class ModelFeatures(BaseModel):
    """Every block's features and the whole model's next-token KL on the probe."""

    model_config = ConfigDict(frozen=True)

    blocks: tuple[BlockFeatures, ...]
    kl: float | None = None
    probe_tokens: int = 0


class _Sums:
    """Running sums of one block over its tensors, for every source and pair."""

    def __init__(self, sources: int):
        pairs = list(itertools.combinations(range(sources), 2))
        self.squares = [0.0] * sources
        self.base_squares = 0.0
        self.mass = [0.0] * sources
        self.concentrated = [0.0] * sources  # mass-weighted density_90 of each tensor
        self.dots = dict.fromkeys(pairs, 0.0)
        self.both_top = dict.fromkeys(pairs, 0)
        self.conflicts = dict.fromkeys(pairs, 0)

    def add(self, base: torch.Tensor, vectors: list[torch.Tensor]) -> None:
        self.base_squares += float(base.square().sum())
        tops = []
        for i, vector in enumerate(vectors):
            magnitude = vector.abs()
            self.squares[i] += float(vector.square().sum())
            mass = float(magnitude.sum())
            self.mass[i] += mass
            self.concentrated[i] += mass * _density_holding(magnitude, MASS)
            count = max(1, math.ceil(TOP * magnitude.numel()))
            threshold = torch.topk(magnitude, count, sorted=False).values.min()
            tops.append(magnitude >= threshold)
        for i, j in self.dots:
            self.dots[i, j] += float(torch.dot(vectors[i], vectors[j]))
            both = tops[i] & tops[j]
            self.both_top[i, j] += int(both.sum())
            self.conflicts[i, j] += int((both & (vectors[i] * vectors[j] < 0)).sum())

    def features(self, name: str, distance: float | None) -> BlockFeatures:
        norms = tuple(math.sqrt(s) for s in self.squares)
        cosines = [self.dots[i, j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0
                   for i, j in self.dots]  # fmt: skip
        shares = [self.conflicts[p] / self.both_top[p] for p in self.dots if self.both_top[p]]
        densities = [c / m for c, m in zip(self.concentrated, self.mass) if m > 0]
        smallest, base = min(norms), math.sqrt(self.base_squares)
        return BlockFeatures(
            block=name,
            norms=norms,
            norm_ratio=max(norms) / smallest if smallest > 0 else math.inf,
            relative_norm=sum(norms) / len(norms) / base if base > 0 else math.inf,
            cosine=sum(cosines) / len(cosines),
            sign_conflict=sum(shares) / len(shares) if shares else 0.0,
            density_90=sum(densities) / len(densities) if densities else 1.0,
            activation_distance=distance,
        )


def _density_holding(magnitude: torch.Tensor, share: float) -> float:
    """The smallest fraction of entries, largest first, whose sum is `share` of the total."""
    total = float(magnitude.sum())
    if total <= 0:
        return 1.0
    ordered = torch.sort(magnitude, descending=True).values
    needed = int(torch.searchsorted(torch.cumsum(ordered, 0), share * total)) + 1
    return min(needed, ordered.numel()) / ordered.numel()


def weight_features(
    sources: Sequence[Path], base: Path, blocks: Sequence[Block], trust_remote_code: bool = False
) -> dict[str, _Sums]:
    """Each block's running sums over its tensors, read memory-mapped one tensor at a time
    (tensors whose shapes differ between the models, e.g. token-indexed ones of different
    vocabularies, are left out)."""
    if is_module_folder(base):  # a raw PyTorch model merges every floating tensor
        keys = merged_names(base)
    else:
        keys = merge_tensor_keys(base, load_config(base, trust_remote_code))
    with ExitStack() as stack:
        models = []
        for folder in (base, *sources):
            models.append(MappedModel(folder, keys, torch.float32, "cpu"))
            stack.callback(models[-1].close)
        return _block_sums(models, keys, blocks, len(sources))


def _block_sums(models, keys, blocks: Sequence[Block], sources: int) -> dict[str, _Sums]:
    sums = {}
    for block in blocks:
        sums[block.name] = _Sums(sources)
        for name in block.tensors:
            if name not in keys:
                continue
            tensors = [model[name] for model in models]
            if len({t.shape for t in tensors}) > 1:
                continue
            vectors = [(t - tensors[0]).flatten() for t in tensors[1:]]
            sums[block.name].add(tensors[0].flatten(), vectors)
    return sums


@torch.no_grad()
def probe_features(
    sources: Sequence[Path],
    blocks: Sequence[Block],
    token_ids: list[int],
    trust_remote_code: bool = False,
) -> tuple[dict[str, float], float]:
    """On the probe `token_ids`: per block of layers, the mean relative distance of the
    sources' hidden states after its last layer, and the symmetric next-token KL per token
    (each source loaded in turn, in float32)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([token_ids])
    states, logprobs = [], []
    for folder in sources:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        output = model(input_ids=ids, output_hidden_states=True)
        states.append([h[0] for h in output.hidden_states])
        logprobs.append(torch.log_softmax(output.logits[0].float(), dim=-1))
        del model
    pairs = list(itertools.combinations(range(len(sources)), 2))
    distances = {}
    for block in blocks:
        if block.layers is None:
            continue
        after = block.layers[1]  # layers are [start, end); hidden_states[k] follows layer k-1
        values = []
        for i, j in pairs:
            a, b = states[i][after], states[j][after]
            scale = (a.norm(dim=-1) + b.norm(dim=-1)) / 2
            values.append(float(((a - b).norm(dim=-1) / scale.clamp_min(1e-12)).mean()))
        distances[block.name] = sum(values) / len(values)
    kls = []
    for i, j in pairs:
        p, q = logprobs[i], logprobs[j]
        forward = (p.exp() * (p - q)).sum(-1)
        backward = (q.exp() * (q - p)).sum(-1)
        kls.append(float((forward + backward).mean() / 2))
    return distances, sum(kls) / len(kls)


def model_features(
    sources: Sequence[Path],
    base: Path,
    blocks: Sequence[Block],
    probe: list[int] | None = None,
    trust_remote_code: bool = False,
) -> ModelFeatures:
    """Every block's features; with `probe` token ids (of the sources' shared vocabulary),
    the activation features too."""
    sums = weight_features(sources, base, blocks, trust_remote_code)
    distances, kl = ({}, None)
    if probe:
        distances, kl = probe_features(sources, blocks, probe, trust_remote_code)
    return ModelFeatures(
        blocks=tuple(sums[b.name].features(b.name, distances.get(b.name)) for b in blocks),
        kl=kl,
        probe_tokens=len(probe or ()),
    )


def features_table(features: ModelFeatures, names: Sequence[str]) -> str:
    """The features as an aligned text table, one block per row."""
    header = ["block", *(f"|τ {n}|" for n in names), "ratio", "|τ|/|base|", "cosine",
              "sign conflict", "density 90%", "activation dist"]  # fmt: skip
    rows = [header]
    for f in features.blocks:
        distance = "-" if f.activation_distance is None else f"{f.activation_distance:.4f}"
        rows.append([f.block, *(f"{n:.4g}" for n in f.norms), f"{f.norm_ratio:.3f}",
                     f"{f.relative_norm:.4f}",
                     f"{f.cosine:+.4f}", f"{f.sign_conflict:.3f}", f"{f.density_90:.3f}",
                     distance])  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if features.kl is not None:
        lines.append(f"next-token KL between the sources (symmetric, per token, on "
                     f"{features.probe_tokens} probe tokens): {features.kl:.4f}")  # fmt: skip
    return "\n".join(lines)
