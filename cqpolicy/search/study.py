"""Optuna studies over the speedup-quality frontier, logged to MLflow (a parent run, a nested run per trial).

Every trial runs the chosen policy through the same runtime and sampler as ``bench``, on the same seeds as
the uncached baseline that the worker measured once, on the search role's seeds (never test seeds): exact
MACs of the trial's own run (``evaluation.cost``), wall time (same process), FID (shipped classifier
features vs the real test set) or, with ``proxy``, paired PSNR. With a ``weights`` section the trial also
picks the weights the policy runs on (``fp`` or a quantized folder); the baseline stays the unquantized
uncached model, and ``model_bytes`` is the chosen weights' stored size.

Storages: ``--storage`` unset -> ``sqlite:///mlruns/optuna.db``; an RDB URL (``sqlite:///``,
``postgresql://``, ``mysql://``) -> ``RDBStorage`` (several machines); any other value is a file path ->
``JournalStorage(JournalFileBackend(path))`` (several local worker processes).

With the space's ``forecast`` section a trial first fits a forecast to the static schedule it drew (calibration
seeds, ``training.forecast.fit_forecast``) into ``ARTIFACTS/trial-N`` and then measures ``forecast:path=...``:
the trial's ``policy`` is that spec (what the bench deploys), its ``schedule`` the spec drawn.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path

import optuna
import torch
from optuna.storages._heartbeat import is_heartbeat_enabled  # noqa: PLC2701 - no public equivalent

from cqpolicy.search.space import FP_WEIGHTS, SearchSpace, suggest, suggest_weights
from cqpolicy.tracking.mlflow_store import database_connect_args, shown

RDB_PREFIXES = ("sqlite://", "postgresql://", "postgresql+", "mysql://", "mysql+", "oracle://", "mssql")
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
HEARTBEAT_S = 60  # RDB storages: a running trial's worker records a heartbeat this often
RETRIES = 2  # a trial whose worker died is run again this many times at most
PARENT_WAIT_S = 30  # a launch that joins a study waits this long for its creator's MLflow parent run
SCHEMA_TRIES = 5  # workers that open an empty database together: tries to find its tables made


def make_storage(storage: str | None):
    """An Optuna storage for ``storage`` (see module doc); unreachable ones fail here, before any trial."""
    import sqlalchemy
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    url = storage or DEFAULT_STORAGE
    try:
        if url.startswith(RDB_PREFIXES):
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # a worker that dies mid-trial stops beating: its trial is failed after the grace period and re-queued
            # (up to RETRIES times) for any worker, instead of staying RUNNING forever
            engine_kwargs = None if url.startswith("sqlite") else {
                "pool_pre_ping": True, "connect_args": database_connect_args(url)}
            for attempt in range(SCHEMA_TRIES):
                try:
                    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=3 * HEARTBEAT_S, heartbeat_stale_trial_callback=(
                                              RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)))
                except sqlalchemy.exc.IntegrityError:
                    # workers started together on an empty database race to create Optuna's tables (PostgreSQL:
                    # duplicate pg_type rows); the loser finds them made on its next try
                    if attempt == SCHEMA_TRIES - 1:
                        raise
                    time.sleep(0.5 + random.random())
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # noqa: BLE001 - drivers raise many types; the user needs one line
        raise ValueError(f"cannot open Optuna storage {shown(url)!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def make_sampler(space: SearchSpace, seed: int | None):
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=space.population, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


class Evaluator:
    """Holds the model and the uncached baseline of one worker; ``__call__`` measures one configuration."""

    def __init__(self, space: SearchSpace):
        from cqpolicy.evaluation.cost import measured_sample
        from cqpolicy.evaluation.evaluate import default_labels, is_fashion_mnist_like
        from cqpolicy.evaluation.quality import images_to_uint8
        from cqpolicy.models import load_model
        from cqpolicy.quantization import fp_weights_info, weights_info
        from cqpolicy.sampling.sampler import settings_for

        self.space = space
        self.model = load_model(space.model, prompts=space.prompts, resolution=space.resolution)
        # choice -> (the model it runs, its weights_info); quantized folders loaded once per worker
        self.weights = {w: (self.model, fp_weights_info(self.model)) if w == FP_WEIGHTS else
                        (load_model(w, prompts=space.prompts, resolution=space.resolution), weights_info(w))
                        for w in space.weights}
        self.settings = settings_for(self.model, space.steps, space.scheduler, space.batch_size, space.guidance_scale)
        self.labels = default_labels(space.num_samples, self.model.num_classes)
        self.seeds = [space.seed + i for i in range(space.num_samples)]
        self.fid = None
        if "fid" in space.objectives and not space.proxy:
            if not is_fashion_mnist_like(self.model):
                raise ValueError("FID objective needs a Fashion-MNIST-like model here; set proxy: true")
            from cqpolicy.evaluation.quality import ClassifierFID

            self.fid = ClassifierFID()
        base = measured_sample(self.model, None, "fp16", self.labels, self.seeds, self.settings)
        self.base_images, self.base_wall, self.base_macs = images_to_uint8(base.images), base.wall_s, base.macs
        self.base_fid = self.fid(self.base_images) if self.fid is not None else math.nan

    def fit_forecast(self, schedule: str, weights: str, out: Path) -> str:
        """Fit a forecast to ``schedule`` on the trial's weights; its spec."""
        from cqpolicy.training.forecast import fit_forecast

        f, space = self.space.forecast, self.space
        fit_forecast(space.model if weights == FP_WEIGHTS else weights, schedule, out, steps=space.steps,
                     scheduler=self.settings.scheduler, guidance_scale=self.settings.guidance_scale,
                     samples=f["samples"], val_samples=f["val_samples"], order=f["order"], affine=f["affine"],
                     batch_size=f["batch_size"], overwrite=True, progress=False, prompts=space.prompts,
                     resolution=space.resolution, track=False)
        return f"forecast:path={out}"

    def __call__(self, spec: str, cache_format: str, weights: str = FP_WEIGHTS) -> dict:
        from cqpolicy.evaluation.cost import measured_sample
        from cqpolicy.evaluation.quality import images_to_uint8, paired_fidelity
        from cqpolicy.policies import make_policy

        model, info = self.weights[weights]
        policy = make_policy(spec)
        policy.prepare(model, self.settings)
        run = measured_sample(model, policy, cache_format, self.labels, self.seeds, self.settings)
        images, macs, wall = images_to_uint8(run.images), run.macs, run.wall_s
        reuse, cache_bytes = run.reuse_ratio, run.cache_bytes
        fidelity = paired_fidelity(images, self.base_images)
        result = {"macs_speedup": self.base_macs / macs, "wall_speedup": self.base_wall / wall,
                  "psnr_vs_baseline": fidelity["psnr"], "ssim_vs_baseline": fidelity["ssim"],
                  "reuse_ratio": reuse if reuse is not None else math.nan,
                  "cache_bytes": cache_bytes if cache_bytes is not None else math.nan,
                  "baseline_fid": self.base_fid, "model_bytes": info["model_bytes"],
                  "compression_ratio": info["compression_ratio"]}
        result["fid"] = self.fid(images) if self.fid is not None else -min(fidelity["psnr"], 100.0)
        return result


def _objective(space: SearchSpace, evaluator: Evaluator, parent_run_id: str | None, experiment: str,
               artifacts: Path | None):
    import mlflow

    from cqpolicy.tracking import start_run

    def objective(trial: optuna.Trial):
        spec, cache_format = suggest(trial, space)
        weights = suggest_weights(trial, space)
        if space.forecast is not None:
            trial.set_user_attr("schedule", spec)
            spec = evaluator.fit_forecast(spec, weights, artifacts / f"trial-{trial.number}")
        trial.set_user_attr("policy", spec)
        trial.set_user_attr("cache_dtype", cache_format)
        trial.set_user_attr("weights", weights)
        result = evaluator(spec, cache_format, weights)
        if space.forecast is not None:  # the trial's artifact was scored on the search seeds: it says so
            from cqpolicy.policies.artifact import record_selection

            record_selection(artifacts / f"trial-{trial.number}", space.seed, space.num_samples,
                             f"search trial {trial.number} of study {trial.study.study_name}")
        for key, value in result.items():
            trial.set_user_attr(key, float(value))
        if space.min_psnr is not None:
            psnr = min(result["psnr_vs_baseline"], 1e6)
            trial.set_constraint("min_psnr", float(space.min_psnr) - psnr)  # feasible when <= 0
        with start_run(experiment, run_name=f"trial-{trial.number}", parent_run_id=parent_run_id):
            mlflow.log_params({"policy": spec, "policy_config": spec, "cache_dtype": cache_format,
                               "schedule": trial.user_attrs.get("schedule", ""),
                               "weights": evaluator.weights[weights][1]["weights"], "weights_dir": weights,
                               "model": space.model, "steps": space.steps, "num_samples": space.num_samples,
                               "seed": space.seed, "trial": trial.number, "study": trial.study.study_name,
                               **{f"p.{k}": v for k, v in trial.params.items()}})
            mlflow.log_metrics({k: float(v) for k, v in result.items() if math.isfinite(float(v))})
        return tuple(result[o] for o in space.objectives)

    return objective


def _mark_stale_running_trials_failed(study: optuna.Study) -> int:
    """A killed worker leaves RUNNING trials behind: mark them FAIL (kept, not lost) when a study resumes."""
    stale = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


def _creators_parent_run(study_name: str, storage: str | None) -> str | None:
    """The parent run id that the launch which created the study records moments after creating it (None when
    that launch died first: this launch then opens the parent run)."""
    deadline = time.monotonic() + PARENT_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.5)
        parent_id = optuna.load_study(study_name=study_name, storage=make_storage(storage)).user_attrs.get(
            "mlflow_parent_run_id")
        if parent_id is not None:
            return parent_id
    return None


def run_worker(space: SearchSpace, storage: str | None, study_name: str, n_trials: int, experiment: str,
               parent_run_id: str | None, seed: int | None, progress: bool = True,
               artifacts: Path | None = None) -> None:
    """One worker process: its own model and baseline, trials drawn from the shared storage."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    # a resumed study must not redraw the random points it started with: the seed moves past its trials
    study.sampler = make_sampler(space, None if seed is None else seed + len(study.trials))
    evaluator = Evaluator(space)
    study.optimize(_objective(space, evaluator, parent_run_id, experiment, artifacts), n_trials=n_trials,
                   catch=(RuntimeError, ValueError), show_progress_bar=progress)


def run_study(space: SearchSpace, n_trials: int, storage: str | None = None, study_name: str | None = None,
              workers: int = 1, experiment: str = "cqpolicy-search", seed: int = 0, progress: bool = True,
              artifacts: str | Path | None = None) -> dict:
    """Create or resume ``study_name`` and run ``n_trials`` more trials over ``workers`` processes; a forecast
    space's fitted artifacts go to ``artifacts`` (default ``out/search/<study name>``)."""
    import multiprocessing as mp

    import mlflow

    from cqpolicy.tracking import start_run

    if n_trials < 1 or workers < 1:
        raise ValueError("--n-trials and --workers must be at least 1")
    study_name = study_name or Path(space.source).stem or "cqpolicy-search"
    artifacts = Path(artifacts or Path("out/search") / study_name) if space.forecast is not None else None
    try:  # the storage names one creator even when several hosts start together: it opens the MLflow parent run
        study = optuna.create_study(study_name=study_name, storage=make_storage(storage),
                                    directions=space.directions, sampler=make_sampler(space, seed))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage),
                                  sampler=make_sampler(space, seed))
        created = False
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in space.directions]:
        raise ValueError(f"study {study_name!r} exists with other objectives; choose another --study-name")
    # RDB storages fail a dead worker's trials by their heartbeats, leaving other hosts' running trials alone;
    # a journal has no heartbeats: what is RUNNING when a launch starts was left by a killed one
    failed_stale = 0 if is_heartbeat_enabled(study._storage) else _mark_stale_running_trials_failed(study)
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id is None and not created:
        parent_id = _creators_parent_run(study_name, storage)
    with start_run(experiment, run_name=f"study-{study_name}", run_id=parent_id) as parent:
        if parent_id is None:
            study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
            mlflow.log_params({"study": study_name, "space": space.source, "sampler": space.sampler,
                               "objectives": ",".join(space.objectives), "steps": space.steps,
                               "num_samples": space.num_samples, "model": space.model})
        parent_id = parent.info.run_id
        per_worker = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
        if workers == 1:
            run_worker(space, storage, study_name, n_trials, experiment, parent_id, seed, progress, artifacts)
        else:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=run_worker, args=(space, storage, study_name, n, experiment, parent_id,
                                                          seed + i, False, artifacts))
                     for i, n in enumerate(per_worker) if n]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise RuntimeError(f"{sum(1 for p in procs if p.exitcode)} search worker(s) failed")
        study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
        trials = study.get_trials()
        states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
        mlflow.log_metrics({f"trials_{k.lower()}": v for k, v in states.items()})
    best = [{"number": t.number, "policy": t.user_attrs.get("policy"), "cache_dtype": t.user_attrs.get("cache_dtype"),
             **({"schedule": t.user_attrs["schedule"]} if "schedule" in t.user_attrs else {}),
             "weights": t.user_attrs.get("weights", FP_WEIGHTS), **dict(zip(space.objectives, t.values))}
            for t in study.best_trials]
    return {"study": study_name, "trials": len(trials), "states": states, "stale_marked_failed": failed_stale,
            "pareto": best, "parent_run_id": parent_id}
