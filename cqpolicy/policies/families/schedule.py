"""``schedule``: a static per-step compute/reuse schedule in SmoothCache's published JSON format.

SmoothCache: A Universal Inference Acceleration Technique for Diffusion Transformers (Liu et al., 2024).

A schedule file maps a unit key to one 0/1 entry per denoising step (1 = compute, 0 = reuse the cached
output). Accepted keys: ``attn1`` / ``ff`` (diffusers module names), ``attn`` / ``mlp`` (the original DiT
code's names, read as ``attn1`` / ``ff``), ``block`` (the whole block's residual), and per-block variants
``attn1-5``, ``ff-5``, ``attn-5``, ``mlp-5``, ``block-5`` that override the type-wide key for block 5 only.
A block with neither a per-block nor a type-wide key for a unit type computes that unit at every step.

A 0 at step 0 is accepted but behaves as 1: nothing is cached yet, so the runtime computes anyway.

A schedule only fits the step count it was made for: another count raises ``StepMismatchError`` in
``prepare`` and ``reset``, or (steps inferred inside an unmodified ``DiTPipeline``, where the count is
unknown) as soon as a step beyond the schedule's end is reached. A run *shorter* than the schedule
cannot be detected in that inferred mode, since nothing announces the end of such a call.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cqpolicy.models.adapters import UNIT_NAMES, cache_blocks
from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.registry import register
from cqpolicy.runtime.runtime import StepMismatchError

ScheduleKey = tuple[str, "int | None"]  # (unit, block); block None = every block without its own entry
Schedule = dict  # ScheduleKey -> tuple[int, ...], one 0/1 entry per step

_ALIASES = {"attn1": "attn1", "attn": "attn1", "ff": "ff", "mlp": "ff", "block": "block"}
_KEY = re.compile(r"^(attn1|attn|ff|mlp|block)(?:-(\d+))?$")


def parse_key(key: str) -> ScheduleKey:
    """``'mlp-5'`` -> ``('ff', 5)``; ``'attn'`` -> ``('attn1', None)``."""
    match = _KEY.match(key) if isinstance(key, str) else None
    if match is None:
        raise ValueError(f"unknown schedule key {key!r}; accepted: attn1, ff, attn, mlp, block, "
                         f"each optionally with -<block index> (e.g. attn1-5)")
    block = match.group(2)
    return _ALIASES[match.group(1)], (int(block) if block is not None else None)


def format_key(key: ScheduleKey) -> str:
    unit, block = key
    return unit if block is None else f"{unit}-{block}"


def _check_entries(key_name: str, values) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"schedule entry {key_name!r} must be a non-empty list of 0/1 per step")
    for v in values:
        # bools are ints in Python; the format is 0/1, so refuse true/false as well as 2, 0.5, "1"
        if type(v) is not int or v not in (0, 1):
            raise ValueError(f"schedule entry {key_name!r} holds {v!r}; entries must be 0 (reuse) or 1 (compute)")
    return tuple(values)


def normalize_schedule(raw: dict) -> Schedule:
    """Published-format dict (string keys) or a ``Schedule`` -> a validated ``Schedule``."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("a schedule must be a non-empty JSON object mapping unit keys to 0/1 lists")
    schedule: Schedule = {}
    origin: dict = {}
    for name, values in raw.items():
        key = parse_key(name) if isinstance(name, str) else name
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in UNIT_NAMES
                and (key[1] is None or (type(key[1]) is int and key[1] >= 0))):
            raise ValueError(f"unknown schedule key {name!r}; expected (unit, block or None)")
        label = name if isinstance(name, str) else format_key(key)
        if key in schedule:
            raise ValueError(f"schedule keys {origin[key]!r} and {label!r} both set {format_key(key)}")
        schedule[key] = _check_entries(label, values)
        origin[key] = label
    lengths = {len(v) for v in schedule.values()}
    if len(lengths) > 1:
        detail = ", ".join(f"{origin[k]}={len(v)}" for k, v in schedule.items())
        raise ValueError(f"schedule lists have different lengths ({detail}); one entry per step is required")
    return schedule


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def load_schedule(path: str | os.PathLike) -> Schedule:
    """Read a published SmoothCache schedule: ``{(unit, block or None): (0/1, ...)}``, keys normalised."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read schedule {path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(f"schedule {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except ValueError as exc:
        raise ValueError(f"schedule {path}: {exc}") from None
    try:
        return normalize_schedule(raw)
    except ValueError as exc:
        raise ValueError(f"schedule {path}: {exc}") from None


def schedule_length(schedule: Schedule) -> int:
    return len(next(iter(schedule.values())))


def schedule_units(schedule: Schedule) -> tuple[str, ...]:
    present = {unit for unit, _ in schedule}
    return tuple(u for u in UNIT_NAMES if u in present)


def check_blocks(schedule: Schedule, num_blocks: int) -> None:
    too_far = sorted({b for _, b in schedule if b is not None and b >= num_blocks})
    if too_far:
        raise ValueError(f"the schedule names block {too_far[-1]} but the model has {num_blocks} blocks "
                         f"(indices 0..{num_blocks - 1}): it was made for another model")


def resolve(schedule: Schedule, num_blocks: int) -> dict:
    """``{(block, unit): entries or None}``: a per-block key overrides its type-wide key; None = always compute."""
    check_blocks(schedule, num_blocks)
    return {(b, unit): schedule.get((unit, b), schedule.get((unit, None)))
            for unit in schedule_units(schedule) for b in range(num_blocks)}


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a sibling temporary file, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_dict(schedule: Schedule | dict, num_blocks: int | None = None) -> dict[str, list[int]]:
    """The published form with diffusers keys: a type-wide key per unit, per-block keys only where blocks differ.

    With ``num_blocks`` the most common per-block list becomes the type-wide key (blocks without any entry
    count as computing every step); without it the schedule's own type-wide keys are kept.
    """
    schedule = normalize_schedule(schedule)
    length = schedule_length(schedule)
    out: dict[str, list[int]] = {}
    for unit in schedule_units(schedule):
        shared = schedule.get((unit, None))
        own = {b: v for (u, b), v in schedule.items() if u == unit and b is not None}
        if num_blocks is not None:
            check_blocks(schedule, num_blocks)
            every = {b: own.get(b, shared) or (1,) * length for b in range(num_blocks)}
            shared = Counter(every.values()).most_common(1)[0][0]
            own = every
        own = {b: v for b, v in own.items() if v != shared}  # a per-block key equal to the shared one adds nothing
        if shared is not None:
            out[unit] = list(shared)
        for b in sorted(own):
            out[f"{unit}-{b}"] = list(own[b])
    return out


def save_schedule(schedule: Schedule | dict, path: str | os.PathLike, num_blocks: int | None = None) -> Path:
    """Write ``schedule`` in SmoothCache's published JSON layout (diffusers keys), atomically."""
    out = export_dict(schedule, num_blocks)
    lines = [f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in out.items()]
    path = Path(path)
    _atomic_write(path, ("{\n" + ",\n".join(lines) + "\n}\n").encode())
    return path


class StaticSchedule:
    """Decisions from a validated schedule; shared by ``schedule``, ``table`` and ``smoothcache``."""

    def __init__(self, schedule: Schedule, owner: str, source: str):
        self.schedule = normalize_schedule(schedule)
        self.owner = owner  # policy name, for messages
        self.source = source  # where the schedule came from, for messages
        self.length = schedule_length(self.schedule)
        self.units = schedule_units(self.schedule)
        self._resolved: dict | None = None
        self._num_blocks: int | None = None

    def _fail(self, text: str):
        return f"policy {self.owner!r}: {text}"

    def check_steps(self, num_steps: int | None) -> None:
        if num_steps is not None and int(num_steps) != self.length:
            raise StepMismatchError(self._fail(
                f"{self.source} has {self.length} steps but sampling uses {num_steps}; a schedule only fits "
                f"the step count it was made for"))

    def check_blocks(self, num_blocks: int) -> None:
        try:
            check_blocks(self.schedule, num_blocks)
        except ValueError as exc:
            raise ValueError(self._fail(f"{self.source}: {exc}")) from None

    def prepare(self, model, settings) -> None:
        self.check_steps(settings.steps)
        self.check_blocks(len(cache_blocks(model.transformer)))

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self.check_steps(num_steps)
        if self._num_blocks != num_blocks:
            self.check_blocks(num_blocks)
            self._resolved, self._num_blocks = resolve(self.schedule, num_blocks), num_blocks

    def decide(self, query: UnitQuery) -> bool:
        if query.step >= self.length:
            # inferred steps (num_steps None): the call is longer than the schedule
            raise StepMismatchError(self._fail(
                f"{self.source} has {self.length} steps but sampling reached step {query.step + 1}; a schedule "
                f"only fits the step count it was made for"))
        if self._num_blocks != query.num_blocks:  # decide without reset (direct use): resolve now
            self.reset(None, query.num_blocks)
        entries = self._resolved.get((query.block, query.unit))
        return True if entries is None else bool(entries[query.step])


@dataclass(frozen=True)
class ScheduleConfig:
    path: str = ""  # required: a SmoothCache schedule JSON (keys attn1/ff/attn/mlp/block[-<block>], 0/1 per step)


@register("schedule", ScheduleConfig)
class SchedulePolicy(Policy):
    static = True

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        # the path is checked here, not in the config: spec_string builds a default config to compare against
        if not config.path:
            raise ValueError("policy 'schedule': path is required, e.g. schedule:path=schedule.json")
        try:
            schedule = load_schedule(config.path)
        except ValueError as exc:
            raise ValueError(f"policy 'schedule': {exc}") from None
        self.static = StaticSchedule(schedule, "schedule", f"schedule {config.path}")
        self.units = self.static.units

    @property
    def schedule(self) -> Schedule:
        return self.static.schedule

    def prepare(self, model, settings) -> None:
        self.static.prepare(model, settings)

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self.static.reset(num_steps, num_blocks)

    def decide(self, query: UnitQuery) -> bool:
        return self.static.decide(query)
