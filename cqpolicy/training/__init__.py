"""Training: trace rows -> a learned reuse policy (MLP or layer scheduler) -> a verified policy artifact.

Submodules: ``data`` (``TraceDataModule``: features, split by seed, train-only normalisation), ``modules``
(``ReuseMLP``, ``ReusePolicyModule``, ``LayerSchedulerModule``), ``artifact`` (``save_artifact``,
``load_artifact``, ``check_fits``), ``train`` (``train_policy``). Names are imported lazily, so loading an
artifact does not import Lightning.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TraceDataModule": "data", "ImpactTableDataModule": "data",
    "ReuseMLP": "modules", "ReusePolicyModule": "modules", "LayerSchedulerModule": "modules",
    "ArtifactError": "artifact", "save_artifact": "artifact", "load_artifact": "artifact", "check_fits": "artifact",
    "train_policy": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cqpolicy.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cqpolicy.training' has no attribute {name!r}")
