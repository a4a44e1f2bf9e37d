"""The learner: the Coordinator actor that drives a DRaFT-K run.

``rlhf finetune`` (also as a ``ray job submit`` entrypoint) builds a
:class:`~actors.finetune_run.FinetuneRun`, which starts one :class:`Coordinator` actor (named,
owned by the driver: a dead driver takes it and everything it started with it), relays its
console lines and waits for its summary. The coordinator owns the run's MLflow state
(:class:`~rlhf.run_records.RunRecords`), the reward servers and the text-encoder actor; it runs
the generator workers as a Ray Train ``TorchTrainer`` (:func:`actors.generator_worker.
train_func`) and plans every step for them (:class:`~rlhf.run_plans.RunLoop`): rank 0 asks
:meth:`Coordinator.advance` what to do next and gets the step's prompts and seeds, an
evaluation of fixed held-out prompts and seeds, a checkpoint, or stop. The coordinator
averages the workers' metrics and logs them, scores evaluations with every configured reward
(image grids and reward-hacking statistics too), registers every checkpoint's policy export as
an MLflow model version (aliases ``best``, by held-out reward, and ``last``) and applies the
stop rules.

Faults: a worker that dies makes Ray Train restart the group (``FailureConfig``,
``scaling.max_failures``), which restores the newest checkpoint that matches its manifest
(:mod:`rlhf.checkpointing`); a reward server that dies is restarted by Ray and the call resent;
a non-finite reward skips the step on every rank, and ``train.max_bad_steps`` in a row stop the
run with a checkpoint. Steps already in MLflow are not logged again after a resume or a restart.
Ctrl-C asks the coordinator to stop after the current step: the MLflow run is marked KILLED.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from actors.reward_client import RewardClient
from rewards.errors import UserError
from rlhf import tracking
from rlhf.checkpointing import CHECKPOINTS, CheckpointError, checkpoint_folders, verify_checkpoint
from rlhf.run_config import RunConfig
from rlhf.run_plans import STAGING, RunLoop
from rlhf.run_records import ResumeError, RunFailed, RunRecords, RunStopped, first_line

log = logging.getLogger(__name__)


class Coordinator:
    """One fine-tuning run, as a Ray actor (:class:`~actors.finetune_run.FinetuneRun` starts
    it). ``resume_run_id`` continues that MLflow run in ``run_dir`` from its last good
    checkpoint. ``on_step(co, step, metrics)`` runs in the actor after each logged step (a
    hook for tests and tools)."""

    def __init__(
        self,
        cfg: RunConfig,
        resume_run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        run_dir: str | None = None,
        progress: bool = True,
        on_step=None,
    ):
        self.cfg = cfg
        self.resume_run_id = resume_run_id
        self.on_step = on_step
        self.records = RunRecords(
            cfg,
            tracking_uri or tracking.tracking_uri(cfg.mlflow.tracking_uri),
            Path(run_dir) if run_dir else None,
            self._say,
        )
        hook = (lambda step, m: on_step(self, step, m)) if on_step is not None else None
        self.loop = RunLoop(cfg, self.records, self._say, progress=progress, on_step=hook)
        self.clients: dict[str, RewardClient] = {}
        self.text_encoder = None
        self.workers: list[dict] = []  # what each rank of the current group reported
        self.rebuilds = 0
        self._unusable: set[str] = set()  # checkpoints a group could not load
        self._plans = None  # the generator of the current group's plans
        self._fatal: BaseException | None = None
        self._interrupted = False
        self._lock = threading.Lock()  # worker calls of a dying and a new group do not mix
        self._lines: list[str] = []

    @property
    def run_id(self) -> str | None:
        return self.records.run_id

    @property
    def run_dir(self) -> Path | None:
        return self.records.run_dir

    # ------------------------------------------------------------------ the driver's calls

    def run(self) -> dict:
        """The whole run; returns its summary (``interrupted``: stopped by :meth:`interrupt`)."""
        t_start = time.perf_counter()
        try:
            self.records.start(self.resume_run_id)
            self._start_actors()
            if self.resume_run_id and not self._good_checkpoints():
                raise ResumeError(
                    f"--resume {self.run_id}: no usable checkpoint in "
                    f"{self.run_dir / CHECKPOINTS} (see above); the run cannot be continued: "
                    "start a new run"
                )
            if not self._interrupted:
                self._fit()
            if self._fatal is not None:
                raise self._fatal
            if self._interrupted:
                self.records.end("KILLED")
                return {**self.info(), "interrupted": True}
            summary = self._summary(time.perf_counter() - t_start)
            self.records.end("FINISHED")
            return summary
        except (RunStopped, UserError):
            self.records.end("FAILED")
            raise
        except Exception as e:
            self.records.end("FAILED")
            cause = f"{type(e).__name__}: {first_line(e)}"
            if self.run_id is None:
                raise RunFailed(f"could not start the run: {cause}") from e
            raise RunFailed(
                f"run {self.run_id} failed after step "
                f"{max(self.loop.step, self.records.high_water)}: "
                f"{cause}; resume with: {self.records.resume_command()}"
            ) from e
        finally:
            self.shutdown()

    def interrupt(self) -> None:
        """Stop after the current step (Ctrl-C in the driver); the run is marked KILLED."""
        self._interrupted = True
        self._say("interrupt: stopping after the current step")

    def lines(self, since: int = 0) -> list[str]:
        """Console lines from number ``since`` on (the driver prints them)."""
        return self._lines[since:]

    def info(self) -> dict:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "tracking_uri": self.records.tracking_uri,
            "resume": self.records.resume_command() if self.run_id else None,
        }

    # ------------------------------------------------------------------ the workers' calls

    def group_started(self, infos: list[dict]) -> dict:
        """Rank 0 of a new worker group: its ranks are up. Returns the checkpoints to try,
        newest first, each verified against its manifest."""
        with self._lock:
            if self.workers:  # Ray Train restarted the group after a failure
                self.rebuilds += 1
                # What the dead group logged (some of it still gathered here) is sent now,
                # and its steps are not logged again when the new group replays them.
                self.records.flush()
                self.records.last_logged = max(self.records.last_logged, self.records.high_water)
                self._say(
                    f"generator group restarted by Ray Train ({self.rebuilds} of "
                    f"scaling.max_failures={self.cfg.scaling.max_failures}); restoring the "
                    "last checkpoint"
                )
            self.workers = infos
            setup = max(i["setup_s"] for i in infos)
            self._say(f"{len(infos)} generator worker(s) ready ({setup:.1f}s)")
            return {"restore": [str(f) for f in self._good_checkpoints()]}

    def checkpoint_unusable(self, folder: str, why: str) -> None:
        with self._lock:
            self._unusable.add(folder)
            self._say(f"skipping checkpoint {folder}: cannot load it ({why})")

    def restored(self, folder: str | None, step: int, state: dict) -> dict:
        """Rank 0: the group restored ``folder`` (None: none, a fresh start). Returns the
        first plan."""
        with self._lock:
            self.loop.restore(folder, step, state)
            if self._plans is not None:
                self._plans.close()
            self._plans = self.loop.plans(step)
            return self._next(None)

    def advance(self, results: list) -> dict:
        """Rank 0: the ranks' results of the last plan (in rank order). Returns the next."""
        with self._lock:
            return self._next(results)

    def _next(self, results) -> dict:
        """Feed ``results`` to the plans (logging, registration: the work done is recorded
        even after an interrupt) and return the next plan, or stop."""
        if self._fatal is not None or self._plans is None:
            return {"do": "stop"}
        try:
            plan = self._plans.send(results) if results is not None else next(self._plans)
        except StopIteration:
            self._plans = None
            return {"do": "stop"}
        except BaseException as e:  # ends the run, not the workers: Ray Train must not retry
            self._fatal, self._plans = e, None
            return {"do": "stop"}
        if self._interrupted:
            self._plans.close()
            self._plans = None
            return {"do": "stop"}
        return plan

    # ------------------------------------------------------------------ checkpoints

    def _good_checkpoints(self) -> list[Path]:
        """The run's checkpoints that match their manifests and loaded (or were not tried),
        newest first; each bad one is named on the console."""
        good = []
        for folder in checkpoint_folders(self.run_dir):
            if str(folder) in self._unusable:
                continue
            try:
                verify_checkpoint(folder)  # raises, naming the bad file
            except CheckpointError as e:
                self._say(f"skipping checkpoint: {e}")
                log.error("%s", e)
                self._unusable.add(str(folder))
                continue
            good.append(folder)
        return good

    # ------------------------------------------------------------------ set-up

    def _start_actors(self) -> None:
        """The reward servers and the text-encoder actor: the coordinator's, so they outlive
        a restart of the worker group."""
        from actors.text_encoder import start_text_encoder

        specs = self.cfg.reward_specs() + self.cfg.eval_reward_specs()
        clients = {
            s.key: RewardClient(s, self.cfg.reward_server, seed=self.cfg.seed)
            for s in specs
            if s.placement == "server"
        }
        t = time.perf_counter()
        for client in clients.values():
            client.handle  # noqa: B018 (creates the actor: every server loads at once)
        for key, client in clients.items():
            self.clients[key] = client.start()
            self._say(f"reward server {key} ready ({time.perf_counter() - t:.1f}s)")
        gen = self.cfg.policy.generator
        if gen.text_encoders == "actor":
            self.text_encoder = start_text_encoder(gen, self.cfg.text_encoder.resources)

    def _trainer(self):
        """The generator workers as a Ray Train ``TorchTrainer``; its checkpoints land in
        ``<run_dir>/checkpoints`` (a resume's new trainer finds the old ones there)."""
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from actors.generator_worker import train_func

        cfg = self.cfg
        use_gpu = cfg.scaling.use_gpu
        return TorchTrainer(
            train_func,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "coordinator": ray.get_runtime_context().current_actor,
                "clients": self.clients,
                "text_encoder": self.text_encoder,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=use_gpu,
                resources_per_worker=cfg.scaling.ray_resources(),
            ),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS,
                storage_path=str(self.run_dir),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=cfg.checkpoint.keep,
                    checkpoint_score_attribute="step",
                    checkpoint_score_order="max",
                ),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            ),
        )

    def _fit(self) -> None:
        """Run the generator workers to the end; a group that failed past
        ``scaling.max_failures`` raises, naming each failed rank's error."""
        import ray.train

        shutil.rmtree(self.run_dir / STAGING, ignore_errors=True)  # a killed driver's half-saves
        trainer = self._trainer()
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            if self._fatal is not None:
                return  # the run's own error, raised by run()
            failures = getattr(e, "worker_failures", None) or {}
            why = "; ".join(f"rank {r}: {first_line(x)}" for r, x in sorted(failures.items()))
            raise RuntimeError(
                f"generator group failed {self.rebuilds + 1} times (scaling.max_failures="
                f"{self.cfg.scaling.max_failures}): generator worker failed: "
                f"{why or first_line(e)}"
            ) from e

    # ------------------------------------------------------------------ console, summary

    def _say(self, line: str) -> None:
        """A console line (the driver prints it)."""
        log.info("%s", line)
        self._lines.append(line)

    def _summary(self, wall_s: float) -> dict:
        before, after, versions = self.records.logged_results()
        summary = {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "checkpoints": str(self.run_dir / CHECKPOINTS),
            "tracking_uri": self.records.tracking_uri,
            "resume": self.records.resume_command(),
            "steps": self.loop.step,
            "stop_reason": self.loop.stop_reason,
            "reward_before": before,
            "reward_after": after,
            "best_step": self.loop.best_step,
            "registered_model": self.cfg.mlflow.register_as,
            "versions": versions,
            "skipped_steps": self.loop.skipped_total,
            "rebuilds": self.rebuilds,
            "workers": self.workers,
            "samples": str(self.run_dir / "samples"),
            "wall_s": wall_s,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def shutdown(self) -> None:
        import ray

        for c in self.clients.values():
            try:
                c.shutdown()
            except Exception:  # best effort at teardown
                pass
        self.clients = {}
        if self.text_encoder is not None:
            ray.kill(self.text_encoder, no_restart=True)
            self.text_encoder = None
