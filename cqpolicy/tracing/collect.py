"""``cqpolicy trace``: record traces batch by batch into a Parquet run folder (resumable, shardable).

One shard per batch of seeds. A killed run resumes at the first batch without a complete shard; workers
on disjoint seed ranges (``--seed``) can write into one folder. Downstream probes run each batch a second
time with, for every sample, one randomly chosen (step, block, unit) forced to reuse, and label that row
with the change of the final sample (relative L2 change before quantisation, PSNR against the unforced
sample, relative distance in the shipped classifier's feature space for Fashion-MNIST models).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from cqpolicy import seeds as seed_roles
from cqpolicy.distributed import FolderLock, all_sum, world
from cqpolicy.models.adapters import cache_blocks
from cqpolicy.models.fingerprint import model_fingerprint
from cqpolicy.policies import make_policy
from cqpolicy.policies.base import DelegatingPolicy, UnitQuery
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample
from cqpolicy.sampling.sampler import uses_cfg
from cqpolicy.tracing.recorder import LABEL_COLUMNS as LOCAL_LABELS
from cqpolicy.tracing.recorder import MAX_CHAIN, POST_COLUMNS, PRE_COLUMNS, TraceRecorder, records_to_columns
from cqpolicy.tracing.store import RunInfo, TraceWriter

PROBES = ("local", "chain", "downstream")  # chain: local probes at every staleness up to MAX_CHAIN steps
DOWNSTREAM_LABELS = ("downstream_psnr", "downstream_feature_distance", "downstream_rel")
LABEL_COLUMNS = LOCAL_LABELS + DOWNSTREAM_LABELS
CONTEXT_COLUMNS = ("class_label",)
TRACE_SCHEMA = pa.schema(
    [("seed", pa.int64()), ("cfg_branch", pa.int8()), ("step", pa.int16()), ("block", pa.int16()),
     ("unit", pa.string()), ("class_label", pa.int16())]
    + [(name, pa.float32()) for name in PRE_COLUMNS + POST_COLUMNS + LABEL_COLUMNS])


def parse_probes(text: str) -> tuple[str, ...]:
    probes = tuple(p for p in (part.strip() for part in text.split(",")) if p and p != "none")
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe {unknown[0]!r}; use local, chain, downstream (comma-separated) or none")
    return probes


class _ForcedReuse(DelegatingPolicy):
    """The traced policy, except that sample i's rows reuse at its one target (step, block, unit)."""

    def __init__(self, inner, targets: list[tuple[int, int, str]], cfg: bool):
        super().__init__(inner)
        self.units = tuple(dict.fromkeys((*inner.units, *(unit for _, _, unit in targets))))
        self.targets, self.cfg = targets, cfg

    @property
    def caches(self) -> bool:
        return True  # the forced reuse needs the last computed output even when the traced policy stores none

    def decide(self, query: UnitQuery):
        decision = super().decide(query)
        hit = torch.tensor([t == (query.step, query.block, query.unit) for t in self.targets])
        if not bool(hit.any()):
            return decision
        forced = torch.cat([hit, hit]) if self.cfg else hit
        base = decision.to("cpu", torch.bool).reshape(-1) if torch.is_tensor(decision) \
            else torch.full_like(forced, bool(decision))
        return base & ~forced


def _downstream(model, policy: str, labels, seeds, settings, images, rng, num_blocks) -> dict:
    """Per sample: a random (step >= 1, block, unit), and the final-sample change its forced reuse causes."""
    from cqpolicy.evaluation.evaluate import is_fashion_mnist_like
    from cqpolicy.evaluation.quality import images_to_uint8

    units = model.adapter.default_units
    targets = [(int(rng.integers(1, settings.steps)), int(rng.integers(num_blocks)),
                units[int(rng.integers(len(units)))]) for _ in seeds]
    forced = _ForcedReuse(make_policy(policy), targets, uses_cfg(settings.guidance_scale, model))
    forced.prepare(model, settings)
    with enable(model.transformer, forced, cache_format="fp32"):
        changed = sample(model, labels, seeds, settings, progress=False)
    # unquantised relative L2 change of the final sample: resolves the tiny changes one reuse makes
    rel = (changed - images).flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1).clamp_min(1e-12)
    a, b = images_to_uint8(changed).float() / 255, images_to_uint8(images).float() / 255
    mse = (a - b).pow(2).flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))
    psnr = psnr.clamp(max=100.0)  # identical images: report 100 dB (finite, and beyond any real change)
    if is_fashion_mnist_like(model):
        from cqpolicy.evaluation.classifier import load_classifier

        classifier = load_classifier()
        with torch.no_grad():
            fa, fb = classifier(images_to_uint8(changed)), classifier(images_to_uint8(images))
        distance = (fa - fb).norm(dim=1) / fb.norm(dim=1).clamp_min(1e-12)
    else:
        distance = torch.full_like(psnr, math.nan)
    return {"targets": targets, "psnr": psnr.numpy(), "feature_distance": distance.numpy(), "rel": rel.float().numpy()}


def _attach_downstream(cols: dict, result: dict, seeds) -> None:
    n = len(cols["seed"])
    for name in DOWNSTREAM_LABELS:
        cols[name] = np.full(n, np.nan, dtype=np.float32)
    for i, (step, block, unit) in enumerate(result["targets"]):
        rows = (cols["seed"] == seeds[i]) & (cols["step"] == step) & (cols["block"] == block) & (cols["unit"] == unit)
        cols["downstream_psnr"][rows] = result["psnr"][i]
        cols["downstream_feature_distance"][rows] = result["feature_distance"][i]
        cols["downstream_rel"][rows] = result["rel"][i]


def collect(model, settings: SampleSettings, out_dir, num_samples: int, seed: int = seed_roles.start("trace"),
            policy: str = "none", probes: tuple[str, ...] = ("local",), progress: bool = True) -> dict:
    """Record traces of ``num_samples`` samples (seeds ``seed .. seed+num_samples-1``) into ``out_dir``."""
    settings.validate()
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    make_policy(policy).prepare(model, settings)  # a bad spec, or one refused for this model, fails before any file
    # workers on disjoint seed ranges may share out_dir; one launch per range
    with FolderLock(out_dir, f".cqpolicy-trace-{seed}-{num_samples}.lock"):
        return _collect(model, settings, out_dir, num_samples, seed, policy, probes, progress)


def _collect(model, settings, out_dir, num_samples, seed, policy, probes, progress) -> dict:
    from cqpolicy import __version__

    num_blocks = len(cache_blocks(model.transformer))
    info = RunInfo(model_id=model.name, model_hash=model_fingerprint(model), scheduler=settings.scheduler,
                   steps=settings.steps, guidance_scale=settings.guidance_scale, policy=policy,
                   extra={"package_version": __version__, "num_blocks": num_blocks,
                          "model_class": type(model.transformer).__name__, "probes": ",".join(probes),
                          "batch_size": settings.batch_size})
    # labels follow the absolute seed, so workers on disjoint seed ranges record what one run would
    labels_all = [(seed + i) % model.num_classes for i in range(num_samples)]
    writer = TraceWriter(out_dir, info, TRACE_SCHEMA, label_columns=LABEL_COLUMNS, unmeasured_columns=("entropy",))
    writer.remove_stale_temporaries()
    done = writer.done_seeds()
    cfg = uses_cfg(settings.guidance_scale, model)
    channels = model.latent_shape[0]
    timing = {"record_s": 0.0, "downstream_s": 0.0, "batches": 0, "rows": 0, "skipped_batches": 0}
    # under torchrun each rank records its share of the batches into its own shards (one manifest, the same rows)
    w = world()
    batches = w.batches(num_samples, settings.batch_size)
    bar = tqdm(total=len(batches) * settings.steps, desc=f"trace {model.name}", unit="step",
               disable=not (progress and w.main), dynamic_ncols=True)
    try:
        for start, end in batches:
            seeds = [seed + i for i in range(start, end)]
            labels = labels_all[start:end]
            present = [s for s in seeds if s in done]
            if present:
                if len(present) != len(seeds):
                    raise ValueError(f"{out_dir} holds seeds {present[0]}..{present[-1]} but not the whole batch "
                                     f"{seeds[0]}..{seeds[-1]}: resume with the --batch-size of the first run")
                timing["skipped_batches"] += 1
                bar.update(settings.steps)
                continue
            recorder = TraceRecorder(make_policy(policy), model.adapter.default_units,
                                     local_probes=bool({"local", "chain"} & set(probes)),
                                     chain=MAX_CHAIN if "chain" in probes else 1)
            recorder.prepare(model, settings)
            started = time.perf_counter()

            def after(i, t, x, out):
                recorder.after_step(i, x, out, channels)
                bar.update(1)

            with enable(model.transformer, recorder):
                images = sample(model, labels, seeds, settings, progress=False, output_callback=after)
            cols = records_to_columns(recorder.take_records(), seeds, labels, cfg)
            timing["record_s"] += time.perf_counter() - started
            if "downstream" in probes:
                started = time.perf_counter()
                rng = np.random.default_rng(seeds[0])
                result = _downstream(model, policy, labels, seeds, settings, images, rng, num_blocks)
                _attach_downstream(cols, result, seeds)
                timing["downstream_s"] += time.perf_counter() - started
            else:
                for name in DOWNSTREAM_LABELS:
                    cols[name] = np.full(len(cols["seed"]), np.nan, dtype=np.float32)
            table = pa.table({name: pa.array(cols[name], type=TRACE_SCHEMA.field(name).type)
                              for name in TRACE_SCHEMA.names}, schema=TRACE_SCHEMA)
            writer.write_shard(table)
            timing["batches"] += 1
            timing["rows"] += table.num_rows
    finally:
        bar.close()
    if w.size > 1:  # every rank's counts, once all shards are published
        keys = ("record_s", "downstream_s", "batches", "rows", "skipped_batches")
        timing = {**dict(zip(keys, all_sum([timing[k] for k in keys]))), "ranks": w.size}
        for key in ("batches", "rows", "skipped_batches"):
            timing[key] = int(timing[key])
    return {"run_dir": str(out_dir), "manifest": writer.manifest, **timing}


def local_vs_downstream(table: pa.Table) -> dict:
    """Spearman rank correlation between the local impact label and the downstream change, over probed rows."""
    from scipy.stats import spearmanr

    names = ["cfg_branch", "impact_local", "downstream_psnr", "downstream_feature_distance", "downstream_rel"]
    df = table.select(names).to_pandas()
    df = df[(df["cfg_branch"] == 0) & df["downstream_psnr"].notna() & df["impact_local"].notna()]
    if len(df) < 3:
        return {"n": int(len(df))}
    result = {"n": int(len(df)),
              "spearman_local_vs_neg_psnr": float(spearmanr(df["impact_local"], -df["downstream_psnr"]).statistic)}
    result["spearman_local_vs_rel_change"] = float(spearmanr(df["impact_local"], df["downstream_rel"]).statistic)
    if df["downstream_feature_distance"].notna().all():
        result["spearman_local_vs_feature_distance"] = float(
            spearmanr(df["impact_local"], df["downstream_feature_distance"]).statistic)
    return result


def heatmaps(table: pa.Table, path, num_blocks: int, steps: int) -> None:
    """PNG: step x block means of the main signals and of the impact label, one row of panels per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("entropy", "out_rel_l1_prev", "cka_prev", "in_rel_l1_last", "impact_local")
    df = table.select(["step", "block", "unit", *names]).to_pandas()
    units = sorted(df["unit"].unique())
    fig, axes = plt.subplots(len(units), len(names), figsize=(3.2 * len(names), 2.6 * len(units)), squeeze=False)
    for r, unit in enumerate(units):
        sub = df[df["unit"] == unit].groupby(["block", "step"])[list(names)].mean()
        for c, name in enumerate(names):
            grid = np.full((num_blocks, steps), np.nan)
            for (block, step), value in sub[name].items():
                grid[block, step] = value
            ax = axes[r][c]
            image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
            ax.set_title(f"{unit}: {name}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("block")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
