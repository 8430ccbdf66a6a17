"""Exact, resumable, validated storage of per-layer traces: one folder per run, one parquet shard per seed batch.

A trace row is keyed by ``(seed, cfg_branch, step, block, unit)`` and carries signals (float columns) and
labels. Layout of one run folder ``traces/<run>/``::

    manifest.json                       what produced the run (RunInfo), the column types, versions
    shard-<first_seed>-<last_seed>.parquet   ALL rows of the contiguous seeds first..last (one sampling batch)

Shards are published atomically (temporary dot-file in the same folder, fsync, then a no-clobber link into
place), so a killed writer leaves only a ``.*.tmp`` file that readers ignore; a re-opened writer resumes by
skipping ``done_seeds()``. Every shard footer repeats ``schema_version``, ``model_hash``, ``steps`` and its
seed range, so a shard copied into the wrong folder is caught. Readers refuse anything they cannot trust:
other schema versions, runs of different models or step counts, corrupt shards and duplicate keys.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

SCHEMA_VERSION = 3  # 2: downstream_rel column; 3: impact_stale_2..8 chain labels
KEY_COLUMNS = ("seed", "cfg_branch", "step", "block", "unit")
KEY_TYPES = {"seed": pa.int64(), "cfg_branch": pa.int8(), "step": pa.int16(), "block": pa.int16(),
             "unit": pa.string()}
MANIFEST_NAME = "manifest.json"

__all__ = ["SCHEMA_VERSION", "KEY_COLUMNS", "KEY_TYPES", "MANIFEST_NAME", "TraceError", "RunInfo", "TraceWriter",
           "TraceReader"]

_SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)\.parquet$")
# Temporaries are named ``.<target>~<pid>@<host>~<token>.tmp`` so a cleaner can tell a live writer from a dead one.
_TMP_RE = re.compile(r"^\.(?P<target>.+)~(?P<pid>\d+)@(?P<host>[^~]+)~(?P<token>[0-9a-f]+)\.tmp$")
# RunInfo fields that identify a run; ``extra`` is free-form and not compared.
_IDENTITY_FIELDS = ("model_id", "model_hash", "scheduler", "steps", "guidance_scale", "policy")
# Manifest keys the store relies on: ``extra`` may not shadow them. ``package_version`` and ``created`` are
# informational, so ``extra`` may set them (e.g. a caller recording its own version string).
_RESERVED_KEYS = frozenset(("schema_version", *_IDENTITY_FIELDS, "columns", "label_columns"))
_INFO_KEYS = frozenset(("package_version", "created"))
# Temporaries this process is writing right now; remove_stale_temporaries must never delete them.
_LIVE_TEMPS: set[str] = set()
_LIVE_LOCK = threading.Lock()


class TraceError(ValueError):
    """One-line, user-facing problems with a trace folder (wrong run, corrupt shard, duplicate rows, ...)."""


@dataclass(frozen=True)
class RunInfo:
    """What identifies a run; two writers into one folder must agree on all of it except ``extra``.

    ``extra`` keys are stored at the top level of the manifest (e.g. ``{"num_classes": 10}``), so they
    must be JSON-serialisable and must not shadow a key the store relies on (``package_version`` and
    ``created`` may be overridden; ``from_manifest`` leaves them out of ``extra``).
    """

    model_id: str
    model_hash: str
    scheduler: str
    steps: int
    guidance_scale: float
    policy: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model_id", "model_hash", "scheduler", "policy"):
            if not isinstance(getattr(self, name), str):
                raise TraceError(f"RunInfo.{name} must be a str, got {getattr(self, name)!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise TraceError(f"RunInfo.steps must be a positive int, got {self.steps!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not math.isfinite(self.guidance_scale):
            raise TraceError(f"RunInfo.guidance_scale must be a finite number, got {self.guidance_scale!r}")
        # Store a float so 4 and 4.0 compare (and serialise) alike.
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        clash = sorted(_RESERVED_KEYS.intersection(self.extra))
        if clash:
            raise TraceError(f"RunInfo.extra may not use manifest keys: {', '.join(clash)}")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TraceError(f"RunInfo.extra must be JSON-serialisable: {err}") from None

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> "RunInfo":
        """Rebuild the RunInfo a manifest was written from (unknown keys go to ``extra``)."""
        extra = {k: v for k, v in manifest.items() if k not in _RESERVED_KEYS | _INFO_KEYS}
        return cls(**{k: manifest[k] for k in _IDENTITY_FIELDS}, extra=extra)


# ----------------------------------------------------------------------------------------------- helpers

def _columns_of(schema: pa.Schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _describe_column_change(have: Mapping[str, str], want: Mapping[str, str]) -> str:
    """Short human description of how two column maps differ (missing / extra / retyped / reordered)."""
    parts = []
    if missing := [c for c in want if c not in have]:
        parts.append("missing " + ", ".join(missing))
    if added := [c for c in have if c not in want]:
        parts.append("extra " + ", ".join(added))
    if retyped := [f"{c} {have[c]} != {want[c]}" for c in want if c in have and have[c] != want[c]]:
        parts.append("types " + ", ".join(retyped))
    return "; ".join(parts) or "column order differs"


def _check_key_schema(schema: pa.Schema, where: str) -> None:
    for name, typ in KEY_TYPES.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise TraceError(f"{where} lacks key column {name!r} (keys are {', '.join(KEY_COLUMNS)})")
        if schema.field(idx).type != typ:
            raise TraceError(f"{where}: key column {name!r} must be {typ}, got {schema.field(idx).type}")


from cqpolicy.outputs import fsync_dir as _fsync_dir, read_json  # noqa: E402


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}~{os.getpid()}@{socket.gethostname()}~{secrets.token_hex(4)}.tmp")


def _publish_no_clobber(tmp: Path, final: Path) -> bool:
    """Move ``tmp`` to ``final`` atomically unless ``final`` exists; False if it did (tmp is then left alone).

    A hard link is atomic *and* refuses to replace, so two writers can never clobber each other. On
    filesystems without hard links we fall back to check-then-``os.replace``, which has a tiny race window.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError:
        if final.exists():
            return False
        os.replace(tmp, final)
        return True
    tmp.unlink()
    return True


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _shard_range(path: Path) -> tuple[int, int] | None:
    m = _SHARD_RE.match(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _list_shards(run_dir: Path) -> list[tuple[int, int, Path]]:
    """Published shards of a run, by first seed; temporaries and other files are not shards."""
    shards = []
    for p in run_dir.iterdir():
        rng = _shard_range(p)
        if rng is not None and p.is_file():
            shards.append((*rng, p))
    return sorted(shards)


def _load_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST_NAME
    manifest = read_json(path, TraceError, f"{run_dir} is not a trace run (no {MANIFEST_NAME})")
    if not isinstance(manifest, dict):
        raise TraceError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(f"{run_dir} holds trace schema_version {version}, this cqpolicy reads "
                         f"schema_version {SCHEMA_VERSION}")
    missing = [k for k in (*_IDENTITY_FIELDS, "columns", "label_columns") if k not in manifest]
    if missing:
        raise TraceError(f"{path} lacks {', '.join(missing)}")
    return manifest


def _check_shard_footer(path: Path, manifest: Mapping, run_name: str) -> tuple[int, int]:
    """Read only the footer of a published shard and check it belongs to this run; returns its seed range."""
    first, last = _shard_range(path)
    try:
        md = pq.read_metadata(path)
        schema = md.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise TraceError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it to "
                         f"re-record seeds {first}-{last}") from None
    kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    expected = {"schema_version": str(SCHEMA_VERSION), "model_hash": str(manifest["model_hash"]),
                "steps": str(manifest["steps"]), "first_seed": str(first), "last_seed": str(last)}
    for key, want in expected.items():
        if kv.get(key) != want:
            raise TraceError(f"{path} disagrees with {run_name}: {key} {kv.get(key)} != {want}")
    columns = _columns_of(schema.remove_metadata())
    if columns != manifest["columns"]:
        raise TraceError(f"{path} columns disagree with {run_name}'s manifest: "
                         f"{_describe_column_change(columns, manifest['columns'])}")
    return first, last


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    # Arrow hands out read-only zero-copy views; torch must not alias memory it could write to.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _is_stale(tmp: Path, max_foreign_age_s: float) -> bool:
    """Whether a temporary belongs to a writer that can no longer finish it."""
    m = _TMP_RE.match(tmp.name)
    if m is None:
        return True  # not our naming: no live writer of ours can own it
    with _LIVE_LOCK:
        if str(tmp) in _LIVE_TEMPS:
            return False
    pid = int(m.group("pid"))
    if m.group("host") != socket.gethostname():
        # Another machine on a shared filesystem: its pids mean nothing here, so only age can tell.
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > max_foreign_age_s
    if pid == os.getpid():
        return True  # ours but not in _LIVE_TEMPS: left by an earlier, failed write of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


# ------------------------------------------------------------------------------------------------ writer

class TraceWriter:
    """Append seed-batch shards to one run folder, creating or validating its manifest.

    ``label_columns`` are the columns that may hold NaN ("not probed") or nulls, ``unmeasured_columns`` signals
    that are NaN where a model has nothing to measure (no attention in a UNet's resnet layer); every other
    float column must be finite and every other column null-free. Writers on disjoint seed ranges may share a folder,
    in one process or many.
    """

    def __init__(self, run_dir: str | os.PathLike, info: RunInfo, schema: pa.Schema,
                 label_columns: tuple[str, ...] = (), unmeasured_columns: tuple[str, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.info = info
        # Schema metadata (e.g. pandas hints) is not part of a run's identity; names, types and order are.
        self.schema = schema.remove_metadata()
        self.label_columns = tuple(label_columns)
        self.unmeasured_columns = tuple(unmeasured_columns)
        self._name = str(run_dir)
        _check_key_schema(self.schema, f"schema for {self._name}")
        for col in self.label_columns:
            if col not in self.schema.names:
                raise TraceError(f"label column {col!r} is not in the schema for {self._name}")
            if col in KEY_COLUMNS:
                raise TraceError(f"key column {col!r} cannot be a label column")
        if len(set(self.schema.names)) != len(self.schema.names):
            raise TraceError(f"schema for {self._name} repeats a column name")
        self._verified: dict[str, tuple[int, int]] = {}  # shard name -> seed range, footer already checked
        self.manifest = self._open_or_create_manifest()

    # -- manifest ---------------------------------------------------------------------------------------

    def _new_manifest(self) -> dict:
        from cqpolicy import __version__

        return {"schema_version": SCHEMA_VERSION,
                **{k: getattr(self.info, k) for k in _IDENTITY_FIELDS},
                "package_version": __version__,
                "columns": _columns_of(self.schema),
                "label_columns": sorted(self.label_columns),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **self.info.extra}

    def _open_or_create_manifest(self) -> dict:
        path = self.run_dir / MANIFEST_NAME
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TraceError(f"{self._name} exists and is not a folder")
        if not path.exists():
            if self.run_dir.exists():
                # Dot-files (temporaries of a writer that died creating the manifest, .DS_Store) are not data.
                foreign = sorted(p.name for p in self.run_dir.iterdir() if not p.name.startswith("."))
                # Re-check: a writer starting together with us may just have published its manifest.
                if foreign and not path.exists():
                    raise TraceError(f"{self._name} is not a trace run (no {MANIFEST_NAME}) but holds "
                                     f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; "
                                     f"refusing to write there")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = _temp_path(path)
            self._register(tmp)
            try:
                _write_bytes_durably(tmp, (json.dumps(self._new_manifest(), indent=2, allow_nan=False)
                                           + "\n").encode())
                # Exactly one of several writers starting together wins; the others validate its manifest.
                if _publish_no_clobber(tmp, path):
                    _fsync_dir(self.run_dir)
            finally:
                tmp.unlink(missing_ok=True)
                self._unregister(tmp)
        manifest = _load_manifest(self.run_dir)
        self._check_same_run(manifest)
        return manifest

    def _check_same_run(self, manifest: Mapping) -> None:
        for key in _IDENTITY_FIELDS:
            have, want = manifest[key], getattr(self.info, key)
            same = float(have) == want if key == "guidance_scale" else have == want
            if not same:
                raise TraceError(f"{self._name} holds another run: {key} {have!r} != {want!r}")
        columns = _columns_of(self.schema)
        if list(manifest["columns"].items()) != list(columns.items()):
            raise TraceError(f"{self._name} holds another run: columns differ "
                             f"({_describe_column_change(columns, manifest['columns'])})")
        if sorted(manifest["label_columns"]) != sorted(self.label_columns):
            raise TraceError(f"{self._name} holds another run: label_columns {sorted(manifest['label_columns'])} "
                             f"!= {sorted(self.label_columns)}")

    # -- shards ----------------------------------------------------------------------------------------

    def done_seeds(self) -> set[int]:
        """Seeds covered by published shards (their footers are checked once; a corrupt one raises)."""
        done: set[int] = set()
        for first, last, path in _list_shards(self.run_dir):
            if path.name not in self._verified:
                self._verified[path.name] = _check_shard_footer(path, self.manifest, self._name)
            done.update(range(first, last + 1))
        return done

    def _validate(self, table: pa.Table) -> tuple[int, int]:
        if not table.schema.remove_metadata().equals(self.schema):
            raise TraceError(f"shard schema differs from {self._name}'s: "
                             f"{_describe_column_change(_columns_of(table.schema), _columns_of(self.schema))}")
        if table.num_rows == 0:
            raise TraceError("refusing to write an empty shard")
        for col in KEY_COLUMNS:
            if table[col].null_count:
                raise TraceError(f"key column {col!r} holds {table[col].null_count} nulls")
        seeds = pc.unique(table["seed"]).to_pylist()
        first, last = min(seeds), max(seeds)
        if first < 0:
            raise TraceError(f"seeds must be >= 0, got {first}")
        # A shard name promises every seed of its range, which is what done_seeds() relies on to resume.
        if len(seeds) != last - first + 1:
            raise TraceError(f"shard seeds must be contiguous: {len(seeds)} distinct seeds in {first}..{last}")
        overlap = self.done_seeds().intersection(range(first, last + 1))
        if overlap:
            raise TraceError(f"{self._name} already holds seeds {sorted(overlap)[:5]}"
                             f"{' ...' if len(overlap) > 5 else ''}; writing them again would duplicate rows")
        distinct = table.select(list(KEY_COLUMNS)).group_by(list(KEY_COLUMNS)).aggregate([]).num_rows
        if distinct != table.num_rows:
            raise TraceError(f"shard {first}-{last} holds {table.num_rows - distinct} duplicate "
                             f"{'/'.join(KEY_COLUMNS)} rows")
        for f in self.schema:
            col = table[f.name]
            if f.name in self.label_columns:
                if pa.types.is_floating(f.type) and pc.any(pc.is_inf(col)).as_py():
                    raise TraceError(f"label column {f.name!r} holds inf (only NaN, meaning 'not probed', is allowed)")
                continue
            if col.null_count:
                raise TraceError(f"column {f.name!r} holds {col.null_count} nulls (only label columns may)")
            if pa.types.is_floating(f.type):
                finite = pc.is_finite(col) if f.name not in self.unmeasured_columns else pc.invert(pc.is_inf(col))
                bad = table.num_rows - pc.sum(finite.cast(pa.int64())).as_py()
                if bad:
                    raise TraceError(f"column {f.name!r} holds {bad} NaN/inf values (only label columns may "
                                     f"hold NaN)")
        return first, last

    def write_shard(self, table: pa.Table) -> Path:
        """Validate ``table`` (all rows of a contiguous seed batch) and publish it atomically; returns its path."""
        first, last = self._validate(table)
        final = self.run_dir / f"shard-{first}-{last}.parquet"
        meta = {"schema_version": str(SCHEMA_VERSION), "model_hash": self.info.model_hash,
                "steps": str(self.info.steps), "first_seed": str(first), "last_seed": str(last)}
        table = table.sort_by([(c, "ascending") for c in KEY_COLUMNS]).replace_schema_metadata(meta)
        tmp = _temp_path(final)
        self._register(tmp)
        try:
            with open(tmp, "xb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            # No-clobber: a concurrent writer that published the same range first wins, we never overwrite.
            if not _publish_no_clobber(tmp, final):
                raise TraceError(f"{final} appeared while writing it (another writer on the same seeds?); "
                                 f"not overwritten")
            _fsync_dir(self.run_dir)
        finally:
            tmp.unlink(missing_ok=True)
            self._unregister(tmp)
        self._verified[final.name] = (first, last)
        return final

    def remove_stale_temporaries(self, max_foreign_age_s: float = 24 * 3600.0) -> int:
        """Delete ``.*.tmp`` files of killed writers in this run folder; returns how many were deleted.

        Temporaries of live writers on this host (other processes or other writers in this process) are
        kept. Temporaries from other hosts (shared filesystems) are deleted only once older than
        ``max_foreign_age_s``, since their pids cannot be checked from here.
        """
        removed = 0
        for p in self.run_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file() \
                    and _is_stale(p, max_foreign_age_s):
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass  # its writer finished or another cleaner got there first
        return removed

    @staticmethod
    def _register(tmp: Path) -> None:
        with _LIVE_LOCK:
            _LIVE_TEMPS.add(str(tmp))

    @staticmethod
    def _unregister(tmp: Path) -> None:
        with _LIVE_LOCK:
            _LIVE_TEMPS.discard(str(tmp))


# ------------------------------------------------------------------------------------------------ reader

class TraceReader:
    """Read the rows of one or more runs of the same model and step count, validated, sorted by key.

    All checks that need only manifests and shard footers run in the constructor; shard data is read
    (and checked for corruption, seed ranges and duplicate keys) by ``table()``.
    """

    def __init__(self, run_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
                 expect_model_hash: str | None = None, expect_steps: int | None = None) -> None:
        if isinstance(run_dirs, (str, os.PathLike)):
            run_dirs = [run_dirs]  # a lone path would otherwise be iterated character by character
        self.run_dirs = [Path(d) for d in run_dirs]
        if not self.run_dirs:
            raise TraceError("TraceReader needs at least one run folder")
        self.categories: dict[str, list[str]] = {}
        self.manifests: list[dict] = []
        self._shards: list[tuple[int, int, Path]] = []
        for d in self.run_dirs:
            if not d.is_dir():
                raise TraceError(f"{d} is not a folder")
            manifest = _load_manifest(d)
            self._check_compatible(d, manifest, expect_model_hash, expect_steps)
            shards = _list_shards(d)
            if not shards:
                raise TraceError(f"{d} holds no trace shards")
            for first, last, path in shards:
                _check_shard_footer(path, manifest, str(d))
                self._shards.append((first, last, path))
            self.manifests.append(manifest)
        # Seeds are the first key column, so overlapping seed ranges are exactly duplicate keys across shards.
        self._shards.sort()
        for (_, a1, path_a), (b0, b1, path_b) in zip(self._shards, self._shards[1:]):
            if b0 <= a1:
                raise TraceError(f"duplicate keys: {path_a} and {path_b} both hold seeds {b0}-{min(a1, b1)}")

    def _check_compatible(self, run_dir: Path, manifest: Mapping, expect_model_hash: str | None,
                          expect_steps: int | None) -> None:
        if expect_model_hash is not None and manifest["model_hash"] != expect_model_hash:
            raise TraceError(f"{run_dir} traces model_hash {manifest['model_hash']!r}, expected "
                             f"{expect_model_hash!r}")
        if expect_steps is not None and manifest["steps"] != expect_steps:
            raise TraceError(f"{run_dir} traces {manifest['steps']} steps, expected {expect_steps}")
        if not self.manifests:
            return
        first, first_dir = self.manifests[0], self.run_dirs[0]
        for key in ("model_hash", "steps"):
            if manifest[key] != first[key]:
                raise TraceError(f"cannot read runs of different {key} together: {first_dir} has "
                                 f"{first[key]!r}, {run_dir} has {manifest[key]!r}")
        if list(manifest["columns"].items()) != list(first["columns"].items()):
            raise TraceError(f"cannot read runs with different columns together: {run_dir} vs {first_dir} "
                             f"({_describe_column_change(manifest['columns'], first['columns'])})")

    @property
    def manifest(self) -> dict:
        """The manifest of the first run (all runs share model_hash, steps and columns)."""
        return dict(self.manifests[0])

    @property
    def columns(self) -> list[str]:
        return list(self.manifests[0]["columns"])

    def seeds(self) -> list[int]:
        """All seeds of all runs, ascending (from shard names, validated against their footers)."""
        return [s for first, last, _ in self._shards for s in range(first, last + 1)]

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All rows of all runs, sorted by KEY_COLUMNS; ``columns`` selects (and orders) the columns returned."""
        wanted = list(self.columns if columns is None else columns)
        unknown = [c for c in wanted if c not in self.manifests[0]["columns"]]
        if unknown:
            raise TraceError(f"unknown trace columns {', '.join(unknown)}; have {', '.join(self.columns)}")
        # Key columns are always read: sorting, seed-range and duplicate checks need them.
        read = list(dict.fromkeys([*KEY_COLUMNS, *wanted]))
        parts = []
        for first, last, path in self._shards:
            try:
                part = pq.read_table(path, columns=read)
            except (pa.ArrowException, OSError) as err:
                raise TraceError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from None
            seeds = pc.unique(part["seed"]).to_pylist()
            if sorted(seeds) != list(range(first, last + 1)):
                raise TraceError(f"{path} holds seeds other than its name's {first}-{last}")
            parts.append(part.replace_schema_metadata(None))
        table = pa.concat_tables(parts)
        if table.select(list(KEY_COLUMNS)).group_by(list(KEY_COLUMNS)).aggregate([]).num_rows != table.num_rows:
            raise TraceError(f"duplicate {'/'.join(KEY_COLUMNS)} rows in {', '.join(map(str, self.run_dirs))}")
        table = table.sort_by([(c, "ascending") for c in KEY_COLUMNS])
        return table.select(wanted).combine_chunks()

    def tensors(self, columns: Sequence[str],
                categories: Mapping[str, Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """Columns as tensors, rows sorted by key: floats keep their dtype, ints become int64, bools bool.

        String columns (e.g. ``unit``) become int64 codes into ``self.categories[col]``, which is the
        sorted list of values seen unless ``categories`` fixes it (to keep codes stable across readers,
        e.g. train vs. eval traces; a value outside the given list is an error).
        """
        table = self.table(columns)
        out = {}
        for name in columns:
            col, typ = table[name], table.schema.field(name).type
            if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                if col.null_count:
                    raise TraceError(f"column {name!r} holds nulls and cannot become codes")
                cats = list(categories[name]) if categories and name in categories \
                    else sorted(pc.unique(col).to_pylist())
                codes = pc.index_in(col, value_set=pa.array(cats, type=typ))
                if codes.null_count:
                    raise TraceError(f"column {name!r} holds values outside the given categories")
                self.categories[name] = cats
                out[name] = _to_tensor(codes.to_numpy().astype("int64"))
            elif pa.types.is_floating(typ):
                out[name] = _to_tensor(col.to_numpy())  # nulls (unprobed labels) become NaN
            elif pa.types.is_integer(typ) or pa.types.is_boolean(typ):
                if col.null_count:
                    raise TraceError(f"column {name!r} holds nulls, which an integer tensor cannot hold")
                arr = col.to_numpy()
                out[name] = _to_tensor(arr if pa.types.is_boolean(typ) else arr.astype("int64"))
            else:
                raise TraceError(f"column {name!r} of type {typ} has no tensor form")
        return out

    def iter_batches(self, columns: Sequence[str], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """``tensors(columns)`` in consecutive row slices of ``batch_size`` (the last may be shorter)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TraceError(f"batch_size must be a positive int, got {batch_size!r}")
        full = self.tensors(columns)
        n = len(next(iter(full.values()))) if full else 0
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in full.items()}
