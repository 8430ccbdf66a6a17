"""Where MLflow runs go.

MLflow 3.17 refuses a plain ``./mlruns`` file store, so the default is ``sqlite:///mlruns/mlflow.db``
with artifacts in ``mlruns/artifacts``, relative to the working directory.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

DEFAULT_DIR = Path("mlruns")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DIR / 'mlflow.db'}"


def _experiment_id(name: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifact_location = (DEFAULT_DIR / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


@contextmanager
def start_run(experiment: str, run_name: str | None = None, run_id: str | None = None, nested: bool = False,
              parent_run_id: str | None = None):
    """Open an MLflow run in ``experiment`` (created on first use) on our tracking store; with
    ``parent_run_id`` it is nested under that run (also from another process)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(experiment)
    # inside another run (a pipeline stage, a study in this process) a run nests under it
    nested = nested or (run_id is None and mlflow.active_run() is not None)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=None if run_id else run_name, nested=nested,
                          parent_run_id=parent_run_id) as run:
        yield run
