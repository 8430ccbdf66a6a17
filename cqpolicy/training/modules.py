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
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

from cqpolicy.training.data import LOG_EPS

__all__ = ["ReuseMLP", "ReusePolicyModule", "LayerSchedulerModule", "weighted_mse", "harm_scores"]


class ReuseMLP(nn.Module):
    """``in_features -> hidden -> hidden -> 1`` with SiLU; returns ``[rows, 1]`` predicted log impact.

    Normalised inputs are first clamped to the range the training split spanned (buffers ``low`` / ``high``,
    saved with the weights): the MLP never extrapolates, and a feature that was constant in training (e.g.
    ``steps_since_compute`` in traces that never reused) is held at its training value instead of reaching
    the net as a huge normalised number when it varies at run time.
    """

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("low", torch.full((in_features,), -math.inf))
        self.register_buffer("high", torch.full((in_features,), math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.clamp(x, self.low, self.high))


def weighted_mse(pred: torch.Tensor, y: torch.Tensor, impact: torch.Tensor, tolerance: float,
                 harm_weight: float) -> torch.Tensor:
    """MSE where rows with ``impact > tolerance`` weigh ``harm_weight`` times more (weighted mean)."""
    w = torch.where(impact > tolerance, torch.full_like(pred, harm_weight), torch.ones_like(pred))
    return (w * (pred - y).pow(2)).sum() / w.sum()


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
        self.val_auroc = BinaryAUROC()
        self.val_ap = BinaryAveragePrecision()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(1)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, impact = batch[0], batch[1], batch[2]
        pred = self(x)
        return weighted_mse(pred, y, impact, self.hparams.tolerance, self.hparams.harm_weight), pred, impact

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch[0]))
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
