#!/usr/bin/env python
"""The paper-scale table: every frontier point of every family and the learned policies of a main-job run,
N = 1000 samples per test replicate x 3 replicates, resumable per (replicate, method).

    python scripts/bench_paper.py                                   # configs/fmnist-dit-paper.yaml
    python scripts/bench_paper.py --num-samples 64 --seeds 0 --out out/paper-smoke   # a quick look
    python scripts/bench_paper.py --table-only                      # the table from the rows so far
    python scripts/bench_paper.py --retime diffusers-fbc:threshold=0.1   # time a finished method's wall again

For each test replicate ``k`` (samples ``k * 1_000_000 + i``, which nothing learned, calibrated or searched
saw) the plain model runs first; its images are kept under ``OUT/work/`` so a resumed run scores every method
against the same uncached samples (paired PSNR / SSIM). Each finished (replicate, method) row is written to
``OUT/rows/<k>/<method>.json`` at once and logged to MLflow (experiment ``cqpolicy-bench-paper``); a re-run
skips finished rows. MACs are exact for the scored run. Wall speedup is measured once per method, on the
first batch of the first replicate it runs on: the plain model and the method in turn, in this process, until
the last ``--wall-repeats`` pairs agree within 20% for both; the ratio of those pairs' median times
(``OUT/wall/<method>.json``; ``--retime`` times finished methods again). A load that drifts during the hours
of the bench reaches both alike, which timing the quality passes one after the other would not; a burst is
caught by the spread (keep the machine otherwise idle all the same). At the end ``OUT/leaderboard.{csv,md}`` and ``OUT/pareto.png`` are written from every row so far:
FID / KID mean ± std over replicates, paired ΔFID / ΔKID ± std, and each row's verdict against every other
family's frontier.

Weights: a ``methods:`` entry ``{policy: SPEC, weights: DIR}`` runs SPEC (``none``: no caching) on the model
``cqpolicy quantize`` wrote to DIR, which must record the bench model's fingerprint as its source. It is scored
against the same replicate's plain full-precision images and FID (ΔFID against the unquantized uncached model),
its wall speedup timed against the plain full-precision model; its slug adds the digest of DIR's files. Every row
records ``weights`` (``fp`` or the folder's ``weights_label``, e.g. ``int8``, ``mixed4``), ``model_bytes`` (a
quantized folder's every stored byte; the fp model's tensors in their dtype as loaded, i.e. its float32
safetensors) and ``compression_ratio`` (vs float32).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cqpolicy import seeds as seed_roles
from cqpolicy.evaluation.bench import BASELINE, cost_row, interleaved_walls, log_bench_rows, quality_row
from cqpolicy.evaluation.classifier import load_classifier
from cqpolicy.evaluation.cost import measured_sample, model_costs
from cqpolicy.evaluation.evaluate import default_labels
from cqpolicy.evaluation.quality import ClassifierFID, ClassifierKID, images_to_uint8
from cqpolicy.models import load_model
from cqpolicy.models.fingerprint import model_fingerprint
from cqpolicy.outputs import read_yaml
from cqpolicy.policies import make_policy
from cqpolicy.quantization import fp_weights_info, weights_info
from cqpolicy.sampling import SampleSettings
from cqpolicy.tracking.leaderboard import leaderboard, write_leaderboard

EXPERIMENT = "cqpolicy-bench-paper"
NO_POLICY = "none"  # a weights entry's policy that samples the quantized model uncached


class PaperError(ValueError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist-dit-paper.yaml")
    p.add_argument("--learned-from", default=None, help="main-job folder (default: the config's learned_from)")
    p.add_argument("--learned-config", default=None, help="its config (default: the config's learned_config)")
    p.add_argument("--num-samples", type=int, default=None, help="per replicate (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="test replicates (default: the config's)")
    p.add_argument("--only", nargs="*", default=None,
                   help="bench only the methods whose spec or weights folder contains one of these")
    p.add_argument("--wall-repeats", type=int, default=2, help="interleaved timing pairs per method")
    p.add_argument("--table-only", action="store_true", help="bench nothing: write the table from the rows so far")
    p.add_argument("--retime", nargs="+", default=None, metavar="SPEC",
                   help="time these methods' wall speedup again (every entry with that spec, with or without "
                        "weights; their rows stay), then write the table")
    p.add_argument("--out", default="docs/results/paper")
    return p.parse_args(argv)


def learned_methods(run_dir: Path, run_config: str, frozen: Path) -> list[tuple[str, str]]:
    """The learned policies of a finished ``cqpolicy run`` (its study's Pareto points, the capped scheduler, the
    interval fits; the main job's own list), each artifact copied once into ``frozen``: the table's rows name files
    that stay, a later main job cannot swap them, and a resumed bench needs no ``out/run``."""
    from cqpolicy.pipeline import Stage, learned_methods as run_methods, load_config

    listed = frozen / "methods.json"
    stages = {name: Stage(run_dir, name) for name in ("train", "retrain", "search")}
    if not all(stage.done for stage in stages.values()):
        return [tuple(m) for m in json.loads(listed.read_text())] if listed.is_file() else []
    _, methods = run_methods(load_config(run_config), {name: st.result() for name, st in stages.items()})
    methods = [(freeze(spec, run_dir, frozen), fmt) for spec, fmt in methods]
    if listed.is_file() and [tuple(m) for m in json.loads(listed.read_text())] != methods:
        raise PaperError(f"{run_dir} has other learned policies than the ones {listed} benches: "
                         f"bench into a new --out")
    write_json(listed, methods)
    return methods


def freeze(spec: str, run_dir: Path, frozen: Path) -> str:
    """``spec`` with its artifact copied to ``frozen/<its path under run_dir>`` (refused if a different copy is there)."""
    match = re.search(r"path=([^,]+)", spec)
    source = Path(match.group(1))
    target = frozen / "-".join(source.resolve().relative_to(run_dir.resolve()).parts)
    if not target.exists():
        shutil.copytree(source, target)
    elif _tree_digest(target) != _tree_digest(source):
        raise PaperError(f"{target} holds another artifact than {source}: bench into a new --out")
    return spec.replace(match.group(0), f"path={target}")


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def slug(spec: str, fmt: str, weights_digest: str | None = None) -> str:
    """A file name for a method: its family and a hash of spec, cache format and (weights entries only) the
    digest of the quantized folder's files."""
    key = f"{spec}|{fmt}" + (f"|{weights_digest}" if weights_digest else "")
    return spec.split(":")[0] + "-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def method_slug(method: tuple) -> str:
    spec, fmt, weights = method
    return slug(spec, fmt, weights and weights["weights_digest"])


def config_methods(entries: list) -> list[tuple]:
    """A config's ``methods:`` as ``(spec, cache format, weights folder)``: a spec string runs on the bench's
    model (folder None) with an fp16 cache, ``{policy: SPEC, weights: DIR, cache: FORMAT}`` (``weights`` and
    ``cache`` optional) on the model quantized into DIR with cached tensors stored as FORMAT (e.g. ``int8-token``)."""
    from cqpolicy.runtime.cache_store import CacheFormat

    methods = []
    for entry in entries:
        if isinstance(entry, str):
            methods.append((entry, "fp16", None))
        elif isinstance(entry, dict) and "policy" in entry and set(entry) <= {"policy", "weights", "cache"}:
            spec = str(entry["policy"])
            if spec == NO_POLICY and ("weights" not in entry or "cache" in entry):
                raise PaperError(f"a methods entry is {{policy: none, weights: DIR}} (no cache) to sample a "
                                 f"quantized model uncached, got {entry!r}")
            try:  # a head granularity's head count is the model's: any count checks the name
                fmt = ("none" if spec == NO_POLICY
                       else str(CacheFormat.parse(str(entry.get("cache", "fp16")), num_heads=1)))
            except ValueError as exc:
                raise PaperError(f"methods entry {entry!r}: {exc}") from None
            methods.append((spec, fmt, str(entry["weights"]) if "weights" in entry else None))
        else:
            raise PaperError(f"a methods entry is a policy spec or {{policy: SPEC, weights: DIR, cache: FORMAT}}, "
                             f"got {entry!r}")
    return methods


def with_weights(methods: list[tuple], fingerprint: str) -> list[tuple]:
    """``methods`` with each weights folder replaced by its record (``weights_info`` plus path and digest: the
    fields its rows carry), after checking the folder was quantized from the bench's model (``fingerprint``)."""
    records = {}
    for folder in dict.fromkeys(m[2] for m in methods if m[2]):
        try:
            info = weights_info(folder, fingerprint)
        except ValueError as exc:
            raise PaperError(f"methods: {exc}") from None
        records[folder] = {"weights": info["weights"], "model_bytes": info["model_bytes"],
                           "compression_ratio": info["compression_ratio"], "weights_dir": folder,
                           "weights_digest": _tree_digest(Path(folder))}
    labels = {}
    for record in records.values():  # the leaderboard groups rows by the label: two folders must not share one
        if labels.setdefault(record["weights"], record["weights_digest"]) != record["weights_digest"]:
            raise PaperError(f"methods: two weights folders are both {record['weights']!r} with other contents, "
                             f"{record['weights_dir']} one of them: keep one")
    return [(spec, fmt, folder and records[folder]) for spec, fmt, folder in methods]


def prepare(model, spec: str, weights: dict | None, settings):
    """The model a method runs on (a weights entry's quantized model) and its prepared policy (None: uncached)."""
    run_model = model if weights is None else load_model(weights["weights_dir"], device=str(model.device))
    if weights is not None and spec == NO_POLICY:
        return run_model, None
    policy = make_policy(spec)
    policy.prepare(run_model, settings)
    return run_model, policy


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def as_leaderboard_rows(rows: list[dict]) -> pd.DataFrame:
    """Bench rows in the shape ``collect_rows`` gives the leaderboard."""
    df = pd.DataFrame(rows)
    df["method"] = df["policy_config"]
    df["experiment"] = EXPERIMENT
    df["run_id"] = [f"{r['seed']}-{slug(r['policy'], r['cache_dtype'], r.get('weights_digest'))}" for r in rows]
    return df


def main(argv=None) -> int:
    args = parse_args(argv)
    config = read_yaml(args.config, PaperError, "paper config")
    num_samples = int(args.num_samples or config.get("num_samples", 1000))
    if args.table_only:
        return write_table(Path(args.out), num_samples)
    replicates = [int(k) for k in (args.seeds or config.get("seeds", [0, 1, 2]))]
    model = load_model(config.get("model", "fmnist-dit"))
    g = config.get("guidance_scale")
    settings = SampleSettings(steps=int(config.get("steps", 50)), batch_size=int(config.get("batch_size", 64)),
                              guidance_scale=model.default_guidance_scale if g is None else float(g),
                              scheduler=str(config.get("scheduler", "ddim")))
    settings.validate()
    out = Path(args.out)
    learned_from = args.learned_from or config.get("learned_from", "out/run")
    learned = [] if learned_from is None else learned_methods(  # first: the rows the table is for
        Path(learned_from), args.learned_config or config.get("learned_config", "configs/fmnist-dit.yaml"),
        out / "policies")
    methods = [(spec, fmt, None) for spec, fmt in learned] + config_methods(config.get("methods") or [])
    if args.only:
        methods = [m for m in methods if any(word in m[0] or word in (m[2] or "") for word in args.only)]
    fingerprint = model_fingerprint(model)
    methods = with_weights(methods, fingerprint)
    for spec, _, weights in methods:
        if not (weights and spec == NO_POLICY):
            make_policy(spec)  # bad specs fail before anything runs
    if args.retime:
        return retime(model, settings, out, methods, args.retime, num_samples, args.wall_repeats)
    (out / "work").mkdir(parents=True, exist_ok=True)
    labels = default_labels(num_samples, model.num_classes)
    classifier, fid, kid = load_classifier(), ClassifierFID(), ClassifierKID()
    per_image = model_costs(model, settings).plain(1, settings)
    fp_weights = fp_weights_info(model)
    digests = {w["weights_dir"]: w["weights_digest"] for _, _, w in methods if w}
    for old in sorted((out / "rows").glob("*/*.json")):
        row = json.loads(old.read_text())
        if row.get("model_fingerprint") != fingerprint:
            raise PaperError(f"{old} was measured on other weights than {model.name}'s now: "
                             f"bench into a new --out (or remove {out / 'rows'})")
        if digests.get(row.get("weights_dir"), row.get("weights_digest")) != row.get("weights_digest"):
            raise PaperError(f"{old} was measured on other weights than {row['weights_dir']} holds now: "
                             f"bench into a new --out")
    todo = [(k, m) for k in replicates for m in [(BASELINE, "none", None)] + methods
            if not (out / "rows" / str(k) / f"{method_slug(m)}.json").is_file()]
    bar = tqdm(total=len(todo), desc="paper bench", unit="row", dynamic_ncols=True)

    def plain(k):
        """Replicate ``k``'s plain row and uint8 images, sampled once and kept for a resumed run."""
        first = seed_roles.test_start(k)
        rows_dir = out / "rows" / str(k)
        rows_dir.mkdir(parents=True, exist_ok=True)
        plain_file = out / "work" / f"plain-{k}-{num_samples}.npz"
        base_row_file = rows_dir / f"{slug(BASELINE, 'none')}.json"
        if not _plain_matches(plain_file, base_row_file):  # the row and the kept images come from one run
            bar.set_postfix_str(f"replicate {k}: plain model")
            run = measured_sample(model, None, "none", labels, [first + i for i in range(num_samples)], settings)
            images = images_to_uint8(run.images).numpy()
            np.savez_compressed(plain_file, images=images)
            base_row = {**score(BASELINE, "none", run, None, labels, classifier, fid, kid, per_image),
                        "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(), **fp_weights}
            write_json(base_row_file, finish(base_row, base_row, model, settings, num_samples, first, fingerprint))
            log_bench_rows(EXPERIMENT, [json.loads(base_row_file.read_text())])
            bar.update(1)
        with np.load(plain_file) as data:
            return json.loads(base_row_file.read_text()), torch.from_numpy(data["images"])

    plains = {k: plain(k) for k in replicates}  # every replicate's plain model first: the noise floor early
    (out / "wall").mkdir(exist_ok=True)
    for method in methods:  # method by method, so a method's rows over all replicates are done early
        spec, fmt, weights = method
        prepared = None
        for k in replicates:
            path = out / "rows" / str(k) / f"{method_slug(method)}.json"
            if path.is_file():
                continue
            bar.set_postfix_str(f"{spec[:48]}{' on ' + weights['weights'] if weights else ''}, replicate {k}")
            if prepared is None:
                prepared = prepare(model, spec, weights, settings)
            run_model, policy = prepared
            first = seed_roles.test_start(k)
            seeds = [first + i for i in range(num_samples)]
            base_row, reference = plains[k]  # a weights entry too: ΔFID is against the unquantized uncached model
            run = measured_sample(run_model, policy, fmt, labels, seeds, settings)
            row = {**score(spec, fmt, run, reference, labels, classifier, fid, kid, per_image, policy),
                   **(weights or fp_weights)}
            wall = wall_record(out / "wall" / f"{method_slug(method)}.json", model, policy, fmt, labels, seeds,
                               settings, args.wall_repeats, run_model)
            write_json(path, finish(row, base_row, model, settings, num_samples, first, fingerprint, wall))
            log_bench_rows(EXPERIMENT, [json.loads(path.read_text())])
            bar.update(1)
    bar.close()
    return write_table(out, num_samples)


def retime(model, settings, out: Path, methods: list[tuple], specs: list[str], num_samples: int,
           repeats: int) -> int:
    """New wall records for every method with a spec of ``specs`` (timed as in the run: the first batch of
    replicate 0)."""
    unknown = [spec for spec in specs if spec not in {m[0] for m in methods}]
    if unknown:
        raise PaperError(f"--retime {unknown[0]!r} is not a method of this table")
    first = seed_roles.test_start(0)
    seeds = [first + i for i in range(settings.batch_size)]
    labels = default_labels(len(seeds), model.num_classes)
    for method in tqdm([m for m in methods if m[0] in specs], desc="retime", unit="method"):
        spec, fmt, weights = method
        run_model, policy = prepare(model, spec, weights, settings)
        measured_sample(run_model, policy, fmt, labels, seeds, settings)  # warm-up, as the quality pass is
        path = out / "wall" / f"{method_slug(method)}.json"
        path.unlink(missing_ok=True)
        wall = wall_record(path, model, policy, fmt, labels, seeds, settings, repeats, run_model)
        print(spec, weights["weights"] if weights else "", wall["wall_speedup"])
    return write_table(out, num_samples)


def write_table(out: Path, num_samples: int) -> int:
    """``OUT/leaderboard.{md,csv}`` and ``OUT/pareto.png`` from every row on disk (of ``num_samples`` per replicate)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*/*.json"))]
    rows = [r for r in rows if r["num_samples"] == num_samples]
    for row in rows:  # wall speedup is one measurement per method: a re-timed method's file wins
        wall = out / "wall" / f"{slug(row['policy'], row['cache_dtype'], row.get('weights_digest'))}.json"
        if row["family"] != "plain" and wall.is_file():
            row["wall_speedup"] = json.loads(wall.read_text())["wall_speedup"]
    if not rows:
        raise PaperError(f"no rows of {num_samples} samples in {out / 'rows'}")
    paths = write_leaderboard(leaderboard(as_leaderboard_rows(rows)), out, overwrite=True)
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} from {len(rows)} rows")
    return 0


def _plain_matches(images_file: Path, row_file: Path) -> bool:
    """Whether the kept plain images are the ones the plain row scored (a run killed between writing the images
    and the row, or a row from another checkout, must not be paired with them)."""
    if not images_file.is_file() or not row_file.is_file():
        return False
    with np.load(images_file) as data:
        digest = hashlib.sha256(data["images"].tobytes()).hexdigest()
    return json.loads(row_file.read_text()).get("images_sha256") == digest


def score(spec, fmt, run, reference, labels, classifier, fid, kid, per_image, policy=None) -> dict:
    images = images_to_uint8(run.images)
    return {**cost_row(spec, policy, fmt, run, len(labels), per_image),
            "bit_identical": bool(reference is None or torch.equal(images, reference)),
            **quality_row(images, reference, labels, classifier, fid, kid)}


WALL_SPREAD = 1.2  # timings of one run that differ more than this: the machine's load changed, time another pair
WALL_MAX_PAIRS = 8


def wall_record(path: Path, model, policy, fmt, labels, seeds, settings, repeats: int, method_model=None) -> dict:
    """The method's wall speedup, timed once (first batch, the plain model and the method in turn) and kept in
    ``path``: pairs until the last ``repeats`` (at least 2) agree within ``WALL_SPREAD`` for both (a burst of load
    elsewhere is timed past), the ratio of those pairs' medians. ``method_model``: the model the method runs on
    when it is not ``model`` (a quantized one; the plain runs stay on ``model``)."""
    if not path.is_file():
        n, window = min(settings.batch_size, len(seeds)), max(2, repeats)
        plain_s, method_s = [], []
        while True:  # the quality pass just warmed both up
            times = interleaved_walls(model, [(None, "none"), (policy, fmt, method_model or model)], labels[:n],
                                      seeds[:n], settings, 1, warmup=False)
            plain_s += times[0]
            method_s += times[1]
            recent = (plain_s[-window:], method_s[-window:])
            settled = len(plain_s) >= window and all(max(t) <= WALL_SPREAD * min(t) for t in recent)
            if settled or len(plain_s) >= WALL_MAX_PAIRS:
                break
        write_json(path, {"plain_s": plain_s, "method_s": method_s, "settled": settled, "pairs_used": len(recent[0]),
                          "wall_speedup": statistics.median(recent[0]) / statistics.median(recent[1]),
                          "batch_size": n, "first_seed": seeds[0]})
    return json.loads(path.read_text())


def finish(row: dict, base: dict, model, settings, num_samples: int, first_seed: int, fingerprint: str,
           wall: dict | None = None) -> dict:
    return {**row, "macs_speedup": base["macs_per_image"] / row["macs_per_image"],
            "wall_speedup": 1.0 if wall is None else wall["wall_speedup"],
            "wall_measured_on": "the plain model" if wall is None else
            f"median of {len(wall['plain_s'])} interleaved runs of one batch of {wall['batch_size']} with the plain "
            f"model (samples {wall['first_seed']}+)",
            "num_samples": num_samples, "steps": settings.steps, "seed": first_seed,
            "batch_size": settings.batch_size, "guidance_scale": settings.guidance_scale,
            "scheduler": settings.scheduler, "repeats": 0, "model": model.name, "model_fingerprint": fingerprint}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PaperError, ValueError, FileNotFoundError) as exc:
        print(f"bench_paper: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
