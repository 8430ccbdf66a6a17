"""Training: trace rows -> a learned reuse policy (MLP or layer scheduler) -> a verified policy artifact.

Submodules: ``data`` (``TraceDataModule``: features, split by seed, train-only normalisation), ``modules``
(``ReusePolicyModule``, ``LayerSchedulerModule``), ``train`` (``train_policy``). The artifact format and the
deployed net live with the policies (``cqpolicy.policies.artifact``, ``cqpolicy.policies.networks``): training
imports them, never the other way round, so deploying a policy does not import Lightning.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TraceDataModule": "data", "ImpactTableDataModule": "data",
    "ReusePolicyModule": "modules", "LayerSchedulerModule": "modules",
    "train_policy": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cqpolicy.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cqpolicy.training' has no attribute {name!r}")
