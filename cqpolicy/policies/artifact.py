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
KINDS = ("mlp", "scheduler", "gates", "forecast")

__all__ = ["FORMAT_VERSION", "POLICY_FILE", "WEIGHTS_FILE", "SCHEDULE_FILE", "ArtifactError", "save_artifact",
           "load_artifact", "record_selection", "check_fits", "transfers_across_steps", "table_to_schedule"]


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


from cqpolicy.outputs import check_out_dir, fsync_dir as _fsync_dir, read_json  # noqa: E402


def table_to_schedule(table: torch.Tensor, units) -> dict:
    """``[steps, blocks, units]`` 0/1 table -> schedule dict ``{(unit, block): (0/1 per step)}``."""
    table = table.to(torch.uint8)
    return {(unit, b): tuple(int(v) for v in table[:, b, u].tolist())
            for u, unit in enumerate(units) for b in range(table.shape[1])}


def check_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``cqpolicy.outputs.check_out_dir`` (refuse an existing non-empty folder unless ``overwrite``), raising
    ``ArtifactError``; returns the path."""
    try:
        return check_out_dir(out_dir, overwrite)
    except FileExistsError as exc:
        raise ArtifactError(str(exc)) from None


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
        if kind in _KIND_FILES:
            _KIND_FILES[kind](stage, meta, tensors)
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


def record_selection(path: str | os.PathLike, first_seed: int, count: int, by: str) -> None:
    """Add to the artifact's ``selected_on`` that it was scored, to be chosen or not, on samples ``first_seed ..
    first_seed + count - 1`` (``by``: what chose); a bench refuses to score it on a role those seeds belong to.
    ``policy.json`` is rewritten atomically (the weights hash does not cover it)."""
    meta_file = Path(path) / POLICY_FILE
    meta = read_json(meta_file, ArtifactError, f"{path} is not a policy artifact (no {POLICY_FILE})")
    record = {"seeds": [int(first_seed), int(count)], "by": str(by)}
    if record in meta.setdefault("selected_on", []):
        return
    meta["selected_on"].append(record)
    tmp = meta_file.with_name(f".{POLICY_FILE}.{secrets.token_hex(4)}.tmp")
    _write_file(tmp, (json.dumps(_jsonable(meta), indent=2, allow_nan=False) + "\n").encode())
    os.replace(tmp, meta_file)


def load_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a policy artifact: ``(meta, tensors)``. Never unpickles anything."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"policy artifact {path} does not exist or is not a folder")
    meta = read_json(path / POLICY_FILE, ArtifactError, f"{path} is not a policy artifact (no {POLICY_FILE})")
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
    except OSError as err:
        raise ArtifactError(f"cannot read {path / WEIGHTS_FILE}: {err.strerror or err}") from None
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ArtifactError(f"policy artifact {path}: weights do not match policy.json (tampered or partial copy)")
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # a hash match makes this unlikely: the artifact was written broken
        raise ArtifactError(f"policy artifact {path}: {WEIGHTS_FILE} is unreadable ({err})") from None
    _check_structure(path, meta, tensors)
    return meta, tensors


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_structure(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, in one line, a ``policy.json`` that a policy could not be built from or would fail on mid-run
    (the weights hash does not cover a hand-edited ``policy.json``): the common fields, then the kind's own."""
    where = path / POLICY_FILE

    def bad(what: str):
        return ArtifactError(f"{where}: {what} (a damaged or hand-edited artifact; retrain it with `cqpolicy train`)")

    model = meta["model"]
    if not isinstance(model, dict):
        raise bad("'model' is not a JSON object")
    for key in ("class", "scheduler"):
        if not isinstance(model.get(key), str):
            raise bad(f"model.{key} is missing or not a string")
    for key in ("num_blocks", "steps"):
        if not _is_int(model.get(key)) or model[key] < 1:
            raise bad(f"model.{key} is missing or not a positive integer")
    units = model.get("units")
    if (not isinstance(units, list) or not units or not all(isinstance(u, str) and u for u in units)
            or len(set(units)) != len(units)):
        raise bad("model.units is missing or not a list of distinct unit names")
    if model.get("model_hash") is not None and not isinstance(model["model_hash"], str):
        raise bad("model.model_hash is not a string")  # absent or null: check_fits asks for a retrain
    _KIND_CHECKS[meta["kind"]](meta, tensors, bad)


def _check_mlp(meta: dict, tensors: dict, bad) -> None:
    from cqpolicy.policies.features import RUNTIME_FEATURES, STEP_FEATURES

    features = meta.get("features")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise bad("features is missing or not a list of feature names")
    unknown = [f for f in features if f not in set(RUNTIME_FEATURES) | set(STEP_FEATURES)]
    if unknown:
        raise bad(f"feature {unknown[0]!r} is not one a deployed policy computes")
    if not _is_int(meta.get("hidden")) or meta["hidden"] < 1:
        raise bad("hidden is missing or not a positive integer")
    norm = meta.get("normalization")
    if not isinstance(norm, dict):
        raise bad("normalization is missing")
    for key in ("mean", "std"):
        values = norm.get(key)
        if not isinstance(values, list) or len(values) != len(features) or not all(map(_is_number, values)):
            raise bad(f"normalization.{key} is not {len(features)} finite numbers (one per feature)")
    if not all(v > 0 for v in norm["std"]):
        raise bad("normalization.std holds a value that is not positive")
    if not _is_number(meta.get("default_threshold")) or meta["default_threshold"] <= 0:
        raise bad("default_threshold is missing or not a positive number")


def _check_gates(meta: dict, tensors: dict, bad) -> None:
    from cqpolicy.policies.gates import GATE_FEATURES

    model, n = meta["model"], len(GATE_FEATURES)
    if meta.get("features") != list(GATE_FEATURES):
        raise bad(f"features is not {list(GATE_FEATURES)}")
    norm = meta.get("normalization")
    if not isinstance(norm, dict) or not all(
            isinstance(norm.get(k), list) and len(norm[k]) == n and all(map(_is_number, norm[k]))
            for k in ("mean", "std")) or not all(v > 0 for v in norm["std"]):
        raise bad(f"normalization is not {n} finite means and positive stds")
    if not _is_int(meta.get("hidden")) or meta["hidden"] < 1:
        raise bad("hidden is missing or not a positive integer")
    budgets = meta.get("budget_range")
    if (not isinstance(budgets, list) or len(budgets) != 2 or not all(map(_is_number, budgets))
            or not 0 < budgets[0] < budgets[1] <= 1):
        raise bad("budget_range is not [low, high] with 0 < low < high <= 1")
    if not _is_number(meta.get("row_macs")) or meta["row_macs"] <= 0:
        raise bad("row_macs is missing or not positive")
    macs = tensors.get("unit_macs")
    if macs is None or tuple(macs.shape) != (model["num_blocks"], len(model["units"])):
        raise bad(f"its unit_macs are not [blocks, units] = {[model['num_blocks'], len(model['units'])]}")


def _check_forecast(meta: dict, tensors: dict, bad) -> None:
    model = meta["model"]
    table, weights = tensors.get("table"), tensors.get("weights")
    shape = (model["steps"], model["num_blocks"], len(model["units"]))
    if table is None or tuple(table.shape) != shape:
        raise bad(f"its table is not [steps, blocks, units] = {list(shape)}")
    if weights is None or weights.ndim != 4 or tuple(weights.shape[:3]) != shape or weights.shape[3] < 1:
        raise bad(f"its weights are not [steps, blocks, units, K] = {list(shape)} + [K]")
    if meta.get("channel_dim") is not None:  # per-channel fits: [steps, C, K + 1] per (block, unit)
        for key, w in tensors.items():
            parts = key.split(".")
            if key.startswith("channel.") and (
                    len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= model["num_blocks"]
                    or parts[2] not in model["units"] or w.ndim != 3 or w.shape[0] != model["steps"]
                    or w.shape[2] != weights.shape[3] + 1):
                raise bad(f"its per-channel weights {key!r} are not [steps, C, K + 1] for a block and unit")


def _check_scheduler(meta: dict, tensors: dict, bad) -> None:
    model = meta["model"]
    table = tensors.get("table")
    shape = (model["steps"], model["num_blocks"], len(model["units"]))
    if table is None:
        raise bad(f"{WEIGHTS_FILE} holds no 'table'")
    if tuple(table.shape) != shape:
        raise bad(f"its table is {list(table.shape)}, not [steps, blocks, units] = {list(shape)}")


def _write_schedule(stage: Path, meta: dict, tensors: dict) -> None:
    """A scheduler's table as a SmoothCache schedule beside the weights (``schedule:path=...`` reads it)."""
    from cqpolicy.policies.families.schedule import save_schedule

    if "table" not in tensors:
        raise ArtifactError("a scheduler artifact needs a 'table' tensor [steps, blocks, units]")
    save_schedule(table_to_schedule(tensors["table"], meta["model"]["units"]), stage / SCHEDULE_FILE,
                  num_blocks=int(meta["model"]["num_blocks"]))


# per kind: the structure check on load, and what else its folder holds besides policy.json and the weights
_KIND_CHECKS = {"mlp": _check_mlp, "scheduler": _check_scheduler, "gates": _check_gates, "forecast": _check_forecast}
_KIND_FILES = {"scheduler": _write_schedule}


def transfers_across_steps(meta: dict) -> bool:
    """True when the policy is keyed on where sampling is (progress, log-SNR, staleness, inputs), not on the
    step index: an MLP whose every input is one of the runtime features of ``cqpolicy.policies.features``.
    A ``scheduler`` table (or interval schedule) is indexed by step and never transfers."""
    from cqpolicy.policies.features import RUNTIME_FEATURES, STEP_FEATURES

    if meta.get("kind") == "gates":  # scores keyed on log-SNR and progress
        return True
    features = meta.get("features")
    if meta.get("kind") != "mlp" or not isinstance(features, list) or not features:
        return False
    return all(isinstance(f, str) and f in set(RUNTIME_FEATURES) | set(STEP_FEATURES) for f in features)


def check_fits(meta: dict, model_class: str, num_blocks: int, steps: int, scheduler: str,
               source: str | None = None, *, model_hashes=None, steps_transfer: bool = False) -> None:
    """Refuse a policy trained for another model class, block count, model weights, step count or scheduler.

    ``model_hashes``: the loaded model's weight hashes (``cqpolicy.models.fingerprint.model_fingerprints``, a
    dict or a list of accepted values); the artifact's stored ``model.model_hash`` must be one of them, and an
    artifact that stores none is refused. ``None`` skips the weight check (callers without a model).
    ``steps_transfer``: accept another step count or scheduler (see ``transfers_across_steps``).
    """
    model = meta.get("model") or {}
    what = source or f"for {model.get('model_id', 'an unknown model')}"
    want = (model.get("class"), model.get("num_blocks"), model.get("steps"), model.get("scheduler"))
    have = (model_class, int(num_blocks), int(steps), scheduler)
    names = ("model class", "block count", "step count", "scheduler")
    diff = [name for name, w, h in zip(names, want, have) if w != h]
    if steps_transfer:
        diff = [name for name in diff if name not in ("step count", "scheduler")]
    if diff:
        why = ""
        if {"step count", "scheduler"} & set(diff):
            if meta.get("kind") == "scheduler":
                why = "; a scheduler table is indexed by step"
            elif not transfers_across_steps(meta):
                why = "; its features are not all keyed on progress"
        raise ArtifactError(
            f"policy artifact {what} was trained for {want[2]} steps of {want[3]} on a {want[1]}-block {want[0]}; "
            f"this run has {have[2]} steps of {have[3]} on a {have[1]}-block {have[0]} "
            f"(mismatch: {', '.join(diff)}{why}); train a policy on traces of this setup")
    if model_hashes is None:
        return
    accepted = list(model_hashes.values()) if isinstance(model_hashes, dict) else list(model_hashes)
    stored = model.get("model_hash")
    if not isinstance(stored, str) or not stored:
        raise ArtifactError(f"policy artifact {what} records no model weight hash (model.model_hash; made by an "
                            f"older cqpolicy), so it cannot be checked against this model; retrain it with "
                            f"`cqpolicy train` on traces of this model")
    if stored not in accepted:
        raise ArtifactError(
            f"policy artifact {what} was trained on {model.get('model_id', 'a model')} with weight hash {stored}; "
            f"this run's model has weight hash {accepted[0]} (same shape, other weights or config); train a policy on "
            f"traces of this model")


def check_denoiser(meta: dict, module, source: str | None = None) -> None:
    """``check_fits`` for a denoiser module alone (no run settings yet): class, block count and weights. Every
    deployment passes here when the runtime is enabled, whether or not a sampler or pipeline prepares the policy."""
    from cqpolicy.models.adapters import cache_blocks
    from cqpolicy.models.fingerprint import model_fingerprints

    model = meta.get("model") or {}
    check_fits(meta, type(module).__name__, len(cache_blocks(module)), int(model.get("steps") or 0),
               model.get("scheduler"), source=source,
               model_hashes=model_fingerprints(module))
