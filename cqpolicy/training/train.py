"""``train_policy``: traces -> a policy artifact, with Lightning (deterministic, resumable) and MLflow tracking.

Checkpoints live in a sibling folder ``<out_dir>.ckpt/`` (kept out of the artifact): ``last.ckpt`` after every
epoch and the best one by ``val_loss`` (MLP). Calling ``train_policy`` again with the same data and settings
resumes from ``last.ckpt`` (after a kill, or to train for more epochs) and continues the same MLflow run;
settings or data that differ from the checkpoint's are refused rather than silently mixed.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cqpolicy.distributed import barrier, main_writes, world
from cqpolicy.policies.features import FEATURE_SETS
from cqpolicy.policies.artifact import ArtifactError, check_target, save_artifact
from cqpolicy.training.data import LOG_EPS, ImpactTableDataModule, TraceDataModule
from cqpolicy.training.modules import (LayerSchedulerModule, ReusePolicyModule, chain_costs, fit_intervals, harm_scores,
                                       weighted_mse)

EXPERIMENT = "cqpolicy-train"
CONFIG_FILE = "train_config.json"
RUN_FILE = "mlflow_run.json"
LAST = "last.ckpt"

__all__ = ["train_policy", "checkpoint_dir", "mlp_metrics", "scheduler_metrics"]


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """``<out_dir>.ckpt``: next to the artifact, never inside it."""
    out = Path(out_dir)
    return out.with_name(out.name + ".ckpt")


def _artifact_location() -> str | None:
    # the same rule as cqpolicy.tracking.mlflow_store: artifacts under mlruns/artifacts for the default store
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from cqpolicy.tracking.mlflow_store import DEFAULT_DIR

    return (DEFAULT_DIR / "artifacts").resolve().as_uri()


def _previous_run_id(ckpt_dir: Path, uri: str) -> str | None:
    """The MLflow run of the checkpoints being resumed, if it is in the current tracking store."""
    try:
        saved = json.loads((ckpt_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("tracking_uri") != uri or not isinstance(saved.get("run_id"), str):
        return None
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(saved["run_id"])
    except Exception:  # deleted run, other store: start a new run rather than fail the training
        return None
    return saved["run_id"]


def start_checkpoints(ckpt_dir: Path, config: dict, resuming: bool) -> None:
    """Check a resumed training's settings, or record a new one's (rank 0, after every rank looked for a
    checkpoint)."""
    barrier()
    with main_writes() as mine:
        if mine or resuming:
            _check_resume_config(ckpt_dir, config, resuming)


def training_logger(ckpt_dir: Path, run_name: str, resuming: bool):
    """Lightning's MLflow logger for a training: a resumed training continues its run. Its run starts now (rank 0)
    and is recorded next to the checkpoints, so that a killed training can continue it too."""
    from lightning.pytorch.loggers import MLFlowLogger

    from cqpolicy.tracking.mlflow_store import tracking_uri

    uri = tracking_uri()
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=uri, run_name=run_name,
                          artifact_location=_artifact_location(),
                          run_id=_previous_run_id(ckpt_dir, uri) if resuming else None, synchronous=False)
    run_id = logger.run_id
    with main_writes() as mine:
        if mine:
            (ckpt_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
    return logger, run_id


def _check_resume_config(ckpt_dir: Path, config: dict, resuming: bool) -> None:
    path = ckpt_dir / CONFIG_FILE
    if resuming:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != config:
            changed = sorted(k for k in set(config) | set(saved or {}) if (saved or {}).get(k) != config.get(k))
            raise ArtifactError(f"{ckpt_dir} holds checkpoints of a training with other data or settings "
                                f"({', '.join(changed) or 'no record of them'}); delete it to start over")
    else:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _checkpoint_epoch(path: Path) -> int:
    """Epochs completed in a Lightning checkpoint (its ``epoch`` is the 0-based index of the last one)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return int(ckpt["epoch"]) + 1
    except Exception as err:
        raise ArtifactError(f"{path} is unreadable ({type(err).__name__}; killed while saving?): delete it to "
                            f"resume from the checkpoint before, or delete {path.parent} to start over") from None


@torch.no_grad()
def mlp_metrics(module: ReusePolicyModule, dm: TraceDataModule, split: str = "val") -> dict:
    """Held-out quality of a trained MLP on ``split`` (with the module's tolerance as the harm threshold)."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    module = module.eval()
    s = dm.split[split]
    pred = torch.cat([module(x) for x in s["x"].split(65536)])
    tol = float(module.hparams.tolerance)
    harmful = s["impact"] > tol
    scores = harm_scores(pred, tol)
    both = bool(harmful.any()) and bool((~harmful).any())
    safe = pred < math.log(tol + LOG_EPS)  # what the deployed policy reuses at the default threshold
    return {
        f"{split}_auroc": float(binary_auroc(scores, harmful.long())) if both else math.nan,
        f"{split}_ap": float(binary_average_precision(scores, harmful.long())) if both else math.nan,
        f"{split}_loss": float(weighted_mse(pred, s["y"], s["impact"], tol, float(module.hparams.harm_weight))),
        f"{split}_harmful_rate": float(harmful.float().mean()),
        f"{split}_reuse_rate": float(safe.float().mean()),
        f"{split}_harmful_among_reused": float((harmful & safe).sum() / safe.sum()) if bool(safe.any()) else 0.0,
        f"{split}_rows": int(len(pred)),
        f"{split}_seeds": len(dm.val_seeds if split == "val" else dm.train_seeds),
    }


def scheduler_metrics(compute: torch.Tensor, dm: TraceDataModule) -> dict:
    """Budget and the impact of the cells the table reuses, on train and held-out seeds."""
    out = {"compute_fraction": float(compute.float().mean()), "cells": int(compute.numel())}
    for split in ("train", "val"):
        table = dm.impact_table(split)
        known = ~torch.isnan(table)
        reused, computed = known & ~compute, known & compute
        out[f"{split}_reused_impact_mean"] = float(table[reused].mean()) if bool(reused.any()) else math.nan
        out[f"{split}_computed_impact_mean"] = float(table[computed].mean()) if bool(computed.any()) else math.nan
        out[f"{split}_known_impact_mean"] = float(table[known].mean()) if bool(known.any()) else math.nan
    out["val_seeds"] = len(dm.val_seeds)
    return out


def _label_metrics(dm) -> dict:
    info = dm.label_info
    return {k: info[k] for k in ("probes", "residual_std", "spearman_local_vs_downstream",
                                 "spearman_weighted_vs_downstream") if k in info}


class _MLP:
    """``mlp``: a per-cell reuse-impact regressor; the checkpoint kept is the best by held-out loss."""

    monitor = "val_loss"

    @staticmethod
    def build(dm: TraceDataModule, options: dict):
        module = ReusePolicyModule(dm.in_features, hidden=options["hidden"], tolerance=options["tolerance"],
                                   harm_weight=options["harm_weight"], input_range=dm.input_range,
                                   target_mean=float(dm.split["train"]["y"].mean()))
        return module, dm, {"hidden": options["hidden"], "harm_weight": options["harm_weight"]}

    @staticmethod
    def finish(module, dm: TraceDataModule, checkpoint, options: dict) -> dict:
        best = checkpoint.best_model_path
        if best and Path(best).is_file():
            module = ReusePolicyModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
        module = module.cpu().eval()
        score = checkpoint.best_model_score
        metrics = {"tolerance": options["tolerance"], **_label_metrics(dm), **mlp_metrics(module, dm, "val"),
                   "best_val_loss": float(score) if score is not None else math.nan,
                   "train_rows": int(len(dm.split["train"]["y"])), "train_seeds": len(dm.train_seeds)}
        return {"metrics": metrics, "features": list(dm.features), "normalization": dm.normalization,
                "default_threshold": options["tolerance"], "hidden": options["hidden"],
                "tensors": {k: v.detach().cpu() for k, v in module.state_dict().items() if k.startswith("mlp.")}}


class _Scheduler:
    """``scheduler``: a learned step x block x unit table under a compute budget; the last epoch is kept."""

    monitor = None

    @staticmethod
    def build(dm: TraceDataModule, options: dict):
        table = dm.impact_table("train")
        module = LayerSchedulerModule(table, compute_budget=options["compute_budget"])
        data = ImpactTableDataModule(table, steps_per_epoch=options["steps_per_epoch"])
        return module, data, {"compute_budget": options["compute_budget"],
                              "steps_per_epoch": options["steps_per_epoch"]}

    @staticmethod
    def finish(module, dm: TraceDataModule, checkpoint, options: dict) -> dict:
        compute = module.cpu().table()
        metrics = {"compute_budget": options["compute_budget"], **_label_metrics(dm),
                   **scheduler_metrics(compute, dm)}
        return {"metrics": metrics, "features": [], "normalization": {"mean": [], "std": []},
                "default_threshold": 0.5, "hidden": 0,
                "tensors": {"table": compute.to(torch.uint8), "logits": module.logits.detach().cpu()}}


_NETS = {"mlp": _MLP, "scheduler": _Scheduler}  # trained through Lightning; "intervals" is fitted in closed form


def train_policy(run_dirs: Sequence[str | os.PathLike], kind: str = "mlp", out_dir: str | os.PathLike = "out/policy",
                 max_epochs: int = 20, seed: int = 0, hidden: int = 64, compute_budget: float = 0.5,
                 overwrite: bool = False, progress: bool = True, *, batch_size: int = 4096,
                 val_fraction: float = 0.25, harm_weight: float = 4.0, tolerance_quantile: float = 0.5,
                 steps_per_epoch: int = 50, label: str = "auto", features: str = "step",
                 intervals: Sequence[int] = (1, 2, 4, 8), chain: bool = False) -> dict:
    """Train a ``kind`` ("mlp", "scheduler" or "intervals") policy on trace runs and write its artifact to ``out_dir``.

    ``intervals`` fits phase-locked refresh intervals (``fit_intervals``, from ``intervals``) in closed form: no
    epochs, no checkpoints; its artifact is a ``scheduler`` (a static table) that records the chosen intervals.

    ``features``: ``step`` (decided once per step from the model input, the default) or ``unit`` (per-unit
    input features, about 11% of sampling time to compute at run time); see ``cqpolicy.policies.features``.

    ``chain`` (mlp): also train on the traces' chain labels, one row per staleness (``TraceDataModule``).

    Returns the artifact metadata (``policy.json``), including held-out ``metrics`` and a ``training`` record
    (epochs, whether and from which epoch it resumed, the MLflow run id).
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    if kind == "intervals":
        return _fit_interval_artifact(run_dirs, out_dir, compute_budget, intervals, seed, val_fraction, label,
                                      overwrite)
    if kind not in _NETS:
        raise ValueError(f"unknown policy kind {kind!r}; choose mlp, scheduler or intervals")
    net = _NETS[kind]
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"max_epochs must be a positive int, got {max_epochs!r}")
    if not 0 < compute_budget <= 1:
        raise ValueError(f"compute_budget must lie in (0, 1], got {compute_budget}")
    if not 0 < tolerance_quantile < 1:
        raise ValueError(f"tolerance_quantile must lie in (0, 1), got {tolerance_quantile}")
    if chain and net is not _MLP:
        raise ValueError("chain rows train the mlp (a scheduler prices cells from one-reuse labels)")
    if features not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {features!r}; choose from {', '.join(FEATURE_SETS)}")
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    out = check_target(out_dir, overwrite)  # fail before training, not after
    ckpt_dir = checkpoint_dir(out)

    L.seed_everything(seed, workers=True, verbose=False)
    dm = TraceDataModule(run_dirs, features=FEATURE_SETS[features], val_fraction=val_fraction,
                         batch_size=batch_size, seed=seed, label=label, chain=chain)
    tolerance = dm.tolerance(tolerance_quantile)
    options = {"hidden": hidden, "harm_weight": harm_weight, "tolerance": tolerance,
               "compute_budget": compute_budget, "steps_per_epoch": steps_per_epoch}
    module, data, settings = net.build(dm, options)
    config = {"kind": kind, "seed": seed, "data": dm.fingerprint(), "batch_size": batch_size,
              "val_fraction": val_fraction, "tolerance_quantile": tolerance_quantile, **settings}

    w = world()  # under torchrun: DDP, each rank a share of every batch; rank 0 writes
    last = ckpt_dir / LAST
    resuming = last.is_file()
    start_checkpoints(ckpt_dir, config, resuming)
    resumed_from = _checkpoint_epoch(last) if resuming else None

    logger, run_id = training_logger(ckpt_dir, f"train-{kind}-{out.name}", resuming)
    if data is not dm:  # the Lightning module does not see the traces: record them here
        logger.log_hyperparams({"traces": dm.run_dirs, "train_seeds": dm.train_seeds, "val_seeds": dm.val_seeds})

    class _EpochCounter(Callback):  # and last.ckpt after every epoch (after its validation): ModelCheckpoint's
        epochs_run = 0               # save_last follows its monitor, so it would keep the last *improving* epoch

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs_run += 1
            trainer.save_checkpoint(last, weights_only=False)  # the full state: a resume continues from it

    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}" if net.monitor else "{epoch:03d}",
                                 monitor=net.monitor, mode="min", save_top_k=1)
    counter = _EpochCounter()
    trainer = L.Trainer(deterministic=True, accelerator="cuda" if torch.cuda.is_available() else "cpu",
                        **lightning_devices(w), max_epochs=max_epochs, logger=logger, callbacks=[checkpoint, counter],
                        enable_progress_bar=progress and w.main, enable_model_summary=progress and w.main,
                        log_every_n_steps=1, default_root_dir=str(ckpt_dir))
    with warnings.catch_warnings():
        # our own files (config, run id) live next to the checkpoints; one process loads data in memory
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r".*does not have many workers")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")
        trainer.fit(module, datamodule=data, ckpt_path=str(last) if resuming else None)
    if not trainer.is_global_zero:
        barrier()  # DDP: rank 0 alone evaluates and writes the artifact; the others wait for it
        return {}

    best = checkpoint.best_model_path
    out_fields = net.finish(module, dm, checkpoint, options)
    metrics = out_fields["metrics"]

    meta = {"format_version": 1, "kind": kind, "features": out_fields["features"],
            "normalization": out_fields["normalization"], "target": "log_impact", "label": dm.label_info,
            "tolerance": tolerance, "default_threshold": out_fields["default_threshold"],
            "hidden": out_fields["hidden"], "model": dm.model_meta(), "metrics": metrics,
            "traces": [str(d) for d in dm.run_dirs],
            "training": {"seed": seed, "train_seeds": dm.train_seeds, "val_seeds": dm.val_seeds,  # what it saw
                         "max_epochs": max_epochs, "epochs": int(trainer.current_epoch),
                         "global_step": int(trainer.global_step), "epochs_run": counter.epochs_run,
                         "resumed_from_epoch": resumed_from, "best_checkpoint": Path(best).name if best else None,
                         "checkpoint_dir": str(ckpt_dir), "mlflow_run_id": run_id}}
    meta = save_artifact(out, meta, out_fields["tensors"], overwrite=overwrite)

    # the trainer has finished (and closed) the run; the held-out numbers and the artifact go to it directly
    from mlflow.entities import Metric

    step, now = int(trainer.global_step), int(time.time() * 1000)
    final = [Metric(f"final_{k}", v, now, step) for k, v in _finite_numbers(metrics).items()]
    client = logger.experiment
    client.log_batch(run_id, metrics=final, synchronous=True)
    client.log_artifacts(run_id, str(out), artifact_path="policy")
    barrier()
    return meta


def lightning_devices(w) -> dict:
    """The Trainer's devices: one process here, or under torchrun DDP over its ranks (the loaders shard the batches
    themselves, ``EpochSampler``, so Lightning's distributed sampler stays off)."""
    if w.size == 1:
        return {"devices": 1}
    from lightning.pytorch.strategies import DDPStrategy

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", w.size))
    return {"devices": per_node, "num_nodes": w.size // per_node, "strategy": DDPStrategy(),
            "use_distributed_sampler": False}


def _finite_numbers(metrics: dict) -> dict:
    """The metrics MLflow can log: finite numbers (not bools, lists or dicts)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def _fit_interval_artifact(run_dirs, out_dir, compute_budget: float, intervals: Sequence[int], seed: int,
                           val_fraction: float, label: str, overwrite: bool) -> dict:
    """``kind="intervals"``: fit on the train seeds' impact table, report the predicted harm of the fitted
    schedule and of each uniform interval on train and held-out seeds, write a ``scheduler`` artifact, log it
    to MLflow."""
    from cqpolicy.tracking.mlflow_store import start_run

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    out = check_target(out_dir, overwrite)
    dm = TraceDataModule(run_dirs, val_fraction=val_fraction, seed=seed, label=label)
    table, chosen, lam = fit_intervals(dm.impact_table("train"), compute_budget, intervals)
    candidates = sorted(set(int(k) for k in intervals))
    position = torch.searchsorted(torch.tensor(candidates), chosen)  # [blocks, units]: index of each choice
    steps = table.shape[0]
    metrics = {"compute_budget": compute_budget, "lagrange_multiplier": lam, **_label_metrics(dm),
               **scheduler_metrics(table, dm)}
    for split in ("train", "val"):
        costs = chain_costs(dm.impact_table(split), candidates)  # [K, blocks, units]
        metrics[f"{split}_chain_cost"] = float(costs.gather(0, position[None]).sum())
        for i, k in enumerate(candidates):
            metrics[f"{split}_chain_cost_uniform_{k}"] = float(costs[i].sum())
    for k in candidates:
        metrics[f"compute_fraction_uniform_{k}"] = len(range(0, steps, k)) / steps
    metrics["intervals"] = {unit: [int(v) for v in chosen[:, u]] for u, unit in enumerate(dm.units)}
    meta = {"format_version": 1, "kind": "scheduler", "fit": "intervals", "features": [],
            "normalization": {"mean": [], "std": []}, "target": "log_impact", "label": dm.label_info,
            "tolerance": None, "default_threshold": 0.5, "hidden": 0, "model": dm.model_meta(), "metrics": metrics,
            "traces": [str(d) for d in dm.run_dirs],
            "training": {"seed": seed, "intervals": candidates, "train_seeds": dm.train_seeds,
                         "val_seeds": dm.val_seeds}}
    with start_run(EXPERIMENT, run_name=f"train-intervals-{out.name}") as run:
        import mlflow

        meta["training"]["mlflow_run_id"] = run.info.run_id
        meta = save_artifact(out, meta, {"table": table.to(torch.uint8), "intervals": chosen.to(torch.int32)},
                             overwrite=overwrite)
        mlflow.log_params({"kind": "intervals", "compute_budget": compute_budget, "traces": dm.run_dirs,
                           "intervals": candidates, "seed": seed})
        mlflow.log_metrics({f"final_{k}": v for k, v in _finite_numbers(metrics).items()})
        mlflow.log_artifacts(str(out), artifact_path="policy")
    return meta
