"""MLflow tracking: one sqlite store under ``mlruns/`` unless ``MLFLOW_TRACKING_URI`` says otherwise."""
from cqpolicy.tracking.mlflow_store import start_run, tracking_uri

__all__ = ["start_run", "tracking_uri"]
