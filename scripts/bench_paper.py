#!/usr/bin/env python
"""The paper-scale table: every frontier point of every family and the learned policies of a main-job run,
N = 1000 samples per test replicate x 3 replicates, resumable per (replicate, method).

    python scripts/bench_paper.py                                   # configs/fmnist-dit-paper.yaml
    python scripts/bench_paper.py --num-samples 64 --seeds 0 --out out/paper-smoke   # a quick look

For each test replicate ``k`` (samples ``k * 1_000_000 + i``, which nothing learned, calibrated or searched
saw) the plain model runs first; its images are kept under ``OUT/work/`` so a resumed run scores every method
against the same uncached samples (paired PSNR / SSIM). Each finished (replicate, method) row is written to
``OUT/rows/<k>/<method>.json`` at once and logged to MLflow (experiment ``cqpolicy-bench-paper``); a re-run
skips finished rows. MACs are exact for the scored run; wall speedup is the method's quality-pass time
against the plain model's quality pass of the same replicate (sequential, same batch size: a ratio, not a
clock). At the end ``OUT/leaderboard.{csv,md}`` and ``OUT/pareto.png`` are written from every row so far:
FID / KID mean ± std over replicates, paired ΔFID / ΔKID ± std, and each row's verdict against every other
family's frontier.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.bench import BASELINE, cost_row, log_bench_rows
from cqpolicy.evaluation.classifier import load_classifier
from cqpolicy.evaluation.cost import measured_sample, model_costs
from cqpolicy.evaluation.evaluate import default_labels
from cqpolicy.evaluation.quality import ClassifierFID, ClassifierKID, class_accuracy, images_to_uint8, paired_fidelity
from cqpolicy.models import load_model
from cqpolicy.models.fingerprint import model_fingerprint
from cqpolicy.outputs import read_yaml
from cqpolicy.policies import make_policy
from cqpolicy.sampling import SampleSettings
from cqpolicy.tracking.leaderboard import leaderboard, write_leaderboard

EXPERIMENT = "cqpolicy-bench-paper"


class PaperError(ValueError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist-dit-paper.yaml")
    p.add_argument("--learned-from", default=None, help="main-job folder (default: the config's learned_from)")
    p.add_argument("--num-samples", type=int, default=None, help="per replicate (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="test replicates (default: the config's)")
    p.add_argument("--only", nargs="*", default=None, help="bench only the methods whose spec contains one of these")
    p.add_argument("--out", default="docs/results/paper")
    return p.parse_args(argv)


def learned_methods(run_dir: Path) -> list[tuple[str, str]]:
    """The learned policies a finished ``cqpolicy run`` benches: study Pareto points, scheduler, intervals."""
    done = {stage: run_dir / stage / "done.json" for stage in ("train", "retrain", "search")}
    if not all(path.is_file() for path in done.values()):
        return []
    train, retrain, search = (json.loads(path.read_text()) for path in done.values())
    methods = [(p["policy"], p["cache_dtype"]) for p in search.get("pareto", [])]
    methods.append((f"learned:path={retrain['scheduler']}", "fp16"))
    methods += [(f"learned:path={path}", "fp16") for path in (train.get("intervals") or {}).values()]
    return methods


def slug(spec: str, fmt: str) -> str:
    text = f"{spec}|{fmt}"
    return text.split(":")[0] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def as_leaderboard_rows(rows: list[dict]) -> pd.DataFrame:
    """Bench rows in the shape ``collect_rows`` gives the leaderboard."""
    df = pd.DataFrame(rows)
    df["method"] = df["policy_config"]
    df["experiment"], df["run_id"] = EXPERIMENT, [f"{r['seed']}-{slug(r['policy'], r['cache_dtype'])}" for r in rows]
    return df


def main(argv=None) -> int:
    args = parse_args(argv)
    config = read_yaml(args.config, PaperError, "paper config")
    num_samples = int(args.num_samples or config.get("num_samples", 1000))
    replicates = [int(k) for k in (args.seeds or config.get("seeds", [0, 1, 2]))]
    model = load_model(config.get("model", "fmnist-dit"))
    g = config.get("guidance_scale")
    settings = SampleSettings(steps=int(config.get("steps", 50)), batch_size=int(config.get("batch_size", 64)),
                              guidance_scale=model.default_guidance_scale if g is None else float(g))
    methods = [(spec, "fp16") for spec in config.get("methods", [])]
    methods += learned_methods(Path(args.learned_from or config.get("learned_from", "out/run")))
    if args.only:
        methods = [m for m in methods if any(word in m[0] for word in args.only)]
    for spec, _ in methods:
        make_policy(spec)  # bad specs fail before anything runs
    out = Path(args.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    labels = default_labels(num_samples, model.num_classes)
    classifier, fid, kid = load_classifier(), ClassifierFID(), ClassifierKID()
    per_image = model_costs(model, settings).plain(1, settings)
    fingerprint = model_fingerprint(model)
    for old in sorted((out / "rows").glob("*/*.json")):
        if json.loads(old.read_text()).get("model_fingerprint") != fingerprint:
            raise PaperError(f"{old} was measured on other weights than {model.name}'s now: "
                             f"bench into a new --out (or remove {out / 'rows'})")
    todo = [(k, m) for k in replicates for m in [(BASELINE, "none")] + methods
            if not (out / "rows" / str(k) / f"{slug(*m)}.json").is_file()]
    bar = tqdm(total=len(todo), desc="paper bench", unit="row", dynamic_ncols=True)

    def plain(k):
        """Replicate ``k``'s plain row and uint8 images, sampled once and kept for a resumed run."""
        first = seed_roles.test_start(k)
        rows_dir = out / "rows" / str(k)
        rows_dir.mkdir(parents=True, exist_ok=True)
        plain_file = out / "work" / f"plain-{k}-{num_samples}.npz"
        base_row_file = rows_dir / f"{slug(BASELINE, 'none')}.json"
        if not plain_file.is_file() or not base_row_file.is_file():
            bar.set_postfix_str(f"replicate {k}: plain model")
            run = measured_sample(model, None, "none", labels, [first + i for i in range(num_samples)], settings)
            np.savez_compressed(plain_file, images=images_to_uint8(run.images).numpy())
            base_row = score(BASELINE, "none", run, None, labels, classifier, fid, kid, per_image)
            write_json(base_row_file, finish(base_row, base_row, model, settings, num_samples, first, fingerprint))
            log_bench_rows(EXPERIMENT, [json.loads(base_row_file.read_text())])
            bar.update(1)
        with np.load(plain_file) as data:
            return json.loads(base_row_file.read_text()), torch.from_numpy(data["images"])

    plains = {k: plain(k) for k in replicates}  # every replicate's plain model first: the noise floor early
    for k in replicates:
        first = seed_roles.test_start(k)
        seeds = [first + i for i in range(num_samples)]
        rows_dir = out / "rows" / str(k)
        base_row, reference = plains[k]
        for spec, fmt in methods:
            path = rows_dir / f"{slug(spec, fmt)}.json"
            if path.is_file():
                continue
            bar.set_postfix_str(f"replicate {k}: {spec[:40]}")
            policy = make_policy(spec)
            policy.prepare(model, settings)
            run = measured_sample(model, policy, fmt, labels, seeds, settings)
            row = score(spec, fmt, run, reference, labels, classifier, fid, kid, per_image, policy)
            write_json(path, finish(row, base_row, model, settings, num_samples, first, fingerprint))
            log_bench_rows(EXPERIMENT, [json.loads(path.read_text())])
            bar.update(1)
    bar.close()
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*/*.json"))]
    rows = [r for r in rows if r["num_samples"] == num_samples]
    table = leaderboard(as_leaderboard_rows(rows))
    paths = write_leaderboard(table, out, overwrite=True)
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} from {len(rows)} rows")
    return 0


def score(spec, fmt, run, reference, labels, classifier, fid, kid, per_image, policy=None) -> dict:
    images = images_to_uint8(run.images)
    fidelity = paired_fidelity(images, reference) if reference is not None else {"psnr": float("inf"), "ssim": 1.0}
    return {**cost_row(spec, policy, fmt, run, len(labels), per_image),
            "bit_identical": bool(reference is None or torch.equal(images, reference)),
            "psnr_vs_baseline": fidelity["psnr"], "ssim_vs_baseline": fidelity["ssim"],
            "class_accuracy": class_accuracy(images, labels, classifier), "fid": fid(images), "kid": kid(images)}


def finish(row: dict, base: dict, model, settings, num_samples: int, first_seed: int, fingerprint: str) -> dict:
    return {**row, "macs_speedup": base["macs_per_image"] / row["macs_per_image"],
            "wall_speedup": base["quality_pass_s"] / row["quality_pass_s"],
            "wall_measured_on": "the quality pass (all samples), against the plain model's of the same replicate",
            "num_samples": num_samples, "steps": settings.steps, "seed": first_seed,
            "batch_size": settings.batch_size, "guidance_scale": settings.guidance_scale,
            "scheduler": settings.scheduler, "repeats": 0, "model": model.name, "model_fingerprint": fingerprint}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PaperError, ValueError, FileNotFoundError) as exc:
        print(f"bench_paper: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
