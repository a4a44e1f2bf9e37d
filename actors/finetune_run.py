"""The driver's side of ``rlhf finetune`` (also as a ``ray job submit`` entrypoint):
:class:`FinetuneRun` starts the :class:`~actors.coordinator.Coordinator` actor, prints the
console lines it hands over and waits for its summary."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from actors.coordinator import Coordinator
from rlhf import tracking
from rlhf.config import bind
from rlhf.run_config import RunConfig
from rlhf.run_records import read_resume, resume_command


class FinetuneRun:
    """The driver's side of one run: starts the :class:`Coordinator` actor, prints its
    console lines, waits for its summary. Ctrl-C asks the coordinator to stop (the run is
    marked KILLED and :class:`KeyboardInterrupt` re-raised here); a second Ctrl-C stops
    waiting. ``echo``: where console lines go (None: dropped)."""

    POLL_S = 0.25

    def __init__(
        self,
        cfg: RunConfig | None,
        resume_run_id: str | None = None,
        *,
        progress: bool = True,
        on_step=None,
        echo=print,
    ):
        if cfg is None and resume_run_id is None:
            raise ValueError("give a config or a run id to resume")
        self.cfg = cfg
        self.resume_run_id = resume_run_id
        self.progress = progress
        self.on_step = on_step
        self.echo = echo
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._resume_cmd: str | None = None
        self.actor = None

    def prepare(self) -> FinetuneRun:
        """Before Ray starts: a resume reads its run and config from MLflow and checks that
        a checkpoint is there (:class:`~rlhf.run_records.ResumeError`, naming the folder, if not); a new run
        resolves its paths and tracking store here, where the user gave them."""
        if self.resume_run_id:
            if self.run_dir is None:
                doc, self.run_dir = read_resume(self.resume_run_id)
                self.cfg = bind(RunConfig, doc).validate()
        else:
            self.cfg.output_dir = str(Path(self.cfg.output_dir).resolve())
            for key in ("train", "eval"):
                source = getattr(self.cfg.prompts, key)
                if Path(source).is_file():
                    setattr(self.cfg.prompts, key, str(Path(source).resolve()))
        self.tracking_uri = tracking.tracking_uri(self.cfg.mlflow.tracking_uri)
        return self

    def run(self) -> dict:
        """Start the coordinator and wait; its errors (:mod:`rlhf.run_records`'
        ``RunStopped``, ``RunFailed``, ``ResumeError``, ...) are raised here as themselves."""
        import ray

        self.prepare()
        # The driver's MLflow settings (credentials, retries, timeouts) reach the coordinator
        # and what it starts: Ray workers of a running cluster do not inherit this process's
        # environment.
        mlflow_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        remote = ray.remote(Coordinator).options(
            name=f"coordinator-{self.cfg.name}-{uuid.uuid4().hex[:6]}",
            num_cpus=0,
            max_restarts=0,
            max_concurrency=8,  # run() waits on Ray Train while the workers call in
            runtime_env={"env_vars": mlflow_env} if mlflow_env else None,
        )
        self.actor = remote.remote(
            self.cfg,
            self.resume_run_id,
            tracking_uri=self.tracking_uri,
            run_dir=str(self.run_dir) if self.run_dir else None,
            progress=self.progress,
            on_step=self.on_step,
        )
        done = self.actor.run.remote()
        shown, interrupted = 0, False
        try:
            while True:
                try:
                    ready, _ = ray.wait([done], timeout=self.POLL_S)
                    shown = self._relay(shown)
                    if ready:
                        summary = ray.get(done)
                        break
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    interrupted = True
                    self.actor.interrupt.remote()
        except ray.exceptions.RayTaskError as e:
            self._relay(shown)
            self._info()
            cause = e.cause if isinstance(e.cause, BaseException) else e
            if cause is not e:
                cause.__cause__ = e  # the remote traceback, for -v
            raise cause from e
        finally:
            self._info()
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        return summary

    def _relay(self, shown: int) -> int:
        import ray

        new = ray.get(self.actor.lines.remote(shown))
        if self.echo is not None:
            for line in new:
                self.echo(line)
        return shown + len(new)

    def _info(self) -> None:
        import ray

        if self.actor is None:
            return
        try:
            info = ray.get(self.actor.info.remote(), timeout=30)
        except Exception:  # the actor is gone: keep what we knew
            return
        self.run_id = info["run_id"] or self.run_id
        self.run_dir = Path(info["run_dir"]) if info["run_dir"] else self.run_dir
        self._resume_cmd = info["resume"] or self._resume_cmd

    def resume_command(self) -> str:
        return self._resume_cmd or resume_command(self.tracking_uri or "", self.run_id)
