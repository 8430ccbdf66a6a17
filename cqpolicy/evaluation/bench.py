"""``cqpolicy bench``: every policy against the plain model, measured side by side in one process.

For each policy: the same labels and seeds as the baseline (the plain model, no hooks), so paired PSNR /
SSIM and bit-identity are against the uncached images; MACs counted on the first batch under the FLOP
counter; wall time measured on the first batch, **interleaved** with the baseline (one repeat runs every
method once, in turn), median over repeats after a warm-up round; FID and class accuracy over all samples.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from cqpolicy.evaluation.cost import count_macs
from cqpolicy.evaluation.evaluate import default_labels, is_fashion_mnist_like
from cqpolicy.evaluation.quality import images_to_uint8, paired_fidelity
from cqpolicy.models.loading import LoadedModel
from cqpolicy.policies import make_policy, spec_string
from cqpolicy.runtime import enable
from cqpolicy.sampling import SampleSettings, sample

BASELINE = "baseline"


def _run(model, policy, cache_format, labels, seeds, settings, measure_macs=False):
    """Sample under ``policy`` (None = plain model, no hooks); returns images and runtime stats."""
    stats = {"reuse_ratio": 0.0, "cache_bytes": 0}
    run = lambda: sample(model, labels, seeds, settings, progress=False)  # noqa: E731
    if policy is None:
        return (count_macs(run) if measure_macs else (None, run())), stats
    with enable(model.transformer, policy, cache_format) as handle:
        result = count_macs(run) if measure_macs else (None, run())
        stats = {"reuse_ratio": handle.reuse_ratio, "cache_bytes": handle.cache_bytes}
    return result, stats


def bench(model: LoadedModel, policies: list[str], settings: SampleSettings, num_samples: int, seed: int = 0,
          cache_format: str = "fp16", fid: bool = False, repeats: int = 3, progress: bool = True,
          macs: bool = True, macs_samples: int | None = None) -> list[dict]:
    """One row per method (the plain-model baseline first). Wall speedup: with ``repeats`` the median of that
    many interleaved runs of the first batch after a warm-up round; with ``repeats=0`` the timed quality pass
    of each method over all samples (no extra runs). ``macs=False`` skips the FLOP-counted pass (for extra
    seeds of a table whose costs were measured once)."""
    settings.validate()
    if repeats < 0:
        raise ValueError(f"--repeats must be non-negative (0 skips wall timing), got {repeats}")
    # an entry is a spec, or (spec, cache format) to override ``cache_format`` for that method
    formats = [p[1] if isinstance(p, tuple) else cache_format for p in policies]
    policies = [p[0] if isinstance(p, tuple) else p for p in policies]
    objects = [make_policy(spec) for spec in policies]  # bad specs fail before any sampling
    labels = default_labels(num_samples, model.num_classes)
    seeds = [seed + i for i in range(num_samples)]
    n_first = min(settings.batch_size, num_samples)
    n_macs = min(n_first, macs_samples or n_first)  # the FLOP counter is slow: optionally fewer samples
    fmnist = is_fashion_mnist_like(model)
    fid_metric = classifier = None
    if fmnist:
        from cqpolicy.evaluation.classifier import load_classifier
        from cqpolicy.evaluation.quality import ClassifierFID, class_accuracy

        classifier = load_classifier()
        fid_metric = ClassifierFID() if fid else None
    methods = [(BASELINE, None, "none")] + list(zip(policies, objects, formats))
    bar = tqdm(total=len(methods) * (1 + macs + (repeats + 1 if repeats else 0)), desc="bench", disable=not progress, dynamic_ncols=True)
    rows, reference = [], None
    if not repeats:  # wall comes from the quality passes: warm up first so the baseline does not pay for it
        _run(model, None, cache_format, labels[:2], seeds[:2], settings)
    for name, policy, fmt in methods:
        if policy is not None:
            policy.prepare(model, settings)
        start = time.perf_counter()
        (_, images), stats = _run(model, policy, fmt, labels, seeds, settings)
        quality_wall = time.perf_counter() - start
        bar.update(1)
        counted = None
        if macs:
            (counted, _), _ = _run(model, policy, fmt, labels[:n_macs], seeds[:n_macs], settings, True)
            bar.update(1)
        images_u8 = images_to_uint8(images)
        row = {"policy": name, "policy_config": BASELINE if policy is None else spec_string(policy),
               "cache_dtype": fmt,
               "macs_per_image": counted / n_macs if macs else None, "macs_counted_on": n_macs if macs else 0,
               "quality_pass_s": quality_wall, **stats}
        if reference is None:
            reference = (images, images_u8)
        row["bit_identical"] = bool(torch.equal(images, reference[0]))
        fidelity = paired_fidelity(images_u8, reference[1])
        row["psnr_vs_baseline"], row["ssim_vs_baseline"] = fidelity["psnr"], fidelity["ssim"]
        row["class_accuracy"] = class_accuracy(images_u8, labels, classifier) if fmnist else None
        if fid:
            row["fid"] = fid_metric(images_u8) if fid_metric is not None else None
        rows.append(row)
    # Wall time: first batch, methods interleaved in every repeat, one warm-up round first.
    first = (labels[:n_first], seeds[:n_first], replace(settings))
    times = {i: [] for i in range(len(methods))}
    for r in range(repeats + 1 if repeats else 0):
        for i, (_, policy, fmt) in enumerate(methods):
            start = time.perf_counter()
            _run(model, policy, fmt, *first)
            if r > 0:
                times[i].append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    base_macs = rows[0]["macs_per_image"]
    base_wall = statistics.median(times[0]) if repeats else rows[0]["quality_pass_s"]
    for i, row in enumerate(rows):
        wall = statistics.median(times[i]) if repeats else row["quality_pass_s"]
        row.update({"wall_s_per_batch": wall if repeats else None, "wall_times": times[i],
                    "wall_speedup": base_wall / wall,
                    "wall_measured_on": "interleaved repeats of the first batch" if repeats
                    else "the quality pass (all samples, methods in turn)",
                    "macs_speedup": base_macs / row["macs_per_image"] if macs else None, "num_samples": num_samples,
                    "steps": settings.steps, "seed": seed, "batch_size": settings.batch_size,
                    "guidance_scale": settings.guidance_scale, "scheduler": settings.scheduler,
                    "repeats": repeats, "model": model.name})
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = ("| policy | MACs speedup | wall speedup | FID | PSNR vs baseline (dB) | SSIM | bit-identical | "
              "reuse | cache MiB | class acc. |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| `{r['policy']}` | {fmt(r['macs_speedup'], '.2f')}× | {fmt(r['wall_speedup'], '.2f')}× | "
                     f"{fmt(r.get('fid'), '.2f')} | {fmt(r['psnr_vs_baseline'], '.1f')} | "
                     f"{r['ssim_vs_baseline']:.4f} | {'yes' if r['bit_identical'] else 'no'} | "
                     f"{fmt(r['reuse_ratio'], '.2f')} | "
                     f"{fmt(None if r['cache_bytes'] is None else r['cache_bytes'] / 2**20, '.2f')} | "
                     f"{fmt(r['class_accuracy'], '.3f')} |")
    return "\n".join(lines)
