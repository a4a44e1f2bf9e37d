"""What every run schema shares (:class:`~rlhf.run_config.RunConfig` for ``rlhf finetune``,
:class:`~rlhf.reward_run_config.RewardTrainConfig` for ``rlhf train-reward``): the sections
``checkpoint`` (``every``, ``keep``) and ``mlflow`` (``experiment``, ``register_as``,
``tracking_uri``), and where a run lives (``name`` under ``output_dir``). The worker group's
``scaling`` is :class:`~rlhf.resources.ScalingConfig`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CheckpointConfig:
    """``every``: checkpoint every this many steps and at the end (null: at every evaluation;
    set when the config is validated); ``keep``: how many of the newest are kept."""

    every: int | None = None
    keep: int = 2

    def validate(self, eval_every: int, path: str = "checkpoint") -> None:
        if self.every is None:
            self.every = eval_every
        for key in ("every", "keep"):
            v = getattr(self, key)
            if v < 1:
                raise ValueError(f"{path}.{key}={v} must be >= 1")


@dataclass
class MlflowConfig:
    """``tracking_uri`` null: ``MLFLOW_TRACKING_URI``, else the embedded store in the working
    directory. ``experiment``: where runs are logged; ``register_as``: the registered model
    name of the trained model (see each schema for null)."""

    experiment: str = "default"
    register_as: str | None = None
    tracking_uri: str | None = None


def ray_job_submission_id() -> str | None:
    """The submission id when this process is the entrypoint of a ``ray job submit`` (Ray
    hands the entrypoint its job config in ``RAY_JOB_CONFIG_JSON_ENV_VAR``); else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        meta = {}
    return meta.get("job_submission_id") or "(unknown id)"


def check_run_location(name: str, output_dir: str) -> None:
    """``name`` names a folder under ``output_dir``; inside a Ray job ``output_dir`` must be
    absolute."""
    if not name or "/" in name:
        raise ValueError(f"name={name!r} must be a non-empty name without '/'")
    job = ray_job_submission_id()
    if job and not Path(output_dir).is_absolute():
        # A job's working directory is Ray's temporary copy of --working-dir, removed with
        # the job: checkpoints written there could never be resumed.
        raise ValueError(
            f"output_dir={output_dir!r} is relative, and this is Ray job {job}: it would land "
            "in the job's temporary working directory and be lost; give an absolute path on "
            "storage every node sees"
        )
