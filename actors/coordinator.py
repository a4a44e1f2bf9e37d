"""The learner: the Coordinator actor that drives a DRaFT-K run, and the driver side that
starts it and waits.

``rlhf finetune`` (also as a ``ray job submit`` entrypoint) builds a :class:`FinetuneRun`,
which starts one :class:`Coordinator` actor (named, owned by the driver: a dead driver takes
it and everything it started with it), relays its console lines and waits for its summary.
The coordinator owns the run's MLflow state, the reward servers and the text-encoder actor;
it runs the generator workers as a Ray Train ``TorchTrainer`` (:func:`actors.generator_worker.
train_func`) and plans every step for them: rank 0 asks :meth:`Coordinator.advance` what to do
next and gets the step's prompts and seeds (the data position *is* the step, see
:mod:`rlhf.prompts`), an evaluation of fixed held-out prompts and seeds, a checkpoint, or
stop. The coordinator averages the workers' metrics and logs them, scores evaluations with
every configured reward (image grids and reward-hacking statistics too), registers every
checkpoint's policy export as an MLflow model version (aliases ``best``, by held-out reward,
and ``last``) and applies the stop rules.

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
import os
import shlex
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from actors.reward_client import RewardClient
from rewards.errors import UserError
from rlhf import tracking
from rlhf.checkpointing import (
    CHECKPOINTS,
    MANIFEST,
    CheckpointError,
    checkpoint_folders,
    checkpoint_name,
    verify_checkpoint,
)
from rlhf.config import ConfigError, bind, flatten
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)

RUN_DIR_TAG = "rlhf.run_dir"
STAGING = ".staging"  # under the run folder: where the ranks write a checkpoint together
PROGRESS_EVERY_S = 10.0


class RunStopped(RuntimeError):
    """The run stopped on a rule (too many bad steps); a checkpoint was saved."""


class ResumeError(ConfigError):
    """A run cannot be resumed (unknown run id, no usable checkpoint); nothing was trained."""


class RunFailed(RuntimeError):
    """A started run failed: one line naming the cause, the run id and the resume command
    (the cause is chained)."""


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
            raise RunFailed(f"--resume {run_id}: {_first_line(e)}") from e
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


# --------------------------------------------------------------------------- the actor


class Coordinator:
    """One fine-tuning run, as a Ray actor (:class:`FinetuneRun` starts it). ``resume_run_id``
    continues that MLflow run in ``run_dir`` from its last good checkpoint. ``on_step(co,
    step, metrics)`` runs in the actor after each logged step (a hook for tests and tools)."""

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
        self.tracking_uri = tracking_uri or tracking.tracking_uri(cfg.mlflow.tracking_uri)
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress
        self.on_step = on_step
        self.clients: dict[str, RewardClient] = {}
        self.text_encoder = None
        self.workers: list[dict] = []  # what each rank of the current group reported
        self.best: float | None = None
        self.best_step: int | None = None
        self.run_id: str | None = None
        self.step = 0
        self.bad_in_row = 0
        self.skipped_total = 0
        self.rebuilds = 0
        self.stop_reason = "max_steps"
        self.last_logged = -1  # steps up to here are in MLflow already (resume, restart)
        self.high_water = -1  # the highest step logged by this run's actor
        self._pending_logs: list = []  # mlflow RunOperations of asynchronous metric logging
        self._unusable: set[str] = set()  # checkpoints a group could not load
        self._plans = None  # the generator of the current group's plans
        self._fatal: BaseException | None = None
        self._interrupted = False
        self._lock = threading.Lock()  # worker calls of a dying and a new group do not mix
        self._lines: list[str] = []
        self._last_progress = 0.0

    # ------------------------------------------------------------------ the driver's calls

    def run(self) -> dict:
        """The whole run; returns its summary (``interrupted``: stopped by :meth:`interrupt`)."""
        t_start = time.perf_counter()
        try:
            self._start_run()
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
                self._end_run("KILLED")
                return {**self.info(), "interrupted": True}
            summary = self._summary(time.perf_counter() - t_start)
            self._end_run("FINISHED")
            return summary
        except (RunStopped, UserError):
            self._end_run("FAILED")
            raise
        except Exception as e:
            self._end_run("FAILED")
            cause = f"{type(e).__name__}: {_first_line(e)}"
            if self.run_id is None:
                raise RunFailed(f"could not start the run: {cause}") from e
            raise RunFailed(
                f"run {self.run_id} failed after step {max(self.step, self.high_water)}: "
                f"{cause}; resume with: {self.resume_command()}"
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
            "tracking_uri": self.tracking_uri,
            "resume": self.resume_command() if self.run_id else None,
        }

    def resume_command(self) -> str:
        """The command that continues this run, from any directory."""
        uri = shlex.quote(self.tracking_uri)
        return f"MLFLOW_TRACKING_URI={uri} rlhf finetune --resume {self.run_id}"

    # ------------------------------------------------------------------ the workers' calls

    def group_started(self, infos: list[dict]) -> dict:
        """Rank 0 of a new worker group: its ranks are up. Returns the checkpoints to try,
        newest first, each verified against its manifest."""
        with self._lock:
            if self.workers:  # Ray Train restarted the group after a failure
                self.rebuilds += 1
                self.last_logged = max(self.last_logged, self.high_water)
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
            if folder is not None:
                self.best, self.best_step = state.get("best"), state.get("best_step")
                self.skipped_total = state.get("skipped_total", 0)
                self._say(f"restored {Path(folder).name} (step {step})")
            self.step, self.bad_in_row = step, 0
            if self._plans is not None:
                self._plans.close()
            self._plans = self._plan(step)
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

    # ------------------------------------------------------------------ the loop

    def _plan(self, step: int):
        """The plans of one worker group from ``step`` on; each ``yield`` receives the
        ranks' results of the plan it yielded."""
        from rlhf.prompts import read_prompts, step_batch

        cfg = self.cfg
        p = cfg.prompts
        prompts = read_prompts(p.train, p.column, p.synthetic_train, seed=cfg.seed)
        if step == 0:
            yield from self._evaluate(0)
        while step < cfg.train.max_steps:
            nxt = step + 1
            batch, seeds = step_batch(prompts, nxt, cfg.global_batch, cfg.seed)
            t = time.perf_counter()
            outs = yield {"do": "step", "step": nxt, "prompts": batch, "seeds": seeds}
            self.step = step = nxt
            keys = set().union(*outs)
            m = {k: float(np.mean([o[k] for o in outs if k in o])) for k in keys}
            m["images_per_s"] = cfg.global_batch / (time.perf_counter() - t)
            if m.get("skipped"):
                self.bad_in_row += 1
                self.skipped_total += 1
                log.warning("step %d skipped: non-finite reward or gradient", step)
            else:
                self.bad_in_row = 0
            m["skipped_total"] = self.skipped_total
            self._log({f"train/{k}": v for k, v in m.items()}, step)
            self._progress(step, m)
            if self.on_step is not None:
                self.on_step(self, step, m)
            if self.bad_in_row >= cfg.train.max_bad_steps:
                yield from self._checkpoint(step, None)
                raise RunStopped(
                    f"stopped at step {step}: {self.bad_in_row} steps in a row had a "
                    f"non-finite reward or gradient (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}); checkpoint saved in {self.run_dir}"
                )
            final = step == cfg.train.max_steps
            ev = None
            if step % cfg.train.eval_every == 0 or final:
                ev = yield from self._evaluate(step)
            if step % cfg.checkpoint.every == 0 or final:
                yield from self._checkpoint(step, ev["eval/reward"] if ev else None)
            if ev is not None and self._early_stop(step):
                self.stop_reason = "early_stop"
                if step % cfg.checkpoint.every and not final:
                    yield from self._checkpoint(step, ev["eval/reward"])
                break
        self._flush_logs()

    def _early_stop(self, step: int) -> bool:
        es = self.cfg.train.early_stop
        if not es.patience or self.best_step is None:
            return False
        evals_since = (step - self.best_step) // self.cfg.train.eval_every
        return evals_since >= es.patience

    # ------------------------------------------------------------------ evaluation

    def _eval_set(self) -> tuple[list[str], list[int]]:
        from rlhf.prompts import read_prompts

        p = self.cfg.prompts
        prompts = read_prompts(p.eval, p.column, p.synthetic_eval, seed=p.eval_seed)
        n = self.cfg.scaling.num_workers
        padded = prompts + prompts[: (-len(prompts)) % n]
        return padded, [p.eval_seed + i for i in range(len(padded))]

    def _evaluate(self, step: int):
        import torch
        from mlflow import MlflowClient
        from PIL import Image

        from rlhf.image_stats import grid, image_stats

        prompts, seeds = self._eval_set()
        outs = yield {"do": "evaluate", "prompts": prompts, "seeds": seeds}
        scores = {k: np.concatenate([o["scores"][k] for o in outs]) for k in outs[0]["scores"]}
        total = np.concatenate([o["total"] for o in outs])
        images = np.concatenate([o["images"] for o in outs])
        metrics = {"eval/reward": float(total.mean())}
        metrics.update({f"eval/reward/{k}": float(v.mean()) for k, v in scores.items()})
        imgs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        metrics.update({f"eval/{k}": v for k, v in image_stats(imgs).items()})
        self._log(metrics, step)
        picture = grid(images)
        samples = self.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        Image.fromarray(picture).save(samples / f"step_{step:06d}.png")
        if step > self.last_logged:
            MlflowClient().log_image(self.run_id, picture, f"eval/samples_step_{step:06d}.png")
        parts = " ".join(
            f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if "/reward" in k
        )
        self._say(f"eval @ step {step}: {parts}")
        return metrics

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

    def _checkpoint(self, step: int, eval_reward: float | None):
        from mlflow import MlflowClient

        # Every step up to a checkpoint is in MLflow before the checkpoint exists: a resume
        # from it then never leaves a gap in the metric series.
        self._flush_logs()
        is_best = eval_reward is not None and (self.best is None or eval_reward > self.best)
        if is_best:
            self.best, self.best_step = eval_reward, step
        name = checkpoint_name(self.run_dir, step)
        staging = self.run_dir / STAGING / name
        folder = self.run_dir / CHECKPOINTS / name
        shutil.rmtree(staging, ignore_errors=True)  # left by a group that died saving
        yield {
            "do": "checkpoint",
            "step": step,
            "name": name,
            "folder": str(folder),
            "staging": str(staging),
            "state": {
                "best": self.best,
                "best_step": self.best_step,
                "skipped_total": self.skipped_total,
            },
            "policy": self.cfg.to_dict()["policy"],
        }
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
            self._say(f"checkpoint step {step}: registered {model} v{v}{best}")
        else:
            self._say(f"checkpoint step {step}: {folder}")

    # ------------------------------------------------------------------ set-up

    def _start_run(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        cfg = self.cfg
        tracking.setup(self.tracking_uri, cfg.mlflow.experiment)
        client = MlflowClient()
        if self.resume_run_id:
            client.update_run(self.resume_run_id, status="RUNNING")
            self.last_logged = max(
                tracking.logged_steps(self.resume_run_id, "train/loss"), default=-1
            )
            self._say(f"resuming run {self.resume_run_id} (logged up to step {self.last_logged})")
            self.run_id = self.resume_run_id
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

    def _start_actors(self) -> None:
        """The reward servers and the text-encoder actor: the coordinator's, so they outlive
        a restart of the worker group."""
        from actors.text_encoder import start_text_encoder

        for spec in self.cfg.reward_specs() + self.cfg.eval_reward_specs():
            if spec.placement == "server":
                t = time.perf_counter()
                self.clients[spec.key] = RewardClient(
                    spec, self.cfg.reward_server, seed=self.cfg.seed
                ).start()
                self._say(f"reward server {spec.key} ready ({time.perf_counter() - t:.1f}s)")
        gen = self.cfg.policy.generator
        if gen.text_encoders == "actor":
            self.text_encoder = start_text_encoder(gen, self.cfg.text_encoder.resources)

    def _fit(self) -> None:
        """The generator workers as a Ray Train run; its checkpoints land in
        ``<run_dir>/checkpoints`` (a resume's new trainer finds the old ones there)."""
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from actors.generator_worker import train_func

        cfg = self.cfg
        shutil.rmtree(self.run_dir / STAGING, ignore_errors=True)  # a killed driver's half-saves
        use_gpu = cfg.scaling.use_gpu
        trainer = TorchTrainer(
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
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            if self._fatal is not None:
                return  # the run's own error, raised by run()
            failures = getattr(e, "worker_failures", None) or {}
            why = "; ".join(f"rank {r}: {_first_line(x)}" for r, x in sorted(failures.items()))
            raise RuntimeError(
                f"generator group failed {self.rebuilds + 1} times (scaling.max_failures="
                f"{cfg.scaling.max_failures}): generator worker failed: {why or _first_line(e)}"
            ) from e

    # ------------------------------------------------------------------ logging

    def _log(self, metrics: dict, step: int) -> None:
        import mlflow

        if step <= self.last_logged:
            return  # already in MLflow from before a resume or restart
        op = mlflow.log_metrics(
            {tracking.metric_key(k): float(v) for k, v in metrics.items()},
            step=step,
            synchronous=False,  # off the step's critical path; flushed before each checkpoint
            run_id=self.run_id,
        )
        self._pending_logs.append(op)
        self.high_water = max(self.high_water, step)

    def _flush_logs(self) -> None:
        """Wait for the asynchronous metric logging; raises if any of it failed (MLflow
        unreachable): MLflow only logs such failures, and the run would go on unrecorded."""
        ops, self._pending_logs = self._pending_logs, []
        for op in ops:
            op.wait()

    def _say(self, line: str) -> None:
        """A console line (the driver prints it)."""
        log.info("%s", line)
        self._lines.append(line)

    def _progress(self, step: int, m: dict) -> None:
        now = time.perf_counter()
        if self.progress and (now - self._last_progress > PROGRESS_EVERY_S or step == 1):
            self._last_progress = now
            self._say(f"step {step}/{self.cfg.train.max_steps}: {_step_summary(m)}")

    def _end_run(self, status: str) -> None:
        """End the MLflow run with ``status``; a failure to reach MLflow is reported on the
        console, not raised over the error being reported."""
        if self.run_id is None:
            return
        from mlflow import MlflowClient

        try:
            MlflowClient().set_terminated(self.run_id, status)
        except Exception as e:
            self._say(f"warning: could not mark MLflow run {self.run_id} {status}: {e}")

    def _summary(self, wall_s: float) -> dict:
        before, after, versions = self._logged_results()
        summary = {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "checkpoints": str(self.run_dir / CHECKPOINTS),
            "tracking_uri": self.tracking_uri,
            "resume": self.resume_command(),
            "steps": self.step,
            "stop_reason": self.stop_reason,
            "reward_before": before,
            "reward_after": after,
            "best_step": self.best_step,
            "registered_model": self.cfg.mlflow.register_as,
            "versions": versions,
            "skipped_steps": self.skipped_total,
            "rebuilds": self.rebuilds,
            "workers": self.workers,
            "samples": str(self.run_dir / "samples"),
            "wall_s": wall_s,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _logged_results(self) -> tuple[dict, dict, list[int]]:
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


# --------------------------------------------------------------------------- the driver


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
        a checkpoint is there (:class:`ResumeError`, naming the folder, if not); a new run
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
        """Start the coordinator and wait; its errors (:class:`RunStopped`,
        :class:`RunFailed`, :class:`ResumeError`, ...) are raised here as themselves."""
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
        return self._resume_cmd or (
            f"MLFLOW_TRACKING_URI={shlex.quote(self.tracking_uri or '')} "
            f"rlhf finetune --resume {self.run_id}"
        )


def _step_summary(m: dict) -> str:
    flag = " (skipped: non-finite reward)" if m.get("skipped") else ""
    return (
        f"loss {m.get('loss', float('nan')):+.4f} reward {m.get('reward', float('nan')):.4f} "
        f"{m.get('images_per_s', 0):.2f} img/s{flag}"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
