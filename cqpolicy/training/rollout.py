"""Gates trained through the sampler: ``train_gates`` -> a ``gates`` policy artifact (``learned:path=DIR,budget=b``).

Each training step rolls the real sampler out (``denoise_batch(grad=True)``, the same runtime and hooks a deployed
policy runs in) on a batch of rollout seeds, with one gate per (step, cache unit) that mixes the unit's computed
output with its cached one (``CacheRuntime``'s soft decisions). The loss is the final sample's distance to the
uncached sample of the same noise, in pixels and, where the shipped classifier fits the model, in its feature
space (the space offline FID is measured in). The budget is drawn per step from the trained range and is an
input of the net (``cqpolicy.policies.gates.GateNet``), so one artifact covers the whole frontier.

Hard decisions train as they deploy: the forward pass runs the exact schedule ``plan`` makes at that budget
(gates of 0 and 1), and the backward pass takes the gradient of ``sigmoid((score - theta) / tau)`` through
each gate (straight-through; ``score`` and ``theta`` as in ``cqpolicy.policies.gates.plan``): the first-order change of the loss if a reused cell computed, or a computed one
reused, which is Learning-to-Cache's router signal with HarmoniCa's rule that training runs what inference
runs. Autograd holds the whole run (about 1 GB per 16 model rows x 50 steps on the shipped DiT), so rollouts
are short batches; checkpoints are Lightning's (``last.ckpt``; a second call resumes).

The net starts as a uniform refresh interval, or from a trace-trained MLP (``mlp_prior`` + ``warm_start``): its
scores are first fitted to the MLP's mean predicted log impact per (step, unit, cache age) on its trace rows.
Its rollouts go back into the trace data (``trace_rollouts``): the training seeds, run under the trained artifact,
recorded by ``cqpolicy.tracing.collect`` in the trace schema, so an MLP can retrain on the states the gates reach.
"""
from __future__ import annotations

import ctypes
import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from cqpolicy import defaults
from cqpolicy import seeds as seed_roles
from cqpolicy.distributed import all_sum, barrier, world
from cqpolicy.policies.artifact import check_target, save_artifact
from cqpolicy.policies.base import Policy
from cqpolicy.policies.gates import GATE_FEATURES, GateNet, gate_inputs, min_budget, plan


__all__ = ["train_gates", "trace_rollouts", "Rollouts", "GateRolloutModule"]


class _TrainingGates(Policy):
    """What the runtime asks during a rollout: the gate of each (step, unit) cell, set for the whole run."""

    name = "gates-training"

    def __init__(self, units: tuple[str, ...]):
        self.units = units
        self.gates: torch.Tensor | None = None  # [steps, blocks * units]

    def decide(self, query):
        return self.gates[query.step, query.block * len(self.units) + self.units.index(query.unit)]


class Rollouts:
    """The sampler runs of one training: the model under a gate policy, the seeds' noise, their uncached samples."""

    def __init__(self, model, settings, seeds: list[int], progress: bool = True):
        from cqpolicy.evaluation.cost import model_costs
        from cqpolicy.evaluation.evaluate import default_labels
        from cqpolicy.sampling.sampler import initial_noise, step_log_snrs

        self.model, self.settings = model, settings
        model.transformer.requires_grad_(False)
        self.labels = default_labels(len(seeds), model.num_classes)
        self.noise = initial_noise(seeds, model.latent_shape, model.dtype, model.device)
        self.units = tuple(model.adapter.default_units)
        costs = model_costs(model, settings)
        blocks = len({b for b, _ in costs.unit_macs})
        self.unit_macs = torch.tensor([[costs.unit_macs[b, u] for u in self.units] for b in range(blocks)],
                                      dtype=torch.float64)
        self.row_macs = float(costs.row_macs)
        self.log_snrs = step_log_snrs(model, settings)
        self.floor = min_budget(settings.steps, self.row_macs, self.unit_macs)
        self.seeds, self.progress = seeds, progress

    def start(self) -> None:
        """Sample the seeds uncached (the targets) and hook the gate policy into the model."""
        from cqpolicy.evaluation.evaluate import is_fashion_mnist_like
        from cqpolicy.runtime import enable
        from cqpolicy.sampling import sample

        model = self.model
        self.references = sample(model, self.labels, self.seeds, self.settings, progress=self.progress)  # [-1, 1]
        self.classifier = None
        if is_fashion_mnist_like(model):
            from cqpolicy.evaluation.classifier import load_classifier

            self.classifier = load_classifier()
            with torch.no_grad():
                self.ref_features = self.classifier.float_features(self.references)
            self.feature_var = float(self.ref_features.var(0).mean())
        self.policy = _TrainingGates(self.units)
        self.runtime = enable(model.transformer, self.policy, cache_format="fp32")

    def close(self):
        if getattr(self, "runtime", None) is not None:
            self.runtime.disable()

    def loss(self, net: GateNet, index: torch.Tensor, budget: float, mean, std, tau: float,
             feature_weight: float, train: bool) -> dict:
        """Roll the batch ``index`` out under the schedule the net plans at ``budget``; the losses (and, when
        ``train``, the graph back to the net)."""
        from cqpolicy.sampling.sampler import denoise_batch

        with torch.set_grad_enabled(train):
            a, b = net(gate_inputs(self.log_snrs, budget, mean, std))
            hard, scores, theta = plan(a, b, budget, self.row_macs, self.unit_macs)
            gates = hard.float()
            if train:  # straight-through: the hard schedule forward, the centred sigmoid's gradient backward
                soft = torch.sigmoid((scores - theta) / tau)
                gates = gates + soft - soft.detach()
            self.policy.gates = gates
            x = denoise_batch(self.model, self.labels[index], self.noise[index], self.settings, grad=train)
            pixel = (x.float() - self.references[index]).pow(2).mean()
            out = {"pixel": pixel, "loss": pixel}
            if self.classifier is not None:
                features = self.classifier.float_features(x.float())
                feature = (features - self.ref_features[index]).pow(2).mean() / self.feature_var
                out["feature"], out["loss"] = feature, pixel + feature_weight * feature
        fixed = self.row_macs - float(self.unit_macs.sum())
        spent = (len(self.log_snrs) * fixed + float((hard.double() * self.unit_macs.reshape(-1)).sum()))
        out["macs_fraction"] = spent / (len(self.log_snrs) * self.row_macs)
        return out


def mlp_prior(mlp_dir, traces, steps: int, units: tuple[str, ...], blocks: int, max_age: int = 8):
    """The trace-trained MLP's mean predicted log impact of reusing each (step, cell) with a cache ``age`` steps old,
    over the rows of ``traces`` (its chain rows where the traces hold chain labels, else fresh caches only):
    ``(targets [steps, cells, max_age], observed mask)``, cells = blocks x units in the gates' order."""
    from cqpolicy.policies.artifact import ArtifactError, load_artifact
    from cqpolicy.policies.networks import ReuseMLP
    from cqpolicy.training.data import TraceDataModule, TraceError

    meta, tensors = load_artifact(mlp_dir)
    if meta["kind"] != "mlp":
        raise ArtifactError(f"gates start from an mlp artifact; {mlp_dir} is a {meta['kind']}")
    if meta["model"]["units"] != list(units) or int(meta["model"]["num_blocks"]) != blocks:
        raise ArtifactError(f"{mlp_dir} was trained for {meta['model']['num_blocks']} blocks of "
                            f"{meta['model']['units']}, the model has {blocks} of {list(units)}")
    features = list(meta["features"])
    try:
        data = TraceDataModule([traces], features=features, chain=True)
    except TraceError:
        data = TraceDataModule([traces], features=features)
    mlp = ReuseMLP(len(features), int(meta["hidden"]))
    mlp.load_state_dict({k.removeprefix("mlp."): v for k, v in tensors.items()})
    mean, std = (torch.tensor(data.normalization[k]) for k in ("mean", "std"))
    own_mean, own_std = (torch.tensor(meta["normalization"][k]) for k in ("mean", "std"))
    since = features.index("steps_since_compute") if "steps_since_compute" in features else None
    total = torch.zeros(steps, blocks * len(units), max_age, dtype=torch.float64)
    count = torch.zeros_like(total)
    names = [data.units[int(u)] for u in range(len(data.units))]
    with torch.no_grad():
        for split in data.split.values():
            raw = split["x"] * std + mean
            pred = mlp((raw - own_mean) / own_std).squeeze(1).double()
            age = (raw[:, since].round().long() + 1) if since is not None else torch.ones(len(raw), dtype=torch.long)
            cell = split["block"].long() * len(units) + torch.tensor([units.index(n) for n in names])[split["unit"]]
            keep = (age <= max_age) & (split["step"] < steps)
            index = ((split["step"].long() * blocks * len(units) + cell) * max_age + age - 1)[keep]
            total.view(-1).index_add_(0, index, pred[keep])
            count.view(-1).index_add_(0, index, torch.ones_like(pred[keep]))
    return (total / count.clamp_min(1)).float(), count > 0


def warm_start(net: GateNet, targets: torch.Tensor, mask: torch.Tensor, log_snrs, budget_range, mean, std,
               iterations: int = 1500, lr: float = 1e-2) -> float:
    """Fit the net's scores ``a + b log(age)`` to ``targets`` (a log impact per step, cell and age) at budgets drawn
    from the range: the plan then refreshes first where the MLP predicts the most harm. Returns the final MSE."""
    ages = torch.log(torch.arange(1, targets.shape[-1] + 1, dtype=torch.float32))
    # only the order of scores within a step matters to the plan: centre each step's targets
    centred = targets - (targets * mask).sum((1, 2), keepdim=True) / mask.sum((1, 2), keepdim=True).clamp_min(1)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    low, high = budget_range
    for _ in range(iterations):
        a, b = net(gate_inputs(log_snrs, low + (high - low) * float(torch.rand(())), mean, std))
        scores = a[..., None] + b[..., None] * ages
        loss = ((scores - centred).pow(2) * mask).sum() / mask.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return float(loss.detach())


class GateRolloutModule(L.LightningModule):
    """The gate net and its optimiser; each training step is one rollout at a budget drawn from the range."""

    def __init__(self, cells: int, hidden: int, mean: list, std: list, budget_range: tuple, tau: float,
                 lr: float, feature_weight: float, val_budgets: list, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net = GateNet(cells, hidden)
        self.rollouts: Rollouts | None = None  # attached by train_gates; not part of the checkpoint

    def rollout_loss(self, index, budget: float, train: bool) -> dict:
        h = self.hparams
        return self.rollouts.loss(self.net, index, budget, h.mean, h.std, h.tau, h.feature_weight, train)

    def training_step(self, index, batch_idx):
        low, high = self.hparams.budget_range
        # the budget of a step depends on (seed, step) only: every DDP rank and a resumed run draw the same one
        draw = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.global_step))
        budget = low + (high - low) * float(torch.rand((), generator=draw))
        out = self.rollout_loss(index, budget, train=True)
        loss = out["loss"]
        w = world()
        whole = all_sum([loss.item()])[0] / w.size if w.size > 1 else loss.item()  # the batch's loss, all shares
        out["loss"] = torch.tensor(whole)
        self.log_dict({f"train_{k}": float(torch.as_tensor(v).detach()) for k, v in out.items()},
                      batch_size=len(index))
        self.log("train_budget", budget, batch_size=len(index))
        # minimise log(loss) (relative changes: low budgets' larger losses do not drown the others): its gradient
        # is grad(loss) / loss, and with each rank's share divided by the whole batch's loss the gradients DDP
        # averages over equal shares are the one-process gradient; the value shown is log(loss)
        return loss / whole + (math.log(whole) - 1)

    def validation_step(self, index, batch_idx):
        logs = []
        for budget in self.hparams.val_budgets:
            loss = float(self.rollout_loss(index, budget, train=False)["loss"])
            self.log(f"val_loss_b{budget:g}", loss, batch_size=len(index))
            logs.append(math.log(loss))
        self.log("val_log_loss", sum(logs) / len(logs), batch_size=len(index), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


def keep_freed_memory() -> None:
    """Keep freed heap memory in the process: autograd over a whole run frees gigabytes per step, and glibc's
    default returns them to the OS and faults them in again every step (measured here: forward 2-4x slower)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum; smaller blocks come from the heap


def trace_rollouts(model, settings, artifact_dir, samples: int, budgets, out_dir=None,
                   probes: tuple[str, ...] = ("local", "chain", "downstream"), progress: bool = True) -> list[dict]:
    """Record the gates artifact's rollouts as trace runs, one per budget: budget ``k`` runs rollout seeds
    ``start + k * samples ..`` (disjoint, so the runs read together) under ``learned:path=DIR,budget=b``, with the
    same recorder, probes and schema as ``cqpolicy trace``. Runs go to ``out_dir`` (default ``<artifact>.traces``)
    as ``budget-<b>``; a rerun resumes them. Returns each run's collection summary."""
    from cqpolicy.tracing.collect import collect

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"trace_rollouts needs samples >= 1, got {samples!r}")
    artifact = Path(artifact_dir)
    root = Path(out_dir) if out_dir is not None else artifact.with_name(artifact.name + ".traces")
    first = seed_roles.start("rollout")
    summaries = []
    for k, budget in enumerate(budgets):
        policy = f"learned:path={artifact},budget={budget:g}"
        summaries.append(collect(model, settings, root / f"budget-{budget:g}", samples, seed=first + k * samples,
                                 policy=policy, probes=tuple(probes), progress=progress))
    return summaries


def train_gates(model_name: str, out_dir: str | os.PathLike, *, steps: int = 50, guidance_scale: float | None = None,
                scheduler: str | None = None, budget_range: tuple[float, float] = defaults.GATES_BUDGET_RANGE,
                train_samples: int = 128, val_samples: int = 32, batch_size: int = 8, max_epochs: int = 8,
                hidden: int = 64, lr: float = 3e-3,
                tau: float = 1.0, feature_weight: float = 1.0, seed: int = 0, max_minutes: float | None = None,
                init_mlp: str | None = None, init_traces: str | None = None, rollout_traces: int = 0,
                overwrite: bool = False, progress: bool = True, prompts=None,
                resolution: int | None = None) -> dict:
    """Train a budget-conditioned gate net through the sampler on ``model_name`` and write a ``gates`` artifact.

    Rollout seeds: ``train_samples`` from the ``rollout`` role's start, then ``val_samples`` held out for
    validation (hard schedules at the low, middle and high budget; the best checkpoint by their mean log loss).
    The initial net (every unit alike: a uniform refresh interval at each budget) is scored on them first.
    ``init_mlp`` + ``init_traces``: start instead from a trace-trained MLP (``warm_start`` on ``mlp_prior``: the
    scores rank cells as the MLP's predicted harm does); ``max_epochs=0`` then writes that start untrained.
    ``rollout_traces`` > 0: afterwards record that many training rollouts per validation budget as traces
    (``trace_rollouts``, into ``<out>.traces``).
    """
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from cqpolicy.models import load_model
    from cqpolicy.models.fingerprint import model_fingerprint
    from cqpolicy.sampling.sampler import settings_for
    from cqpolicy.training.data import EpochSampler
    from cqpolicy.training.train import (LAST, _checkpoint_epoch, _finite_numbers, checkpoint_dir, lightning_devices,
                                         start_checkpoints, training_logger)

    low, high = (float(b) for b in budget_range)
    if not 0 < low < high <= 1:
        raise ValueError(f"budget range must satisfy 0 < low < high <= 1, got {low} {high}")
    for name, value in (("train_samples", train_samples), ("val_samples", val_samples),
                        ("batch_size", batch_size), ("max_epochs", max_epochs), ("steps", steps)):
        least = 0 if name == "max_epochs" and init_mlp else 1  # a warm start may be written untrained
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if isinstance(rollout_traces, bool) or not isinstance(rollout_traces, int) or rollout_traces < 0:
        raise ValueError(f"rollout_traces must be an int >= 0, got {rollout_traces!r}")
    if rollout_traces * 3 > train_samples:
        raise ValueError(f"rollout_traces {rollout_traces} x 3 budgets exceeds the {train_samples} training rollouts")
    if (init_mlp is None) != (init_traces is None):
        raise ValueError("a warm start needs both init_mlp (an mlp artifact) and init_traces (its trace run)")
    w = world()  # under torchrun: DDP, each rank rolls out an equal share of every batch; rank 0 writes
    if batch_size % w.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {w.size} ranks (equal shares)")
    out = check_target(out_dir, overwrite)
    ckpt_dir = checkpoint_dir(out)
    keep_freed_memory()
    L.seed_everything(seed, workers=True, verbose=False)

    model = load_model(model_name, resolution=resolution, prompts=prompts)
    settings = settings_for(model, steps, scheduler, batch_size, guidance_scale)
    first = seed_roles.start("rollout")
    seeds = list(range(first, first + train_samples + val_samples))
    rollouts = Rollouts(model, settings, seeds, progress=progress)
    floor = rollouts.floor
    if low < floor:
        raise ValueError(f"budget {low} is below what {model_name} can reach at {steps} steps ({floor:.3f}: every "
                         f"step runs its uncached layers, step 0 all of them)")
    rollouts.start()
    snrs = torch.tensor(rollouts.log_snrs)
    mean = [float(snrs.mean()), 0.5, 0.5 * (low + high)]
    std = [float(snrs.std()), 0.3, max(1e-3, (high - low) / math.sqrt(12))]
    val_budgets = [low, round(0.5 * (low + high), 4), high]
    config = {"model": model_name, "model_hash": model_fingerprint(model), "steps": steps, "scheduler": settings.scheduler,
              "guidance_scale": settings.guidance_scale, "budget_range": [low, high], "train_samples": train_samples,
              "val_samples": val_samples, "batch_size": batch_size, "hidden": hidden, "lr": lr, "tau": tau,
              "feature_weight": feature_weight, "seed": seed, "init_mlp": init_mlp, "init_traces": init_traces}
    last = ckpt_dir / LAST
    resuming = last.is_file()
    start_checkpoints(ckpt_dir, config, resuming)
    resumed_from = _checkpoint_epoch(last) if resuming else None

    module = GateRolloutModule(cells=rollouts.unit_macs.numel(), hidden=hidden, mean=mean, std=std,
                               budget_range=(low, high), tau=tau, lr=lr, feature_weight=feature_weight,
                               val_budgets=val_budgets, seed=seed)
    module.rollouts = rollouts
    init = None
    if init_mlp and not resuming:
        targets, mask = mlp_prior(init_mlp, init_traces, steps, rollouts.units, int(rollouts.unit_macs.shape[0]))
        init = {"mlp": str(init_mlp), "traces": str(init_traces), "cells_observed": float(mask.float().mean()),
                "fit_mse": warm_start(module.net, targets, mask, rollouts.log_snrs, (low, high), mean, std)}
        print(f"gates warm start from {init_mlp}: score fit MSE {init['fit_mse']:.4f}", flush=True)
    elif init_mlp:
        init = {"mlp": str(init_mlp), "traces": str(init_traces), "resumed": True}  # the start is in last.ckpt
    train_index = torch.arange(train_samples)
    val_index = torch.arange(train_samples, train_samples + val_samples)
    loaders = (torch.utils.data.DataLoader(train_index, batch_sampler=EpochSampler(
                   train_samples, seed, batch_size, w.rank, w.size, drop_last=True)),
               torch.utils.data.DataLoader(val_index, batch_size=batch_size))  # every rank validates all of it

    logger, run_id = training_logger(ckpt_dir, f"train-gates-{out.name}", resuming)
    class _EpochLine(Callback):  # one line per validation, readable in a log file; last.ckpt after each
        def on_validation_end(self, trainer, pl_module):
            # the full state, every time (ModelCheckpoint's save_last follows its monitor: only on improvement)
            trainer.save_checkpoint(last, weights_only=False)  # every rank calls it, rank 0 writes
            if trainer.is_global_zero:
                spent.write_text(f"{elapsed()}\n")

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.is_global_zero:
                return
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
            print(f"gates epoch {trainer.current_epoch} step {trainer.global_step} "
                  f"{elapsed():.1f} min: "
                  + " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items())), flush=True)

    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor="val_log_loss",
                                 mode="min", save_top_k=1)
    trainer = L.Trainer(accelerator="cpu", **lightning_devices(w), max_epochs=max_epochs, logger=logger,
                        callbacks=[checkpoint, _EpochLine()], enable_progress_bar=progress and w.main,
                        enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=str(ckpt_dir), num_sanity_val_steps=0,
                        max_time={"minutes": max_minutes} if max_minutes else None)
    def held_out(prefix: str) -> dict:
        out = {}
        with torch.no_grad():
            for budget in val_budgets:
                parts = [module.rollout_loss(index, budget, train=False) for index in loaders[1]]
                for key in parts[0]:
                    out[f"{prefix}_{key}_b{budget:g}"] = sum(float(p[key]) for p in parts) / len(parts)
        return out

    start = time.perf_counter()
    spent = ckpt_dir / "minutes.json"  # training minutes over every call of a resumed training
    before = float(spent.read_text()) if resuming and spent.is_file() else 0.0

    def elapsed() -> float:
        return before + (time.perf_counter() - start) / 60

    try:
        initial = held_out("init_val") if not resuming and w.main else {}
        if initial:
            print("gates init: " + " ".join(f"{k}={v:.4f}" for k, v in initial.items() if "_loss_" in k), flush=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
            trainer.fit(module, *loaders, ckpt_path=str(last) if resuming else None)
        if not trainer.is_global_zero:
            barrier()  # DDP: rank 0 alone evaluates and writes the artifact; the others wait for it
            return {}
        minutes = elapsed()
        best = checkpoint.best_model_path
        if best and Path(best).is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        module.eval()
        metrics = {"train_minutes": minutes, "rollouts": int(trainer.global_step) * batch_size,
                   "min_budget": floor, **initial, **held_out("val")}
    finally:
        rollouts.close()

    unit_names = list(rollouts.units)
    meta = {"kind": "gates", "features": list(GATE_FEATURES), "normalization": {"mean": mean, "std": std},
            "hidden": hidden, "budget_range": [low, high], "row_macs": rollouts.row_macs,
            "estimator": "straight-through", "tau": tau, "target": "final-sample distance", "warm_start": init,
            "model": {"class": type(model.transformer).__name__, "model_id": model.name,
                      "model_hash": model_fingerprint(model), "num_blocks": int(rollouts.unit_macs.shape[0]),
                      "units": unit_names, "steps": steps, "scheduler": settings.scheduler,
                      "guidance_scale": float(settings.guidance_scale)},
            "metrics": metrics,
            "training": {"seed": seed, "max_epochs": max_epochs, "epochs": int(trainer.current_epoch),
                         "global_step": int(trainer.global_step), "resumed_from_epoch": resumed_from,
                         "rollout_seeds": [first, len(seeds)], "train_samples": train_samples,
                         "val_samples": val_samples, "batch_size": batch_size, "lr": lr,
                         "feature_weight": feature_weight, "best_checkpoint": Path(best).name if best else None,
                         "checkpoint_dir": str(ckpt_dir), "mlflow_run_id": run_id}}
    tensors = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    tensors["unit_macs"] = rollouts.unit_macs
    meta = save_artifact(out, meta, tensors, overwrite=overwrite)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client = logger.experiment
    client.log_batch(run_id, metrics=[Metric(f"final_{k}", v, now, int(trainer.global_step))
                                      for k, v in _finite_numbers(metrics).items()], synchronous=True)
    client.log_artifacts(run_id, str(out), artifact_path="policy")
    if rollout_traces:
        summaries = trace_rollouts(model, settings, out, rollout_traces, val_budgets, progress=progress)
        meta["rollout_traces"] = [s["run_dir"] for s in summaries]
        client.log_param(run_id, "rollout_traces", ",".join(meta["rollout_traces"]))
    barrier()
    return meta
