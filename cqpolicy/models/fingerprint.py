"""What weights a loaded model holds, as a short hash: traces and policy artifacts record it, deployment checks it.

``model_fingerprints(model)`` returns the hashes that identify a ``LoadedModel``'s denoiser, computed in one
pass over its tensors and cached on the ``LoadedModel`` (recomputed only when a tensor was replaced or
modified in place), so checking an artifact costs nothing after the first time:

* ``weights``: sha256 over the config's public keys and, per tensor, its name, shape, sum and sum of squares.
  It does not depend on where the model was loaded from.
* ``legacy``: what ``cqpolicy trace`` records today (``cqpolicy.tracing.collect.model_fingerprint``): the same,
  but over the whole config, whose ``_name_or_path`` / ``_diffusers_version`` make the hash change when the
  same weights are loaded from another folder or with another diffusers.

An artifact fits a model when its stored hash equals either.
"""
from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["model_fingerprints", "model_fingerprint"]

_CACHE_ATTR = "_cqpolicy_fingerprints"  # on the denoiser module: (stamp, {"weights": ..., "legacy": ...})


def _stamp(module: torch.nn.Module, tensors: dict) -> tuple:
    """Changes when a tensor is replaced (``.to``, ``load_state_dict`` with ``assign``) or modified in place."""
    return (id(module),) + tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in tensors.items())


def _compute(module: torch.nn.Module, tensors: dict) -> dict[str, str]:
    config = dict(module.config)
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    weights = hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode())
    legacy = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in tensors.items():
            p64 = p.detach().double()
            entry = f"{name}:{tuple(p.shape)}:{float(p64.sum()):.10e}:{float(p64.pow(2).sum()):.10e}".encode()
            weights.update(entry)
            legacy.update(entry)
    return {"weights": weights.hexdigest()[:16], "legacy": legacy.hexdigest()[:16]}


def model_fingerprints(model) -> dict[str, str]:
    """``{"weights": ..., "legacy": ...}`` of a ``LoadedModel``'s denoiser, or of a denoiser module (see the module
    doc); cached on the module, so a policy's ``prepare`` and the runtime's check at enable hash it once."""
    module = getattr(model, "transformer", model)
    tensors = module.state_dict(keep_vars=True)
    stamp = _stamp(module, tensors)
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == stamp:
        return dict(cached[1])
    hashes = _compute(module, tensors)
    module.__dict__[_CACHE_ATTR] = (stamp, hashes)
    return dict(hashes)


def model_fingerprint(model) -> str:
    """The location-independent weight hash of a ``LoadedModel`` (``model_fingerprints(model)["weights"]``)."""
    return model_fingerprints(model)["weights"]
