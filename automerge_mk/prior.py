"""A predicted good merge per block from the similarity features, with no evaluation: the
configuration `suggest` writes and `--prior` puts in the search's initial design.

The rule is transparent on purpose (AutoMerge's own search starts blind; SimMerge learns such
a selector, SIP-BMM a prior, from many merges):

- task vectors whose top entries disagree in sign more than chance (`sign_conflict` above
  CONFLICT; 0.5 is what independent vectors give) or that point apart (cosine below
  -ORTHOGONAL) interfere: **TIES**, weights 1, density `density_90` (the share of entries
  that holds 90 % of the task vectors' mass), so that TIES trims what carries little;
- otherwise **task arithmetic**. Near-orthogonal task vectors (|cosine| at most ORTHOGONAL)
  barely interfere, so in task arithmetic's linear regime (fine-tuning moved the block
  little: `relative_norm` at most LINEAR) every task vector is added whole (weights 1);
  aligned ones (cosine above ORTHOGONAL) overlap and get 1 / (1 + (N - 1) cosine) each, from
  1 (orthogonal) to 1 / N (identical: their average). Where fine-tuning moved the block far
  (`relative_norm` NONLINEAR or more) adding whole vectors overshoots, so the weights fall to
  1 / N (the average), linearly in between. The two thresholds come from two measured
  points: SmolLM2-135M fine-tunes of the real benchmark move blocks by 0.2-1 % and are best
  merged at weights 1 (scripts/results/space.md), the demo's specialists by 15-33 % and are
  best averaged (its baselines: task_arithmetic w=0.5 0.63, w=1 0.50).

Weights and densities are clipped to the searched ranges and rounded to 2 decimals.
"""

from __future__ import annotations

from collections.abc import Sequence

from .features import BlockFeatures, ModelFeatures
from .settings import SearchSettings
from .types import Block, BlockChoice, MergePlan

CONFLICT = 0.6
ORTHOGONAL = 0.1
LINEAR, NONLINEAR = 0.05, 0.2  # relative_norm: task vectors add / overshoot
SCALES = (0.75, 1.25)  # the perturbations the search evaluates beside the prior


def _clip(value: float, bounds: tuple[float, float]) -> float:
    return round(min(max(value, bounds[0]), bounds[1]), 2)


def block_choice(features: BlockFeatures, sources: int, settings: SearchSettings) -> BlockChoice:
    """The rule's merge for one block (see the module docstring)."""
    interfere = features.sign_conflict > CONFLICT or features.cosine < -ORTHOGONAL
    if interfere and "ties" in settings.methods:
        density = _clip(features.density_90, settings.density_range)
        weight = _clip(1.0, settings.weight_range)
        return BlockChoice(method="ties", weights=(weight,) * sources,
                           densities=(density,) * sources)  # fmt: skip
    aligned = features.cosine > ORTHOGONAL
    overlap = 1.0 / (1.0 + (sources - 1) * features.cosine) if aligned else 1.0
    far = min(max((features.relative_norm - LINEAR) / (NONLINEAR - LINEAR), 0.0), 1.0)
    regime = 1.0 - far * (1.0 - 1.0 / sources)  # 1 in the linear regime, 1 / N far from it
    weight = _clip(min(overlap, regime), settings.weight_range)
    return BlockChoice(method="task_arithmetic", weights=(weight,) * sources)


def prior_plans(
    features: ModelFeatures,
    blocks: Sequence[Block],
    sources: tuple[str, ...],
    base: str,
    settings: SearchSettings,
    dtype: str,
) -> dict[str, MergePlan]:
    """The prior plan and its perturbations (every weight scaled by SCALES), by label."""
    by_name = {f.block: f for f in features.blocks}
    choices = tuple(block_choice(by_name[b.name], len(sources), settings) for b in blocks)
    plans = {}
    for scale in (1.0, *SCALES):
        scaled = tuple(
            c.model_copy(
                update={
                    "weights": tuple(_clip(w * scale, settings.weight_range) for w in c.weights)
                }
            )  # fmt: skip
            for c in choices
        )
        label = "prior" if scale == 1.0 else f"prior x{scale:g}"
        plans[label] = MergePlan(sources=sources, base=base, blocks=tuple(blocks), choices=scaled,
                                 dtype=dtype, seed=settings.seed)  # fmt: skip
    return plans
