"""``cqpolicy``: one entry point for every pipeline stage."""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

from cqpolicy import defaults
from cqpolicy import seeds as seed_roles


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="fmnist-dit",
                   help="embedded name (fmnist-dit, fmnist-unet), a local diffusers model or pipeline directory (DiT, "
                        "UNet2DModel, PixArt, SD3, FLUX, Stable Diffusion) or a cached hub id")
    p.add_argument("--prompts", default=None,
                   help="text-conditioned models: a prompt file (one per line, encoded by the pipeline's own text "
                        "encoders) or prompt embeddings (.safetensors); sample i takes prompt i mod their number")
    p.add_argument("--negative-prompt", default="", help="the unconditional branch's prompt (default: empty)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: the model's; FLUX: 1024)")
    p.add_argument("--policy", default="none", help="reuse policy spec NAME[:key=value,...] (default: none)")
    p.add_argument("--steps", type=int, default=defaults.STEPS, help=f"denoising steps (default: {defaults.STEPS})")
    p.add_argument("--num-samples", type=int, default=64, help="images to generate (default: 64)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch (default: 64)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = off (default: the model's, chosen on model-selection "
                        "samples for the embedded ones)")
    p.add_argument("--scheduler", choices=["ddim", "dpm", "flow"], default=None,
                   help="ddim, dpm (DPM-Solver++ multistep) or flow (flow-matching Euler, SD3 / FLUX); default: the "
                        "family the model was trained for (flow, else ddim)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses seed + i (default: 0, test replicate 0; trace: the trace role's "
                        f"{seed_roles.start('trace')}; seed roles in cqpolicy/seeds.py)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--cache-dtype", default="fp16",
                   help="how reused tensors are stored: fp32, fp16, bf16, int8, int4, optionally with a scale "
                        "granularity suffix -tensor, -channel, -token or -head (default: fp16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqpolicy", description="Learn when a diffusion model may skip work.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample", help="generate images and measure them",
                       description="Generate images with a (cached) model; write grid.png, samples.npz and "
                                   "metrics.json to --out and log an MLflow run.")
    _add_sampling_args(p)
    p.add_argument("--fid", action="store_true",
                   help="compute FID (fmnist-dit: shipped classifier features vs the real test set)")
    p.add_argument("--inception-weights", default=None,
                   help="local torch-fidelity Inception weights, for --fid on real checkpoints")
    p.add_argument("--fid-reference", default=None,
                   help="real images (.npz with uint8 'images' [N,C,H,W]) for --fid on real checkpoints")
    p.add_argument("--compare", default=None,
                   help="folder of an earlier run with the same seeds: adds PSNR / SSIM against its samples")
    p.add_argument("--clip-model", default=None,
                   help="text-conditioned models: a local CLIP model folder (transformers); adds the CLIP score of "
                        "each image against its prompt")
    p.add_argument("--experiment", default="cqpolicy-sample", help="MLflow experiment name")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="bench methods against the plain model: methods x replicates x N, resumable",
                       description="One engine (cqpolicy/evaluation/engine.py): every method and the plain model on "
                                   "the same replicates, rows per (replicate, method), interleaved wall timing, "
                                   "OUT/leaderboard.{md,csv} and pareto.png, one MLflow run per row. --config FILE "
                                   "benches a config into --out and resumes what is there; --policies SPEC ... builds "
                                   "the config from the flags into a new --out and adds results.json (every row) and "
                                   "results.md. With --config, sampling flags given override the config's.")
    _add_sampling_args(p)
    # None: not given (the config's value, or the --policies form's default); --num-samples 0 likewise
    p.set_defaults(model=None, policy=None, steps=None, batch_size=None, scheduler=None, dtype=None,
                   cache_dtype=None, num_samples=0)
    for action in p._actions:  # the shared sampling flags, as bench reads them
        if action.dest == "policy":
            action.help = argparse.SUPPRESS  # bench takes --policies
        elif action.dest == "num_samples":
            action.help = "samples per replicate (default: the config's; 64 with --policies)"
        elif action.dest == "seed":
            action.help = ("--policies: the first seed of the replicate to score (0: test replicate 0; test k * "
                           "1_000_000, validation 60_000_000 + k * 100_000; cqpolicy/seeds.py); or --replicates")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="bench config YAML (e.g. configs/fmnist-dit-paper.yaml; keys in "
                                         "cqpolicy/evaluation/engine.py)")
    source.add_argument("--policies", nargs="+", help="policy specs, e.g. none fora:interval=2 (defaults: 50 steps, "
                                                      "64 samples, the replicate --seed starts, 3 timing pairs)")
    p.add_argument("--replicates", type=int, nargs="+", default=None, metavar="K",
                   help="replicate ids to score (default: the config's; with --policies the one --seed starts)")
    p.add_argument("--role", choices=["test", "validation"], default=None,
                   help="replicates of this seed role (cqpolicy/seeds.py): validation chooses variants and settings, "
                        "test scores what was chosen; one --out holds one role (default: the config's, test)")
    p.add_argument("--only", nargs="+", default=None, metavar="WORD",
                   help="--config: bench only the methods whose spec or weights folder contains one of these")
    p.add_argument("--table-only", action="store_true", help="--config: bench nothing, write the table from the rows")
    p.add_argument("--retime", nargs="+", default=None, metavar="SPEC",
                   help="--config: time these methods' wall speedup again (their rows stay), then write the table")
    p.add_argument("--recount-macs", action="store_true",
                   help="--config: add a policy's own arithmetic (forecasts, decision nets) to rows measured before "
                        "MACs counted it, then write the table")
    p.add_argument("--fid", action="store_true", help="FID and KID against the real test set (fmnist models; a "
                                                      "config's fid is on unless it says fid: false)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timing pairs (plain model, method) that must agree (default: the config's, 2; "
                        "3 with --policies); 0 takes wall from the quality passes, flagged quality-pass")
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: the config's, cqpolicy-bench-paper; cqpolicy-bench with --policies)")
    p.add_argument("--overwrite", action="store_true", help="--policies: allow writing into a non-empty --out")
    p.add_argument("--out", default=None, help="output folder (--config: resumed, default out/bench/<config name>; "
                                               "--policies: required, new or empty)")
    p.set_defaults(func=functools.partial(cmd_bench, parser=p))

    p = sub.add_parser("trace", help="record per-layer traces (signals and forced-reuse impact) as Parquet",
                       description="Record per (sample, CFG branch, step, block, unit) signals and forced-reuse "
                                   "impact labels into DIR (Parquet shards + manifest.json); resumable; heatmaps "
                                   "in DIR/plots/; logs an MLflow run.")
    _add_sampling_args(p)
    p.set_defaults(seed=seed_roles.start("trace"))
    p.add_argument("--probes", default="local",
                   help="comma-separated: local, chain (local labels for caches 2..8 steps stale, one probe batch "
                        "per staleness), downstream (or none); default local")
    p.add_argument("--experiment", default="cqpolicy-trace", help="MLflow experiment name")
    p.add_argument("--out", required=True, help="trace run folder (e.g. traces/fmnist-none)")
    p.set_defaults(func=cmd_trace)

    _add_train_parsers(sub)

    p = sub.add_parser("search", help="Optuna study over policy parameters and cache formats",
                       description="Search a YAML space (configs/search/*.yaml) against MACs speedup and FID; "
                                   "resumable; several workers share one storage; MLflow parent + nested runs.")
    p.add_argument("--config", required=True, help="search space YAML")
    p.add_argument("--n-trials", type=int, default=20)
    p.add_argument("--storage", default=None,
                   help="RDB URL (sqlite:///..., postgresql://...) or a journal file path; "
                        "default sqlite:///mlruns/optuna.db")
    p.add_argument("--study-name", default=None, help="default: the config file's name")
    p.add_argument("--workers", type=int, default=1, help="worker processes on the same storage")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--quick", action="store_true", help="the config's small setting (few steps and samples)")
    p.add_argument("--experiment", default="cqpolicy-search", help="MLflow experiment name")
    p.add_argument("--artifacts", default=None,
                   help="a forecast space's fitted forecasts, one folder per trial (default out/search/STUDY)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("leaderboard", help="compare every bench row and search trial logged to MLflow",
                       description="Write leaderboard.md, leaderboard.csv and pareto.png from MLflow runs "
                                   "(MLFLOW_TRACKING_URI honoured).")
    p.add_argument("--experiment", nargs="*", default=None,
                   help="MLflow experiments (default: every cqpolicy-bench* and cqpolicy-search* experiment)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("quantize", help="post-training weight quantization of the denoiser",
                       description="Quantize every Linear / Conv2d weight of the denoiser (int8, int4, mixed precision "
                                   "or ACQ-E) and write a loadable model folder plus report.json (size of every "
                                   "stored byte, compression vs fp32, per-layer bits); --model DIR then loads it.")
    p.add_argument("--model", default="fmnist-dit", help="embedded name, local diffusers directory or cached hub id")
    p.add_argument("--weights", required=True,
                   help="int8 / int4 (per channel or group-wise), mixed (uniform, per-layer widths by calibrated "
                        "sensitivity) or acqe (clustered levels, Huffman-coded indices, per-layer widths)")
    p.add_argument("--group-size", type=int, default=None,
                   help="scale group along the flattened input dim, 0 = per output channel (default: 64 for int4 "
                        "and mixed where it divides, per channel for int8)")
    p.add_argument("--budget-bits", type=float, default=None,
                   help="mixed / acqe: stored bits per weight, scales and tables included (default 4)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration samples (calibration seeds; default 8)")
    p.add_argument("--calib-policy", default=None,
                   help="cache policy spec deployed while sampling the calibration inputs (default: none)")
    p.add_argument("--steps", type=int, default=defaults.STEPS,
                   help=f"denoising steps of the calibration runs (default: {defaults.STEPS})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("run", help="the whole pipeline: traces, training, search, bench, leaderboard",
                       description="Record traces, train the learned policy and scheduler (and retrain under the "
                                   "learned policy), search its threshold and cache format, bench the Pareto points "
                                   "against every baseline family over several seeds, and report. Re-running "
                                   "resumes finished stages.")
    p.add_argument("config", nargs="?", default="fmnist-dit",
                   help="run config: a YAML file or a packaged config's name (fmnist-dit, the default; fmnist-unet; "
                        "fmnist-dit-n128)")
    p.add_argument("--quick", action="store_true", help="the config's quick setting (about 3 minutes)")
    p.add_argument("--out", default=None, help="output folder (default out/run or out/run-quick)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tracking-server", help="an MLflow tracking server that many processes and hosts log to",
                       description="Serve MLflow's tracking API (mlflow server) on --host:--port over a database, so "
                                   "that every worker, rank or host logs into one store: point them at it with "
                                   "MLFLOW_TRACKING_URI=http://HOST:PORT. The database must answer before the "
                                   "server starts. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--backend-store-uri", default=None,
                   help="where runs are stored: postgresql://USER@HOST[:PORT]/DB (needs psycopg: pip install "
                        "'cqpolicy[postgres]'), mysql://..., or sqlite:///FILE (default sqlite:///mlruns/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None,
                   help="folder or object-store URI the server keeps artifacts in (default mlruns/artifacts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.set_defaults(func=cmd_tracking_server)

    p = sub.add_parser("docs", help="regenerate the tables in README.md and docs/ from docs/results",
                       description="Rewrite every generated table block (<!-- table: SOURCE options --> ... "
                                   "<!-- /table -->) in README.md and docs/**/*.md from its source file under "
                                   "docs/results; with --check, change nothing and exit 1 listing the stale blocks. "
                                   "Marker options: cqpolicy/tracking/tables.py.")
    p.add_argument("paths", nargs="*", help="markdown files (default: README.md and docs/**/*.md under --root)")
    p.add_argument("--check", action="store_true", help="list stale blocks and exit 1 if any; write nothing")
    p.add_argument("--root", default=".", help="repository root the sources are relative to (default: .)")
    p.set_defaults(func=cmd_docs)
    return parser


def _resolve_device(name: str | None) -> str:
    import torch

    from cqpolicy.distributed import device_for

    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is available")
    return device_for(name)  # under torchrun, a bare cuda is the rank's own GPU


def _load_npz_images(path: str, key: str = "images"):
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from cqpolicy.evaluation.evaluate import evaluate, save_grid
    from cqpolicy.evaluation.quality import paired_fidelity
    from cqpolicy.models import load_model
    from cqpolicy.outputs import OutputDir
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import CacheFormat
    from cqpolicy.sampling import SampleSettings
    from cqpolicy.sampling.sampler import settings_for

    make_policy(args.policy)  # a bad spec or cache format fails before anything loads
    CacheFormat.parse(args.cache_dtype, num_heads=1)
    settings = SampleSettings(steps=args.steps, guidance_scale=0.0 if args.guidance_scale is None
                              else args.guidance_scale, scheduler=args.scheduler or "ddim", batch_size=args.batch_size)
    settings.validate()  # fail on bad numbers before loading anything
    if args.num_samples < 1:
        raise CliError(f"--num-samples must be at least 1, got {args.num_samples}")
    compare = None
    if args.compare:
        compare = _load_npz_images(f"{args.compare}/samples.npz")
    fid_reference = _load_npz_images(args.fid_reference)["images"] if args.fid_reference else None
    out = OutputDir(args.out, overwrite=args.overwrite, across_ranks=True)  # checks --out before the long part
    main = out.main  # under torchrun the ranks share the batches; rank 0 writes and reports
    with out:
        model = load_model(args.model, dtype=getattr(torch, args.dtype), device=_resolve_device(args.device),
                           prompts=args.prompts, negative_prompt=args.negative_prompt,
                           resolution=args.resolution)
        settings = settings_for(model, args.steps, args.scheduler, args.batch_size, args.guidance_scale)
        result = evaluate(model, settings, args.num_samples, args.seed, policy=args.policy,
                          cache_format=args.cache_dtype, fid=args.fid,
                          inception_weights=args.inception_weights, fid_reference=fid_reference,
                          clip_model=args.clip_model)
        metrics = dict(result.metrics)
        if compare is not None:
            if compare["seeds"].tolist() != result.seeds:
                raise CliError(f"--compare {args.compare} used other seeds; paired metrics need the same seeds")
            metrics.update({f"{k}_vs_compare": v for k, v in
                            paired_fidelity(result.images, compare["images"]).items()})
        if main:
            save_grid(result.images, out.file("grid.png"))
            np.savez_compressed(out.file("samples.npz"), images=result.images.numpy(),
                                labels=result.labels.numpy(), seeds=np.asarray(result.seeds))
            out.file("metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        final = out.commit()
    if main:
        _log_sample_run(args.experiment, metrics, final)
        _print_metrics(metrics)
        print(f"wrote {final}/grid.png, samples.npz, metrics.json")
    return 0


def cmd_bench(args, parser=None) -> int:
    import shutil

    from cqpolicy.distributed import world
    from cqpolicy.evaluation.bench import log_bench_rows, markdown_table
    from cqpolicy.evaluation.engine import load_config, override, parse_config, run_bench
    from cqpolicy.outputs import OutputDir

    if args.policy is not None:
        raise CliError("bench takes --policies SPEC ... (or --config FILE), not --policy")
    if args.config is None and args.policies is None:
        parser.error("the following arguments are required: --policies (or --config FILE)")
    if args.config is not None:
        if args.seed or args.cache_dtype or args.overwrite:
            raise CliError("with --config, replicates, cache formats and --out come from the config, --replicates "
                           "and --out (resumed): not --seed, --cache-dtype or --overwrite")
        base, role = load_config(args.config), args.role
    else:
        if args.out is None:
            parser.error("the following arguments are required: --out")
        if args.table_only or args.retime or args.only or args.recount_macs:
            raise CliError("--table-only, --retime, --recount-macs and --only work on a --config bench's --out")
        role, first = args.role or "test", seed_roles.replicate_of(args.seed)
        if args.replicates is not None and args.seed:
            raise CliError("give --replicates or --seed, not both")
        if args.replicates is None:
            if first is None or (args.role and first[0] != args.role):
                raise CliError(f"--seed {args.seed} starts no {args.role or 'test or validation'} replicate (test "
                               f"k * 1_000_000, validation 60_000_000 + k * 100_000, k < 10): use --replicates")
            role, args.replicates = first[0], [first[1]]
        fmt = args.cache_dtype or defaults.CACHE_FORMAT
        methods = [spec if fmt == defaults.CACHE_FORMAT or spec == "none" else {"policy": spec, "cache": fmt}
                   for spec in args.policies]  # `none` never caches: its format is moot
        base = parse_config({"methods": methods, "num_samples": defaults.NUM_SAMPLES, "repeats": 3, "fid": False,
                             "experiment": "cqpolicy-bench", "replicates": {"role": role, "ids": args.replicates}},
                            "bench --policies")
    config = override(base, model=args.model, steps=args.steps, batch_size=args.batch_size,
                      scheduler=args.scheduler, guidance_scale=args.guidance_scale, num_samples=args.num_samples or None,
                      role=role, replicates=tuple(args.replicates) if args.replicates else None, repeats=args.repeats,
                      fid=args.fid or None, experiment=args.experiment, dtype=args.dtype,
                      device=_resolve_device(args.device) if args.device else None, prompts=args.prompts,
                      negative_prompt=args.negative_prompt or None, resolution=args.resolution)
    if args.config is not None:
        out = Path(args.out or f"out/bench/{Path(args.config).stem}")
        run_bench(config, out, only=args.only, retime=args.retime, table_only=args.table_only,
                  recount=args.recount_macs)
        if world().main:
            print((out / "leaderboard.md").read_text())
            print(f"wrote {out}/leaderboard.md, leaderboard.csv, pareto.png")
        return 0
    main = world().main  # under torchrun, rank 0 writes and reports
    # a new --out (and its MLflow runs), complete or absent
    with OutputDir(args.out, overwrite=args.overwrite, across_ranks=True) as out:
        rows = run_bench(config, out.staging, log=False)
        table = markdown_table(rows)
        if main:
            out.file("results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
            out.file("results.md").write_text(table + "\n")
            for name in ("rows", "wall", "work"):  # --overwrite: this run's folders replace an earlier run's
                if (out.path / name).is_dir():
                    shutil.rmtree(out.path / name)
        final = out.commit()
    if main:
        log_bench_rows(config.experiment, rows, artifact=final / "results.json")
        print(table)
        print(f"wrote {final}/results.json, results.md, leaderboard.md, leaderboard.csv, pareto.png")
    return 0


def cmd_trace(args) -> int:
    import mlflow
    import torch

    from cqpolicy.models import load_model
    from cqpolicy.policies import make_policy
    from cqpolicy.sampling import SampleSettings
    from cqpolicy.sampling.sampler import settings_for
    from cqpolicy.distributed import world
    from cqpolicy.tracing.collect import collect, heatmaps, local_vs_downstream, parse_probes
    from cqpolicy.tracing.store import TraceReader
    from cqpolicy.tracking import start_run

    probes = parse_probes(args.probes)
    make_policy(args.policy)
    SampleSettings(steps=args.steps, guidance_scale=0.0 if args.guidance_scale is None else args.guidance_scale,
                   scheduler=args.scheduler or "ddim", batch_size=args.batch_size).validate()
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=_resolve_device(args.device),
                       prompts=args.prompts, negative_prompt=args.negative_prompt,
                           resolution=args.resolution)
    settings = settings_for(model, args.steps, args.scheduler, args.batch_size, args.guidance_scale)
    if world().size > args.num_samples:
        raise CliError(f"{world().size} ranks for {args.num_samples} samples: launch at most {args.num_samples}")
    summary = collect(model, settings, args.out, args.num_samples, seed=args.seed, policy=args.policy,
                      probes=probes)
    if not world().main:  # under torchrun: rank 0 reads every rank's shards and reports
        return 0
    table = TraceReader([args.out]).table()
    plots = Path(args.out) / "plots"
    plots.mkdir(exist_ok=True)
    heatmaps(table, plots / "heatmaps.png", summary["manifest"]["num_blocks"], settings.steps)
    agreement = local_vs_downstream(table) if "downstream" in probes else {}
    with start_run(args.experiment, run_name=f"trace-{args.policy}"):
        mlflow.log_params({"model": model.name, "policy": args.policy, "steps": settings.steps,
                           "num_samples": args.num_samples, "seed": args.seed, "probes": ",".join(probes),
                           "run_dir": str(args.out), "model_hash": summary["manifest"]["model_hash"]})
        mlflow.log_metrics({k: float(v) for k, v in {**summary, **agreement}.items()
                            if isinstance(v, (int, float)) and math.isfinite(float(v))})
        mlflow.log_artifact(str(plots / "heatmaps.png"))
        mlflow.log_artifact(str(Path(args.out) / "manifest.json"))
    print(f"{args.out}: {table.num_rows} rows in total, {summary['rows']} new from {summary['batches']} batches "
          f"({summary['skipped_batches']} already done); record {summary['record_s']:.1f} s, downstream "
          f"{summary['downstream_s']:.1f} s")
    if agreement:
        print("local impact vs downstream change:", json.dumps(agreement))
    return 0


TRAIN_KINDS = ("mlp", "scheduler", "intervals", "gates", "forecast")


def _add_train_parsers(sub) -> None:
    """``cqpolicy train KIND``: one subcommand per artifact kind, each with only its own options."""
    train = sub.add_parser("train", help="train a policy artifact: train {mlp,scheduler,intervals,gates,forecast}",
                           description="Write a policy artifact (policy.json + weights.safetensors) to --out. Trace "
                                       "kinds (mlp, scheduler, intervals) train with Lightning on trace runs split by "
                                       "seed; gates train through the sampler on --model; forecast fits in closed "
                                       "form on uncached runs of --model.")
    kinds = train.add_subparsers(dest="kind", required=True, metavar="KIND")

    def kind(name, help_text, deploy):
        p = kinds.add_parser(name, help=help_text, description=f"{help_text}. Deploy with {deploy}.")
        p.add_argument("--out", required=True, help="artifact folder")
        p.add_argument("--overwrite", action="store_true", help="replace an existing artifact in --out")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_train)
        return p

    def on_traces(p, epochs=20):
        p.add_argument("--traces", nargs="+", required=True, help="trace run folders (cqpolicy trace)")
        p.add_argument("--max-epochs", type=int, default=epochs)
        p.add_argument("--label", choices=["auto", "local", "downstream"], default="auto",
                       help="training label: the local output error as recorded, or weighted per step by the "
                            "downstream probes (an estimate of the final-sample change); auto uses downstream when "
                            "the traces hold enough probes")

    def budget(p, default=0.5):
        p.add_argument("--compute-budget", type=float, default=default,
                       help=f"fraction of units that compute (default {default})")

    def on_model(p):
        p.add_argument("--model", required=True, help="the model to run (embedded name or local folder)")
        p.add_argument("--prompts", default=None, help="text-conditioned models: a prompt file or embeddings")
        p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
        p.add_argument("--steps", type=int, default=defaults.STEPS,
                       help=f"sampling steps (default {defaults.STEPS})")

    p = kind("mlp", "an MLP that predicts the harm of each reuse from run-time features",
             "--policy learned:path=DIR[,threshold=x,max_reuse=k]")
    on_traces(p)
    p.add_argument("--features", choices=["step", "unit"], default="step",
                   help="inputs: step (model input and staleness, one MLP call decides a whole step; default) or "
                        "unit (each unit's own input, computed before every unit call)")
    p.add_argument("--chain", action="store_true",
                   help="also train on chain labels (traces recorded with --probes chain): one row per staleness "
                        "2..8, so the policy prices chains of reuses, not one reuse of a fresh cache")
    p = kind("scheduler", "a static step x block x unit table (an L2C-style router)", "--policy learned:path=DIR")
    on_traces(p)
    budget(p)
    p = kind("intervals", "one phase-locked refresh interval per block and unit, fitted in closed form",
             "--policy learned:path=DIR")
    on_traces(p)
    budget(p)
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="the refresh intervals to choose from, each dividing the next (default 1 2 4 8)")
    p = kind("gates", "a budget-conditioned schedule trained through the sampler (no traces)",
             "--policy learned:path=DIR,budget=B")
    on_model(p)
    p.add_argument("--budget-range", type=float, nargs=2, default=list(defaults.GATES_BUDGET_RANGE),
                   metavar=("LOW", "HIGH"), help="the MACs fractions of the plain model it is trained for "
                                                 "(default %(default)s)")
    p.add_argument("--train-samples", type=int, default=128, help="rollout seeds to train on (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rollout (default 8)")
    p.add_argument("--max-epochs", type=int, default=20, help="0 writes the warm start untrained (--init-mlp)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    p.add_argument("--init-mlp", help="start from this trace-trained mlp artifact (its predicted harm per step, unit "
                                      "and cache age ranks the first schedule); needs --init-traces")
    p.add_argument("--init-traces", help="the trace run the --init-mlp predictions are averaged over")
    p.add_argument("--rollout-traces", type=int, default=0,
                   help="afterwards record this many training rollouts per validation budget as trace runs "
                        "(OUT.traces/budget-B, probes local, chain, downstream) for retraining an mlp (default 0)")
    p = kind("forecast", "a linear predictor of the units a static --schedule reuses, fitted on uncached runs",
             "--policy forecast:path=DIR")
    on_model(p)
    p.add_argument("--schedule", required=True,
                   help="the static schedule (a policy spec, e.g. fora:interval=3) whose reused units it forecasts")
    p.add_argument("--order", type=int, default=3, help="computed outputs each forecast weighs (default 3)")
    p.add_argument("--on-policy-rounds", type=int, default=0,
                   help="refit that many times on runs that follow the fitted forecast (DAgger; default 0)")
    p.add_argument("--affine", action="store_true",
                   help="weights that sum to 1 (a constant output is forecast as itself, as TaylorSeer's)")
    p.add_argument("--per-channel", action="store_true",
                   help="weights and a bias per output channel (with --order 1, CacheQuant's DEC: a per-channel "
                        "scale and shift of the cached output)")


def legacy_train_argv(argv: list[str]) -> list[str]:
    """``train [--kind K] ...`` (the form before subcommands) as ``train K ...``; ``--kind`` absent: mlp."""
    if not argv or argv[0] != "train" or len(argv) < 2 or not argv[1].startswith("-") or argv[1] in ("-h", "--help"):
        return argv
    rest, kind = list(argv[1:]), "mlp"
    for i, arg in enumerate(rest):
        if arg == "--kind" and i + 1 < len(rest):
            kind = rest[i + 1]
            del rest[i:i + 2]
            break
        if arg.startswith("--kind="):
            kind = arg.split("=", 1)[1]
            del rest[i]
            break
    return ["train", kind, *rest]


def _train_gates(args) -> tuple[dict, str]:
    from cqpolicy.training.rollout import train_gates

    if args.max_epochs < (0 if args.init_mlp else 1):  # a warm start may be written untrained
        raise CliError(f"--max-epochs must be at least {0 if args.init_mlp else 1}, got {args.max_epochs}")
    meta = train_gates(args.model, args.out, steps=args.steps, budget_range=tuple(args.budget_range),
                       train_samples=args.train_samples, batch_size=args.batch_size, max_epochs=args.max_epochs,
                       seed=args.seed, max_minutes=args.max_minutes, init_mlp=args.init_mlp,
                       init_traces=args.init_traces, rollout_traces=args.rollout_traces, overwrite=args.overwrite,
                       prompts=args.prompts, resolution=args.resolution)
    return meta, f"learned:path={args.out},budget=B"


def _train_forecast(args) -> tuple[dict, str]:
    from cqpolicy.training.forecast import fit_forecast

    meta = fit_forecast(args.model, args.schedule, args.out, steps=args.steps, order=args.order,
                        on_policy_rounds=args.on_policy_rounds, affine=args.affine, per_channel=args.per_channel,
                        overwrite=args.overwrite, prompts=args.prompts, resolution=args.resolution)
    return meta, f"forecast:path={args.out}"


def _train_on_traces(args) -> tuple[dict, str]:
    from cqpolicy.training.train import train_policy

    if args.max_epochs < 1:
        raise CliError(f"--max-epochs must be at least 1, got {args.max_epochs}")
    budget = getattr(args, "compute_budget", 0.5)
    if not 0 < budget <= 1:
        raise CliError(f"--compute-budget must lie in (0, 1], got {budget}")
    meta = train_policy(args.traces, kind=args.kind, out_dir=args.out, max_epochs=args.max_epochs, seed=args.seed,
                        compute_budget=budget, overwrite=args.overwrite, label=args.label,
                        features=getattr(args, "features", "step"), intervals=getattr(args, "intervals", [1, 2, 4, 8]),
                        chain=getattr(args, "chain", False))
    return meta, f"learned:path={args.out}"


TRAINERS = {"gates": _train_gates, "forecast": _train_forecast, "mlp": _train_on_traces,
            "scheduler": _train_on_traces, "intervals": _train_on_traces}


DDP_KINDS = ("mlp", "scheduler", "gates")  # under torchrun these train with DDP; the closed-form fits run on rank 0


def cmd_train(args) -> int:
    from cqpolicy.distributed import main_alone, world

    if args.kind in DDP_KINDS:
        meta, spec = TRAINERS[args.kind](args)
    else:
        with main_alone() as mine:
            meta, spec = TRAINERS[args.kind](args) if mine else ({}, "")
    if world().main:
        print(json.dumps(meta.get("metrics", {}), indent=2))
        print(f"wrote {args.kind} artifact {args.out}: deploy with --policy {spec}")
    return 0


def cmd_search(args) -> int:
    from cqpolicy.search import load_space
    from cqpolicy.search.study import make_storage, run_study

    space = load_space(args.config)
    if args.quick:
        space = space.shrink()
    if args.n_trials < 1 or args.workers < 1:
        raise CliError("--n-trials and --workers must be at least 1")
    make_storage(args.storage)  # an unreachable storage fails before any trial
    summary = run_study(space, args.n_trials, storage=args.storage, study_name=args.study_name,
                        workers=args.workers, experiment=args.experiment, seed=args.seed,
                        artifacts=args.artifacts)
    print(f"study {summary['study']}: {summary['trials']} trials {summary['states']}"
          + (f", {summary['stale_marked_failed']} stale running trials marked failed"
             if summary['stale_marked_failed'] else ""))
    print("Pareto-optimal trials:")
    for row in summary["pareto"]:
        print("  " + json.dumps(row))
    return 0


def cmd_leaderboard(args) -> int:
    from cqpolicy.tracking.leaderboard import collect_rows, leaderboard, write_leaderboard

    board = leaderboard(collect_rows(args.experiment or None))
    paths = write_leaderboard(board, args.out, overwrite=args.overwrite)
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_run(args) -> int:
    from cqpolicy.pipeline import load_config, run_pipeline

    config = load_config(args.config, quick=args.quick)
    out = args.out or ("out/run-quick" if args.quick else "out/run")
    from cqpolicy.distributed import world

    summary = run_pipeline(config, out)
    if world().main:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_docs(args) -> int:
    from cqpolicy.tracking import tables

    paths = args.paths or tables.default_paths(args.root)
    if args.check:
        stale = tables.check(paths, root=args.root)
        for block in stale:
            print(f"stale: {block}")
        print(f"{len(stale)} stale table block(s) in {len(paths)} file(s)" if stale
              else f"every table block of {len(paths)} file(s) is current")
        return 1 if stale else 0
    changed = tables.write(paths, root=args.root)
    for block in changed:
        print(f"rewrote: {block}")
    print(f"rewrote {len(changed)} table block(s) in {len(paths)} file(s)")
    return 0


def cmd_tracking_server(args) -> int:
    from cqpolicy.tracking.mlflow_store import DEFAULT_DIR, check_reachable, shown

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    if args.workers < 1:
        raise CliError(f"--workers must be at least 1, got {args.workers}")
    backend = args.backend_store_uri or f"sqlite:///{DEFAULT_DIR / 'mlflow.db'}"
    if backend.startswith("sqlite:///"):
        Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_reachable(backend)
    artifacts = args.artifacts_destination or str((DEFAULT_DIR / "artifacts").resolve())
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", artifacts, "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers)]
    print(f"MLflow tracking server on http://{args.host}:{args.port} (store {shown(backend)}); "
          f"workers log to it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
    import subprocess

    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 0


def cmd_quantize(args) -> int:
    from cqpolicy.models import load_model
    from cqpolicy.policies import make_policy
    from cqpolicy.outputs import check_out_dir
    from cqpolicy.quantization import check_arguments, quantize_model, save_quantized

    check_arguments(args.weights, args.group_size, args.budget_bits)  # all bad input fails before loading
    calibrated = args.weights in ("mixed", "acqe")
    if args.calib_policy is not None:
        if not calibrated:
            raise CliError(f"--calib-policy applies to mixed and acqe (they calibrate), not {args.weights}")
        make_policy(args.calib_policy)
    if args.calib_samples < 1 or args.steps < 1:
        raise CliError(f"--calib-samples and --steps must be at least 1, got {args.calib_samples} and {args.steps}")
    check_out_dir(args.out, args.overwrite)
    model = load_model(args.model, device=_resolve_device(args.device))
    result = quantize_model(model, args.weights, group_size=args.group_size, budget_bits=args.budget_bits,
                            calib_samples=args.calib_samples, calib_steps=args.steps, calib_policy=args.calib_policy)
    report = save_quantized(model, result, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {args.weights} denoiser {report['size_bytes']} bytes, "
          f"{report['compression_ratio']:.2f}x smaller than fp32, {report['bits_per_weight']:.3f} bits per weight")
    return 0


def _log_sample_run(experiment: str, metrics: dict, folder):
    import mlflow

    from cqpolicy.tracking import start_run

    params = {k: metrics[k] for k in ("model", "policy", "policy_config", "steps", "num_samples", "guidance_scale",
                                      "scheduler", "seed", "batch_size")}
    numbers = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and k not in params and math.isfinite(float(v))}
    with start_run(experiment, run_name=f"sample-{metrics['policy']}"):
        mlflow.log_params(params)
        mlflow.log_metrics(numbers)
        for name in ("grid.png", "metrics.json"):
            mlflow.log_artifact(str(folder / name))


def _print_metrics(metrics: dict):
    for key in ("class_accuracy", "fid", "psnr_vs_compare", "ssim_vs_compare", "macs_per_image", "wall_s",
                "time_per_image_s", "peak_memory_bytes"):
        value = metrics.get(key)
        if value is not None:
            print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input of any kind ends in one line on stderr and exit status 2."""
    parser = build_parser()

    def one_line_error(p: argparse.ArgumentParser):
        # argparse prints the whole usage before its error: one line is enough, ``--help`` has the rest
        return lambda message: p.exit(2, f"{p.prog}: error: {message} (see {p.prog} --help)\n")

    def with_subparsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from with_subparsers(sub)

    for p in with_subparsers(parser):
        p.error = one_line_error(p)
    args = parser.parse_args(legacy_train_argv(list(sys.argv[1:] if argv is None else argv)))
    from cqpolicy.data import DatasetMissingError
    from cqpolicy.models import ModelLoadError
    from cqpolicy.pipeline import PipelineError
    from cqpolicy.runtime import StepMismatchError
    from cqpolicy.tracing.store import TraceError

    try:
        # checks every sampling command shares, before anything loads
        if getattr(args, "guidance_scale", None) is not None and not math.isfinite(args.guidance_scale):
            raise CliError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
        if hasattr(args, "num_samples") and hasattr(args, "seed"):
            if args.seed < 0 or args.seed + max(args.num_samples, 1) > 2 ** 63:
                raise CliError(f"--seed must be non-negative and --seed + --num-samples below 2**63, got {args.seed}")
        if getattr(args, "device", None) is not None:
            import torch

            try:
                torch.device(args.device)
            except RuntimeError:
                raise CliError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
        if "experiment" in vars(args) or args.command in ("run", "leaderboard"):
            # a tracking server or database that does not answer fails here, not after the work it would record
            from cqpolicy.tracking.mlflow_store import check_reachable, tracking_uri

            check_reachable(tracking_uri())
        return args.func(args)
    except (CliError, ValueError, OSError, ModelLoadError, DatasetMissingError, TraceError, PipelineError,
            StepMismatchError) as exc:
        # OSError: unreadable, missing or unwritable files (diffusers reports a broken model folder as one)
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open mid-run: erase it, not the error
            bar.leave = False
            bar.close()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one line, from rank 0
            print(f"cqpolicy {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
