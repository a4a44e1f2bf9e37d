"""What a fine-tuning run keeps in MLflow, without Ray: the run itself (created, or resumed
from its config and run folder), its metrics (gathered over a few steps, then logged
asynchronously in one batch; flushed before each checkpoint, never twice for a step), its
registered policy versions, what is read back for the summary, the run's errors and the
console summary.

The :class:`~actors.coordinator.Coordinator` actor holds one :class:`RunRecords`; the driver
(:class:`~actors.finetune_run.FinetuneRun`) uses :func:`read_resume` before Ray starts.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rlhf import tracking
from rlhf.checkpointing import CHECKPOINTS, MANIFEST, checkpoint_folders
from rlhf.config import ConfigError, flatten
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)

RUN_DIR_TAG = "rlhf.run_dir"
# Step metrics go to MLflow in one batch per this many steps or seconds, whichever comes first.
LOG_EVERY_STEPS = 10
LOG_EVERY_S = 5.0


class RunStopped(RuntimeError):
    """The run stopped on a rule (too many bad steps); a checkpoint was saved."""


class ResumeError(ConfigError):
    """A run cannot be resumed (unknown run id, no usable checkpoint); nothing was trained."""


class RunFailed(RuntimeError):
    """A started run failed: one line naming the cause, the run id and the resume command
    (the cause is chained)."""


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resume_command(tracking_uri: str, run_id: str | None) -> str:
    """The command that continues run ``run_id``, from any directory."""
    return f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} rlhf finetune --resume {run_id}"


def read_resume(run_id: str) -> tuple[dict, Path]:
    """The config and run folder of MLflow run ``run_id``, read before Ray starts; a
    :class:`ResumeError` naming the folder when no checkpoint is left to continue from."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri(None))  # where this process points
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RunFailed(f"--resume {run_id}: {first_line(e)}") from e
        raise ResumeError(
            f"--resume {run_id}: no such run in {mlflow.get_tracking_uri()} "
            "(set MLFLOW_TRACKING_URI to the run's tracking store)"
        ) from e
    doc = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")
    run_dir = Path(run.data.tags[RUN_DIR_TAG])
    if not any((f / MANIFEST).is_file() for f in checkpoint_folders(run_dir)):
        logged = max(tracking.logged_steps(run_id, "train/loss"), default=0)
        raise ResumeError(
            f"--resume {run_id}: no checkpoint in {run_dir / CHECKPOINTS} (the run logged "
            f"{logged} steps); its checkpoints are gone, so it cannot be continued: start a "
            "new run"
        )
    return doc, run_dir


class RunRecords:
    """The MLflow run of one fine-tuning run, in the process that owns it. ``run_dir``: the
    run folder of a resumed run (a new run's is made by :meth:`start`); ``say``: where
    console lines go."""

    def __init__(
        self,
        cfg: RunConfig,
        tracking_uri: str,
        run_dir: Path | None,
        say: Callable[[str], None],
    ):
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.run_dir = run_dir
        self.say = say
        self.run_id: str | None = None
        self.last_logged = -1  # steps up to here are in MLflow already (resume, restart)
        self.high_water = -1  # the highest step logged by this process
        self._pending: list = []  # mlflow RunOperations of asynchronous metric logging
        self._batch: list = []  # mlflow Metrics of the steps not yet sent
        self._batch_steps = 0
        self._sent_at = time.monotonic()

    def resume_command(self) -> str:
        return resume_command(self.tracking_uri, self.run_id)

    def start(self, resume_run_id: str | None) -> None:
        """Create the MLflow run (config, parameters, run folder tag), or mark ``resume_run_id``
        running again; then make the run folder and localise the reward checkpoints."""
        import mlflow
        from mlflow import MlflowClient

        cfg = self.cfg
        tracking.setup(self.tracking_uri, cfg.mlflow.experiment)
        client = MlflowClient()
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            self.last_logged = max(tracking.logged_steps(resume_run_id, "train/loss"), default=-1)
            self.say(f"resuming run {resume_run_id} (logged up to step {self.last_logged})")
            self.run_id = resume_run_id
        else:
            exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
            run = client.create_run(exp.experiment_id, run_name=cfg.name)
            rid = run.info.run_id
            self.run_dir = Path(cfg.output_dir) / f"{cfg.name}-{rid[:8]}"
            client.set_tag(rid, RUN_DIR_TAG, str(self.run_dir))
            mlflow.log_dict(cfg.to_dict(), "config.json", run_id=rid)
            params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
            mlflow.log_params(params, run_id=rid)
            self.run_id = rid  # set last: with it, resume_command() works
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._localise_checkpoints()

    def _localise_checkpoints(self) -> None:
        """With a local MLflow store (SQLite or files), fetch ``models:/``/``runs:/`` reward
        checkpoints here and hand actors the local folder: actor processes do not share this
        process's tracking URI. With a tracking server, actors resolve the URI themselves (set
        ``MLFLOW_TRACKING_URI`` in the job's runtime env, see README)."""
        import mlflow

        uri = self.tracking_uri
        if not (uri.startswith(("sqlite:", "file:")) or "://" not in uri):
            return
        for field in ("rewards", "eval_rewards"):
            specs = []
            for i, d in enumerate(getattr(self.cfg, field)):
                ck = d.get("checkpoint") if isinstance(d, dict) else None
                if ck and str(ck).startswith(("models:/", "runs:/")):
                    dst = self.run_dir / "reward_checkpoints" / f"{field}_{i}"
                    dst.mkdir(parents=True, exist_ok=True)
                    local = mlflow.artifacts.download_artifacts(str(ck), dst_path=str(dst))
                    d = {**d, "checkpoint": local}
                specs.append(d)
            setattr(self.cfg, field, specs)

    def log(self, metrics: dict, step: int) -> None:
        """``metrics`` of ``step``, sent to MLflow with those of the next steps: every
        :data:`LOG_EVERY_STEPS` steps or :data:`LOG_EVERY_S` seconds, and at :meth:`flush`.
        A transaction per step cost the coordinator 8% of a core beside the workers' steps
        (BENCHMARKS.md section 6)."""
        from mlflow.entities import Metric

        if step <= self.last_logged:
            return  # already in MLflow from before a resume or restart
        now = int(time.time() * 1000)
        self._batch += [
            Metric(tracking.metric_key(k), float(v), now, step) for k, v in metrics.items()
        ]
        self._batch_steps += 1
        self.high_water = max(self.high_water, step)
        if self._batch_steps >= LOG_EVERY_STEPS or time.monotonic() - self._sent_at >= LOG_EVERY_S:
            self._send()

    def _send(self) -> None:
        """The gathered metrics to MLflow, asynchronously (off the steps' critical path)."""
        from mlflow import MlflowClient

        batch, self._batch, self._batch_steps = self._batch, [], 0
        self._sent_at = time.monotonic()
        client = MlflowClient()
        # MLflow caps a batch at 1000 metrics.
        for i in range(0, len(batch), 1000):
            op = client.log_batch(self.run_id, batch[i : i + 1000], synchronous=False)
            self._pending.append(op)

    def flush(self) -> None:
        """Send what is gathered and wait for the asynchronous metric logging; raises if any
        of it failed (MLflow unreachable): MLflow only logs such failures, and the run would
        go on unrecorded."""
        if self._batch:
            self._send()
        ops, self._pending = self._pending, []
        for op in ops:
            op.wait()

    def log_image(self, picture: np.ndarray, step: int) -> None:
        """The evaluation grid ``picture`` (``[H, W, 3]`` uint8) of ``step``, unless it was
        logged before a resume or restart."""
        from mlflow import MlflowClient

        if step > self.last_logged:
            MlflowClient().log_image(self.run_id, picture, f"eval/samples_step_{step:06d}.png")

    def register(self, folder: Path, step: int, is_best: bool) -> None:
        """Register the policy export of checkpoint ``folder`` (aliases ``last``, and ``best``
        when ``is_best``), unless not configured or done before a resume or restart."""
        from mlflow import MlflowClient

        model = self.cfg.mlflow.register_as
        if model and step > self.last_logged:
            aliases = ("last", "best") if is_best else ("last",)
            v = tracking.register_folder(
                folder / "export", model, self.run_id, aliases=aliases, tags={"step": str(step)}
            )
            client = MlflowClient()
            client.set_model_version_tag(model, str(v), "step", str(step))
            client.set_tag(self.run_id, "rlhf.last_policy_version", str(v))
            best = " (best)" if is_best else ""
            self.say(f"checkpoint step {step}: registered {model} v{v}{best}")
        else:
            self.say(f"checkpoint step {step}: {folder}")

    def end(self, status: str) -> None:
        """End the MLflow run with ``status``; a failure to reach MLflow is reported on the
        console, not raised over the error being reported."""
        if self.run_id is None:
            return
        from mlflow import MlflowClient

        try:
            self.flush()  # the steps done before a failure or an interrupt are recorded too
            MlflowClient().set_terminated(self.run_id, status)
        except Exception as e:
            self.say(f"warning: could not mark MLflow run {self.run_id} {status}: {e}")

    def logged_results(self) -> tuple[dict, dict, list[int]]:
        """The run's step-0 and last evaluations and its policy versions, read back from
        MLflow: the first part of a resumed run was logged by another process."""
        from mlflow import MlflowClient

        client = MlflowClient()
        hist = {
            k: {m.step: m.value for m in client.get_metric_history(self.run_id, k)}
            for k in client.get_run(self.run_id).data.metrics
            if k.startswith("eval/")
        }
        last = max((max(h) for h in hist.values() if h), default=0)
        before = {k: h[0] for k, h in hist.items() if 0 in h}
        after = {k: h[last] for k, h in hist.items() if last in h}
        name = self.cfg.mlflow.register_as
        found = (
            client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'")
            if name
            else []
        )
        return before, after, sorted(int(v.version) for v in found)


def step_summary(m: dict) -> str:
    flag = " (skipped: non-finite reward)" if m.get("skipped") else ""
    return (
        f"loss {m.get('loss', float('nan')):+.4f} reward {m.get('reward', float('nan')):.4f} "
        f"{m.get('images_per_s', 0):.2f} img/s{flag}"
    )


def summary_lines(s: dict) -> list[str]:
    """The human summary of a run (reward before/after per component)."""
    lines = [f"run {s['run_id']}: {s['steps']} steps ({s['stop_reason']}), {s['wall_s']:.0f}s"]
    before, after = s.get("reward_before") or {}, s.get("reward_after") or {}
    for k in sorted(set(before) | set(after)):
        if "reward" in k:
            b, a = before.get(k, np.nan), after.get(k, np.nan)
            lines.append(f"  {k:<28} {b:8.4f} -> {a:8.4f}  ({a - b:+.4f})")
    if s.get("versions"):
        lines.append(
            f"  policy: models:/{s['registered_model']}/{s['versions'][-1]} "
            f"(versions {s['versions']}, best at step {s['best_step']})"
        )
    lines.append(f"  samples: {s['samples']}")
    lines.append(f"  checkpoints: {s['checkpoints']}")
    lines.append(f"  tracking: {s['tracking_uri']}")
    lines.append(f"  resume: {s['resume']}")
    return lines
