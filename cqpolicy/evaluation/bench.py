"""``cqpolicy bench``: every policy against the plain model, measured side by side in one process.

For each policy: the same labels and seeds as the baseline (the plain model, no hooks), so paired PSNR /
SSIM and bit-identity are against the uncached images. MACs are exact for the very run that is scored
(``evaluation.cost``: per-unit MACs x rows the runtime computed); calibration runs (SmoothCache, DPS, ReCaT)
are a column of their own. Wall time: with ``repeats`` the median of that many runs of the first batch,
**interleaved** with the baseline (one repeat runs every method once, in turn) after a warm-up round;
with ``repeats=0`` each method's timed quality pass. FID, KID and class accuracy over all samples.
"""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from cqpolicy.evaluation.cost import measured_sample, model_costs
from cqpolicy.evaluation.evaluate import default_labels, is_fashion_mnist_like
from cqpolicy.evaluation.quality import images_to_uint8, paired_fidelity
from cqpolicy.models.loading import LoadedModel
from cqpolicy.policies import make_policy, spec_string
from cqpolicy.sampling import SampleSettings

BASELINE = "baseline"
PLAIN_FAMILY = "plain"


def cost_row(name: str, policy, cache_format: str, run, num_samples: int, plain_macs_per_image: int) -> dict:
    """What a method is and what its scored run cost (``run``: a ``MeasuredRun``; ``policy`` None = uncached: the
    plain model when ``name`` is ``BASELINE``, else a method of that name, e.g. a quantized model's ``none``)."""
    calibration = int(getattr(policy, "calibration_images", 0) or 0)
    family = policy.family if policy is not None else PLAIN_FAMILY if name == BASELINE else name
    return {"policy": name, "policy_config": name if policy is None else spec_string(policy),
            "family": family, "cache_dtype": cache_format,
            "macs_per_image": run.macs / num_samples, "macs_source": run.macs_source,
            "calibration_images": calibration, "calibration_macs": calibration * plain_macs_per_image,
            "quality_pass_s": run.wall_s, "reuse_ratio": run.reuse_ratio, "cache_bytes": run.cache_bytes}


def quality_row(images_u8, reference_u8, labels, classifier=None, fid=None, kid=None) -> dict:
    """A scored run's quality: paired PSNR / SSIM against the plain run's images (``reference_u8``; None: this run
    is the plain one), and where a classifier / metric is given, class accuracy, FID and KID."""
    from cqpolicy.evaluation.quality import class_accuracy

    fidelity = {"psnr": float("inf"), "ssim": 1.0} if reference_u8 is None else paired_fidelity(images_u8, reference_u8)
    return {"psnr_vs_baseline": fidelity["psnr"], "ssim_vs_baseline": fidelity["ssim"],
            "class_accuracy": None if classifier is None else class_accuracy(images_u8, labels, classifier),
            "fid": None if fid is None else fid(images_u8), "kid": None if kid is None else kid(images_u8)}


def bench(model: LoadedModel, policies: list, settings: SampleSettings, num_samples: int, seed: int = 0,
          cache_format: str = "fp16", fid: bool = False, repeats: int = 3, progress: bool = True) -> list[dict]:
    """One row per method (the plain-model baseline first). Sample ``i`` has class ``i mod classes`` and seed
    ``seed + i``. An entry of ``policies`` is a spec, or ``(spec, cache format)`` to override ``cache_format``."""
    settings.validate()
    if repeats < 0:
        raise ValueError(f"--repeats must be non-negative (0 skips wall timing), got {repeats}")
    formats = [p[1] if isinstance(p, tuple) else cache_format for p in policies]
    policies = [p[0] if isinstance(p, tuple) else p for p in policies]
    objects = [make_policy(spec) for spec in policies]  # bad specs fail before any sampling
    labels = default_labels(num_samples, model.num_classes)
    seeds = [seed + i for i in range(num_samples)]
    n_first = min(settings.batch_size, num_samples)
    fmnist = is_fashion_mnist_like(model)
    fid_metric = kid_metric = classifier = None
    if fmnist:
        from cqpolicy.evaluation.classifier import load_classifier
        from cqpolicy.evaluation.quality import ClassifierFID, ClassifierKID

        classifier = load_classifier()
        fid_metric, kid_metric = (ClassifierFID(), ClassifierKID()) if fid else (None, None)
    per_image = model_costs(model, settings).plain(1, settings)
    methods = [(BASELINE, None, "none")] + list(zip(policies, objects, formats))
    bar = tqdm(total=len(methods) * (1 + (repeats + 1 if repeats else 0)), desc="bench", disable=not progress,
               dynamic_ncols=True)
    rows, reference = [], None
    if not repeats:  # wall comes from the quality passes: warm up first so the baseline does not pay for it
        measured_sample(model, None, cache_format, labels[:2], seeds[:2], settings)
    for name, policy, fmt in methods:
        if policy is not None:
            policy.prepare(model, settings)
        run = measured_sample(model, policy, fmt, labels, seeds, settings)
        bar.update(1)
        images_u8 = images_to_uint8(run.images)
        row = cost_row(name, policy, fmt, run, num_samples, per_image)
        if reference is None:
            reference = (run.images, images_u8)
        row["bit_identical"] = bool(torch.equal(run.images, reference[0]))
        row.update(quality_row(images_u8, reference[1], labels, classifier, fid_metric, kid_metric))
        rows.append(row)
    times = interleaved_walls(model, [(p, f) for _, p, f in methods], labels[:n_first], seeds[:n_first], settings,
                              repeats, warmup=True, on_run=lambda: bar.update(1)) if repeats else {}
    bar.close()
    base_macs = rows[0]["macs_per_image"]
    base_wall = statistics.median(times[0]) if repeats else rows[0]["quality_pass_s"]
    for i, row in enumerate(rows):
        wall = statistics.median(times[i]) if repeats else row["quality_pass_s"]
        row.update({"wall_s_per_batch": wall if repeats else None, "wall_times": times.get(i, []),
                    "wall_speedup": base_wall / wall,
                    "wall_measured_on": "interleaved repeats of the first batch" if repeats
                    else "the quality pass (all samples, methods in turn)",
                    "macs_speedup": base_macs / row["macs_per_image"], "num_samples": num_samples,
                    "steps": settings.steps, "seed": seed, "batch_size": settings.batch_size,
                    "guidance_scale": settings.guidance_scale, "scheduler": settings.scheduler,
                    "repeats": repeats, "model": model.name})
    return rows


def interleaved_walls(model, methods, labels, seeds, settings, repeats: int, warmup: bool = True,
                      on_run=None) -> dict[int, list[float]]:
    """Wall seconds of each ``(policy, cache format)`` of ``methods`` (policy None: the plain model, prepared
    policies otherwise) sampling the same batch, interleaved: every repeat runs each method once in turn, so a
    change in the machine's load reaches all of them alike. ``warmup``: one untimed round first. An entry
    ``(policy, cache format, other model)`` runs on that model (a quantized one) instead of ``model``."""
    times = {i: [] for i in range(len(methods))}
    for r in range(repeats + int(warmup)):
        for i, (policy, fmt, *other) in enumerate(methods):
            run = measured_sample(other[0] if other else model, policy, fmt, labels, seeds, settings)
            if r >= int(warmup):
                times[i].append(run.wall_s)
            if on_run is not None:
                on_run()
    return times


def bench_rows(model, methods, settings, num_samples: int, replicates, repeats: int = 0, progress: bool = True):
    """``bench`` on every test replicate ``k`` (samples ``k * 1_000_000 + i``), FID and KID on; MACs are exact
    per replicate. Wall time (``repeats``) is measured on the first replicate only."""
    from cqpolicy import seeds

    rows = []
    for i, k in enumerate(replicates):
        rows += bench(model, methods, settings, num_samples, seed=seeds.test_start(int(k)), fid=True,
                      repeats=repeats if i == 0 else 0, progress=progress)
    return rows


BENCH_PARAMS = ("model", "policy", "policy_config", "family", "cache_dtype", "steps", "num_samples", "seed",
                "macs_source", "weights")


def log_bench_rows(experiment: str, rows: list[dict], tags: dict | None = None, artifact=None) -> None:
    """One MLflow run per bench row (the leaderboard reads them), optionally with a file attached."""
    import math

    import mlflow

    from cqpolicy.tracking import start_run

    for row in rows:
        with start_run(experiment, run_name=f"bench-{row['policy']}"):
            if tags:
                mlflow.set_tags(tags)
            mlflow.log_params({k: row[k] for k in BENCH_PARAMS if k in row})  # `cqpolicy bench` rows: no weights
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k not in BENCH_PARAMS
                                and isinstance(v, (int, float)) and math.isfinite(float(v))})
            if artifact is not None:
                mlflow.log_artifact(str(artifact))


def markdown_table(rows: list[dict]) -> str:
    header = ("| policy | MACs speedup | wall speedup | FID | KID | PSNR vs baseline (dB) | SSIM | bit-identical | "
              "reuse | cache MiB | class acc. |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| `{r['policy']}` | {fmt(r['macs_speedup'], '.2f')}× | {fmt(r['wall_speedup'], '.2f')}× | "
                     f"{fmt(r.get('fid'), '.2f')} | {fmt(r.get('kid'), '.3f')} | {fmt(r['psnr_vs_baseline'], '.1f')} | "
                     f"{r['ssim_vs_baseline']:.4f} | {'yes' if r['bit_identical'] else 'no'} | "
                     f"{fmt(r['reuse_ratio'], '.2f')} | "
                     f"{fmt(None if r['cache_bytes'] is None else r['cache_bytes'] / 2**20, '.2f')} | "
                     f"{fmt(r['class_accuracy'], '.3f')} |")
    return "\n".join(lines)
