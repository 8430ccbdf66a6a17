"""Policy artifacts: a folder with ``policy.json`` (what the policy is and what it fits) and ``weights.safetensors``.

Nothing is pickled: metadata is JSON, tensors are safetensors. ``policy.json`` records the sha256 of the
weights file, so a tampered or partially copied artifact is refused on load. Artifacts are written
atomically: staged in a hidden sibling folder, then renamed into place, so a reader sees either no artifact
or a whole one. A scheduler artifact also carries its table as a SmoothCache schedule (``schedule.json``),
usable with ``--policy schedule:path=...``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT_VERSION = 1
POLICY_FILE = "policy.json"
WEIGHTS_FILE = "weights.safetensors"
SCHEDULE_FILE = "schedule.json"
KINDS = ("mlp", "scheduler")

__all__ = ["FORMAT_VERSION", "POLICY_FILE", "WEIGHTS_FILE", "SCHEDULE_FILE", "ArtifactError", "save_artifact",
           "load_artifact", "check_fits", "table_to_schedule"]


class ArtifactError(ValueError):
    """One-line, user-facing problems with a policy artifact (missing, tampered, made for another model)."""


def _jsonable(value):
    """JSON-safe copy: NaN/inf become null (JSON has no NaN), tuples lists, numpy/torch scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ArtifactError(f"policy metadata holds a {type(value).__name__}, which JSON cannot store")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


from cqpolicy.outputs import fsync_dir as _fsync_dir  # noqa: E402


def table_to_schedule(table: torch.Tensor, units) -> dict:
    """``[steps, blocks, units]`` 0/1 table -> schedule dict ``{(unit, block): (0/1 per step)}``."""
    table = table.to(torch.uint8)
    return {(unit, b): tuple(int(v) for v in table[:, b, u].tolist())
            for u, unit in enumerate(units) for b in range(table.shape[1])}


def check_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse (early) to write into an existing non-empty folder unless ``overwrite``; returns the path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return out


def save_artifact(out_dir: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor],
                  overwrite: bool = False) -> dict:
    """Write a policy artifact atomically; returns the metadata as written (with ``weights_sha256``)."""
    out = check_target(out_dir, overwrite)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"unknown policy kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not tensors:
        raise ArtifactError("a policy artifact needs at least one tensor")
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                               metadata={"format_version": str(FORMAT_VERSION), "kind": kind})
    meta = _jsonable({**meta, "format_version": FORMAT_VERSION,
                      "weights_sha256": hashlib.sha256(weights).hexdigest()})
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    stage.mkdir()  # unlike mkdtemp, honours the umask: the artifact gets ordinary folder permissions
    trash = None
    try:
        _write_file(stage / WEIGHTS_FILE, weights)
        if kind == "scheduler":
            from cqpolicy.policies.families.schedule import save_schedule

            if "table" not in tensors:
                raise ArtifactError("a scheduler artifact needs a 'table' tensor [steps, blocks, units]")
            save_schedule(table_to_schedule(tensors["table"], meta["model"]["units"]), stage / SCHEDULE_FILE,
                          num_blocks=int(meta["model"]["num_blocks"]))
        _write_file(stage / POLICY_FILE, text.encode())
        _fsync_dir(stage)
        if out.exists():
            # checked again: something may have appeared while staging
            check_target(out, overwrite)
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, trash / "old")
        os.rename(stage, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not out.exists():
            os.rename(trash / "old", out)  # put the previous artifact back
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return meta


def load_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a policy artifact: ``(meta, tensors)``. Never unpickles anything."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"policy artifact {path} does not exist or is not a folder")
    try:
        text = (path / POLICY_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a policy artifact (no {POLICY_FILE})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path / POLICY_FILE} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path / POLICY_FILE} is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"policy artifact {path} has format_version {version!r}; this cqpolicy reads "
                            f"format_version {FORMAT_VERSION}")
    if meta.get("kind") not in KINDS:
        raise ArtifactError(f"policy artifact {path} has unknown kind {meta.get('kind')!r}")
    missing = [k for k in ("model", "weights_sha256") if k not in meta]
    if missing:
        raise ArtifactError(f"{path / POLICY_FILE} lacks {', '.join(missing)}")
    try:
        data = (path / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"policy artifact {path} lacks {WEIGHTS_FILE} (partial copy?)") from None
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ArtifactError(f"policy artifact {path}: weights do not match policy.json (tampered or partial copy)")
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # a hash match makes this unlikely: the artifact was written broken
        raise ArtifactError(f"policy artifact {path}: {WEIGHTS_FILE} is unreadable ({err})") from None
    return meta, tensors


def check_fits(meta: dict, model_class: str, num_blocks: int, steps: int, scheduler: str,
               source: str | None = None) -> None:
    """Refuse a policy trained for another model class, block count, step count or scheduler."""
    model = meta.get("model") or {}
    want = (model.get("class"), model.get("num_blocks"), model.get("steps"), model.get("scheduler"))
    have = (model_class, int(num_blocks), int(steps), scheduler)
    names = ("model class", "block count", "step count", "scheduler")
    diff = [name for name, w, h in zip(names, want, have) if w != h]
    if diff:
        what = source or f"for {model.get('model_id', 'an unknown model')}"
        raise ArtifactError(
            f"policy artifact {what} was trained for {want[2]} steps of {want[3]} on a {want[1]}-block {want[0]}; "
            f"this run has {have[2]} steps of {have[3]} on a {have[1]}-block {have[0]} "
            f"(mismatch: {', '.join(diff)}); train a policy on traces of this setup")
