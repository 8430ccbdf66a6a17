"""Shared mechanism of ``dps`` and ``recat``: split the steps into K contiguous groups, compute at each group's
first step and reuse its features for the rest, with the split chosen by dynamic programming to minimise the
total distance between every reused step and its group's first step.

CacheQuant: Comprehensively Accelerated Diffusion Models (Liu et al., CVPR 2025), "Dynamic Programming Schedule".
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from cqpolicy.models.adapters import parse_units
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.calibration import record_unit_outputs
from cqpolicy.runtime import StepMismatchError


# -- the exact dynamic programme -------------------------------------------------------------------------
def _check_feasible(num_steps: int, num_groups: int, min_len: int, max_len: int | None) -> None:
    """ValueError unless ``num_steps`` splits into ``num_groups`` contiguous groups of ``min_len..max_len``."""
    if num_steps < 1:
        raise ValueError(f"cannot partition {num_steps} steps: need at least one step")
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    if min_len < 1:
        raise ValueError(f"min_len must be at least 1, got {min_len}")
    if max_len is not None and max_len < min_len:
        raise ValueError(f"max_len ({max_len}) is below min_len ({min_len})")
    bound = num_steps if max_len is None else max_len
    # K lengths in [min_len, bound] sum to S exactly when K*min_len <= S <= K*bound
    if num_groups * min_len > num_steps or num_groups * bound < num_steps:
        span = f"{min_len}..{max_len}" if max_len is not None else f"at least {min_len}"
        raise ValueError(f"no partition of {num_steps} steps into {num_groups} groups of {span} steps "
                         f"(needs {num_groups} x min_len <= {num_steps} <= {num_groups} x max_len)")


def group_costs(distance: torch.Tensor) -> torch.Tensor:
    """``[S+1, S+1]`` float64: entry ``[s, e]`` (s < e) is the cost of one group covering steps ``s..e-1``,
    i.e. ``sum_{j=s+1}^{e-1} distance[s, j]``; ``inf`` where ``e <= s``."""
    d = distance.to(torch.float64)
    S = d.shape[0]
    cum = torch.cumsum(d, dim=1)  # cum[s, j] = sum_{i <= j} d[s, i]
    s = torch.arange(S).unsqueeze(1)
    e = torch.arange(S + 1).unsqueeze(0)
    # cost(s, e) = cum[s, e-1] - cum[s, s]: drops d[s, <=s], keeps d[s, s+1 .. e-1]
    cost = cum.gather(1, (e - 1).clamp(min=0).expand(S, S + 1)) - cum.gather(1, s)
    costs = torch.full((S + 1, S + 1), float("inf"), dtype=torch.float64)
    costs[:S] = torch.where(e > s, cost, torch.full_like(cost, float("inf")))
    return costs


def partition_cost(distance: torch.Tensor, starts: list[int]) -> float:
    """Total distance of reused steps to their group's first step, for groups starting at ``starts``."""
    S = distance.shape[0]
    ends = list(starts[1:]) + [S]
    return float(sum(distance[s, s + 1:e].double().sum() for s, e in zip(starts, ends)))


def optimal_partition(distance: torch.Tensor, num_groups: int, min_len: int = 1,
                      max_len: int | None = None) -> list[int]:
    """Start steps (first is 0) of the ``num_groups`` contiguous groups of ``S`` steps that minimise
    ``sum_g sum_{j in g, j != start_g} distance[start_g, j]``, every group ``min_len..max_len`` steps long.

    Exact dynamic programme in O(S^2 K): ``best[k][e]`` is the least cost of covering steps ``0..e-1`` with
    ``k`` groups; ``best[k][e] = min_s best[k-1][s] + cost(s, e)`` over allowed lengths ``e - s``.
    Raises ValueError when no partition satisfies the bounds.
    """
    d = torch.as_tensor(distance)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance must be a square [S, S] matrix, got shape {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("distance holds NaN or infinite entries")
    S = d.shape[0]
    _check_feasible(S, int(num_groups), int(min_len), None if max_len is None else int(max_len))
    bound = S if max_len is None else min(int(max_len), S)

    costs = group_costs(d)
    length = torch.arange(S + 1).unsqueeze(0) - torch.arange(S + 1).unsqueeze(1)  # [s, e] -> e - s
    costs = costs.masked_fill((length < min_len) | (length > bound), float("inf"))

    best = torch.full((S + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0  # zero groups cover zero steps
    back = []
    for _ in range(num_groups):
        # candidates[s, e] = best cover of 0..s-1 so far + one more group s..e-1
        values, arg = (best.unsqueeze(1) + costs).min(dim=0)  # first minimum: deterministic ties
        best = values
        back.append(arg)
    if not torch.isfinite(best[S]):  # unreachable after _check_feasible; kept as a guard
        raise ValueError(f"no partition of {S} steps into {num_groups} groups within the length bounds")
    starts, e = [], S
    for arg in reversed(back):
        e = int(arg[e])
        starts.append(e)
    starts.reverse()
    assert starts[0] == 0
    return starts


# -- feature similarities ---------------------------------------------------------------------------------
def rel_l1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative L1 change from ``x`` to ``y``: ``mean|y - x| / mean|x|`` (0 when both are all zero)."""
    x, y = x.double(), y.double()
    return float((y - x).abs().mean() / x.abs().mean().clamp_min(torch.finfo(torch.float64).tiny))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between feature matrices ``x`` [n, d1] and ``y`` [n, d2]: rows are
    samples. HSIC with linear kernels on column-centred features, normalised to [0, 1]; invariant to
    isotropic scaling and orthogonal transforms. 0 when either input has no variance."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [n, d] matrices with the same n, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    n = x.shape[0]
    if n <= max(x.shape[1], y.shape[1]):
        # sample space: <K_x, K_y>_F with centred Gram matrices (cheaper when n is small)
        kx, ky = x @ x.T, y @ y.T
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        # feature space: ||y^T x||_F^2 = <K_x, K_y>_F (cheaper when n is large)
        cross, nx, ny = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denom = nx * ny
    if denom <= 0:
        return 0.0
    return float((cross / denom).clamp(0.0, 1.0))


# -- the policy -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartitionConfig:
    """Fields shared by ``dps`` and ``recat`` (each subclass sets ``family`` for its error messages)."""

    groups: int = 10  # K: number of contiguous step groups; each group's first step computes, the rest reuse
    min_len: int = 1  # shortest allowed group, in steps
    max_len: int = 0  # longest allowed group, in steps (0 = no bound)
    units: str = ""  # '+'-joined cache units scheduled (and measured); '': the model family's default units
    calibration_samples: int = 8  # samples in the uncached calibration run (2 rows each with guidance)

    family: ClassVar[str] = "partition"

    def __post_init__(self):
        name = self.family
        if self.groups < 1:
            raise ValueError(f"policy {name!r}: groups must be at least 1, got {self.groups}")
        if self.min_len < 1:
            raise ValueError(f"policy {name!r}: min_len must be at least 1, got {self.min_len}")
        if self.max_len < 0:
            raise ValueError(f"policy {name!r}: max_len must be non-negative (0 = no bound), got {self.max_len}")
        if self.max_len and self.max_len < self.min_len:
            raise ValueError(f"policy {name!r}: max_len ({self.max_len}) must be 0 or at least min_len "
                             f"({self.min_len})")
        if self.calibration_samples < 1:
            raise ValueError(f"policy {name!r}: calibration_samples must be at least 1, "
                             f"got {self.calibration_samples}")
        parse_units(self.units, name)


class PartitionPolicy(Policy):
    """Compute at the group start steps, reuse elsewhere (every block, every unit of ``units``).

    ``prepare`` calibrates: it records the uncached unit outputs, turns them into a step-distance matrix
    (``step_distance``, the one thing subclasses define) and solves ``optimal_partition``. Results are cached
    per (steps, scheduler, guidance_scale) for the model last prepared with.
    """

    static = True

    def __init__(self, config: PartitionConfig):
        self.config = config
        self.units = parse_units(config.units, self.name)
        self.starts: list[int] | None = None  # group start steps of the current schedule
        self.distance: torch.Tensor | None = None  # [S, S] step distances behind it
        self.calibrated_steps: int | None = None
        self._compute_steps: frozenset[int] = frozenset()
        self._schedules: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        self._model_ref = None

    def step_distance(self, outputs: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        """``[S, S]`` distance between steps from the per-(block, unit) outputs ``[S, rows, tokens, width]``."""
        raise NotImplementedError

    def prepare(self, model, settings) -> None:
        self.units = self.units or model.adapter.default_units
        steps = int(settings.steps)
        cfg = self.config
        max_len = cfg.max_len or None
        try:  # fail before the (costly) calibration run when the bounds cannot be met
            _check_feasible(steps, cfg.groups, cfg.min_len, max_len)
        except ValueError as exc:
            raise ValueError(f"policy {self.name!r} at {steps} steps: {exc}") from None
        transformer = model.transformer
        if self._model_ref is None or self._model_ref() is not transformer:
            self._schedules.clear()  # schedules belong to one model
            self._model_ref = weakref.ref(transformer)
        key = (steps, settings.scheduler, float(settings.guidance_scale))
        if key not in self._schedules:
            outputs = record_unit_outputs(model, settings, self.units, cfg.calibration_samples)
            distance = self.step_distance(outputs)
            if distance.shape != (steps, steps):
                raise RuntimeError(f"policy {self.name!r}: calibration gave a {tuple(distance.shape)} distance "
                                   f"matrix for {steps} steps")
            self._schedules[key] = (optimal_partition(distance, cfg.groups, cfg.min_len, max_len), distance)
            self.calibration_images = cfg.calibration_samples
        self.starts, self.distance = self._schedules[key]
        self.calibrated_steps = steps
        self._compute_steps = frozenset(self.starts)

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        # The schedule is fixed by calibration, so there is no per-call state; only check the step count.
        if self.calibrated_steps is not None and num_steps is not None and num_steps != self.calibrated_steps:
            raise StepMismatchError(f"policy {self.name!r} was calibrated for {self.calibrated_steps} steps but "
                                    f"this call runs {num_steps}; call prepare() with the new settings")

    def decide(self, query: UnitQuery) -> bool:
        if self.starts is None:
            raise RuntimeError(f"policy {self.name!r} has no schedule yet: call prepare(model, settings) before "
                               f"sampling (it calibrates the step groups)")
        if query.step >= self.calibrated_steps:  # inferred-step calls announce no step count up front
            raise StepMismatchError(f"policy {self.name!r} was calibrated for {self.calibrated_steps} steps but "
                                    f"was asked about step {query.step}")
        return query.step in self._compute_steps
