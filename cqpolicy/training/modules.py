"""What is trained: a per-row reuse-harm regressor (MLP) and a learned static step x block x unit table.

``ReusePolicyModule`` regresses ``y = log(impact + 1e-6)`` from runtime features. Its loss is a
**quality-weighted** MSE: rows whose true impact exceeds ``tolerance`` weigh ``harm_weight`` times more,
because predicting a harmful reuse as safe costs image quality while the opposite only costs speed.
Validation reports how well the predicted impact ranks harmful (impact > tolerance) rows above safe ones
(AUROC, average precision).

``LayerSchedulerModule`` is a Learning-to-Cache-style router (Ma et al., 2024) learned from our impact labels
instead of by back-propagating through the sampler: one logit per (step, block, unit), reuse probability
``g = sigmoid(logits)``, loss ``mean(g * impact_norm) + budget_weight * (mean(1 - g) - compute_budget)^2``.
Cells without a label (step 0, never probed) are forced to compute.

``fit_intervals`` is the phase-locked alternative: one refresh interval per (block, unit) from a set whose
members divide one another (1, 2, 4, 8), all refreshes in phase with step 0, chosen in closed form to
minimise the labels' predicted harm of reusing ever staler caches under the compute budget. The table it
yields deploys exactly like the router's.
"""
from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from cqpolicy.policies.networks import ReuseMLP  # noqa: F401  (the deployed net; trained here)
from cqpolicy.training.data import LOG_EPS

__all__ = ["ReuseMLP", "ReusePolicyModule", "LayerSchedulerModule", "weighted_mse", "harm_scores", "chain_costs",
           "fit_intervals"]


def weighted_mse(pred: torch.Tensor, y: torch.Tensor, impact: torch.Tensor, tolerance: float,
                 harm_weight: float, total_weight=None) -> torch.Tensor:
    """MSE where rows with ``impact > tolerance`` weigh ``harm_weight`` times more (weighted mean);
    ``total_weight(w)``: the weight sum to divide by (under DDP, every rank's share of the batch)."""
    w = torch.where(impact > tolerance, torch.full_like(pred, harm_weight), torch.ones_like(pred))
    return (w * (pred - y).pow(2)).sum() / (w.sum() if total_weight is None else total_weight(w))


def harm_scores(pred: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Predicted log impact -> a score in (0, 1), monotone, 0.5 at the tolerance (float64: no saturation ties)."""
    return torch.sigmoid(pred.double() - math.log(tolerance + LOG_EPS))


class ReusePolicyModule(L.LightningModule):
    def __init__(self, in_features: int, hidden: int = 64, tolerance: float = 0.0, harm_weight: float = 4.0,
                 lr: float = 1e-3, weight_decay: float = 1e-2, target_mean: float = 0.0,
                 input_range: tuple[list[float], list[float]] | None = None):
        super().__init__()
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite impact >= 0, got {tolerance}")
        if not harm_weight >= 1:
            raise ValueError(f"harm_weight must be >= 1, got {harm_weight}")
        self.save_hyperparameters()
        self.mlp = ReuseMLP(in_features, hidden)
        with torch.no_grad():  # start at the mean log impact: the first steps learn features, not the offset
            self.mlp.net[-1].bias.fill_(target_mean)
            if input_range is not None:  # the training split's normalised min / max per feature
                self.mlp.low.copy_(torch.tensor(input_range[0]))
                self.mlp.high.copy_(torch.tensor(input_range[1]))
        # every DDP rank validates on the whole validation split: nothing to sync
        self.val_auroc = BinaryAUROC(sync_on_compute=False)
        self.val_ap = BinaryAveragePrecision(sync_on_compute=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(1)

    def _loss(self, batch, total_weight=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, impact = batch[0], batch[1], batch[2]
        pred = self(x)
        return (weighted_mse(pred, y, impact, self.hparams.tolerance, self.hparams.harm_weight, total_weight),
                pred, impact)

    def training_step(self, batch, batch_idx):
        ranks = self.trainer.world_size if self._trainer is not None else 1
        if ranks == 1:
            loss, _, _ = self._loss(batch)
        else:  # each rank holds a share of the batch: divide by the whole batch's weight, times the ranks DDP
            #      averages over, so the averaged gradient is the one-process gradient
            loss, _, _ = self._loss(batch, lambda w: self.all_gather(w.sum().detach()).sum() / ranks)
        self.log("train_loss", loss * ranks, on_step=True, on_epoch=True, batch_size=max(1, len(batch[0])),
                 reduce_fx="mean", sync_dist=ranks > 1)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, pred, impact = self._loss(batch)
        harmful = (impact > self.hparams.tolerance).long()
        self.val_auroc.update(harm_scores(pred, self.hparams.tolerance), harmful)
        self.val_ap.update(harm_scores(pred, self.hparams.tolerance), harmful)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        self.log("val_auroc", self.val_auroc, on_epoch=True, prog_bar=True)
        self.log("val_ap", self.val_ap, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class LayerSchedulerModule(L.LightningModule):
    """A learned reuse table. ``impact_table``: mean impact per ``[steps, blocks, units]`` cell, NaN if unknown."""

    def __init__(self, impact_table: torch.Tensor, compute_budget: float = 0.5, budget_weight: float = 50.0,
                 lr: float = 0.2):
        super().__init__()
        if not 0 < compute_budget <= 1:
            raise ValueError(f"compute_budget must lie in (0, 1], got {compute_budget}")
        if impact_table.ndim != 3:
            raise ValueError(f"impact_table must be [steps, blocks, units], got {list(impact_table.shape)}")
        impact_norm, known = self.normalize(impact_table)
        self.save_hyperparameters(ignore=["impact_table"])
        self.register_buffer("impact_norm", impact_norm)
        self.register_buffer("known", known)
        self.logits = nn.Parameter(torch.zeros(impact_table.shape))

    @staticmethod
    def normalize(impact_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(impact / mean over known cells, known)``; unknown cells (NaN, and all of step 0) get 0 and False."""
        known = ~torch.isnan(impact_table)
        known[0] = False  # step 0 always computes: nothing is cached yet
        if not bool(known.any()):
            raise ValueError("the impact table holds no probed cell after step 0")
        values = torch.where(known, impact_table, torch.zeros_like(impact_table)).float()
        if bool((values < 0).any()) or not bool(torch.isfinite(values).all()):
            raise ValueError("impacts must be finite and >= 0")
        return values / values[known].mean().clamp_min(1e-12), known

    def reuse_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.logits) * self.known  # unknown cells: g = 0, i.e. compute

    def loss(self, impact_norm: torch.Tensor | None = None) -> torch.Tensor:
        impact_norm = self.impact_norm if impact_norm is None else impact_norm
        g = self.reuse_probability()
        quality = (g * impact_norm).mean()
        budget = ((1 - g).mean() - self.hparams.compute_budget).pow(2)
        return quality + self.hparams.budget_weight * budget

    def training_step(self, batch, batch_idx):
        # the batch is the raw impact table (the data module yields it every step)
        impact_norm, known = self.normalize(batch.to(self.logits.device))
        if not torch.equal(known, self.known):
            raise ValueError("the impact table fed to the scheduler has other known cells than it was built for")
        loss = self.loss(impact_norm)
        table = self.table()
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=1)
        self.log("compute_fraction", table.float().mean(), on_step=False, on_epoch=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.logits], lr=self.hparams.lr)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """The exported bool table: True = compute (g < 0.5, every unknown cell, all of step 0)."""
        compute = self.reuse_probability() < 0.5
        compute = compute | ~self.known
        compute[0] = True
        return compute


def chain_costs(impact: torch.Tensor, intervals: Sequence[int]) -> torch.Tensor:
    """Predicted harm of refreshing each (block, unit) every k steps: ``[len(intervals), blocks, units]``.

    ``impact[t]`` is the harm of reusing at step t a cache computed one step before. A heuristic, not a bound:
    the unit's own output drift over s steps is at most the sum of its one-step drifts (triangle inequality),
    but the labels are per-step-normalised, downstream-weighted model-output errors, for which the sum is only
    an estimate; reusing an s-steps-stale cache at step t is priced ``impact[t-s+1] + ... + impact[t]``, summed
    over the steps an interval-k schedule reuses (those with ``t % k != 0``). Unprobed cells (NaN, e.g. step 0)
    count as free.
    """
    impact = torch.nan_to_num(impact.double(), nan=0.0)
    prefix = torch.cat([torch.zeros_like(impact[:1]), impact.cumsum(0)])  # prefix[t] = sum of impact[:t]
    out = []
    for k in intervals:
        cost = torch.zeros_like(impact[0])
        for t in range(impact.shape[0]):
            s = t % k
            if s:
                cost += prefix[t + 1] - prefix[t + 1 - s]
        out.append(cost)
    return torch.stack(out)


def fit_intervals(impact: torch.Tensor, compute_budget: float,
                  intervals: Sequence[int] = (1, 2, 4, 8)) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per (block, unit) refresh interval from ``intervals`` minimising the summed ``chain_costs`` with at most
    ``compute_budget`` of the step x block x unit cells computed; returns ``(compute table [steps, blocks,
    units], chosen intervals [blocks, units], lagrange multiplier)``.

    Every unit computes at steps 0, k, 2k, ...; the intervals must divide one another so that all refreshes
    stay in phase (a longer interval's compute steps are also every shorter one's). The choice is exact per
    unit for a price ``lam`` per computed cell; ``lam`` is bisected to the smallest price that meets the budget.
    """
    intervals = sorted(set(int(k) for k in intervals))
    if not intervals or intervals[0] < 1 or any(b % a for a, b in zip(intervals, intervals[1:])):
        raise ValueError(f"intervals must be positive and each divide the next (refreshes in phase), got {intervals}")
    if not 0 < compute_budget <= 1:
        raise ValueError(f"compute_budget must lie in (0, 1], got {compute_budget}")
    steps, blocks, units = impact.shape
    costs = chain_costs(impact, intervals)  # [K, blocks, units]
    computes = torch.tensor([len(range(0, steps, k)) for k in intervals], dtype=torch.float64)[:, None, None]
    floor = len(range(0, steps, intervals[-1])) / steps
    if compute_budget < floor:
        raise ValueError(f"compute_budget {compute_budget} is below what the longest interval ({intervals[-1]}) "
                         f"computes ({floor:.3f}); add a longer interval or raise the budget")

    def choose(lam: float) -> torch.Tensor:
        return (costs + lam * computes).argmin(0)  # first (shortest) interval on ties

    def fraction(choice: torch.Tensor) -> float:
        return float(computes[choice, 0, 0].sum() / (steps * blocks * units))

    lo, hi = 0.0, 1.0
    while fraction(choose(hi)) > compute_budget:  # find a price high enough
        lo, hi = hi, hi * 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(choose(mid)) > compute_budget else (lo, mid)
    chosen = torch.tensor(intervals)[choose(hi)]  # [blocks, units]
    table = torch.arange(steps)[:, None, None] % chosen[None] == 0
    return table, chosen, hi
