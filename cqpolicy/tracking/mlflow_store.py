"""Where MLflow runs go.

MLflow 3.17 refuses a plain ``./mlruns`` file store, so the default is ``sqlite:///mlruns/mlflow.db``
with artifacts in ``mlruns/artifacts``, relative to the working directory. Many processes or hosts share one
store through a tracking server (``cqpolicy tracking-server``, ``MLFLOW_TRACKING_URI=http://...``) or a database
URL (``postgresql://...``); ``check_reachable`` fails in one line before any work when such a store does not answer.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

DEFAULT_DIR = Path("mlruns")
CONNECT_TIMEOUT_S = 10  # a server or database that does not answer in this time is an error, not a hang


def database_connect_args(url: str) -> dict:
    """SQLAlchemy ``connect_args`` that bound the wait for a database server that does not answer."""
    return {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith(("postgresql", "mysql")) else {}


def shown(uri: str) -> str:
    """``uri`` as it may appear in a message or log: a password in it replaced by ``***``."""
    import re

    return re.sub(r"(://[^/:@]+:)[^/@]*@", r"\1***@", uri)


def check_reachable(uri: str) -> None:
    """Raise ValueError (one line) when a tracking server or database ``uri`` does not answer; files always do."""
    try:
        if uri.startswith(("http://", "https://")):
            import urllib.request

            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S).close()
        elif "://" in uri and not uri.startswith(("sqlite:", "file:")):
            import sqlalchemy

            engine = sqlalchemy.create_engine(uri, connect_args=database_connect_args(uri))
            try:
                engine.connect().close()
            finally:
                engine.dispose()
    except Exception as exc:  # noqa: BLE001 - drivers and sockets raise many types; the user needs one line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{shown(uri)!r} does not answer: {type(exc).__name__}: {detail}") from None


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
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException as exc:  # another process or host created it first
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise exc
        return experiment.experiment_id


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
