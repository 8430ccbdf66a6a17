"""``fit_forecast``: a static schedule -> a ``forecast`` artifact (``forecast:path=DIR``), fitted in closed form.

Two passes through the one sampler and runtime on calibration seeds:

1. the schedule ``SPEC`` runs as it deploys, and a wrapper records which (step, block, unit) cells compute;
   a schedule that decides differently for other samples or batches is refused (it is not static);
2. the uncached model runs, and at every cell the schedule reuses, the unit's true output ``y`` and its
   outputs at the schedule's last ``K`` computed steps ``h`` (newest first) feed the normal equations
   ``G = sum h h^T`` and ``r = sum h y`` of that cell (float64, accumulated over every row and element; no
   outputs are stored).

Each cell's weights solve ``(G + l I) w = r + l e_0``: ridge towards plain reuse, with ``l = ridge * trace(G) / K``.
Held-out calibration seeds report how much of plain reuse's squared error the forecast leaves, next to
TaylorSeer's order-1 forecast on the same cells (teacher-forced: the inputs are uncached outputs).
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
    """Computes every unit (an uncached run) and accumulates each reused cell's ``G``, ``r`` and ``y.y``."""

    name = "forecast-fit"

    def __init__(self, units: tuple[str, ...], table: torch.Tensor, order: int):
        self.units, self.table, self.order = units, table, order
        steps, blocks, n = table.shape
        self.gram = torch.zeros(steps, blocks, n, order, order, dtype=torch.float64)
        self.cross = torch.zeros(steps, blocks, n, order, dtype=torch.float64)
        self.target = torch.zeros(steps, blocks, n, dtype=torch.float64)
        self.count = torch.zeros(steps, blocks, n, dtype=torch.long)  # inputs available at the cell (<= order)
        self.last: dict = {}  # (block, unit) -> steps of its history, newest last

    def reset(self, num_steps, num_blocks) -> None:
        self._history: dict = {}

    def decide(self, query):
        return True

    def observe(self, query, output):
        u = self.units.index(query.unit)
        key, cell = (query.block, query.unit), (query.step, query.block, u)
        history = self._history.setdefault(key, deque(maxlen=self.order))
        if bool(self.table[cell]):
            history.append((query.step, output.detach().to(torch.float64).reshape(-1)))
            return
        h = torch.stack([v for _, v in reversed(history)])  # newest first
        k = len(h)
        self.gram[cell][:k, :k] += h @ h.T
        y = output.detach().to(torch.float64).reshape(-1)
        self.cross[cell][:k] += h @ y
        self.target[cell] += y @ y
        self.count[cell] = k
        self.last[cell] = [s for s, _ in reversed(history)]


def _residual(gram, cross, target, w) -> float:
    """``|y - sum w_j h_j|^2`` from the normal-equation sums."""
    return float(target - 2 * w @ cross + w @ gram @ w)


def fit_forecast(model_name: str, schedule: str, out_dir: str | os.PathLike, *, steps: int = 50,
                 scheduler: str = "ddim", guidance_scale: float | None = None, samples: int = 64,
                 val_samples: int = 32, order: int = 3, ridge: float = 1e-3, batch_size: int = 32,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Fit a forecast for the static schedule ``schedule`` (a policy spec) on ``model_name``; write its artifact."""
    from cqpolicy.evaluation.evaluate import default_labels
    from cqpolicy.models import load_model
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
    out = check_target(out_dir, overwrite)
    model = load_model(model_name)
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

    stats = {}
    for split, seeds in (("fit", fit_seeds), ("val", val_seeds)):
        accumulator = _NormalEquations(units, table, order)
        with enable(model.transformer, accumulator, cache_format="fp32"):
            sample(model, default_labels(len(seeds), model.num_classes), seeds, settings, progress=progress)
        stats[split] = accumulator

    fit = stats["fit"]
    weights = torch.zeros(steps, blocks, len(units), order)
    weights[..., 0] = 1.0
    sums = {"reuse": 0.0, "forecast": 0.0, "taylor": 0.0}
    for cell in map(tuple, (~table).nonzero().tolist()):
        k = int(fit.count[cell])
        if k == 0:
            continue
        gram, cross = fit.gram[cell][:k, :k], fit.cross[cell][:k]
        lam = ridge * float(gram.diagonal().sum()) / k
        e0 = torch.zeros(k, dtype=torch.float64)
        e0[0] = 1.0
        w = torch.linalg.solve(gram + lam * torch.eye(k, dtype=torch.float64), cross + lam * e0)
        weights[cell][:k] = w.float()
        val = stats["val"]
        vg, vc, vt = val.gram[cell][:k, :k], val.cross[cell][:k], val.target[cell]
        sums["reuse"] += _residual(vg, vc, vt, e0)
        sums["forecast"] += _residual(vg, vc, vt, w)
        if k >= 2:
            c0, c1 = fit.last[cell][:2]
            d = (cell[0] - c0) / (c0 - c1)
            taylor = torch.zeros(k, dtype=torch.float64)
            taylor[0], taylor[1] = 1 + d, -d
            sums["taylor"] += _residual(vg, vc, vt, taylor)
        else:
            sums["taylor"] += _residual(vg, vc, vt, e0)
    metrics = {"reused_cells": int((~table).sum()), "compute_fraction": float(table.float().mean()),
               "val_error_vs_reuse": sums["forecast"] / max(sums["reuse"], 1e-30),
               "val_taylor1_error_vs_reuse": sums["taylor"] / max(sums["reuse"], 1e-30)}
    meta = {"kind": "forecast", "schedule": schedule, "order": order, "ridge": ridge, "features": [],
            "model": {"class": type(model.transformer).__name__, "model_id": model.name,
                      "model_hash": model_fingerprint(model), "num_blocks": blocks, "units": list(units),
                      "steps": steps, "scheduler": scheduler, "guidance_scale": float(settings.guidance_scale)},
            "metrics": metrics,
            "training": {"calibration_seeds": [first, samples], "val_seeds": [first + samples, val_samples],
                         # the cost a break-even count divides: three sampler passes (schedule, fit, val)
                         "sampled_images": 2 * samples + val_samples,
                         "cpu_s": time.process_time() - started_cpu, "wall_s": time.perf_counter() - started_wall}}
    with start_run("cqpolicy-train", run_name=f"fit-forecast-{out.name}") as run:
        import mlflow

        meta["training"]["mlflow_run_id"] = run.info.run_id
        meta = save_artifact(out, meta, {"table": table.to(torch.uint8), "weights": weights}, overwrite=overwrite)
        mlflow.log_params({"kind": "forecast", "schedule": schedule, "order": order, "ridge": ridge,
                           "samples": samples, "model": model.name, "steps": steps})
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(out), artifact_path="policy")
    return meta
