"""The main job's config (``cqpolicy run``), typed: one dataclass per stage, its defaults in one place, parsed once.

A YAML file maps onto ``RunConfig``; every section and key is checked (an unknown one is a one-line error naming
the file), values are converted to the field's type, and what a file leaves out takes the dataclass default here.
``quick:`` holds overrides for ``--quick`` (merged section by section before parsing).

Configs ship inside the package (``cqpolicy/configs/``, also reachable as ``configs/`` from the repository root):
``resolve_config("fmnist-unet")`` finds a packaged one by name, so ``cqpolicy run fmnist-unet`` works from any
folder; a path to a file works too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cqpolicy import defaults

PACKAGED = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run (one line)."""


@dataclass(frozen=True)
class TraceConfig:
    num_samples: int = 32  # traced samples (x2 CFG rows)
    batch_size: int = 16
    probes: str = "local"  # ','-joined: local, downstream, chain


@dataclass(frozen=True)
class GatesConfig:
    budget_range: tuple[float, float] = defaults.GATES_BUDGET_RANGE
    train_samples: int = 128
    val_samples: int = 32
    batch_size: int = 8
    max_epochs: int = 10
    max_minutes: float | None = None
    bench_budgets: tuple[float, ...] = (0.5, 0.33, 0.25, 0.2)  # ~2x, 3x, 4x, 5x MACs


@dataclass(frozen=True)
class ForecastFitConfig:
    schedules: tuple[str, ...] = ("fora:interval=3",)  # the static schedules forecasts are fitted to (one each)
    order: int = 3  # computed outputs each forecast weighs
    samples: int = 64  # uncached calibration samples of the fit (``cqpolicy train forecast``)
    val_samples: int = 32  # held out: the fit's validation error
    batch_size: int = 32


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 15  # the MLP
    scheduler_epochs: int = 40
    compute_budget: float = 0.4  # layer scheduler: share of units that compute
    max_reuse: int = 2  # cap on consecutive reuses: retrain traces and the benched scheduler
    interval_budgets: tuple[float, ...] = (0.2, 0.3)  # phase-locked interval fits: share that computes
    label: str = "auto"
    seed: int = 0
    gates: GatesConfig | None = None  # trained through the sampler when given
    forecast: ForecastFitConfig | None = None  # linear forecasts fitted on uncached runs when given


@dataclass(frozen=True)
class SearchConfig:
    n_trials: int = 12
    num_samples: int = 64
    batch_size: int = 64
    threshold_factor: tuple[float, float] = (0.05, 20.0)  # x the artifact's default threshold (log scale)
    max_reuse: tuple[int, int] = (1, 4)
    cache_dtypes: tuple[str, ...] = ("fp16", "int8")
    proxy: bool = False
    min_psnr: float | None = None


@dataclass(frozen=True)
class BenchConfig:
    num_samples: int = defaults.NUM_SAMPLES  # per test replicate
    seeds: tuple[int, ...] = (0, 1, 2)  # test replicates
    batch_size: int = defaults.BATCH_SIZE
    repeats: int = 0  # timing pairs per method (0: wall time from the quality passes)
    max_pareto: int = 3  # study Pareto points benched
    baselines: tuple[str, ...] = ("fora:interval=2",)


@dataclass(frozen=True)
class RunConfig:
    model: str = defaults.MODEL
    steps: int = defaults.STEPS
    guidance_scale: float | None = None  # None: the model's default
    prompts: str | None = None  # text-conditioned models: a prompt file (sample i: line i mod lines); None: the
    #   embedded model's training prompts (a diffusers SD3 / PixArt / FLUX folder needs one); relative paths are
    #   read from the working directory, else from the config's folder
    negative_prompt: str = ""  # the unconditional branch
    retrain: bool = False  # trace under the learned policy and retrain on both runs
    seeds: dict = field(default_factory=dict)  # role -> first seed, for the movable roles (SEED_KEYS)
    trace: TraceConfig = TraceConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    bench: BenchConfig = BenchConfig()
    source: str = "<defaults>"


SECTIONS = {"trace": TraceConfig, "train": TrainConfig, "search": SearchConfig, "bench": BenchConfig,
            "gates": GatesConfig, "forecast": ForecastFitConfig}


def _convert(value, annotation: str, where: str):
    """``value`` as the field's type (annotations are strings: ``from __future__ import annotations``)."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    try:
        if base.startswith("tuple"):
            items = value if isinstance(value, (list, tuple)) else [value]
            kind = base[len("tuple["):].split(",")[0].strip().rstrip("]")
            return tuple(_convert(v, kind, where) for v in items)
        if base == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): int(v) for k, v in value.items()}
        if base in ("int", "float") and isinstance(value, bool) or base == "int" and isinstance(value, float) \
                and not value.is_integer():
            raise ValueError
        return {"int": int, "float": float, "str": str}[base](value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {base}, got {value!r}") from None


def _build(cls, values, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        annotation = str(fields[name].type)
        section = SECTIONS.get(name)
        if section is not None:
            kwargs[name] = None if value is None and "None" in annotation else _build(section, value,
                                                                                      f"{where} {name}")
        else:
            kwargs[name] = _convert(value, annotation, f"{where} {name}")
    return cls(**kwargs)


def parse_run_config(mapping, source: str = "<config>", quick: bool = False) -> RunConfig:
    """A ``RunConfig`` from a YAML mapping (``quick``: with its ``quick:`` overrides merged in)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: a run config is a YAML mapping")
    mapping = dict(mapping)
    overrides = mapping.pop("quick", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: quick must be a mapping of overrides")
    if quick:
        for section, values in overrides.items():
            base = mapping.get(section)
            mapping[section] = {**(base or {}), **values} if isinstance(values, dict) else values
    else:  # the overrides are checked all the same: a typo there must not wait for the first --quick run
        _build(RunConfig, {**mapping, **{k: {**(mapping.get(k) or {}), **v} if isinstance(v, dict) else v
                                         for k, v in overrides.items()}}, source)
    config = _build(RunConfig, mapping, source)
    prompts = config.prompts
    if prompts is not None and not Path(prompts).is_absolute() and not Path(prompts).exists() \
            and (Path(source).parent / prompts).exists():
        prompts = str(Path(source).parent / prompts)
    return dataclasses.replace(config, source=source, prompts=prompts)


def packaged_configs() -> list[str]:
    """Names of the packaged run and bench configs (``fmnist-dit``, ``fmnist-unet-paper``, ...)."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def resolve_config(spec: str | Path) -> Path:
    """A config file: ``spec`` itself when it is a file, else the packaged config of that name."""
    path = Path(spec)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.name.removesuffix('.yaml')}.yaml"
    if packaged.is_file() and (path.parent == Path(".") or path.parent.name == "configs"):
        return packaged
    raise ConfigError(f"config {spec} not found: give a YAML file or a packaged config "
                      f"({', '.join(packaged_configs())})")


def load_run_config(spec: str | Path, quick: bool = False) -> RunConfig:
    from cqpolicy.outputs import read_yaml

    path = resolve_config(spec)
    return parse_run_config(read_yaml(path, ConfigError, "run config"), str(path), quick)


def as_dict(config) -> dict:
    """A config as plain data (for logs and ``done.json``)."""
    return dataclasses.asdict(config)


__all__ = ["BenchConfig", "ConfigError", "ForecastFitConfig", "GatesConfig", "RunConfig", "SearchConfig", "TraceConfig", "TrainConfig",
           "load_run_config", "packaged_configs", "parse_run_config", "resolve_config"]
