"""Search spaces in YAML: which policy families, which of their parameters, which cache formats.

```yaml
model: fmnist-dit
steps: 50
num_samples: 128          # samples per trial (FID / PSNR over them)
batch_size: 64
seed: 30000000            # first sample seed: the search role's (cqpolicy/seeds.py); test seeds are refused
sampler: tpe              # tpe (default) or nsga2
population: 50            # nsga2: trials per generation (the first generation is random)
objectives: [macs_speedup, fid]   # any of macs_speedup, wall_speedup (max), fid, model_bytes (min)
proxy: false              # true: paired PSNR against the uncached images replaces FID (cheap, early trials)
min_psnr: 15.0            # quality constraint (trial.set_constraint): PSNR vs uncached must reach this
quick: {steps: 8, num_samples: 8, batch_size: 8}
cache:
  dtype: [fp16, int8, int4]       # cached-tensor formats
  granularity: [tensor, token]    # scale granularity of the integer formats
weights:                          # optional: fp (the model as is) or folders `cqpolicy quantize` made of it
  choices: [fp, out/q/dit-int8]
families:
  fora:
    interval: {int: [2, 6]}
  teacache:
    threshold: {float: [0.02, 0.6], log: true}
  learned:
    path: {fixed: out/policy}
    threshold: {float: [1.0e-4, 0.3], log: true}
```

With a ``forecast`` section every trial fits a linear forecast (``train forecast``) to the static schedule it drew,
on calibration seeds, and scores the forecast on the search seeds: schedule and forecast searched together. Only
static families (every sample the same decisions: fora, phased, schedule, deepcache, smoothcache, dps, recat, tgate)
can carry one:

```yaml
sampler: nsga2
forecast: {order: 3, samples: 32, val_samples: 8, batch_size: 32, affine: false}
families:
  phased:
    early: {int: [2, 5]}
    late: {int: [2, 7]}
    split: {float: [0.2, 0.8]}
    warmup: {int: [0, 4]}
```

A parameter is ``{int: [low, high]}``, ``{float: [low, high], log: bool}``, ``{choices: [...]}`` or
``{fixed: value}``. Everything is validated (families, parameter names, ranges, formats, weights folders: they
exist, load and were quantized from the space's model) before any trial.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cqpolicy import seeds as seed_roles


OBJECTIVES = {"macs_speedup": "maximize", "wall_speedup": "maximize", "fid": "minimize", "model_bytes": "minimize"}
FP_WEIGHTS = "fp"  # the weights choice of the unquantized model
SAMPLERS = ("tpe", "nsga2")
_TOP_KEYS = {"model", "steps", "num_samples", "batch_size", "seed", "sampler", "population", "objectives",
             "proxy", "min_psnr", "quick", "cache", "families", "guidance_scale", "scheduler", "weights", "prompts",
             "resolution", "forecast"}
FORECAST_KEYS = {"order": 3, "samples": 32, "val_samples": 8, "batch_size": 32, "affine": False}


class SpaceError(ValueError):
    """A search-space file that cannot be searched (one line)."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # int, float, choices, fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    value: object = None


@dataclass
class SearchSpace:
    families: dict[str, list[Param]]
    cache_dtypes: tuple[str, ...] = ("fp16",)
    granularities: tuple[str, ...] = ("tensor",)
    weights: tuple[str, ...] = (FP_WEIGHTS,)  # "fp" or quantized model folders
    model: str = "fmnist-dit"
    steps: int = 50
    num_samples: int = 128
    batch_size: int = 64
    seed: int = 0
    sampler: str = "tpe"
    population: int = 50  # nsga2's generation size
    objectives: tuple[str, ...] = ("macs_speedup", "fid")
    proxy: bool = False
    min_psnr: float | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None  # None: the model's own (flow for SD3 / FLUX)
    prompts: str | None = None  # text-conditioned models: a prompt file or embeddings (.safetensors)
    resolution: int | None = None
    forecast: dict | None = None  # fit settings (FORECAST_KEYS) when each trial's schedule carries a fitted forecast
    quick: dict = field(default_factory=dict)
    source: str = ""

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def shrink(self) -> "SearchSpace":
        """The ``--quick`` variant: fewer steps and samples (for tests and first contact)."""
        quick = {"steps": 8, "num_samples": 8, "batch_size": 8, **self.quick}
        if self.forecast is not None:
            quick["forecast"] = {**self.forecast, "samples": 4, "val_samples": 2, "batch_size": 4,
                                 **(self.quick.get("forecast") or {})}
        return dataclasses.replace(self, **quick)


def _param(family: str, name: str, spec) -> Param:
    where = f"family {family!r} parameter {name!r}"
    if not isinstance(spec, dict) or len(set(spec) & {"int", "float", "choices", "fixed"}) != 1:
        raise SpaceError(f"{where}: expected one of {{int: [lo, hi]}}, {{float: [lo, hi]}}, {{choices: [...]}}, "
                         f"{{fixed: value}}, got {spec!r}")
    if "fixed" in spec:
        return Param(name, "fixed", value=spec["fixed"])
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        return Param(name, "choices", choices=tuple(choices))
    kind = "int" if "int" in spec else "float"
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)):
        raise SpaceError(f"{where}: {kind} range must be [low, high], got {bounds!r}")
    low, high = bounds
    if low > high or (kind == "float" and low == high):
        raise SpaceError(f"{where}: empty range [{low}, {high}]")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0, got {low}")
    return Param(name, kind, low=low, high=high, log=log)


def _example_value(p: Param):
    return {"fixed": p.value, "choices": p.choices[0] if p.choices else None,
            "int": int(p.low) if p.low is not None else None, "float": p.low}[p.kind]


def parse_space(data: dict, source: str = "") -> SearchSpace:
    from cqpolicy.policies import make_config
    from cqpolicy.runtime.cache_store import CACHE_DTYPES, GRANULARITIES

    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space is a YAML mapping")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SpaceError(f"{source}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_TOP_KEYS))}")
    raw_families = data.get("families")
    if not isinstance(raw_families, dict) or not raw_families:
        raise SpaceError(f"{source}: 'families' must map at least one policy family to its parameters")
    families = {}
    for family, params in raw_families.items():
        params = params or {}
        if not isinstance(params, dict):
            raise SpaceError(f"{source}: family {family!r} must map parameter names to ranges")
        parsed = [_param(family, name, spec) for name, spec in params.items()]
        try:  # unknown family or parameter, or a value the family refuses: before any trial runs
            make_config(family, {p.name: _example_value(p) for p in parsed})
        except ValueError as exc:
            raise SpaceError(f"{source}: {exc}") from None
        families[family] = parsed
    cache = data.get("cache") or {}
    dtypes = tuple(cache.get("dtype", ["fp16"]))
    granularities = tuple(cache.get("granularity", ["tensor"]))
    bad = [d for d in dtypes if d not in CACHE_DTYPES] + [g for g in granularities if g not in GRANULARITIES]
    if bad or not dtypes or not granularities:
        raise SpaceError(f"{source}: cache formats must come from dtype {CACHE_DTYPES} and granularity "
                         f"{GRANULARITIES}, got {bad[0] if bad else 'an empty list'!r}")
    objectives = tuple(data.get("objectives", ["macs_speedup", "fid"]))
    if not objectives or any(o not in OBJECTIVES for o in objectives) or len(set(objectives)) != len(objectives):
        raise SpaceError(f"{source}: objectives must be distinct names from {', '.join(OBJECTIVES)}")
    weights = _weights_choices(data.get("weights", {"choices": [FP_WEIGHTS]}), source)
    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpaceError(f"{source}: unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    space = SearchSpace(families=families, cache_dtypes=dtypes, granularities=granularities, weights=weights,
                        model=str(data.get("model", "fmnist-dit")), steps=int(data.get("steps", 50)),
                        num_samples=int(data.get("num_samples", 128)), batch_size=int(data.get("batch_size", 64)),
                        seed=int(data.get("seed", seed_roles.start("search"))),
                        sampler=sampler, population=int(data.get("population", 50)), objectives=objectives,
                        proxy=bool(data.get("proxy", False)), min_psnr=data.get("min_psnr"),
                        guidance_scale=data.get("guidance_scale"), scheduler=data.get("scheduler"),
                        prompts=data.get("prompts"), resolution=data.get("resolution"),
                        forecast=_forecast_settings(data.get("forecast"), families, source),
                        quick=dict(data.get("quick") or {}), source=source)
    for name in ("steps", "num_samples", "batch_size", "population"):
        if getattr(space, name) < (2 if name == "population" else 1):
            raise SpaceError(f"{source}: {name} must be at least {2 if name == 'population' else 1}")
    try:  # trials choose settings: they must never see the bench's samples
        seed_roles.check_disjoint({"search": [(space.seed, space.num_samples)]})
    except seed_roles.SeedOverlapError as exc:
        raise SpaceError(f"{source}: {exc}; search seeds start at {seed_roles.start('search')}") from None
    _check_weights(space)
    return space


def _forecast_settings(spec, families: dict, source: str) -> dict | None:
    """The ``forecast`` section with its defaults; every family must be static (a forecast is fitted per cell)."""
    from cqpolicy.policies.registry import policy_class

    if spec is None:
        return None
    if spec is True:
        spec = {}
    unknown = sorted(set(spec) - set(FORECAST_KEYS)) if isinstance(spec, dict) else ["(not a mapping)"]
    if unknown:
        raise SpaceError(f"{source}: forecast: unknown key {unknown[0]!r}; known: {', '.join(FORECAST_KEYS)}")
    dynamic = [f for f in families if not policy_class(f).static]
    if dynamic:
        raise SpaceError(f"{source}: family {dynamic[0]!r} decides per sample or per run: a fitted forecast needs a "
                         f"static schedule (fora, phased, schedule, deepcache, smoothcache, dps, recat, tgate)")
    settings = {**FORECAST_KEYS, **spec}
    for key in ("order", "samples", "val_samples", "batch_size"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1:
            raise SpaceError(f"{source}: forecast: {key} must be a positive int, got {settings[key]!r}")
    return settings


def _weights_choices(spec, source: str) -> tuple[str, ...]:
    choices = spec.get("choices") if isinstance(spec, dict) and set(spec) == {"choices"} else None
    if not isinstance(choices, list) or not choices or len(set(map(str, choices))) != len(choices):
        raise SpaceError(f"{source}: weights must be {{choices: [fp, DIR, ...]}} with distinct entries, got {spec!r}")
    return tuple(str(c) for c in choices)


def _check_weights(space: SearchSpace) -> None:
    """Each quantized choice exists, loads and was quantized from the space's model (before any trial)."""
    folders = [w for w in space.weights if w != FP_WEIGHTS]
    if not folders:
        return
    from cqpolicy.models import load_model
    from cqpolicy.models.fingerprint import model_fingerprint
    from cqpolicy.quantization import weights_info

    try:
        fingerprint = model_fingerprint(load_model(space.model, resolution=space.resolution))
        for folder in folders:
            weights_info(folder, fingerprint)
            load_model(folder)  # a damaged folder fails here, not in a trial
    except ValueError as exc:
        raise SpaceError(f"{space.source}: weights: {exc}") from None


def load_space(path: str | Path) -> SearchSpace:
    from cqpolicy.outputs import read_yaml

    return parse_space(read_yaml(path, SpaceError, "search space"), str(path))


def suggest(trial, space: SearchSpace) -> tuple[str, str]:
    """Draw one configuration: the policy spec string and the cache format string."""
    names = sorted(space.families)
    family = trial.suggest_categorical("family", names) if len(names) > 1 else names[0]
    values = []
    for p in space.families[family]:
        key = f"{family}.{p.name}"
        if p.kind == "fixed":
            value = p.value
        elif p.kind == "choices":
            value = trial.suggest_categorical(key, list(p.choices))
        elif p.kind == "int":
            value = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            value = trial.suggest_float(key, float(p.low), float(p.high), log=p.log)
        values.append(f"{p.name}={value}")
    dtype = trial.suggest_categorical("cache_dtype", list(space.cache_dtypes)) \
        if len(space.cache_dtypes) > 1 else space.cache_dtypes[0]
    granularity = "tensor"
    if dtype.startswith("int"):
        granularity = trial.suggest_categorical("granularity", list(space.granularities)) \
            if len(space.granularities) > 1 else space.granularities[0]
    spec = family + (":" + ",".join(values) if values else "")
    return spec, dtype if granularity == "tensor" else f"{dtype}-{granularity}"


def suggest_weights(trial, space: SearchSpace) -> str:
    """Draw the weights the trial's policy runs on: ``fp`` or a quantized model folder."""
    return trial.suggest_categorical("weights", list(space.weights)) if len(space.weights) > 1 else space.weights[0]
