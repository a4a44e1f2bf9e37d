"""Where a checkpoint reference points: a local path, an MLflow URI (``models:/name/3``,
``models:/name@alias``, ``runs:/...``) or a Hugging Face hub id (``owner/name``); fetched by
:func:`resolve_checkpoint`, or only checked, cheaply, by :func:`check_mlflow_ref` and
:func:`check_hub_id`."""

from __future__ import annotations

import os
from pathlib import Path

from rewards.errors import MissingPathError

MLFLOW_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_hub_id(ref: str) -> bool:
    """``owner/name`` that the hub accepts as a repository id, with no such local path and
    nothing that reads as a path: no weight-file suffix, no local folder called ``owner``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.count("/") != 1 or os.path.exists(ref):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    owner, name = ref.split("/")
    return not os.path.isdir(owner) and Path(name).suffix not in _WEIGHT_SUFFIXES


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")


def resolve_checkpoint(ref: str | os.PathLike, where: str = "checkpoint") -> Path:
    """A local path for a checkpoint reference: local path, MLflow URI, or hub id.

    ``where`` (e.g. ``rewards[0].checkpoint``) names the reference in errors.
    """
    ref = str(ref)
    if ref.startswith(MLFLOW_PREFIXES):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(ref))
        except Exception as e:  # MlflowException, OSError: not found, store unreachable
            raise MissingPathError(f"{where}={ref!r}: cannot fetch from MLflow: {e}") from e
    if os.path.exists(ref):
        return Path(ref)
    if is_hub_id(ref):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref))
        except Exception as e:  # offline, unknown repo, gated: all end here
            raise MissingPathError(
                f"{where}={ref!r}: no such local path, and fetching it from the Hugging Face "
                f"hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})"
            ) from e
    raise MissingPathError(f"{where}={ref!r}: no such file or folder (relative to {os.getcwd()})")


def check_mlflow_ref(ref: str, key: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if ref.startswith("runs:/"):
            client.get_run(ref[len("runs:/") :].split("/")[0])
            return
        name, _, version = ref[len("models:/") :].partition("/")
        name, _, alias = name.partition("@")
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version.split("/")[0] == "latest":
            if not client.search_model_versions(f"name='{name}'", max_results=1):
                raise MlflowException(f"registered model {name!r} has no versions")
        else:
            client.get_model_version(name, version.split("/")[0])
    except MlflowException as e:
        raise MissingPathError(
            f"{key}={ref!r}: not found in the MLflow store {client.tracking_uri} "
            f"({e.message.splitlines()[0]})"
        ) from e


def check_hub_id(ref: str, key: str) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ref, local_files_only=True)
        return
    except Exception:  # not cached: ask the hub below
        pass
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(ref)
    except Exception as e:  # offline, unknown repo, gated
        raise MissingPathError(
            f"{key}={ref!r}: no such local path, and the Hugging Face hub cannot be reached "
            f"or has no such repository ({type(e).__name__})"
        ) from e
