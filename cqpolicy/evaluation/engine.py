"""The bench engine: methods x replicates x N samples, resumable per (replicate, method).

One code path for ``cqpolicy bench --config FILE``, ``cqpolicy bench --policies ...`` (a config built from the
flags) and the main job's bench stage. A config names the model and sampling settings, the replicates it scores
and the methods::

    model: fmnist-dit
    steps: 50
    guidance_scale: null                     # the model's
    batch_size: 64
    num_samples: 1000                        # per replicate
    replicates: {role: test, ids: [0, 1, 2]} # or {role: validation, ids: [0, 1]}; `seeds: [0, 1, 2]` = test ids
    learned_from: out/run                    # optional: a finished `cqpolicy run`'s learned policies, frozen
    learned_config: configs/fmnist-dit.yaml  #   into OUT/policies/ (its config)
    methods:
      - fora:interval=3                                        # a policy spec (fp16 cache)
      - {policy: "fora:interval=3", cache: int8-token}         # with a cache format
      - {policy: none, weights: out/q/dit-int8}                # a quantized model (`cqpolicy quantize`), uncached
    repeats: 2                               # timing pairs that must agree (0: wall from the quality passes)

Optional keys: ``fid`` (default true), ``experiment`` (MLflow, default ``cqpolicy-bench-paper``), ``device``,
``dtype``. Replicate ``k`` of a role samples seeds ``replicate_start(role, k) + i`` (cqpolicy/seeds.py): test
replicates score what was chosen, validation replicates choose variants and settings; one OUT holds one role.

OUT (a re-run skips what is there)::

    rows/<k>/<slug>.json     one row per (replicate k, method), written as soon as it is done (and logged to MLflow)
    work/plain-<k>-<N>.npz   replicate k's plain images: every method, resumed or not, is paired with the same ones
    wall/<slug>.json         the method's wall timing, once per method (first batch of its first replicate)
    policies/                ``learned_from``'s artifacts, copied once (the rows name files that stay)
    leaderboard.{md,csv}, pareto.png   from every row of N samples so far (``write_table``)

Protocol (DESIGN.md §4): MACs are exact for the scored run; the plain model runs first on every replicate and each
method is paired with its images. Wall speedup: the plain model and the method in turn on one batch, pairs until the
last ``repeats`` agree within ``WALL_SPREAD`` and every plain time of them lies within ``WALL_DRIFT`` of the median
plain time this process measured so far (the machine's load moved if not); after ``WALL_MAX_PAIRS`` the timing is
kept with ``wall_flag: load`` (``repeats: 0``: the quality passes' ratio, ``wall_flag: quality-pass``). Each row
records ``load_1m`` (``os.getloadavg``) at its timing; the leaderboard has a ``wall_flag`` column. A learned artifact
whose records name test seeds (or the scored role's) is refused; one that records none runs with
``seeds_recorded: false``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from cqpolicy import defaults
from cqpolicy import seeds as seed_roles
from cqpolicy.distributed import FolderLock, broadcast_text, check_shared, device_for, main_writes, world
from cqpolicy.evaluation.bench import BASELINE

EXPERIMENT = "cqpolicy-bench-paper"
NO_POLICY = "none"  # a weights entry's policy that samples the quantized model uncached
KEYS = ("model", "steps", "scheduler", "guidance_scale", "batch_size", "num_samples", "seeds", "replicates",
        "methods", "learned_from", "learned_config", "repeats", "fid", "experiment", "device", "dtype", "prompts",
        "negative_prompt", "resolution")
ROW_SETTINGS = ("steps", "scheduler", "guidance_scale", "batch_size", "num_samples", "role")  # a resume must match
WALL_SPREAD = 1.2  # the last pairs of a timing differ more than this: the load changed during it, time another pair
WALL_DRIFT = 0.10  # a plain time this far from the run's median plain time: the machine is not as it was, again
WALL_MAX_PAIRS = 8  # then keep the timing, flagged
RECOUNT_SAMPLES = 2  # samples a recount of a policy's own arithmetic runs (per image it is batch-independent)


class BenchError(ValueError):
    """A bench that cannot run, or would mix what must not be mixed (one line)."""


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple = ()
    model: str = defaults.MODEL
    steps: int = defaults.STEPS
    scheduler: str | None = None  # None: the family the model was trained for (ddim, or flow)
    guidance_scale: float | None = None  # None: the model's default
    batch_size: int = defaults.BATCH_SIZE
    num_samples: int = 1000  # per replicate: the paper scale (README comparisons, DESIGN.md §4)
    role: str = "test"
    replicates: tuple = (0, 1, 2)
    learned_from: str | None = None
    learned_config: str = "configs/fmnist-dit.yaml"
    repeats: int = 2
    fid: bool = True
    experiment: str = EXPERIMENT
    device: str | None = None
    dtype: str = "float32"
    prompts: str | None = None  # text-conditioned models: a prompt file (one per line) or embeddings .safetensors
    negative_prompt: str = ""
    resolution: int | None = None  # image side in pixels (None: the model's)
    source: str = "bench config"


# ------------------------------------------------------------------------------------------------ config
def load_config(path) -> BenchConfig:
    """The bench config in ``path``: a YAML file or a packaged config's name (``fmnist-dit-paper``)."""
    from cqpolicy.config import ConfigError, resolve_config
    from cqpolicy.outputs import read_yaml

    try:
        path = resolve_config(path)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    return parse_config(read_yaml(path, BenchError, "bench config"), str(path))


def parse_config(data, source: str = "bench config") -> BenchConfig:
    """A bench config from its YAML mapping; any problem is one line naming ``source``."""
    if not isinstance(data, dict):
        raise BenchError(f"{source}: a bench config is a YAML mapping")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise BenchError(f"{source}: unknown key {unknown[0]!r}; known: {', '.join(KEYS)}")
    if "seeds" in data and "replicates" in data:
        raise BenchError(f"{source}: give replicates or seeds (test replicates), not both")
    reps = data["replicates"] if "replicates" in data else {"role": "test", "ids": data.get("seeds", [0, 1, 2])}
    if not isinstance(reps, dict) or set(reps) != {"role", "ids"} or not isinstance(reps["ids"], list):
        raise BenchError(f"{source}: replicates is {{role: test or validation, ids: [k, ...]}}, got {reps!r}")
    if not isinstance(data.get("methods", []), list):
        raise BenchError(f"{source}: methods is a list of policy specs or {{policy, weights, cache}} entries")
    given = {k: v for k, v in data.items() if k not in ("seeds", "replicates", "methods")}
    try:
        config = BenchConfig(methods=tuple(data.get("methods") or ()), role=str(reps["role"]),
                             replicates=tuple(_int(k, "a replicate id") for k in reps["ids"]), source=source,
                             **{k: _typed(k, v) for k, v in given.items()})
    except (TypeError, ValueError) as exc:
        raise BenchError(f"{source}: {exc}") from None
    return check_config(config)


def override(config: BenchConfig, **changes) -> BenchConfig:
    """``config`` with the values given on the command line (None: not given), checked again."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return check_config(replace(config, **changes)) if changes else config


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is an integer, got {value!r}")
    return value


def _typed(key: str, value):
    """A config value in its field's type (YAML gives what it parses: ``steps: fifty`` must not reach the sampler)."""
    if key == "guidance_scale":
        return None if value is None else float(value)
    if key in ("learned_from", "device", "scheduler", "prompts"):
        return None if value is None else str(value)
    if key in ("steps", "batch_size", "num_samples", "repeats"):
        return _int(value, key)
    if key == "resolution":
        return None if value is None else _int(value, key)
    if key == "fid":
        if not isinstance(value, bool):
            raise ValueError(f"fid is true or false, got {value!r}")
        return value
    if value is None:
        raise ValueError(f"{key} is empty")
    return str(value)


def check_config(config: BenchConfig) -> BenchConfig:
    """Refuse (one line) a config that cannot run, before anything is loaded or written (``--table-only`` needs
    no method's files: policies are built by the bench)."""
    from cqpolicy.policies.registry import make_config, parse_spec
    from cqpolicy.sampling import SampleSettings

    where = config.source
    for key in ("steps", "batch_size", "num_samples"):
        if getattr(config, key) < 1:
            raise BenchError(f"{where}: {key} must be at least 1, got {getattr(config, key)}")
    if config.repeats < 0:
        raise BenchError(f"{where}: repeats must be non-negative (0: wall from the quality passes)")
    if config.role not in seed_roles.REPLICATE_SPANS:
        raise BenchError(f"{where}: replicates role is test or validation, got {config.role!r}")
    if not config.replicates or len(set(config.replicates)) != len(config.replicates):
        raise BenchError(f"{where}: replicates ids must be distinct and at least one, got {list(config.replicates)}")
    try:
        for k in config.replicates:
            seed_roles.replicate_start(config.role, k)
        SampleSettings(steps=config.steps, batch_size=config.batch_size,
                       scheduler=config.scheduler or defaults.SCHEDULER,
                       guidance_scale=1.0 if config.guidance_scale is None else config.guidance_scale).validate()
    except ValueError as exc:
        raise BenchError(f"{where}: {exc}") from None
    span = seed_roles.REPLICATE_SPANS[config.role]
    if config.num_samples > span:
        raise BenchError(f"{where}: num_samples {config.num_samples} overruns a {config.role} replicate "
                         f"({span} samples)")
    methods = config_methods(config.methods)
    if not methods and config.learned_from is None:
        raise BenchError(f"{where}: methods is empty and there is no learned_from: nothing to bench")
    for spec, _, _ in methods:
        make_config(*parse_spec(spec))  # a bad spec fails here; a missing artifact when the bench builds it
        check_artifact(spec, config.role)  # a leak is refused as such, before the artifact is even loaded
    return config


def config_methods(entries) -> list[tuple]:
    """A config's ``methods:`` as ``(spec, cache format, weights folder)``: a spec string runs on the bench's
    model (folder None) with an fp16 cache, ``{policy: SPEC, weights: DIR, cache: FORMAT}`` (``weights`` and
    ``cache`` optional) on the model quantized into DIR with cached tensors stored as FORMAT (e.g. ``int8-token``)."""
    from cqpolicy.runtime.cache_store import CacheFormat

    methods = []
    for entry in entries:
        if isinstance(entry, str):
            methods.append((entry, defaults.CACHE_FORMAT, None))
        elif isinstance(entry, dict) and "policy" in entry and set(entry) <= {"policy", "weights", "cache"}:
            spec = str(entry["policy"])
            if spec == NO_POLICY and ("weights" not in entry or "cache" in entry):
                raise BenchError(f"a methods entry is {{policy: none, weights: DIR}} (no cache) to sample a "
                                 f"quantized model uncached, got {entry!r}")
            try:  # a head granularity's head count is the model's: any count checks the name
                fmt = ("none" if spec == NO_POLICY
                       else str(CacheFormat.parse(str(entry.get("cache", defaults.CACHE_FORMAT)), num_heads=1)))
            except ValueError as exc:
                raise BenchError(f"methods entry {entry!r}: {exc}") from None
            methods.append((spec, fmt, str(entry["weights"]) if "weights" in entry else None))
        else:
            raise BenchError(f"a methods entry is a policy spec or {{policy: SPEC, weights: DIR, cache: FORMAT}}, "
                             f"got {entry!r}")
    return methods


# ----------------------------------------------------------------------------------------------- methods
def slug(spec: str, fmt: str, weights_digest: str | None = None) -> str:
    """A file name for a method: its family and a hash of spec, cache format and (weights entries only) the
    digest of the quantized folder's files."""
    key = f"{spec}|{fmt}" + (f"|{weights_digest}" if weights_digest else "")
    return spec.split(":")[0] + "-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def method_slug(method: tuple) -> str:
    spec, fmt, weights = method
    return slug(spec, fmt, weights and weights["weights_digest"])


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def with_weights(methods: list[tuple], fingerprint: str) -> list[tuple]:
    """``methods`` with each weights folder replaced by its record (``weights_info`` plus path and digest: the
    fields its rows carry), after checking the folder was quantized from the bench's model (``fingerprint``)."""
    from cqpolicy.quantization import weights_info

    records = {}
    for folder in dict.fromkeys(m[2] for m in methods if m[2]):
        try:
            info = weights_info(folder, fingerprint)
        except ValueError as exc:
            raise BenchError(f"methods: {exc}") from None
        records[folder] = {"weights": info["weights"], "model_bytes": info["model_bytes"],
                           "compression_ratio": info["compression_ratio"], "weights_dir": folder,
                           "weights_digest": tree_digest(Path(folder))}
    labels = {}
    for record in records.values():  # the leaderboard groups rows by the label: two folders must not share one
        if labels.setdefault(record["weights"], record["weights_digest"]) != record["weights_digest"]:
            raise BenchError(f"methods: two weights folders are both {record['weights']!r} with other contents, "
                             f"{record['weights_dir']} one of them: keep one")
    return [(spec, fmt, folder and records[folder]) for spec, fmt, folder in methods]


def learned_methods(run_dir: Path, run_config: str, frozen: Path, role: str = "test") -> list[tuple[str, str]]:
    """The learned policies of a finished ``cqpolicy run`` (its study's Pareto points, the capped scheduler, the
    interval fits; the main job's own list), each artifact checked (``check_artifact``) and copied once into
    ``frozen``: the table's rows name files that stay, a later main job cannot swap them, and a resumed bench needs
    no ``out/run``."""
    from cqpolicy.pipeline import Stage, learned_methods as run_methods, load_config as load_run_config

    listed = frozen / "methods.json"
    stages = {name: Stage(run_dir, name) for name in ("train", "retrain", "search")}
    if not all(stage.done for stage in stages.values()):
        return [tuple(m) for m in json.loads(listed.read_text())] if listed.is_file() else []
    _, methods = run_methods(load_run_config(run_config), {name: st.result() for name, st in stages.items()})
    for spec, _ in methods:
        check_artifact(spec, role)  # before anything is copied
    methods = [(freeze(spec, run_dir, frozen), fmt) for spec, fmt in methods]
    if listed.is_file() and [tuple(m) for m in json.loads(listed.read_text())] != methods:
        raise BenchError(f"{run_dir} has other learned policies than the ones {listed} benches: bench into a new --out")
    write_json(listed, methods)
    return methods


def freeze(spec: str, run_dir: Path, frozen: Path) -> str:
    """``spec`` with its artifact copied to ``frozen/<its path under run_dir>`` (refused if another copy is there)."""
    match = re.search(r"path=([^,]+)", spec)
    source = Path(match.group(1))
    target = frozen / "-".join(source.resolve().relative_to(run_dir.resolve()).parts)
    if not target.exists():
        with main_writes() as mine:
            if mine:
                shutil.copytree(source, target)
    elif tree_digest(target) != tree_digest(source):
        raise BenchError(f"{target} holds another artifact than {source}: bench into a new --out")
    return spec.replace(match.group(0), f"path={target}")


# ------------------------------------------------------------------------------------------ seed records
def recorded_seeds(path) -> tuple[list[tuple[int, int]], bool]:
    """The ``(first seed, count)`` ranges an artifact records it was fitted or selected on, read-only, and whether
    its records are complete. ``policy.json`` of ``cqpolicy train``: ``training.calibration_seeds`` / ``val_seeds``
    (forecast) and ``rollout_seeds`` (gates) as ``[first, count]``, ``selected_on`` (search trials, validation
    choices: ``artifact.record_selection``), the interval fit's ``train_seeds`` /
    ``val_seeds`` as lists, and the trace runs it read (``traces``, gates' ``warm_start.traces``) whose shard names
    hold their seeds. A file (a table or schedule) or a trace run that is gone records nothing."""
    from cqpolicy.policies.artifact import POLICY_FILE

    meta_file = Path(path) / POLICY_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return [], False
    if not isinstance(meta, dict):
        return [], False
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    pairs = {"calibration_seeds", "rollout_seeds"} | ({"val_seeds"} if meta.get("kind") == "forecast" else set())
    ranges, complete = [], True
    for key in ("calibration_seeds", "rollout_seeds", "train_seeds", "val_seeds"):
        value = training.get(key)
        if isinstance(value, list) and key in pairs and len(value) == 2:
            ranges.append((int(value[0]), int(value[1])))
        elif isinstance(value, list):
            ranges += [(int(s), 1) for s in value]
    for record in meta.get("selected_on") or []:  # scored to be chosen (``artifact.record_selection``)
        ranges.append((int(record["seeds"][0]), int(record["seeds"][1])))
    warm = meta.get("warm_start") if isinstance(meta.get("warm_start"), dict) else {}
    traces = [meta.get("traces"), warm.get("traces")]
    for run in [t for entry in traces for t in (entry if isinstance(entry, list) else [entry]) if t]:
        seeds = _trace_seeds(Path(run))
        complete = complete and seeds is not None
        ranges += [(s, 1) for s in seeds or []]
    return ranges, complete and bool(ranges)


def _trace_seeds(run_dir: Path) -> list[int] | None:
    from cqpolicy.tracing.store import TraceError, TraceReader

    try:
        return TraceReader([run_dir]).seeds()
    except (TraceError, OSError, ValueError):
        return None


def check_artifact(spec: str, role: str) -> bool | None:
    """Whether the artifact ``spec`` names (``path=``) records the seeds it was fitted or selected on (None: the spec
    names no artifact). Refused in one line when any of them is a test seed, or a seed of the scored ``role``."""
    from cqpolicy.policies.registry import parse_spec

    path = parse_spec(spec)[1].get("path")
    if path is None:
        return None
    ranges, complete = recorded_seeds(path)
    for scored in dict.fromkeys(("test", role)):
        lo = seed_roles.replicate_start(scored, 0)
        hi = lo + seed_roles.TEST_REPLICATES * seed_roles.REPLICATE_SPANS[scored]
        for first, count in ranges:
            if first < hi and first + count > lo:
                raise BenchError(f"{path} records {scored} seeds ({max(first, lo)}...) among the samples it was "
                                 f"fitted or selected on: it must not be scored on {scored} replicates")
    return complete


# --------------------------------------------------------------------------------------------- the bench
def run_bench(config: BenchConfig, out, *, model=None, only=None, retime=None, table_only: bool = False,
              progress: bool = True, tags: dict | None = None, log: bool = True, recount: bool = False) -> list[dict]:
    """Bench ``config`` into ``out`` (resuming what is there) and write the table; returns the rows of this config's
    (replicate, method) pairs, replicate by replicate, the plain model first. ``only``: the methods whose spec or
    weights folder contains one of these words. ``retime``: time these specs' wall speedup again (their rows stay).
    The plain model is always benched (``only=["baseline"]``: it alone). ``table_only``: bench nothing, write the
    table from the rows on disk. ``model``: already loaded. ``log``: each row to MLflow (experiment
    ``config.experiment``, with ``tags``) as it is written; False leaves logging to the caller."""
    out = Path(out)
    if table_only:
        return write_table(out, config.num_samples, config.experiment)
    w = world()
    if w.size > config.num_samples:
        raise BenchError(f"{w.size} ranks for {config.num_samples} samples per replicate: launch at most "
                         f"{config.num_samples} (--nproc_per_node x --nnodes)")
    return _Bench(config, out, model, progress and w.main, tags, log).run(only, retime, recount)


class _Bench:
    def __init__(self, config: BenchConfig, out: Path, model, progress: bool, tags, log: bool):
        import torch

        from cqpolicy.models import load_model
        from cqpolicy.sampling.sampler import settings_for

        self.config, self.out, self.progress, self.tags, self.log = config, out, progress, tags, log
        if model is None:
            model = load_model(config.model, dtype=getattr(torch, config.dtype), device=device_for(config.device),
                               prompts=config.prompts, negative_prompt=config.negative_prompt,
                               resolution=config.resolution)
        self.model = model
        self.settings = settings_for(model, steps=config.steps, batch_size=config.batch_size,
                                     scheduler=config.scheduler, guidance_scale=config.guidance_scale)
        # the wall timings of this launch: their plain times are the reference (rank 0's id on every rank)
        self.run_id = broadcast_text(uuid.uuid4().hex if world().main else None)

    def seeds(self, k: int, n: int | None = None) -> list[int]:
        first = seed_roles.replicate_start(self.config.role, k)
        return list(range(first, first + (self.config.num_samples if n is None else n)))

    def row_path(self, k: int, method: tuple) -> Path:
        return self.out / "rows" / str(k) / f"{method_slug(method)}.json"

    def methods(self, only) -> tuple[list[tuple], dict]:
        """Every method to bench (learned first: the rows the table is for) and whether each artifact records
        its seeds; weights folders and artifacts checked before anything is written."""
        from cqpolicy.models.fingerprint import model_fingerprint
        from cqpolicy.policies import make_policy

        config, entries = self.config, config_methods(self.config.methods)
        for spec, _, weights in entries:
            if not (weights and spec == NO_POLICY):
                make_policy(spec)  # a bad spec or a missing artifact fails before anything runs
        self.fingerprint = model_fingerprint(self.model)
        methods = with_weights(entries, self.fingerprint)
        recorded = {spec: check_artifact(spec, config.role) for spec, _, _ in methods}
        learned = [] if config.learned_from is None else learned_methods(
            Path(config.learned_from), config.learned_config, self.out / "policies", config.role)
        recorded.update({spec: check_artifact(spec, config.role) for spec, _ in learned})
        methods = [(spec, fmt, None) for spec, fmt in learned] + methods
        if only:
            methods = [m for m in methods if any(w in m[0] or w in ((m[2] or {}).get("weights_dir") or "")
                                                 for w in only)]
        if not methods and BASELINE not in (only or ()):  # `--only baseline`: the plain rows alone
            raise BenchError(f"{config.source}: no method to bench" + (f" matches --only {' '.join(only)}"
                                                                       if only else ""))
        return methods, recorded

    def check_resume(self, methods: list[tuple]) -> None:
        """Rows already in OUT must come from this model, these weights and these settings: one table, one setup."""
        expected = {**self.row_settings(), "model_fingerprint": self.fingerprint}
        digests = {w["weights_dir"]: w["weights_digest"] for _, _, w in methods if w}
        for old in sorted((self.out / "rows").glob("*/*.json")):
            row = json.loads(old.read_text())
            row.setdefault("role", row_role(row))
            if row.get("model_fingerprint") != expected["model_fingerprint"]:
                raise BenchError(f"{old} was measured on other weights than {self.model.name}'s now: "
                                 f"bench into a new --out (or remove {self.out / 'rows'})")
            if digests.get(row.get("weights_dir"), row.get("weights_digest")) != row.get("weights_digest"):
                raise BenchError(f"{old} was measured on other weights than {row['weights_dir']} holds now: "
                                 f"bench into a new --out")
            other = [k for k in ROW_SETTINGS if row.get(k) != expected[k]]
            if other:
                raise BenchError(f"{old} has {other[0]} {row.get(other[0])!r}, this bench {expected[other[0]]!r}: "
                                 f"bench into a new --out")

    def row_settings(self) -> dict:
        s = self.settings
        return {"steps": s.steps, "scheduler": s.scheduler, "guidance_scale": s.guidance_scale,
                "batch_size": s.batch_size, "num_samples": self.config.num_samples, "role": self.config.role}

    def run(self, only, retime, recount: bool = False) -> list[dict]:
        methods, self.recorded = self.methods(only)
        check_shared(self.out)  # checked and locked before the first write; bad input above leaves no folder
        with FolderLock(self.out):
            if retime:
                return self.retime(methods, retime)
            if recount:
                return self.recount(methods)
            return self.bench(methods)

    def bench(self, methods: list[tuple]) -> list[dict]:
        from tqdm.auto import tqdm

        from cqpolicy.evaluation.cost import model_costs
        from cqpolicy.evaluation.evaluate import default_labels, is_fashion_mnist_like, sample_classes
        from cqpolicy.quantization import fp_weights_info

        self.check_resume(methods)
        config, model = self.config, self.model
        (self.out / "work").mkdir(parents=True, exist_ok=True)
        (self.out / "wall").mkdir(exist_ok=True)
        self.labels = default_labels(config.num_samples, model.num_classes)
        self.classifier = self.fid = self.kid = self.classes = None
        if is_fashion_mnist_like(model):
            from cqpolicy.evaluation.classifier import load_classifier
            from cqpolicy.evaluation.quality import ClassifierFID, ClassifierKID

            self.classifier = load_classifier()
            self.classes = sample_classes(model, self.labels)
            self.fid, self.kid = (ClassifierFID(), ClassifierKID()) if config.fid else (None, None)
        self.per_image = model_costs(model, self.settings).plain(1, self.settings)
        self.fp_weights = fp_weights_info(model)
        plain = (BASELINE, "none", None)
        todo = [(k, m) for k in config.replicates for m in [plain] + methods if not self.row_path(k, m).is_file()]
        self.bar = tqdm(total=len(todo), desc="bench", unit="row", dynamic_ncols=True, disable=not self.progress)
        if todo and not config.repeats:  # quality passes are the timings: warm up so the first one does not pay
            self.sample(model, None, "none", self.seeds(config.replicates[0], 2))
        plains = {k: self.plain(k) for k in config.replicates}  # every replicate's plain model first: the noise floor
        for method in methods:  # method by method, so a method's rows over all replicates are done early
            prepared = None
            for k in config.replicates:
                if self.row_path(k, method).is_file():
                    continue
                spec, fmt, weights = method
                self.bar.set_postfix_str(f"{spec[:48]}{' on ' + weights['weights'] if weights else ''}, replicate {k}")
                prepared = prepared or self.prepare(spec, weights)
                self.method_row(k, method, prepared, plains[k])
        self.bar.close()
        write_table(self.out, config.num_samples, config.experiment)
        return [json.loads(self.row_path(k, m).read_text()) for k in config.replicates for m in [plain] + methods]

    def sample(self, model, policy, fmt, seeds):
        from cqpolicy.evaluation.cost import measured_sample

        return measured_sample(model, policy, fmt, _labels(len(seeds), self.model), seeds, self.settings)

    def prepare(self, spec: str, weights: dict | None):
        """The model a method runs on (a weights entry's quantized model) and its prepared policy (None: uncached)."""
        from cqpolicy.models import load_model
        from cqpolicy.policies import make_policy

        run_model = self.model if weights is None else load_model(weights["weights_dir"], device=str(self.model.device))
        if weights is not None and spec == NO_POLICY:
            return run_model, None
        policy = make_policy(spec)
        policy.prepare(run_model, self.settings)
        return run_model, policy

    def plain(self, k: int):
        """Replicate ``k``'s plain row and uint8 images, sampled once and kept for a resumed run."""
        import numpy as np
        import torch

        from cqpolicy.evaluation.quality import images_to_uint8

        n = self.config.num_samples
        plain_file = self.out / "work" / f"plain-{k}-{n}.npz"
        row_file = self.row_path(k, (BASELINE, "none", None))
        row_file.parent.mkdir(parents=True, exist_ok=True)
        if not plain_matches(plain_file, row_file):  # the row and the kept images come from one run
            self.bar.set_postfix_str(f"replicate {k}: plain model")
            run = self.sample(self.model, None, "none", self.seeds(k))
            images = images_to_uint8(run.images).numpy()
            with main_writes() as mine:
                if mine:
                    np.savez_compressed(plain_file, images=images)
            row = {**self.score(BASELINE, "none", run, None),
                   "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(), **self.fp_weights,
                   "seeds_recorded": None}
            self.write_row(row_file, self.finish(row, row, k, None, load_1m()))
        with np.load(plain_file) as data:
            return json.loads(row_file.read_text()), torch.from_numpy(data["images"])

    def method_row(self, k: int, method: tuple, prepared, plain) -> None:
        spec, fmt, weights = method
        run_model, policy = prepared
        base_row, reference = plain  # a weights entry too: ΔFID is against the unquantized uncached model
        seeds = self.seeds(k)
        run = self.sample(run_model, policy, fmt, seeds)
        load = load_1m()
        row = {**self.score(spec, fmt, run, reference, policy), **(weights or self.fp_weights),
               "seeds_recorded": self.recorded.get(spec)}
        wall = None
        if self.config.repeats:
            n = min(self.settings.batch_size, len(seeds))
            pair = lambda: time_pair(self.model, policy, fmt, run_model, self.labels[:n], seeds[:n],  # noqa: E731
                                     self.settings)
            wall = wall_record(self.out / "wall" / f"{method_slug(method)}.json", pair, self.config.repeats,
                               n, seeds[0], self.run_id)
        self.write_row(self.row_path(k, method), self.finish(row, base_row, k, wall, load))

    def score(self, spec, fmt, run, reference, policy=None) -> dict:
        import torch

        from cqpolicy.evaluation.bench import cost_row, quality_row
        from cqpolicy.evaluation.quality import images_to_uint8

        images = images_to_uint8(run.images)
        return {**cost_row(spec, policy, fmt, run, len(self.labels), self.per_image),
                "bit_identical": bool(reference is None or torch.equal(images, reference)),
                **quality_row(images, reference, self.classes, self.classifier, self.fid, self.kid)}

    def finish(self, row: dict, base: dict, k: int, wall: dict | None, load: float | None) -> dict:
        """The row with its speedups, how its wall was measured, and the setup it was measured in."""
        s = self.settings
        if row is base:
            speedup, how, flag = 1.0, "the plain model", ""
        elif wall is None:  # repeats 0: a cheap look, not the protocol's timing, and flagged as such
            speedup, flag = base["quality_pass_s"] / row["quality_pass_s"], "quality-pass"
            how = "the quality passes (all samples, plain model and method not interleaved)"
        else:
            # a record timed before the load checks has no flag or load: None, as its earlier rows have
            speedup, flag, load = wall["wall_speedup"], wall.get("wall_flag"), wall.get("load_1m")
            how = (f"median of {wall['pairs_used']} of {len(wall['plain_s'])} interleaved runs of one batch of "
                   f"{wall['batch_size']} with the plain model (samples {wall['first_seed']}+)")
        return {**row, "macs_speedup": base["macs_per_image"] / row["macs_per_image"], "wall_speedup": speedup,
                "wall_measured_on": how, "wall_flag": flag, "load_1m": load,
                "num_samples": self.config.num_samples, "steps": s.steps,
                "seed": seed_roles.replicate_start(self.config.role, k), "role": self.config.role, "replicate": k,
                "batch_size": s.batch_size, "guidance_scale": s.guidance_scale, "scheduler": s.scheduler,
                "repeats": self.config.repeats if wall else 0, "model": self.model.name,
                "model_fingerprint": self.fingerprint}

    def write_row(self, path: Path, row: dict) -> None:
        from cqpolicy.evaluation.bench import log_bench_rows

        write_json(path, row)
        with main_writes() as mine:
            if mine and self.log:
                log_bench_rows(self.config.experiment, [row], self.tags)
        self.bar.update(1)

    def recount(self, methods: list[tuple]) -> list[dict]:
        """Rows measured before MACs included a policy's own arithmetic get it added: the method runs on the first
        ``RECOUNT_SAMPLES`` seeds of the first replicate and its per-image arithmetic (``policy_macs_per_image``)
        is added to ``macs_per_image``. Per image it does not depend on the batch for static schedules, forecasts
        and decision nets that run at every step (exact); DQAR measures attention entropy only at the steps a
        row computes, so its count is an estimate from those samples (``policy_macs_source`` says which)."""
        from tqdm.auto import tqdm

        first = self.config.replicates[0]
        seeds = self.seeds(first, min(RECOUNT_SAMPLES, self.config.num_samples))
        for method in tqdm(methods, desc="recount MACs", unit="method", disable=not self.progress):
            paths = [self.row_path(k, method) for k in self.config.replicates]
            pending = [p for p in paths if p.is_file() and "policy_macs_per_image" not in json.loads(p.read_text())]
            if not pending:
                continue
            run_model, policy = self.prepare(method[0], method[2])
            if policy is None or not policy.reports_reuse:  # uncached, or a peer's own hooks: no arithmetic of ours
                per_image, source = 0.0, "none of ours"
            else:
                per_image = self.sample(run_model, policy, method[1], seeds).policy_macs / len(seeds)
                dynamic = policy.family == "dqar"
                source = f"{'estimated' if dynamic else 'exact'}, recounted on {len(seeds)} samples"
            for path in pending:
                row = json.loads(path.read_text())
                base = json.loads(self.row_path(int(row.get("replicate", path.parent.name)),
                                                (BASELINE, "none", None)).read_text())
                row["macs_per_image"] += per_image
                row.update({"policy_macs_per_image": per_image, "policy_macs_source": source,
                            "macs_speedup": base["macs_per_image"] / row["macs_per_image"]})
                write_json(path, row)
        return write_table(self.out, self.config.num_samples, self.config.experiment)

    def retime(self, methods: list[tuple], specs: list[str]) -> list[dict]:
        """New wall records for every method with a spec of ``specs`` (timed as in the run: the first batch of the
        first replicate), then the table."""
        unknown = [spec for spec in specs if spec not in {m[0] for m in methods}]
        if unknown:
            raise BenchError(f"--retime {unknown[0]!r} is not a method of this table")
        from tqdm.auto import tqdm

        (self.out / "wall").mkdir(parents=True, exist_ok=True)
        seeds = self.seeds(self.config.replicates[0], min(self.settings.batch_size, self.config.num_samples))
        labels = _labels(len(seeds), self.model)
        for method in tqdm([m for m in methods if m[0] in specs], desc="retime", unit="method",
                           disable=not self.progress):
            spec, fmt, weights = method
            run_model, policy = self.prepare(spec, weights)
            time_pair(self.model, policy, fmt, run_model, labels, seeds, self.settings)  # warm-up, as a quality pass
            path = self.out / "wall" / f"{method_slug(method)}.json"
            path.unlink(missing_ok=True)
            pair = lambda: time_pair(self.model, policy, fmt, run_model, labels, seeds, self.settings)  # noqa: E731
            wall = wall_record(path, pair, max(self.config.repeats, 2), len(seeds), seeds[0], self.run_id)
            print(spec, weights["weights"] if weights else "", f"{wall['wall_speedup']:.3f}", wall["wall_flag"])
        return write_table(self.out, self.config.num_samples, self.config.experiment)


def _labels(n: int, model):
    from cqpolicy.evaluation.evaluate import default_labels

    return default_labels(n, model.num_classes)


# ------------------------------------------------------------------------------------------------- wall
def load_1m() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def time_pair(model, policy, fmt, method_model, labels, seeds, settings) -> tuple[float, float]:
    """Wall seconds of the plain model, then of the method (on ``method_model``), sampling the same batch: a change
    in the machine's load between the two reaches both."""
    from cqpolicy.evaluation.cost import measured_sample

    plain = measured_sample(model, None, "none", labels, seeds, settings).wall_s
    return plain, measured_sample(method_model, policy, fmt, labels, seeds, settings).wall_s


def plain_reference(wall_dir: Path, batch_size: int, run_id: str) -> float | None:
    """The median plain time of every timing this process made so far at this batch size (None before two): a
    resumed bench may run on another day or machine, so earlier processes' times are no reference."""
    times = []
    for path in wall_dir.glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("run_id") == run_id and record.get("batch_size") == batch_size:
            times += record["plain_s"]
    return statistics.median(times) if len(times) >= 2 else None


def wall_record(path: Path, pair, repeats: int, batch_size: int, first_seed: int, run_id: str) -> dict:
    """The method's wall speedup, timed once and kept in ``path``: ``pair()`` (plain seconds, method seconds) until
    the last ``repeats`` (at least 2) pairs agree within ``WALL_SPREAD`` for both and each of their plain times lies
    within ``WALL_DRIFT`` of the run's median plain time (``plain_reference``); the ratio of those pairs' medians.
    After ``WALL_MAX_PAIRS`` pairs it is kept with ``wall_flag: load``."""
    if path.is_file():
        return json.loads(path.read_text())
    reference = plain_reference(path.parent, batch_size, run_id)
    window = max(2, repeats)
    plain_s, method_s, loads = [], [], []
    while True:  # the quality pass just warmed both up
        p, m = pair()
        plain_s.append(p)
        method_s.append(m)
        loads.append(load_1m())
        recent = (plain_s[-window:], method_s[-window:])
        settled = len(plain_s) >= window and all(max(t) <= WALL_SPREAD * min(t) for t in recent)
        steady = reference is None or all(abs(t / reference - 1) <= WALL_DRIFT for t in recent[0])
        if (settled and steady) or len(plain_s) >= WALL_MAX_PAIRS:
            break
    record = {"plain_s": plain_s, "method_s": method_s, "settled": settled, "pairs_used": len(recent[0]),
              "wall_speedup": statistics.median(recent[0]) / statistics.median(recent[1]),
              "plain_reference_s": reference, "wall_flag": "" if settled and steady else "load",
              "load_1m": loads[-1], "loads_1m": loads, "batch_size": batch_size, "first_seed": first_seed,
              "run_id": run_id}
    write_json(path, record)
    return record


# ------------------------------------------------------------------------------------------------ table
def row_role(row: dict) -> str:
    """A row's replicate role (rows from before roles were recorded: the role of their first seed)."""
    return row.get("role") or seed_roles.role_of(int(row["seed"])) or "?"


def write_table(out: Path, num_samples: int, experiment: str = EXPERIMENT) -> list[dict]:
    """``OUT/leaderboard.{md,csv}`` and ``OUT/pareto.png`` from every row on disk of ``num_samples`` per replicate
    (``experiment``: the MLflow experiment the rows were logged to); returns those rows."""
    import pandas as pd

    from cqpolicy.tracking.leaderboard import leaderboard, write_leaderboard

    out = Path(out)
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*/*.json"))]
    rows = [r for r in rows if r["num_samples"] == num_samples]
    if not rows:
        raise BenchError(f"no rows of {num_samples} samples in {out / 'rows'}")
    roles = sorted({row_role(r) for r in rows})
    if len(roles) > 1:
        raise BenchError(f"{out / 'rows'} holds rows of {' and '.join(roles)} replicates: one table scores one role")
    for row in rows:  # wall speedup is one measurement per method: a re-timed method's file wins
        wall = out / "wall" / f"{slug(row['policy'], row['cache_dtype'], row.get('weights_digest'))}.json"
        if row["family"] != "plain" and wall.is_file():
            record = json.loads(wall.read_text())
            row.update(wall_speedup=record["wall_speedup"], wall_flag=record.get("wall_flag", row.get("wall_flag")))
    df = pd.DataFrame(rows)
    df["method"] = df["policy_config"]
    df["experiment"] = experiment
    df["run_id"] = [f"{r['seed']}-{slug(r['policy'], r['cache_dtype'], r.get('weights_digest'))}" for r in rows]
    with main_writes() as mine:
        if mine:
            write_leaderboard(leaderboard(df), out, overwrite=True)
    return rows


def plain_matches(images_file: Path, row_file: Path) -> bool:
    """Whether the kept plain images are the ones the plain row scored (a run killed between writing the images
    and the row, or a row from another checkout, must not be paired with them)."""
    import numpy as np

    if not images_file.is_file() or not row_file.is_file():
        return False
    with np.load(images_file) as data:
        digest = hashlib.sha256(data["images"].tobytes()).hexdigest()
    return json.loads(row_file.read_text()).get("images_sha256") == digest


def write_json(path: Path, data) -> None:
    """Atomically, by rank 0 of a ``torchrun`` launch (every rank waits for it)."""
    with main_writes() as mine:
        if mine:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            os.replace(tmp, path)
