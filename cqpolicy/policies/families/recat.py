"""``recat``: the DPS partition with distance 1 - linear CKA between the step features (ReCaT, from the ACQ-E
work), so groups follow changes in feature *structure* rather than magnitude.

ReCaT (ACQ-E work; citation as given in the project brief, not verified here); the partition DP is CacheQuant's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cqpolicy.policies.families.partition import PartitionConfig, PartitionPolicy
from cqpolicy.policies.registry import register

CKA_MAX_SAMPLES = 512  # rows x tokens kept per step: the Gram matrices are samples^2, so cap them


@dataclass(frozen=True)
class RecatConfig(PartitionConfig):
    """groups (K, default 10), min_len (1), max_len (0 = none), units ("attn1+ff"), calibration_samples (8)."""

    family: ClassVar[str] = "recat"


def cka_samples(features: torch.Tensor, max_samples: int = CKA_MAX_SAMPLES) -> torch.Tensor:
    """``[S, rows, tokens, width]`` -> ``[S, n, width]`` with rows x tokens as samples; tokens are thinned
    to evenly spaced ones (the same at every step) when rows x tokens exceeds ``max_samples``."""
    S, rows = features.shape[:2]
    x = features.reshape(S, rows, -1, features.shape[-1])
    tokens = x.shape[2]
    keep = max(1, min(tokens, max_samples // rows))
    if keep < tokens:
        x = x[:, :, torch.linspace(0, tokens - 1, keep).round().long()]
    return x.reshape(S, rows * keep, x.shape[-1])


def cka_matrix(samples: torch.Tensor) -> torch.Tensor:
    """``[S, S]`` linear CKA between every pair of steps of ``samples`` ``[S, n, d]`` (same as ``linear_cka``
    pairwise): one centred, Frobenius-normalised Gram matrix per step, then all inner products at once."""
    x = samples.double()
    x = x - x.mean(dim=1, keepdim=True)
    grams = (x @ x.transpose(1, 2)).flatten(1)  # [S, n*n]
    norms = grams.norm(dim=1, keepdim=True)
    grams = torch.where(norms > 0, grams / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return (grams @ grams.T).clamp(0.0, 1.0)  # a step without variance gets CKA 0 (as linear_cka)


@register("recat", RecatConfig)
class RecatPolicy(PartitionPolicy):
    def __init__(self, config: RecatConfig = RecatConfig()):
        super().__init__(config)

    def step_distance(self, outputs: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        return torch.stack([1.0 - cka_matrix(cka_samples(out)) for out in outputs.values()]).mean(dim=0)
