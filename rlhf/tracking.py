"""MLflow: embedded by default, any tracking server when ``MLFLOW_TRACKING_URI`` is set.

Models are registered as MLflow 3 *logged models* whose artifacts are plain files
(safetensors + JSON): nothing is pickled, and ``models:/name/version`` or
``models:/name@alias`` resolves to a folder any reward or policy loader reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlhf import console

log = logging.getLogger(__name__)

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def tracking_uri(configured: str | None = None, root: str | os.PathLike | None = None) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else a SQLite file under ``root``
    (the working directory)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root or os.getcwd()).resolve()
    return f"sqlite:///{root / EMBEDDED_DB}"


def setup(configured: str | None = None, experiment: str = "default") -> str:
    """Point MLflow at the tracking store and select (or create) ``experiment``.

    With the embedded store, artifacts go to ``./mlartifacts``; with a server, wherever the
    server says. Also exports the URI so Ray workers started later see the same store.
    Returns the experiment id.
    """
    import mlflow

    uri = tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            root = Path(uri[len("sqlite:///") :]).parent
            location = (root / EMBEDDED_ARTIFACTS / experiment).resolve().as_uri()
        try:
            exp_id = mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another process
            exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def register_folder(
    folder: str | os.PathLike,
    name: str,
    run_id: str,
    aliases: tuple[str, ...] = (),
    tags: dict | None = None,
) -> int:
    """Log ``folder`` as a logged model of run ``run_id``, register it under ``name``, set
    ``aliases``; returns the new version number."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    lm = mlflow.initialize_logged_model(name=name, source_run_id=run_id, tags=tags)
    try:
        client.log_model_artifacts(lm.model_id, str(folder))
    except Exception:
        mlflow.finalize_logged_model(lm.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(lm.model_id, "READY")
    with console.mlflow_events():
        mv = mlflow.register_model(f"models:/{lm.model_id}", name)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


def metric_key(name: str) -> str:
    """MLflow-safe metric name: ``eval/I2>I1`` -> ``eval/I2_gt_I1``."""
    return name.replace(">", "_gt_")


def logged_steps(run_id: str, key: str) -> list[int]:
    """Steps already logged for metric ``key`` (to continue a run without duplicates)."""
    from mlflow import MlflowClient

    return [m.step for m in MlflowClient().get_metric_history(run_id, key)]
