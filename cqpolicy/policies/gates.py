"""Budget-conditioned gates: a small net maps (log-SNR, progress, budget) to two numbers per cache unit, and a
compute budget turns them into a hard step x unit schedule.

At step ``s`` a unit whose cache is ``age`` steps old scores ``a_s + b_s * log(age)`` (``a``, ``b > 0``: the net's
outputs for that unit at that step) and computes when its score passes a threshold ``theta``; computing resets its
age to 1 at the next step. The threshold is set by bisection so the run spends the budget (a fraction of the
plain model's MACs) as closely as the discrete schedule allows without passing it; step 0 computes everything
(nothing is cached yet). Equal ``a`` and ``b`` for every unit is a uniform refresh interval (FORA at the budget:
the initialisation); a unit's ``a`` sets how early it refreshes, ``b`` how much staleness counts, both varying
with where sampling is. Keyed on log-SNR and progress, never on the step index, one artifact deploys at any step
count or scheduler and anywhere in its trained budget range.

The net is trained through the sampler (``cqpolicy.training.rollout``); deploying it needs only this module.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

GATE_FEATURES = ("log_snr", "progress", "budget")


class GateNet(nn.Module):
    """``[steps, 3]`` (normalised log-SNR, progress, budget) -> ``(a, b)``, each ``[steps, cells]``
    (cells = blocks x units). The last layer starts at zero: every unit alike, ``a = 0``, ``b = 1``."""

    def __init__(self, cells: int, hidden: int = 64):
        super().__init__()
        self.cells = cells
        self.net = nn.Sequential(nn.Linear(len(GATE_FEATURES), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * cells))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.net(x).split(self.cells, dim=1)
        return a, F.softplus(b + math.log(math.e - 1))  # b = 1 at zero


def gate_inputs(log_snrs, budget: float, mean, std) -> torch.Tensor:
    """The net's normalised inputs for every step of a run (``log_snrs``: one per step, in sampling order)."""
    snr = torch.as_tensor(log_snrs, dtype=torch.float32)
    steps = len(snr)
    progress = torch.arange(steps, dtype=torch.float32) / max(1, steps - 1)
    raw = torch.stack([snr, progress, torch.full((steps,), float(budget))], dim=1)
    return (raw - torch.as_tensor(mean, dtype=torch.float32)) / torch.as_tensor(std, dtype=torch.float32)


def unit_budget(budget: float, steps: int, row_macs: float, unit_macs: torch.Tensor) -> float:
    """MACs per row that the cells after step 0 may spend so that the run costs ``budget`` x the plain MACs."""
    fixed = row_macs - float(unit_macs.sum())  # embeddings, final layer: always run
    return budget * steps * row_macs - steps * fixed - float(unit_macs.sum())


def min_budget(steps: int, row_macs: float, unit_macs: torch.Tensor) -> float:
    """The least budget reachable: every step runs the fixed part, step 0 every unit."""
    fixed = row_macs - float(unit_macs.sum())
    return (steps * fixed + float(unit_macs.sum())) / (steps * row_macs)


def _simulate(a: torch.Tensor, b: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule of threshold ``theta``: (compute table, age of each cell's cache when decided), [steps, cells]."""
    steps, cells = a.shape
    table = torch.zeros(steps, cells, dtype=torch.bool)
    ages = torch.ones(steps, cells)
    table[0] = True
    age = torch.ones(cells)
    for s in range(1, steps):
        ages[s] = age
        compute = a[s] + b[s] * torch.log(age) > theta
        table[s] = compute
        age = torch.where(compute, 1.0, age + 1.0)
    return table, ages


def plan(a: torch.Tensor, b: torch.Tensor, budget: float, row_macs: float, unit_macs: torch.Tensor,
         iterations: int = 40) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The schedule spending at most ``budget`` of the plain MACs, as closely as a threshold can: (table,
    ``scores`` = ``a + b log(age)`` with the gradient of ``a`` and ``b``, ``theta``)."""
    steps, cells = a.shape
    macs = unit_macs.reshape(-1).double()
    if macs.numel() != cells:
        raise ValueError(f"{cells} units scored per step but {macs.numel()} unit MACs")
    left = unit_budget(budget, steps, row_macs, macs)
    a_, b_ = a.detach(), b.detach()

    def spent(theta):
        table, _ = _simulate(a_, b_, theta)
        return float((table[1:].double() * macs).sum())

    high = float((a_ + b_ * math.log(steps)).max()) + 1.0  # nothing after step 0 passes it
    low = float(a_.min()) - 1.0  # everything passes (age >= 1)
    if spent(low) <= left:
        high = low
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if spent(mid) <= left else (mid, high)
    table, ages = _simulate(a_, b_, high)
    return table, a + b * torch.log(ages), high
