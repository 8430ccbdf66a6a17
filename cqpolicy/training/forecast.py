"""``fit_forecast``: a static schedule -> a ``forecast`` artifact (``forecast:path=DIR``), fitted in closed form.

Two passes through the one sampler and runtime on calibration seeds:

1. the schedule ``SPEC`` runs as it deploys, and a wrapper records which (step, block, unit) cells compute;
   a schedule that decides differently for other samples or batches is refused (it is not static);
2. the uncached model runs, and at every cell the schedule reuses, the unit's true output ``y`` and its
   outputs at the schedule's last ``K`` computed steps ``h`` (newest first) feed the normal equations
   ``G = sum h h^T`` and ``r = sum h y`` of that cell (float64, accumulated over every row and element; no
   outputs are stored).

Each cell's weights solve ``(G + l I) w = r + l e_0``: ridge towards plain reuse, with ``l = ridge * trace(G) / K``.
Optional on-policy rounds (DAgger) then run the sampler *under the fitted forecast* and add each reused cell's true
output at the state the forecast led to, with the history that run computed, before solving again.
Held-out calibration seeds report how much of plain reuse's squared error the forecast leaves, teacher-forced (the
inputs are uncached outputs; next to TaylorSeer's order-1 forecast on the same cells) and on-policy (on the
trajectories the forecast itself produces).
"""
from __future__ import annotations

import math
import os
import time
from collections import deque

import torch

from cqpolicy import seeds as seed_roles
from cqpolicy.policies.artifact import check_target, save_artifact
from cqpolicy.policies.base import DelegatingPolicy, Policy
from cqpolicy.policies.families.forecast import forecast_by_channel

__all__ = ["fit_forecast"]


class ScheduleError(ValueError):
    """The schedule cannot carry a fitted forecast (one line)."""


class _DecisionRecorder(DelegatingPolicy):
    """Passes every call to the schedule and records which cells computed (all rows alike, or refused)."""

    def __init__(self, inner: Policy, spec: str):
        super().__init__(inner)
        self.spec = spec
        self.table: dict[tuple[int, int, str], bool] = {}

    def decide(self, query):
        decision = super().decide(query)
        if torch.is_tensor(decision):
            if decision.numel() and not bool((decision == decision.reshape(-1)[0]).all()):
                raise ScheduleError(f"schedule {self.spec!r} decides per sample: a fitted forecast needs a static "
                                    f"schedule")
            decision = bool(decision.reshape(-1)[0]) if decision.numel() else True
        computed = bool(decision) or not query.has_cache
        key = (query.step, query.block, query.unit)
        if self.table.setdefault(key, computed) != computed:
            raise ScheduleError(f"schedule {self.spec!r} decided step {query.step}, block {query.block}, "
                                f"{query.unit} differently for two batches: a fitted forecast needs a static schedule")
        return decision


class _NormalEquations(Policy):
    """Accumulates each reused cell's normal equations ``G``, ``r`` and ``y.y``.

    Without ``weights`` the run is uncached (teacher-forced: ``h`` and ``y`` come from the uncached trajectory).
    With ``weights`` the run follows that forecast (on-policy, DAgger-style): every reused cell takes a soft
    decision of gate 0, so the sample evolves exactly as under the deployed forecast while the unit still computes
    its true output at that state, which is the cell's label; ``h`` is the history this trajectory computed.
    On-policy runs also sum the squared error of the forecast and of plain reuse against those labels.
    """

    name = "forecast-fit"

    def __init__(self, units: tuple[str, ...], table: torch.Tensor, order: int, weights: torch.Tensor | None = None,
                 channel_dim: int | None = None, channel_weights: dict | None = None):
        self.units, self.table, self.order, self.weights = units, table, order, weights
        # per-channel fits: each channel's own weights and a bias (inputs [h_0 .. h_{order-1}, 1], bias last)
        self.channel_dim, self.channel_weights = channel_dim, channel_weights
        self.channel_gram: dict = {}  # cell -> [C, order + 1, order + 1]
        self.channel_cross: dict = {}  # cell -> [C, order + 1]
        steps, blocks, n = table.shape
        self.gram = torch.zeros(steps, blocks, n, order, order, dtype=torch.float64)
        self.cross = torch.zeros(steps, blocks, n, order, dtype=torch.float64)
        self.target = torch.zeros(steps, blocks, n, dtype=torch.float64)
        self.count = torch.zeros(steps, blocks, n, dtype=torch.long)  # inputs available at the cell (<= order)
        self.last: dict = {}  # cell -> steps of its history, newest first
        self.errors = {"forecast": 0.0, "reuse": 0.0}  # on-policy runs only

    def reset(self, num_steps, num_blocks) -> None:
        self._history: dict = {}

    def _cell(self, query):
        return (query.step, query.block, self.units.index(query.unit))

    def _inputs(self, query) -> torch.Tensor:
        history = self._history[(query.block, query.unit)]
        return torch.stack([v for _, v in reversed(history)])  # newest first, [k, *output shape]

    def decide(self, query):
        if self.weights is None or bool(self.table[self._cell(query)]):
            return True
        return torch.zeros(())  # compute the label, follow the forecast

    def observe(self, query, output):
        cell = self._cell(query)
        if bool(self.table[cell]):
            history = self._history.setdefault((query.block, query.unit), deque(maxlen=self.order))
            history.append((query.step, output.detach().to(torch.float64)))
        elif self.weights is None:
            self._add(cell, self._inputs(query), output)

    def reuse(self, query, cached):
        h = self._inputs(query)
        cell = self._cell(query)
        if self.channel_weights is not None:
            return forecast_by_channel(self.channel_weights[cell[1:]][cell[0]], list(h), self.channel_dim,
                                        self.order).to(cached.dtype)
        w = self.weights[cell][:len(h)].to(torch.float64)
        return (w @ h.reshape(len(h), -1)).reshape(cached.shape).to(cached.dtype)

    def observe_soft(self, query, computed, reused):
        cell = self._cell(query)
        h = self._inputs(query)
        y = self._add(cell, h, computed)
        self.errors["forecast"] += float((y - reused.detach().to(torch.float64).reshape(-1)).pow(2).sum())
        self.errors["reuse"] += float((y - h[0].reshape(-1)).pow(2).sum())

    def _add(self, cell, h, output) -> torch.Tensor:
        k = len(h)
        if self.channel_dim is not None:
            self._add_by_channel(cell, h, output)
        h = h.reshape(k, -1)
        y = output.detach().to(torch.float64).reshape(-1)
        self.gram[cell][:k, :k] += h @ h.T
        self.cross[cell][:k] += h @ y
        self.target[cell] += y @ y
        self.count[cell] = k
        self.last[cell] = [s for s, _ in reversed(self._history[(cell[1], self.units[cell[2]])])]
        return y

    def _add_by_channel(self, cell, h, output) -> None:
        k, dim = len(h), self.channel_dim
        y = output.detach().to(torch.float64).movedim(dim, 0)
        channels = y.shape[0]
        x = torch.zeros(self.order + 1, channels, y[0].numel(), dtype=torch.float64)
        x[:k] = h.movedim(dim + 1 if dim >= 0 else dim, 1).reshape(k, channels, -1)
        x[-1] = 1.0
        y = y.reshape(channels, -1)
        gram = torch.einsum("icm,jcm->cij", x, x)
        cross = torch.einsum("icm,cm->ci", x, y)
        if cell in self.channel_gram:
            self.channel_gram[cell] += gram
            self.channel_cross[cell] += cross
        else:
            self.channel_gram[cell], self.channel_cross[cell] = gram, cross

    def merge(self, other: "_NormalEquations") -> None:
        """DAgger's aggregation: fit on every run so far."""
        self.gram += other.gram
        self.cross += other.cross
        self.target += other.target
        for cell, gram in other.channel_gram.items():
            self.channel_gram[cell] += gram
            self.channel_cross[cell] += other.channel_cross[cell]


def _residual(gram, cross, target, w) -> float:
    """``|y - sum w_j h_j|^2`` from the normal-equation sums."""
    return float(target - 2 * w @ cross + w @ gram @ w)


def _unit_reuse(k: int) -> torch.Tensor:
    e0 = torch.zeros(k, dtype=torch.float64)
    e0[0] = 1.0
    return e0


def _solve(fit: _NormalEquations, table: torch.Tensor, ridge: float, affine: bool = False) -> torch.Tensor:
    """Each reused cell's ridge solution ``(G + l I) w = r + l e_0``; plain reuse where a cell has no data.

    ``affine``: weights that sum to 1 (``w = e_0 + D a`` with ``D``'s columns ``e_j - e_0``, ridge on ``a``), so a
    constant output is forecast as itself, as TaylorSeer's weights do; the free fit shrinks slightly towards 0."""
    order = fit.gram.shape[-1]
    weights = torch.zeros(*table.shape, order)
    weights[..., 0] = 1.0
    for cell in map(tuple, (~table).nonzero().tolist()):
        k = int(fit.count[cell])
        if k == 0 or (affine and k == 1):
            continue
        gram, cross = fit.gram[cell][:k, :k], fit.cross[cell][:k]
        if affine:
            d = torch.eye(k, dtype=torch.float64)[:, 1:] - _unit_reuse(k)[:, None]
            dgd = d.T @ gram @ d
            lam = ridge * float(dgd.diagonal().sum()) / (k - 1)
            a = torch.linalg.solve(dgd + lam * torch.eye(k - 1, dtype=torch.float64),
                                   d.T @ (cross - gram @ _unit_reuse(k)))
            w = _unit_reuse(k) + d @ a
        else:
            lam = ridge * float(gram.diagonal().sum()) / k
            w = torch.linalg.solve(gram + lam * torch.eye(k, dtype=torch.float64), cross + lam * _unit_reuse(k))
        weights[cell][:k] = w.float()
    return weights


def _solve_by_channel(fit: _NormalEquations, ridge: float) -> dict[tuple[int, int], torch.Tensor]:
    """Per-channel fits (CacheQuant's DEC shape: each channel its own weights and a bias): for every (block, unit
    index) with a reused cell, ``[steps, C, order + 1]`` weights, the bias last; each channel solves its ridge
    system towards plain reuse with a zero bias. Computed cells keep plain reuse (never used)."""
    order, steps = fit.order, fit.table.shape[0]
    solved: dict[tuple[int, int], torch.Tensor] = {}
    for cell, gram in fit.channel_gram.items():
        k = int(fit.count[cell])
        idx = list(range(k)) + [order]
        gram, cross = gram[:, idx][:, :, idx], fit.channel_cross[cell][:, idx]
        prior = torch.zeros(k + 1, dtype=torch.float64)
        prior[0] = 1.0
        lam = ridge * gram.diagonal(dim1=1, dim2=2)[:, :k].sum(-1) / k  # per channel, on its outputs' scale
        w = torch.linalg.solve(gram + lam[:, None, None] * torch.eye(k + 1, dtype=torch.float64),
                               cross + lam[:, None] * prior)
        weights = solved.get(cell[1:])
        if weights is None:
            weights = solved[cell[1:]] = torch.zeros(steps, gram.shape[0], order + 1)
            weights[..., 0] = 1.0
        weights[cell[0]][:, idx] = w.float()
    return solved


def _channel_residual(fit: _NormalEquations, cell, w: torch.Tensor) -> float:
    """``|y - forecast|^2`` of per-channel weights ``w`` ([C, order + 1]) from the cell's per-channel sums."""
    w = w.double()
    gram, cross = fit.channel_gram[cell], fit.channel_cross[cell]
    return float(fit.target[cell] - 2 * (w * cross).sum() + torch.einsum("ci,cij,cj->", w, gram, w))


def fit_forecast(model_name: str, schedule: str, out_dir: str | os.PathLike, *, steps: int = 50,
                 scheduler: str | None = None, guidance_scale: float | None = None, samples: int = 64,
                 val_samples: int = 32, order: int = 3, ridge: float = 1e-3, on_policy_rounds: int = 0,
                 affine: bool = False, per_channel: bool = False, batch_size: int = 32, overwrite: bool = False,
                 progress: bool = True, prompts=None, resolution: int | None = None,
                 negative_prompt: str = "", track: bool = True) -> dict:
    """Fit a forecast for the static schedule ``schedule`` (a policy spec) on ``model_name``; write its artifact.

    ``on_policy_rounds``: after the teacher-forced fit, run the forecast on the fit seeds that many times and refit
    on all data so far (DAgger), so the weights see the histories their own errors produce. ``affine``: weights
    that sum to 1 (see ``_solve``). ``per_channel``: every channel of a reused cell gets its own weights and a
    bias (with ``order=1``, CacheQuant's DEC: a per-channel scale and shift of the cached output). ``track``: an
    MLflow run of its own (a search trial logs the fit in its trial run instead)."""
    from cqpolicy.evaluation.evaluate import default_labels
    from cqpolicy.models import load_model
    from cqpolicy.models.adapters import adapter_for
    from cqpolicy.models.fingerprint import model_fingerprint
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample
    from cqpolicy.sampling.sampler import settings_for
    from cqpolicy.tracking.mlflow_store import start_run

    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
        raise ValueError(f"order must be an int in [1, 8], got {order!r}")
    if not ridge >= 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a non-negative number, got {ridge}")
    if isinstance(on_policy_rounds, bool) or not isinstance(on_policy_rounds, int) or not 0 <= on_policy_rounds <= 8:
        raise ValueError(f"on_policy_rounds must be an int in [0, 8], got {on_policy_rounds!r}")
    if affine and per_channel:
        raise ValueError("affine and per_channel do not combine: a per-channel fit has a free bias")
    out = check_target(out_dir, overwrite)
    model = load_model(model_name, resolution=resolution, prompts=prompts, negative_prompt=negative_prompt)
    channel_dim = adapter_for(model.transformer).channel_dim if per_channel else None
    settings = settings_for(model, steps, scheduler, batch_size, guidance_scale)
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    first = seed_roles.start("calibration")
    fit_seeds = list(range(first, first + samples))
    val_seeds = list(range(first + samples, first + samples + val_samples))

    policy = make_policy(schedule)
    policy.prepare(model, settings)
    recorder = _DecisionRecorder(policy, schedule)
    with enable(model.transformer, recorder) as runtime:
        units = tuple(dict.fromkeys(u.name for u in runtime.units))
        blocks = runtime.num_blocks
        sample(model, default_labels(len(fit_seeds), model.num_classes), fit_seeds, settings, progress=progress)
    table = torch.ones(steps, blocks, len(units), dtype=torch.bool)
    for (s, b, unit), computed in recorder.table.items():
        table[s, b, units.index(unit)] = computed
    if bool(table.all()):
        raise ScheduleError(f"schedule {schedule!r} reuses nothing at {steps} steps: there is nothing to forecast")

    def run(seeds, solved=None) -> _NormalEquations:
        """An uncached run (``solved`` None) or one following the forecast ``solved`` = (weights, by_channel)."""
        weights, by_channel = solved or (None, None)
        accumulator = _NormalEquations(units, table, order, weights, channel_dim, by_channel)
        with enable(model.transformer, accumulator, cache_format="fp32"):
            sample(model, default_labels(len(seeds), model.num_classes), seeds, settings, progress=progress)
        return accumulator

    def ratio(errors) -> float:
        return errors["forecast"] / max(errors["reuse"], 1e-30)

    def solve(fit):
        return _solve(fit, table, ridge, affine), (_solve_by_channel(fit, ridge) if per_channel else None)

    fit, val = run(fit_seeds), run(val_seeds)
    solved = solve(fit)
    rounds = []  # each on-policy round: the error of the weights it ran, on their own trajectories
    for _ in range(on_policy_rounds):
        follow = run(fit_seeds, solved)
        rounds.append(ratio(follow.errors))
        fit.merge(follow)
        solved = solve(fit)
    onpolicy_val = run(val_seeds, solved)
    weights, by_channel = solved

    sums = {"reuse": 0.0, "forecast": 0.0, "taylor": 0.0}  # teacher-forced, on the uncached val runs
    for cell in map(tuple, (~table).nonzero().tolist()):
        k = int(val.count[cell])
        if k == 0:
            continue
        vg, vc, vt = val.gram[cell][:k, :k], val.cross[cell][:k], val.target[cell]
        sums["reuse"] += _residual(vg, vc, vt, _unit_reuse(k))
        sums["forecast"] += (_channel_residual(val, cell, by_channel[cell[1:]][cell[0]]) if per_channel
                             else _residual(vg, vc, vt, weights[cell][:k].double()))
        taylor = _unit_reuse(k)
        if k >= 2:
            c0, c1 = val.last[cell][:2]
            d = (cell[0] - c0) / (c0 - c1)
            taylor[0], taylor[1] = 1 + d, -d
        sums["taylor"] += _residual(vg, vc, vt, taylor)
    metrics = {"reused_cells": int((~table).sum()), "compute_fraction": float(table.float().mean()),
               "val_error_vs_reuse": ratio(sums),
               "val_taylor1_error_vs_reuse": sums["taylor"] / max(sums["reuse"], 1e-30),
               # closed loop: on the trajectories this forecast itself produces on the val seeds
               "val_onpolicy_error_vs_reuse": ratio(onpolicy_val.errors)}
    meta = {"kind": "forecast", "schedule": schedule, "order": order, "ridge": ridge, "affine": affine,
            "per_channel": per_channel, "channel_dim": channel_dim, "features": [],
            "model": {"class": type(model.transformer).__name__, "model_id": model.name,
                      "model_hash": model_fingerprint(model), "num_blocks": blocks, "units": list(units),
                      "steps": steps, "scheduler": settings.scheduler, "guidance_scale": float(settings.guidance_scale)},
            "metrics": metrics,
            "training": {"calibration_seeds": [first, samples], "val_seeds": [first + samples, val_samples],
                         "on_policy_rounds": on_policy_rounds, "round_errors_vs_reuse": rounds,
                         # the cost a break-even count divides: every sampler pass (schedule, fit, val, on-policy)
                         "sampled_images": (2 + on_policy_rounds) * samples + 2 * val_samples,
                         "cpu_s": time.process_time() - started_cpu, "wall_s": time.perf_counter() - started_wall}}
    tensors = {"table": table.to(torch.uint8), "weights": weights}
    tensors.update({f"channel.{block}.{units[unit]}": w for (block, unit), w in (by_channel or {}).items()})
    if not track:
        return save_artifact(out, meta, tensors, overwrite=overwrite)
    with start_run("cqpolicy-train", run_name=f"fit-forecast-{out.name}") as run:
        import mlflow

        meta["training"]["mlflow_run_id"] = run.info.run_id
        meta = save_artifact(out, meta, tensors, overwrite=overwrite)
        mlflow.log_params({"kind": "forecast", "schedule": schedule, "order": order, "ridge": ridge,
                           "on_policy_rounds": on_policy_rounds, "affine": affine, "per_channel": per_channel,
                           "samples": samples, "model": model.name, "steps": steps})
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="policy")
    return meta
