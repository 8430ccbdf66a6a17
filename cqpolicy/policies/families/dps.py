"""``dps``: Dynamic Programming Schedule; K contiguous step groups chosen to minimise the rel-L1 drift of the
reused features from their group's first (computed) step.

CacheQuant: Comprehensively Accelerated Diffusion Models (Liu et al., CVPR 2025).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cqpolicy.policies.families.partition import PartitionConfig, PartitionPolicy
from cqpolicy.policies.registry import register


@dataclass(frozen=True)
class DpsConfig(PartitionConfig):
    """groups (K, default 10), min_len (1), max_len (0 = none), units ("attn1+ff"), calibration_samples (8)."""

    family: ClassVar[str] = "dps"


def rel_l1_distances(features: torch.Tensor) -> torch.Tensor:
    """``[S, S]``: entry ``[i, j]`` = ``mean|f_j - f_i| / mean|f_i|`` (``rel_l1``) for ``features`` ``[S, ...]``."""
    flat = features.reshape(features.shape[0], -1).double()
    scale = flat.abs().mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    # one row at a time: never materialise an [S, S, N] difference
    return torch.stack([(flat - flat[i]).abs().mean(dim=1) / scale[i] for i in range(flat.shape[0])])


@register("dps", DpsConfig)
class DpsPolicy(PartitionPolicy):
    def __init__(self, config: DpsConfig = DpsConfig()):
        super().__init__(config)

    def step_distance(self, outputs: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        # the cached step's output is the reference the reused steps drift from; average over (block, unit)
        return torch.stack([rel_l1_distances(out) for out in outputs.values()]).mean(dim=0)
