"""``cqpolicy run``: the whole pipeline on one model, stage by stage, resumable.

Stages (each writes ``OUT/<stage>/done.json`` when complete; a re-run skips completed stages):

1. ``traces``    record traces under ``none`` (local impact labels)
2. ``train``     train the MLP reuse policy and the layer scheduler on them; fit phase-locked intervals, and
                 (``train.forecast``) linear forecasts of static schedules on uncached calibration runs
3. ``retrain``   close the loop: record traces under the learned policy, retrain on both runs
4. ``search``    an Optuna study over the learned policy's threshold and the cache format
5. ``bench``     the study's Pareto points, the learned scheduler and every baseline family, side by side,
                 at a larger sample count over several test replicates (``cqpolicy.evaluation.engine``: rows
                 under ``OUT/bench/rows``, resumable; one MLflow run per row and replicate)
6. ``report``    leaderboard (md, csv), Pareto plot, heatmap of the learned policy's reuse decisions,
                 sample grids (uncached vs the best policies), summary

Under ``torchrun`` every rank runs the pipeline: the traces and the bench shard their samples over the ranks, the
MLP, the scheduler and the gates train with DDP, and the rest (interval and forecast fits, the study, the report)
runs on rank 0 alone while the others wait; rank 0's result of each stage is every rank's, and rank 0 writes.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from cqpolicy.config import GatesConfig, RunConfig
from cqpolicy.distributed import broadcast_text, main_alone, main_writes, world

DEFAULT_CONFIG = "fmnist-dit"  # a packaged config (cqpolicy/configs/)
STAGES = ("traces", "train", "retrain", "search", "bench", "report")
BENCH_TAG = "cqpolicy_bench_id"


class PipelineError(ValueError):
    """A pipeline config that cannot run (one line)."""


def load_config(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> RunConfig:
    """The typed run config of ``path`` (a file or a packaged config's name), its seed roles checked."""
    from cqpolicy.config import ConfigError, load_run_config

    try:
        config = load_run_config(path, quick)
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None
    check_seed_roles(config)
    return config


SEED_KEYS = ("trace", "retrain", "search", "display")  # roles a config may move (cqpolicy/seeds.py)
GRID_SAMPLES = 20


def seed_start(config: RunConfig, role: str) -> int:
    """The first sample seed of ``role`` in this config: ``seeds.<role>`` or the default of cqpolicy/seeds.py."""
    from cqpolicy import seeds

    return int(config.seeds.get(role, seeds.start(role)))


def seed_uses(config: RunConfig) -> dict[str, list[tuple[int, int]]]:
    """Every (first seed, count) range each role of this config samples."""
    from cqpolicy import seeds

    n_trace = config.trace.num_samples
    uses = {"trace": [(seed_start(config, "trace"), n_trace)],
            "search": [(seed_start(config, "search"), config.search.num_samples)],
            "calibration": [(seeds.start("calibration"), seeds.SPAN)],
            "display": [(seed_start(config, "display"), GRID_SAMPLES)],
            "test": [(seeds.test_start(k), config.bench.num_samples) for k in config.bench.seeds]}
    if config.retrain:
        uses["retrain"] = [(seed_start(config, "retrain"), n_trace)]
    g = config.train.gates
    if g:
        uses["rollout"] = [(seeds.start("rollout"), g.train_samples + g.val_samples)]
    return uses


def check_seed_roles(config: RunConfig) -> None:
    """Refuse (one line) a config whose roles would see the same samples, or learn on test samples."""
    unknown = sorted(set(config.seeds) - set(SEED_KEYS))
    if unknown:
        raise PipelineError(f"{config.source}: seeds has no role {unknown[0]!r}; movable roles: "
                            f"{', '.join(SEED_KEYS)} (test seeds are bench.seeds replicates)")
    from cqpolicy import seeds

    try:
        seeds.check_disjoint(seed_uses(config))
    except ValueError as exc:  # SeedOverlapError, or a test replicate out of range
        raise PipelineError(f"{config.source}: {exc}") from None


class Stage:
    def __init__(self, out: Path, name: str):
        self.dir = out / name
        self.done_file = self.dir / "done.json"

    @property
    def done(self) -> bool:
        return self.done_file.is_file()

    def result(self) -> dict:
        return json.loads(self.done_file.read_text())

    def finish(self, result: dict) -> dict:
        tmp = self.done_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(self.done_file)
        return result


def run_pipeline(config: RunConfig, out: str | Path, progress: bool = True) -> dict:
    import mlflow

    from cqpolicy.models import load_model
    from cqpolicy.sampling.sampler import settings_for
    from cqpolicy.tracking import start_run

    out = Path(out)
    w = world()
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model, prompts=config.prompts, negative_prompt=config.negative_prompt)
    settings = settings_for(model, steps=config.steps, guidance_scale=config.guidance_scale)  # the model's scheduler
    timings, results = {}, {}
    say = print if w.main else (lambda *a, **k: None)
    with start_run("cqpolicy-run", run_name=f"run-{out.name}") if w.main else nullcontext():
        if w.main:
            mlflow.log_params({"config": config.source, "model": model.name, "steps": settings.steps,
                               "prompts": config.prompts or ""})
        for name in STAGES:
            stage = Stage(out, name)
            if stage.done:
                results[name] = stage.result()
                say(f"[{name}] done earlier: skipped", flush=True)
                continue
            stage.dir.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            say(f"[{name}] ...", flush=True)
            if name in ONE_PROCESS_STAGES:
                with main_alone() as mine:
                    result = STAGE_FUNCS[name](config, model, settings, stage.dir, results, progress) if mine else None
            else:
                result = STAGE_FUNCS[name](config, model, settings, stage.dir, results, progress and w.main)
            # rank 0's result is every rank's (the others' train calls return no metrics); rank 0 records it
            result = json.loads(broadcast_text(json.dumps(result, default=str) if w.main else None))
            with main_writes() as mine:
                if mine:
                    stage.finish(result)
            results[name] = result
            timings[name] = time.perf_counter() - started
            if w.main:
                mlflow.log_metric(f"stage_{name}_s", timings[name])
            say(f"[{name}] {timings[name]:.0f} s", flush=True)
        summary = results["report"]
        if w.main:
            mlflow.log_artifacts(str(out / "report"), artifact_path="report")
    return {"timings": timings, **summary}


def _trace(config, model, settings, stage_dir, results, progress, policy="none", name="none", role="trace"):
    from cqpolicy.tracing.collect import collect

    t = config.trace
    s = replace(settings, batch_size=t.batch_size)
    probes = tuple(p for p in t.probes.split(",") if p)
    run_dir = stage_dir / name
    summary = collect(model, s, run_dir, t.num_samples,
                      seed=seed_start(config, role),
                      policy=policy, probes=probes, progress=progress)
    return {"run_dir": str(run_dir), "rows": summary["rows"], "record_s": summary["record_s"]}


def stage_traces(config, model, settings, stage_dir, results, progress):
    return _trace(config, model, settings, stage_dir, results, progress)


def _train_both(config, traces, stage_dir, progress):
    from cqpolicy.training.train import train_policy

    t = config.train
    mlp = train_policy(traces, kind="mlp", out_dir=stage_dir / "mlp", max_epochs=t.max_epochs, seed=t.seed,
                       overwrite=True, progress=progress, label=t.label)
    sched = train_policy(traces, kind="scheduler", out_dir=stage_dir / "scheduler", max_epochs=t.scheduler_epochs,
                         compute_budget=t.compute_budget, seed=t.seed, overwrite=True, progress=progress,
                         label=t.label)
    return {"mlp": str(stage_dir / "mlp"), "scheduler": str(stage_dir / "scheduler"),
            "mlp_metrics": mlp.get("metrics", {}), "scheduler_metrics": sched.get("metrics", {})}


def stage_train(config, model, settings, stage_dir, results, progress):
    from cqpolicy.training.train import train_policy

    trained = _train_both(config, [results["traces"]["run_dir"]], stage_dir, progress)
    # phase-locked interval schedules, fitted on the fresh-cache labels of the first traces only (the chain
    # cost model sums one-step drifts; the retrain traces' labels are of stale caches)
    t = config.train
    intervals = {f"{budget:g}": str(stage_dir / f"intervals-{budget:g}") for budget in t.interval_budgets}
    with main_alone() as mine:  # closed-form fits: one process
        for budget in t.interval_budgets if mine else ():
            train_policy([results["traces"]["run_dir"]], kind="intervals", out_dir=intervals[f"{budget:g}"],
                         compute_budget=budget, seed=t.seed, overwrite=True, label=t.label)
    gates = None
    g = t.gates
    if g:  # trained through the sampler: one artifact, benched at several budgets
        from cqpolicy.training.rollout import train_gates

        gates = str(stage_dir / "gates")
        train_gates(config.model, gates, steps=settings.steps, guidance_scale=settings.guidance_scale,
                    scheduler=settings.scheduler, prompts=config.prompts, budget_range=g.budget_range,
                    train_samples=g.train_samples, val_samples=g.val_samples,
                    batch_size=g.batch_size, max_epochs=g.max_epochs, max_minutes=g.max_minutes, seed=t.seed,
                    overwrite=True, progress=progress)
    forecasts = {}
    f = t.forecast
    for spec in (f.schedules if f else ()):  # fitted on uncached calibration runs, no traces
        from cqpolicy.training.forecast import fit_forecast

        name = re.sub(r"[^\w.+-]", "_", spec.replace(":", "-").replace("=", "").replace(",", "-"))  # offsets=1/0
        out = stage_dir / f"forecast-{name}"
        with main_alone() as mine:  # a closed-form fit on a few calibration samples: one process
            if mine:
                fit_forecast(config.model, spec, out, steps=settings.steps, guidance_scale=settings.guidance_scale,
                             scheduler=settings.scheduler, prompts=config.prompts,
                             negative_prompt=config.negative_prompt, samples=f.samples, val_samples=f.val_samples,
                             order=f.order, batch_size=f.batch_size, overwrite=True, progress=progress)
        forecasts[spec] = str(out)
    return {**trained, "intervals": intervals, "gates": gates, "forecasts": forecasts}


def stage_retrain(config, model, settings, stage_dir, results, progress):
    if not config.retrain:
        return {**results["train"], "retrained": False}
    traced = _trace(config, model, settings, stage_dir, results, progress,
                    policy=f"learned:path={results['train']['mlp']},max_reuse={_reuse_cap(config)}", name="learned",
                    role="retrain")  # new seeds: a run's rows are keyed by seed, and more seeds help
    trained = _train_both(config, [results["traces"]["run_dir"], traced["run_dir"]], stage_dir, progress)
    return {**trained, "retrained": True, "first_round": results["train"]}


def _reuse_cap(config) -> int:
    """``train.max_reuse``: the cap on consecutive reuses of the retrain traces and of the benched scheduler."""
    return config.train.max_reuse


def stage_search(config, model, settings, stage_dir, results, progress):
    from cqpolicy.search.space import parse_space
    from cqpolicy.search.study import run_study

    s = config.search
    mlp = results["retrain"]["mlp"]
    # the learned threshold is searched around the artifact's default (its labels' median): label scales differ
    from cqpolicy.policies.artifact import load_artifact

    default = float(load_artifact(mlp)[0]["default_threshold"])
    lo, hi = (default * v for v in s.threshold_factor)
    space = parse_space({"model": config.model, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
                         "scheduler": settings.scheduler, "prompts": config.prompts,
                         "num_samples": s.num_samples, "batch_size": s.batch_size,
                         "seed": seed_start(config, "search"), "objectives": ["macs_speedup", "fid"],
                         "proxy": s.proxy, "min_psnr": s.min_psnr,
                         "cache": {"dtype": list(s.cache_dtypes), "granularity": ["token"]},
                         "families": {"learned": {"path": {"fixed": mlp},
                                                  "threshold": {"float": [lo, hi], "log": True},
                                                  "max_reuse": {"int": list(s.max_reuse)}}}},
                        source=str(stage_dir / "space"))
    summary = run_study(space, s.n_trials, storage=str(stage_dir / "journal.log"),
                        study_name=f"learned-{stage_dir.parent.name}", progress=progress)
    return summary


def stage_bench(config, model, settings, stage_dir, results, progress):
    b = config.bench
    pareto, learned = learned_methods(config, results, b.max_pareto)
    interval_paths = list((results["train"].get("intervals") or {}).values())
    baselines = [(spec, "fp16") for spec in b.baselines]
    # the strongest hand rule at each learned point's MACs and cache format: do the decisions beat a uniform interval?
    from cqpolicy.policies.families.fora import interval_spec

    gate_budgets = [float(spec.rsplit("budget=", 1)[1]) for spec, _ in learned if ",budget=" in spec]
    for p in pareto + [{"macs_speedup": _table_speedup(path), "cache_dtype": "fp16"} for path in interval_paths] + [
            {"macs_speedup": 1 / budget, "cache_dtype": "fp16"} for budget in gate_budgets]:
        interval = _matched_interval(p["macs_speedup"], settings.steps)
        matched = (interval_spec(interval, model.adapter.default_units), p["cache_dtype"])
        if interval > 1 and _ran_as(matched, model) not in {_ran_as(m, model) for m in baselines}:
            baselines.append(matched)
    from cqpolicy.evaluation.engine import parse_config, run_bench

    # the report reads exactly these runs, not those of earlier runs into this --out; kept for a resumed bench
    id_file = stage_dir / "bench_id"
    with main_writes() as mine:
        if mine and not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex)
    bench_id = id_file.read_text().strip()
    bench = parse_config({"model": config.model, "steps": settings.steps,
                          "guidance_scale": settings.guidance_scale, "scheduler": settings.scheduler,
                          "batch_size": b.batch_size, "num_samples": b.num_samples, "seeds": list(b.seeds),
                          "repeats": b.repeats, "prompts": config.prompts, "negative_prompt": config.negative_prompt,
                          "methods": [{"policy": spec, "cache": fmt} if spec != "none" else spec
                                      for spec, fmt in learned + baselines],
                          "experiment": f"cqpolicy-bench-{stage_dir.parent.name}"}, f"{config.source} bench")
    rows = run_bench(bench, stage_dir, model=model, progress=progress, tags={BENCH_TAG: bench_id})
    with main_writes() as mine:
        if mine:
            (stage_dir / "rows.json").write_text(json.dumps(rows, indent=2, default=str))
    return {"rows": str(stage_dir / "rows.json"), "n_rows": len(rows), "bench_id": bench_id}


def _ran_as(method: tuple[str, str], model) -> tuple:
    """What a ``(spec, cache format)`` runs on ``model``: a family's default units spelled out (``fora:interval=2``
    and ``fora:interval=2,unit=<the model's default units>`` are one method)."""
    from cqpolicy.policies import make_policy

    policy = make_policy(method[0])
    config = getattr(policy, "config", None)
    if config is not None and getattr(config, "unit", None) == "":
        config = replace(config, unit="+".join(model.adapter.default_units))
    return policy.name, config, method[1]


def learned_methods(config: RunConfig, results: dict, max_pareto: int | None = None) -> tuple[list, list]:
    """The learned policies a finished run benches, as ``(spec, cache format)``: ``max_pareto`` of the study's
    Pareto points spread along the front (all if None), the scheduler under the reuse cap, the interval fits.
    Returns (the Pareto points benched, every method)."""
    front = sorted(results["search"]["pareto"], key=lambda r: r["macs_speedup"])
    pareto = front if max_pareto is None else _spread(front, max_pareto)
    learned = [(p["policy"], p["cache_dtype"]) for p in pareto]
    learned.append((f"learned:path={results['retrain']['scheduler']},max_reuse={_reuse_cap(config)}", "fp16"))
    learned += [(f"learned:path={path}", "fp16") for path in (results["train"].get("intervals") or {}).values()]
    if results["train"].get("gates"):
        budgets = (config.train.gates or GatesConfig()).bench_budgets
        learned += [(f"learned:path={results['train']['gates']},budget={b:g}", "fp16") for b in budgets]
    learned += [(f"forecast:path={path}", "fp16") for path in (results["train"].get("forecasts") or {}).values()]
    return pareto, learned


def _table_speedup(artifact: str) -> float:
    """A scheduler artifact's share of computed cells as a speedup (MACs are counted in the bench itself)."""
    from cqpolicy.policies.artifact import load_artifact

    return 1.0 / float(load_artifact(artifact)[0]["metrics"]["compute_fraction"])


def _matched_interval(macs_speedup: float, steps: int) -> int:
    """The FORA interval whose share of computed steps (ceil(steps / k) of ``steps``) best matches a MACs speedup."""
    return min(range(1, steps + 1), key=lambda k: abs(steps / math.ceil(steps / k) - macs_speedup))


def _spread(points: list, k: int) -> list:
    """``k`` points evenly spaced along a sorted front, both ends included (all of them if there are fewer)."""
    if len(points) <= k:
        return list(points)
    if k == 1:
        return [points[-1]]
    return [points[round(i * (len(points) - 1) / (k - 1))] for i in range(k)]


def stage_report(config, model, settings, stage_dir, results, progress):
    from cqpolicy.tracking.leaderboard import collect_rows, leaderboard, write_leaderboard

    board = leaderboard(collect_rows([f"cqpolicy-bench-{stage_dir.parent.name}"],
                                     tags={BENCH_TAG: results["bench"]["bench_id"]} if "bench_id" in results["bench"]
                                     else None))  # a bench stage finished by an older version: untagged runs
    paths = write_leaderboard(board, stage_dir / "leaderboard", overwrite=True)
    _decision_heatmap(config, model, settings, results["retrain"]["mlp"], stage_dir / "learned-decisions.png")
    for budget, path in (results["train"].get("intervals") or {}).items():
        _decision_heatmap(config, model, settings, path, stage_dir / f"learned-intervals-{budget}.png",
                          label=f"learned intervals (budget {budget})")
    best = board[(board["pareto"]) & (board["method"] != "baseline")].head(2)
    shown = board[(board["pareto"]) & (board["method"] != "baseline")].head(5)
    _grids(config, model, settings, board[board["method"] == "baseline"].head(1), shown, stage_dir / "grids.png")
    base = board[board["method"] == "baseline"]
    summary = {"leaderboard": str(paths["markdown"]), "pareto_plot": str(paths["plot"]),
               "baseline_fid": float(base["fid_mean"].iloc[0]) if len(base) else None,
               "best": best[["method", "cache_dtype", "macs_speedup", "wall_speedup", "fid_mean", "fid_std"]]
               .to_dict("records"),
               # each learned row against every other family's frontier interpolated at its MACs (protocol v2)
               "learned_verdicts": board[board["family"].astype(str).str.startswith("learned")][
                   ["method", "name", "cache_dtype", "macs_speedup", "delta_fid", "delta_fid_std", "beats_all",
                    "beats", "ties", "loses_to", "unopposed", "vs_frontiers"]].to_dict("records")}
    print(paths["markdown"].read_text())
    return summary


def _decision_heatmap(config, model, settings, artifact, path, label="learned policy"):
    """Step x block share of rows a learned policy (MLP or table) reuses, per unit, on a fresh batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cqpolicy.policies import make_policy
    from cqpolicy.policies.base import DelegatingPolicy
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample

    class Watch(DelegatingPolicy):
        def __init__(self, inner):
            super().__init__(inner)
            self.seen = {}

        def decide(self, query):
            decision = super().decide(query)
            computed = decision.float().mean() if hasattr(decision, "float") else float(bool(decision))
            self.seen[query.step, query.block, query.unit] = 1 - float(computed) if query.has_cache else 0.0
            return decision

    watch = Watch(make_policy(f"learned:path={artifact}"))
    watch.prepare(model, settings)
    with enable(model.transformer, watch):
        first = seed_start(config, "display")
        sample(model, list(range(8)), list(range(first, first + 8)), replace(settings, batch_size=8), progress=False)
    units = sorted({u for _, _, u in watch.seen})
    blocks = 1 + max(b for _, b, _ in watch.seen)
    fig, axes = plt.subplots(1, len(units), figsize=(5 * len(units), 3.2), squeeze=False)
    for ax, unit in zip(axes[0], units):
        grid = np.zeros((blocks, settings.steps))
        for (step, block, u), value in watch.seen.items():
            if u == unit:
                grid[block, step] = value
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set(title=f"{label}: share reused ({unit})", xlabel="step", ylabel="block")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grids(config, model, settings, plain, shown, path):
    """The same display-seed samples under the plain model and each shown leaderboard row, one titled panel each
    (short name, MACs speedup, FID)."""
    from cqpolicy.evaluation.quality import images_to_uint8
    from cqpolicy.policies import make_policy
    from cqpolicy.runtime import enable
    from cqpolicy.sampling import sample
    from cqpolicy.tracking.grids import save_sample_grids

    first = seed_start(config, "display")
    labels, seeds = [i % model.num_classes for i in range(GRID_SAMPLES)], list(range(first, first + GRID_SAMPLES))

    def title(name, row):
        if row is None:
            return name
        return f"{name}\n{row['macs_speedup']:.2f}x MACs · FID {row['fid_mean']:.2f} ± {row['fid_std']:.2f}"

    base = plain.iloc[0].to_dict() if len(plain) else None
    panels = [(title("uncached", base), images_to_uint8(sample(model, labels, seeds, settings, progress=False)))]
    for row in shown.to_dict("records"):
        policy = make_policy(row["method"])
        policy.prepare(model, settings)
        with enable(model.transformer, policy, row["cache_dtype"]):
            images = images_to_uint8(sample(model, labels, seeds, settings, progress=False))
        panels.append((title(f"{row['name']} ({row['cache_dtype']})", row), images))
    save_sample_grids(panels, path)


ONE_PROCESS_STAGES = {"search", "report"}  # under torchrun: rank 0 alone (a study's trials, plots and grids)
STAGE_FUNCS = {"traces": stage_traces, "train": stage_train, "retrain": stage_retrain, "search": stage_search,
               "bench": stage_bench, "report": stage_report}
