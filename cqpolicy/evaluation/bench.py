"""Bench rows: what one (replicate, method) row holds, how it is logged to MLflow and printed.

The engine that runs methods x replicates x N samples and writes them is ``cqpolicy.evaluation.engine``. A row:
what ran (spec, family, cache format) and what its scored run cost (``cost_row``: MACs exact for that very run,
calibration images and their MACs in columns of their own), and its quality (``quality_row``: paired PSNR / SSIM
against the plain run on the same seeds, class accuracy, FID and KID against the real test set).
"""
from __future__ import annotations

from cqpolicy.evaluation.quality import paired_fidelity
from cqpolicy.policies import spec_string

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
            "policy_macs_per_image": run.policy_macs / num_samples,
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


BENCH_PARAMS = ("model", "policy", "policy_config", "family", "cache_dtype", "steps", "num_samples", "seed",
                "macs_source", "weights", "role", "replicate", "wall_flag")


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
    """One line per row (``cqpolicy bench --policies``' results.md; the leaderboard aggregates over replicates)."""
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
