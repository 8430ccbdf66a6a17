"""``table``: a static step x block x unit compute table, as a Learning-to-Cache router exports it.

Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching (Ma et al., 2024).

The file is ``.safetensors`` (a uint8/bool tensor ``table`` of shape [steps, blocks, units] plus the metadata
entry ``units``, a JSON list of unit names such as ``["attn1", "ff"]``) or ``.json``
(``{"units": [...], "table": [[[1, 0], ...], ...]}``). 1 = compute, 0 = reuse. Nothing is ever unpickled.
Unit names are ``attn1``, ``ff``, ``block`` (``attn`` and ``mlp`` are read as ``attn1`` and ``ff``).

A table covers every block of the model it was made for, so its block count must equal the model's; its step
count must equal the sampler's (``StepMismatchError`` otherwise, as for ``schedule``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cqpolicy.policies.base import Policy, UnitQuery
from cqpolicy.policies.families.schedule import StaticSchedule, _atomic_write, parse_key
from cqpolicy.policies.registry import register

_SUFFIXES = (".safetensors", ".json")


def _check_units(units) -> tuple[str, ...]:
    if not isinstance(units, (list, tuple)) or not units or not all(isinstance(u, str) for u in units):
        raise ValueError("'units' must be a non-empty list of unit names (attn1, ff, block)")
    names = []
    for u in units:
        try:
            unit, block = parse_key(u)
        except ValueError:
            block = -1
        if block is not None:
            raise ValueError(f"unknown unit {u!r} in 'units'; choose from attn1, ff, block")
        names.append(unit)
    if len(set(names)) != len(names):
        raise ValueError(f"'units' names a unit twice: {list(units)}")
    return tuple(names)


def _check_table(table: torch.Tensor, units: tuple[str, ...]) -> torch.Tensor:
    if not torch.is_tensor(table):
        raise ValueError("the table must be a tensor")
    if table.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"the table must be uint8 or bool, got {table.dtype}")
    if table.ndim != 3 or min(table.shape) < 1:
        raise ValueError(f"the table must have shape [steps, blocks, units], got {list(table.shape)}")
    if table.shape[2] != len(units):
        raise ValueError(f"the table has {table.shape[2]} unit columns but 'units' names {len(units)}: {list(units)}")
    table = table.to(torch.uint8)
    if bool((table > 1).any()):
        raise ValueError("table entries must be 0 (reuse) or 1 (compute)")
    return table


def _read(path: Path) -> tuple[torch.Tensor, object]:
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(raw, dict) or set(raw) != {"units", "table"}:
            raise ValueError('expected a JSON object {"units": [...], "table": [[[0/1, ...], ...], ...]}')
        try:
            values = torch.tensor(raw["table"])
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("'table' must be a rectangular nested list [steps][blocks][units] of 0/1") from None
        if values.numel() == 0:
            raise ValueError("the table is empty")
        if values.dtype != torch.int64 or bool(((values != 0) & (values != 1)).any()):
            raise ValueError("table entries must be 0 (reuse) or 1 (compute)")
        return values.to(torch.uint8), raw["units"]
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if "table" not in f.keys():
                raise ValueError(f"no tensor named 'table' (found: {', '.join(f.keys()) or 'none'})")
            metadata = f.metadata() or {}
            table = f.get_tensor("table")
    except SafetensorError as exc:
        raise ValueError(f"not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if "units" not in metadata:
        raise ValueError("the safetensors metadata has no 'units' entry (a JSON list of unit names)")
    try:
        units = json.loads(metadata["units"])
    except json.JSONDecodeError:
        raise ValueError(f"the 'units' metadata is not a JSON list: {metadata['units']!r}") from None
    return table, units


def load_table(path: str | os.PathLike) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Read a table file: (uint8 tensor [steps, blocks, units], unit names)."""
    path = Path(path)
    try:
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"unsupported file type {path.suffix or '(none)'!r}; use .safetensors or .json "
                             f"(pickled files are never loaded)")
        if not path.is_file():
            raise ValueError("no such file")
        table, units = _read(path)
        units = _check_units(units)
        return _check_table(table, units), units
    except OSError as exc:
        raise ValueError(f"table {path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"table {path}: {exc}") from None


def save_table(table: torch.Tensor, units, path: str | os.PathLike) -> Path:
    """Write a [steps, blocks, units] 0/1 table as ``.safetensors`` or ``.json`` (by suffix), atomically."""
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"table {path}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use .safetensors or .json")
    if torch.is_tensor(table) and table.dtype not in (torch.bool, torch.uint8) \
            and not (table.is_floating_point() or table.is_complex()):
        # other integer dtypes (e.g. int64 from torch.tensor([[...]])) are fine when they hold only 0/1
        if bool(((table != 0) & (table != 1)).any()):
            raise ValueError(f"table {path}: entries must be 0 (reuse) or 1 (compute)")
        table = table.to(torch.uint8)
    try:
        units = _check_units(list(units))
        table = _check_table(table, units).cpu().contiguous()
    except ValueError as exc:
        raise ValueError(f"table {path}: {exc}") from None
    if path.suffix == ".json":
        data = json.dumps({"units": list(units), "table": table.tolist()}).encode()
    else:
        from safetensors.torch import save

        data = save({"table": table}, metadata={"units": json.dumps(list(units))})
    _atomic_write(path, data)
    return path


def table_schedule(table: torch.Tensor, units: tuple[str, ...]) -> dict:
    """The same decisions as a per-block schedule ``{(unit, block): entries}``."""
    return {(unit, b): tuple(int(v) for v in table[:, b, k]) for k, unit in enumerate(units)
            for b in range(table.shape[1])}


@dataclass(frozen=True)
class TableConfig:
    path: str = ""  # required: .safetensors (tensor 'table' [steps, blocks, units] + 'units' metadata) or .json


@register("table", TableConfig)
class TablePolicy(Policy):
    def __init__(self, config: TableConfig = TableConfig()):
        self.config = config
        # checked here, not in the config: spec_string builds a default config to compare against
        if not config.path:
            raise ValueError("policy 'table': path is required, e.g. table:path=router.safetensors")
        try:
            self.table, table_units = load_table(config.path)
        except ValueError as exc:
            raise ValueError(f"policy 'table': {exc}") from None
        self.num_steps, self.num_blocks = int(self.table.shape[0]), int(self.table.shape[1])
        self.static = StaticSchedule(table_schedule(self.table, table_units), "table", f"table {config.path}")
        self.units = self.static.units

    def _check_blocks(self, num_blocks: int) -> None:
        if num_blocks != self.num_blocks:
            raise ValueError(f"policy 'table': table {self.config.path} has {self.num_blocks} blocks but the model "
                             f"has {num_blocks}: it was made for another model")

    def prepare(self, model, settings) -> None:
        from cqpolicy.models.adapters import cache_blocks

        self.static.check_steps(settings.steps)
        self._check_blocks(len(cache_blocks(model.transformer)))

    def reset(self, num_steps: int | None, num_blocks: int) -> None:
        self._check_blocks(num_blocks)
        self.static.reset(num_steps, num_blocks)

    def decide(self, query: UnitQuery) -> bool:
        if query.num_blocks != self.num_blocks:
            self._check_blocks(query.num_blocks)
        return self.static.decide(query)
