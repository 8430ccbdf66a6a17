"""Trace rows as training data: runtime features, log-impact targets, a split by seed, train-only normalisation.

``TraceDataModule`` reads every run through ``TraceReader`` (schema, model and step checks), derives the
features a deployed policy computes from where a unit is (``progress``, ``depth``, ``is_attn1`` / ``is_ff`` /
``is_block``, exactly as ``cqpolicy.policies.features.context_features`` does at run time), keeps only rows
with a probed label (``impact_local`` is NaN at step 0 and wherever probes were off) and splits them **by
seed**: every row of a sample lands on one side, so validation measures generalisation to unseen samples
rather than to unseen steps of samples already trained on. Normalisation statistics come from the train
split only.

With ``chain=True`` (traces recorded with ``--probes chain`` under the plain model) every probed row also
yields one row per staleness s = 2 .. 8 with a label: the same features, except ``steps_since_compute`` = s - 1
and ``model_in_rel_l1_acc`` summed over those s steps, labelled ``impact_stale_s`` (what the last of s
consecutive reuses costs). A policy trained on them prices chains of reuses instead of one reuse of a fresh cache.
Runs recorded under a caching policy (a deployed policy's rollouts, ``cqpolicy.training.rollout.trace_rollouts``)
may join them: their rows add the states that policy reaches, each at the staleness it left the cache.

Loading is eager (in the constructor): bad trace folders fail before any model or logger is built.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from cqpolicy import seeds as seed_roles
from cqpolicy.models.adapters import UNIT_NAMES, DiTAdapter
from cqpolicy.policies.features import MODEL_INPUT, STEP_FEATURES, position_features
from cqpolicy.tracing.recorder import CHAIN_COLUMNS
from cqpolicy.tracing.store import TraceError, TraceReader

LABEL = "impact_local"
DOWNSTREAM = "downstream_rel"
LABEL_KINDS = ("auto", "local", "downstream")
MIN_DOWNSTREAM_PROBES = 8
RATIO_FLOOR = 1e-4  # a reuse whose final-sample change rounds to 0 still counts as 1e-4 of its local error
LOG_EPS = 1e-6  # target y = log(impact + LOG_EPS); the deployed policy uses the same offset
MODEL_FEATURES = tuple(f"model_{name}" for name in MODEL_INPUT) + ("model_in_rel_l1_acc",)
DERIVED_FEATURES = ("progress", "depth", "is_attn1", "is_ff", "is_block") + MODEL_FEATURES
STD_FLOOR = 1e-6
STALENESS_FEATURES = ("steps_since_compute", "model_in_rel_l1_acc")  # what chain rows set for their staleness

__all__ = ["LABEL", "LABEL_KINDS", "LOG_EPS", "fit_step_weight", "DERIVED_FEATURES", "TraceDataModule",
           "ImpactTableDataModule", "EpochSampler"]


class EpochSampler(Sampler[list[int]]):
    """Batches of a shuffle that depends only on ``(seed, epoch)``: a resumed run sees the same batches as an
    unbroken one. Under DDP (``ranks`` > 1) every rank takes its contiguous share of each of those batches (the
    shares of one batch make the batch one process would see; a rank's share may be empty), so every rank takes the
    same number of steps.

    Lightning calls ``set_epoch`` at the start of every training epoch (also after restoring a checkpoint).
    """

    def __init__(self, n: int, seed: int, batch_size: int, rank: int = 0, ranks: int = 1, drop_last: bool = False):
        self.n, self.seed, self.batch_size, self.rank, self.ranks, self.epoch = n, int(seed), batch_size, rank, ranks, 0
        self.drop_last = drop_last  # leave out a last batch smaller than batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        for batch in order.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                break
            yield batch.tensor_split(self.ranks)[self.rank].tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)


def fit_step_weight(progress: np.ndarray, local: np.ndarray, downstream: np.ndarray, degree: int = 2) -> dict:
    """How much of a reuse's local output error reaches the final sample, as a function of progress.

    Fits ``log(downstream / local) ~ polynomial(progress)`` by least squares on the downstream probes.
    On fmnist-dit the ratio falls from about 1 at the first steps to about 0.06 near the end: an error
    injected early is carried through the whole trajectory, one injected late barely moves the sample. The
    local label alone ranks late reuses as the most harmful, which is backwards for the final image.
    """
    ok = np.isfinite(progress) & np.isfinite(local) & np.isfinite(downstream) & (local > 1e-9) & (downstream >= 0)
    n = int(ok.sum())
    if n < MIN_DOWNSTREAM_PROBES:
        raise TraceError(f"{n} downstream probes: at least {MIN_DOWNSTREAM_PROBES} are needed to fit the step "
                         f"weight (record traces with --probes local,downstream and more samples)")
    ratio = np.maximum(downstream[ok], RATIO_FLOOR * local[ok]) / local[ok]
    coefficients = np.polyfit(progress[ok], np.log(ratio), degree)
    residual = np.log(ratio) - np.polyval(coefficients, progress[ok])
    return {"coefficients": [float(c) for c in coefficients], "probes": n,
            "residual_std": float(residual.std()), "degree": degree}


def step_weight(fit: dict, progress: np.ndarray) -> np.ndarray:
    return np.exp(np.polyval(fit["coefficients"], progress))


def _unit_order(found: Sequence[str]) -> list[str]:
    """Known units in the runtime's order (attn1, ff, block), then any others sorted: stable codes across runs."""
    found = set(found)
    return [u for u in UNIT_NAMES if u in found] + sorted(found - set(UNIT_NAMES))


class TraceDataModule(L.LightningDataModule):
    """Rows of trace runs as ``(x, y, impact, step, block, unit)`` tensors, split by seed.

    ``x``: the ``features`` normalised with train-split statistics; ``y``: ``log(impact + 1e-6)``; ``impact``:
    the label (for metrics); ``step``, ``block``, ``unit`` (code into ``units``): where the row is.

    ``label``: ``local`` trains on ``impact_local`` as recorded; ``downstream`` on the local label times a
    step weight fitted on the downstream probes (``fit_step_weight``), an estimate of the relative change
    of the final sample; ``auto`` (default) is ``downstream`` when the runs hold enough downstream probes.
    """

    def __init__(self, run_dirs: Sequence[str | os.PathLike], features: Sequence[str] = STEP_FEATURES,
                 val_fraction: float = 0.25, batch_size: int = 4096, seed: int = 0, label: str = "auto",
                 chain: bool = False):
        super().__init__()
        if label not in LABEL_KINDS:
            raise TraceError(f"unknown label {label!r}; choose from {', '.join(LABEL_KINDS)}")
        self.label, self.chain = label, bool(chain)
        if isinstance(run_dirs, (str, os.PathLike)):
            run_dirs = [run_dirs]
        self.run_dirs = [str(d) for d in run_dirs]
        self.features = list(features)
        if not self.run_dirs:
            raise TraceError("no trace folders given: pass at least one run recorded by `cqpolicy trace`")
        if not self.features:
            raise TraceError("no features given")
        if len(set(self.features)) != len(self.features):
            raise TraceError(f"features repeat a name: {self.features}")
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise TraceError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TraceError(f"batch_size must be a positive int, got {batch_size!r}")
        self.val_fraction, self.batch_size, self.seed = float(val_fraction), batch_size, int(seed)
        self._load()
        self.save_hyperparameters({"traces": self.run_dirs, "features": self.features, "chain": self.chain,
                                   "val_fraction": self.val_fraction, "batch_size": self.batch_size,
                                   "split_seed": self.seed, "train_seeds": self.train_seeds,
                                   "val_seeds": self.val_seeds})

    # -- loading ------------------------------------------------------------------------------------------

    def _load(self) -> None:
        reader = TraceReader(self.run_dirs)
        self.reader = reader
        manifests = reader.manifests
        self.manifest = reader.manifest
        self.steps = int(self.manifest["steps"])
        for key in ("num_blocks", "scheduler", "guidance_scale"):
            values = {_comparable(m.get(key)) for m in manifests}
            if len(values) > 1:
                raise TraceError(f"cannot train on runs of different {key} together "
                                 f"({', '.join(sorted(map(str, values)))}): one policy fits one sampling setup")
        if not isinstance(self.manifest.get("num_blocks"), int) or self.manifest["num_blocks"] < 1:
            raise TraceError(f"{self.run_dirs[0]}'s manifest lacks num_blocks (record it with `cqpolicy trace`)")
        self.num_blocks = int(self.manifest["num_blocks"])

        columns = reader.columns
        if LABEL not in columns:
            raise TraceError(f"the traces hold no {LABEL!r} label column; record them with --probes local")
        derived = [f for f in self.features if f in DERIVED_FEATURES]
        stored = [f for f in self.features if f not in DERIVED_FEATURES]
        missing = [f for f in stored if f not in columns]
        if missing:
            raise TraceError(f"features missing from the traces: {', '.join(missing)} "
                             f"(columns: {', '.join(columns)})")
        has_downstream = DOWNSTREAM in columns
        if self.label == "downstream" and not has_downstream:
            raise TraceError(f"--label downstream needs traces with the {DOWNSTREAM!r} column "
                             f"(record them with --probes local,downstream)")
        model_sources = [*MODEL_INPUT, "steps_since_compute"] if set(derived) & set(MODEL_FEATURES) else []
        missing = [f for f in model_sources if f not in columns]
        if missing:
            raise TraceError(f"model-input features need trace columns {', '.join(missing)}")
        if self.chain:
            self._check_chain(columns, manifests, stored)
        read = list(dict.fromkeys(["seed", "step", "block", "unit", "cfg_branch", LABEL, *stored, *model_sources]
                                  + ([DOWNSTREAM] if has_downstream else []) + ([*CHAIN_COLUMNS, "steps_since_compute"]
                                                                                if self.chain else [])))
        table = reader.table(read)

        # one training row per (trace row, staleness with a label): staleness 1 is impact_local. Rows of runs
        # under a caching policy (rollouts of a deployed policy) give their impact_local only, at the staleness
        # the policy left (its last compute, steps_since_compute + 1 steps back); their chain labels probed
        # outputs that may themselves be reused.
        labels = [LABEL, *(CHAIN_COLUMNS if self.chain else ())]
        on_policy = np.isin(table["seed"].to_numpy(), [s for d, m in zip(self.run_dirs, manifests)
                                                      if str(m.get("policy")) != "none"
                                                      for s in TraceReader([d]).seeds()])
        rows, since, impact = [], [], []
        for s, name in enumerate(labels, start=1):
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            found = np.flatnonzero(~np.isnan(values) & (~on_policy if s > 1 else True))
            stale = np.full(len(found), s - 1)
            if self.chain and s == 1:
                stale = np.where(on_policy[found], table["steps_since_compute"].to_numpy()[found], stale)
            rows.append(found), since.append(stale.astype(np.int64)), impact.append(values[found])
        keep, since, impact = np.concatenate(rows), np.concatenate(since), np.concatenate(impact)
        fresh = since == 0 if self.chain else np.ones(len(keep), dtype=bool)
        if not len(keep):
            raise TraceError(f"{', '.join(self.run_dirs)} hold no probed rows ({LABEL} is NaN everywhere): "
                             f"record traces with --probes local")
        if not np.isfinite(impact).all() or (impact < 0).any():
            raise TraceError(f"{LABEL} holds infinite or negative values; it must be a relative error >= 0")

        self.units = _unit_order(pc.unique(table["unit"]).to_pylist())
        col = lambda name: table[name].to_numpy(zero_copy_only=False)[keep]  # noqa: E731
        step, block, seed = col("step").astype(np.int64), col("block").astype(np.int64), col("seed").astype(np.int64)
        unit_names = col("unit")
        codes = pc.index_in(table["unit"], value_set=pa.array(self.units, type=pa.string()))
        unit = np.asarray(codes.to_numpy())[keep].astype(np.int64)
        if step.max() >= self.steps or block.max() >= self.num_blocks or min(step.min(), block.min()) < 0:
            raise TraceError(f"trace rows lie outside {self.steps} steps x {self.num_blocks} blocks")

        self.label_info = {"kind": "local"}
        if self.label != "local" and has_downstream:
            probes = col(DOWNSTREAM).astype(np.float64)
            probes[col("cfg_branch") != 0] = np.nan  # one probe per sample: its conditional row
            probes[~fresh] = np.nan  # a probe measured one reuse of a fresh cache: pair it with that label
            if self.chain:  # ... in the plain model, which chain rows price; next to it a rollout's probe is noise
                probes[on_policy[keep]] = np.nan
            progress = step / max(1, self.steps - 1)
            if self.label == "downstream" or np.isfinite(probes).sum() >= MIN_DOWNSTREAM_PROBES:
                fit = fit_step_weight(progress, impact, probes)
                impact = impact * step_weight(fit, progress)
                self.label_info = {"kind": "downstream", **fit, **_rank_agreement(impact, probes, col("impact_local"))}

        values = _model_input_features(table, self.units[0], self.steps, keep,
                                       since if self.chain else None) if model_sources else {}
        where = position_features(step, self.steps, block, self.num_blocks,
                                  lambda kind: (unit_names == kind).astype(np.float64))
        values.update({name: where[name] for name in derived if name in where})
        for name in stored:
            values[name] = since.astype(np.float64) if self.chain and name == "steps_since_compute" \
                else col(name).astype(np.float64)
        x = np.stack([values[name] for name in self.features], axis=1)
        if not np.isfinite(x).all():
            bad = [name for name in self.features if not np.isfinite(values[name]).all()]
            raise TraceError(f"features {', '.join(bad)} hold NaN/inf on probed rows")

        # the split: a seeded permutation of the distinct seeds, never of rows
        seeds = np.unique(seed)
        try:  # a policy trained on the bench's samples would be scored on what it learned
            seed_roles.refuse_test_seeds(seeds, f"the traces {', '.join(self.run_dirs)}")
        except seed_roles.SeedOverlapError as exc:
            raise TraceError(str(exc)) from None
        if len(seeds) < 2:
            raise TraceError(f"need at least 2 seeds to split into train and validation, the probed rows of "
                             f"{', '.join(self.run_dirs)} hold {len(seeds)} (seed {seeds[0]})")
        n_val = min(max(1, math.ceil(self.val_fraction * len(seeds))), len(seeds) - 1)
        order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(self.seed)).numpy()
        self.val_seeds = sorted(int(s) for s in seeds[order[:n_val]])
        self.train_seeds = sorted(int(s) for s in seeds[order[n_val:]])
        is_val = np.isin(seed, self.val_seeds)

        train_x = x[~is_val]
        mean = train_x.mean(0)
        std = np.maximum(train_x.std(0), STD_FLOOR)
        self.normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        xn = torch.from_numpy(((x - mean) / std).astype(np.float32))
        train_xn = xn[torch.from_numpy(~is_val)]
        self.input_range = (train_xn.min(0).values.tolist(), train_xn.max(0).values.tolist())
        y = torch.from_numpy(np.log(impact + LOG_EPS).astype(np.float32))
        raw = torch.from_numpy(impact.astype(np.float32))
        where = [torch.from_numpy(a) for a in (step, block, unit, seed)]
        split = {}
        for name, mask in (("train", ~is_val), ("val", is_val)):
            m = torch.from_numpy(mask)
            split[name] = {"x": xn[m], "y": y[m], "impact": raw[m], "step": where[0][m], "block": where[1][m],
                           "unit": where[2][m], "seed": where[3][m]}
        self.split = split
        self.train_impact = impact[~is_val & fresh]  # the tolerance keeps its meaning: one reuse of a fresh cache

    def _check_chain(self, columns, manifests, stored) -> None:
        missing = [c for c in CHAIN_COLUMNS if c not in columns]
        if missing:
            raise TraceError(f"chain rows need the {missing[0]!r} label: record traces with --probes chain")
        if all(str(m.get("policy")) != "none" for m in manifests):  # their chain labels are not read (see _load)
            raise TraceError("chain rows need a trace run of the plain model (policy none) among the runs")
        bad = [f for f in stored if f not in STALENESS_FEATURES and ("last" in f or f.startswith("out_"))]
        if bad:
            raise TraceError(f"feature {bad[0]!r} depends on how stale the cache is, which chain rows do not record: "
                             f"train chain rows on the step features")
        if not any("chain" in str(m.get("probes", "")).split(",") for m in manifests
                   if str(m.get("policy")) == "none"):
            raise TraceError(f"{', '.join(self.run_dirs)} hold no chain labels: record traces with --probes chain")

    # -- what the trainer and train.py use ------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return len(self.features)

    def tolerance(self, quantile: float = 0.5) -> float:
        """The ``quantile`` of the train-split impacts: rows above it count as harmful reuses."""
        return float(np.quantile(self.train_impact, quantile))

    def dataset(self, name: str) -> TensorDataset:
        s = self.split[name]
        return TensorDataset(s["x"], s["y"], s["impact"], s["step"], s["block"], s["unit"])

    def setup(self, stage: str | None = None) -> None:
        pass  # loaded (and validated) in the constructor

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        from cqpolicy.distributed import world

        w = world()
        return DataLoader(ds, batch_sampler=EpochSampler(len(ds), self.seed, self.batch_size, w.rank, w.size))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size, shuffle=False)

    def impact_table(self, split: str = "train") -> torch.Tensor:
        """Mean impact per (step, block, unit) over ``split`` rows: ``[steps, num_blocks, len(units)]``, NaN where
        never probed (e.g. step 0)."""
        s = self.split[split]
        shape = (self.steps, self.num_blocks, len(self.units))
        index = (s["step"] * shape[1] + s["block"]) * shape[2] + s["unit"]
        total = torch.zeros(math.prod(shape), dtype=torch.float64).index_add_(0, index, s["impact"].double())
        count = torch.zeros(math.prod(shape), dtype=torch.float64).index_add_(
            0, index, torch.ones_like(index, dtype=torch.float64))
        mean = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
        return mean.reshape(shape).float()

    def model_meta(self) -> dict:
        """The ``model`` entry of a policy artifact: what sampling setup the traces (and so the policy) fit."""
        m = self.manifest
        return {"class": m.get("model_class", DiTAdapter.model_class), "model_id": m["model_id"],
                "model_hash": m["model_hash"], "num_blocks": self.num_blocks, "units": list(self.units),
                "steps": self.steps, "scheduler": m["scheduler"], "guidance_scale": float(m["guidance_scale"])}

    def fingerprint(self) -> dict:
        """What the data is: runs, model, seeds of each side; a resumed training must see the same."""
        return {"traces": [os.path.abspath(d) for d in self.run_dirs], "model_hash": self.manifest["model_hash"],
                "label": self.label_info["kind"], "chain": self.chain,
                "steps": self.steps, "features": self.features, "train_seeds": self.train_seeds,
                "val_seeds": self.val_seeds, "rows": {k: int(len(v["y"])) for k, v in self.split.items()}}


def _model_input_features(table: pa.Table, first_unit: str, steps: int, keep: np.ndarray,
                          since: np.ndarray | None = None) -> dict:
    """``model_*`` features of the kept rows: the input features of block 0's first unit at the row's
    (sample, CFG branch, step), and ``model_in_rel_l1_acc``, the sum of ``model_in_rel_l1_prev`` over the steps
    since the row's unit last computed (``steps_since_compute`` + 1 steps, this one included). ``keep``: the table
    rows wanted, in order (a mask or indices); ``since``: their staleness, where not the recorded one."""
    col = lambda name: table[name].to_numpy(zero_copy_only=False)  # noqa: E731
    seed, branch, step = col("seed").astype(np.int64), col("cfg_branch").astype(np.int64), col("step").astype(np.int64)
    _, sample = np.unique(np.stack([seed, branch], axis=1), axis=0, return_inverse=True)
    sample = sample.reshape(-1)
    first = (col("block") == 0) & (col("unit") == first_unit)
    grids = {}
    for name in MODEL_INPUT:
        grid = np.full((sample.max() + 1, steps), np.nan)
        grid[sample[first], step[first]] = col(name)[first]
        grids[name] = grid
    # cum[:, t + 1] = sum of the relative changes of steps 0..t (step 0's is 0 by definition)
    cum = np.concatenate([np.zeros((len(grid), 1)), np.cumsum(grids["in_rel_l1_prev"], axis=1)], axis=1)
    sample, step = sample[keep], step[keep]
    since = col("steps_since_compute").astype(np.int64)[keep] if since is None else since
    start = np.clip(step - since, 0, None)  # the unit last computed at step - since - 1
    values = {f"model_{name}": grid[sample, step] for name, grid in grids.items()}
    values["model_in_rel_l1_acc"] = cum[sample, step + 1] - cum[sample, start]
    return values


def _rank_agreement(weighted: np.ndarray, downstream: np.ndarray, local: np.ndarray) -> dict:
    """Spearman correlation with the measured downstream change: of the raw local label and of the weighted one."""
    from scipy.stats import spearmanr

    ok = np.isfinite(downstream)
    return {"spearman_local_vs_downstream": float(spearmanr(local[ok], downstream[ok]).statistic),
            "spearman_weighted_vs_downstream": float(spearmanr(weighted[ok], downstream[ok]).statistic)}


def _comparable(value):
    return value if isinstance(value, (str, int, float, type(None))) else repr(value)


class _Repeat(Dataset):
    def __init__(self, item: torch.Tensor, n: int):
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.item


class ImpactTableDataModule(L.LightningDataModule):
    """The one impact table, yielded ``steps_per_epoch`` times per epoch (the scheduler's whole data set)."""

    def __init__(self, table: torch.Tensor, steps_per_epoch: int = 50):
        super().__init__()
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        self.table, self.steps_per_epoch = table, steps_per_epoch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.table, self.steps_per_epoch), batch_size=None, shuffle=False)
