"""The learner: drives a DRaFT-K run over the generator group and the reward servers.

It runs in the job's driver process (``rlhf finetune``, also under ``ray job submit``) and
owns every actor of the run, so a dead driver takes its actors with it. Per step it hands
each worker its share of the step's prompts and seeds (the data position *is* the step, see
:mod:`rlhf.prompts`), averages the workers' metrics and logs them to MLflow. Every
``eval_every`` steps it samples fixed held-out prompts and seeds and scores them with every
configured reward (image grids and reward-hacking statistics too); every ``checkpoint.every``
steps it writes a resume bundle plus the policy export and registers the export as an
MLflow model version (aliases ``best``, by held-out reward, and ``last``).

Faults: a worker that dies makes the coordinator rebuild the group from the last good
checkpoint (a checkpoint is good when its manifest of file sizes and hashes matches); a
reward server that dies is restarted by Ray and the call resent; a non-finite reward skips
the step on every rank, and ``train.max_bad_steps`` in a row stop the run with a
checkpoint. Steps already in MLflow are not logged again after a resume or a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from actors.generator_worker import WorkerGroup, WorkerGroupError
from actors.reward_client import RewardClient
from rewards.checkpoints import file_sha256
from rewards.errors import UserError
from rlhf import tracking
from rlhf.config import ConfigError, bind, flatten
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_DIR_TAG = "rlhf.run_dir"


class RunStopped(RuntimeError):
    """The run stopped on a rule (too many bad steps); a checkpoint was saved."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt (the message names it)."""


class ResumeError(ConfigError):
    """A run cannot be resumed (unknown run id, no usable checkpoint); nothing was trained."""


class RunFailed(RuntimeError):
    """A started run failed: one line naming the cause, the run id and the resume command
    (the cause is chained)."""


# --------------------------------------------------------------------------- checkpoints


def write_manifest(folder: Path, step: int) -> None:
    """Sizes and hashes of every file under ``folder``, written last and atomically: a
    checkpoint without a manifest is incomplete."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify_checkpoint(folder: Path) -> int:
    """The checkpoint's step if every file matches its manifest; else :class:`CheckpointError`
    naming the first bad file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {MANIFEST})")
    try:
        doc = json.loads(manifest.read_text())
    except ValueError as e:
        raise CheckpointError(f"{manifest}: corrupt manifest ({e})") from e
    for rel, want in doc["files"].items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing checkpoint file")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(
                f"{p}: truncated or changed ({p.stat().st_size} bytes, expected {want['bytes']})"
            )
        if file_sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: corrupt checkpoint file (hash mismatch)")
    return int(doc["step"])


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """``run_dir/checkpoints/step_*``, newest first."""
    root = run_dir / "checkpoints"
    return sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []


# --------------------------------------------------------------------------- the learner


class Coordinator:
    """One fine-tuning run. ``resume_run_id`` continues an MLflow run from its last good
    checkpoint (its config comes from the run; ``cfg`` is then ignored)."""

    def __init__(
        self,
        cfg: RunConfig | None,
        resume_run_id: str | None = None,
        progress: bool = True,
        on_step=None,
    ):
        if cfg is None and resume_run_id is None:
            raise ValueError("give a config or a run id to resume")
        self.cfg = cfg
        self.resume_run_id = resume_run_id
        self.progress = progress
        self.on_step = on_step  # on_step(coordinator, step, metrics): a hook for tests and tools
        self.group: WorkerGroup | None = None
        self.clients: dict[str, RewardClient] = {}
        self.best: float | None = None
        self.best_step: int | None = None
        self.run_id: str | None = None
        self._resume: tuple | None = None  # (run, config dict), read by prepare()
        self.bad_in_row = 0
        self.skipped_total = 0
        self.rebuilds = 0
        self.last_logged = -1  # steps up to here are in MLflow already (resume, rebuild)
        self.high_water = -1  # the highest step logged by this process
        self._pending_logs: list = []  # mlflow RunOperations of asynchronous metric logging

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> Coordinator:
        """For a resume, before Ray starts: read the run and its config from MLflow and check
        that a checkpoint is there; :class:`ResumeError` (naming the folder) if not."""
        if not self.resume_run_id or self._resume is not None:
            return self
        import mlflow
        from mlflow.exceptions import MlflowException

        rid = self.resume_run_id
        mlflow.set_tracking_uri(tracking.tracking_uri(None))  # where this process points
        try:
            run = mlflow.get_run(rid)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RunFailed(f"--resume {rid}: {_first_line(e)}") from e
            raise ResumeError(
                f"--resume {rid}: no such run in {mlflow.get_tracking_uri()} "
                "(set MLFLOW_TRACKING_URI to the run's tracking store)"
            ) from e
        doc = mlflow.artifacts.load_dict(f"runs:/{rid}/config.json")
        self.run_dir = Path(run.data.tags[RUN_DIR_TAG])
        folder = self.run_dir / "checkpoints"
        if not any((f / MANIFEST).is_file() for f in checkpoint_folders(self.run_dir)):
            logged = max(tracking.logged_steps(rid, "train/loss"), default=0)
            raise ResumeError(
                f"--resume {rid}: no checkpoint in {folder} (the run logged {logged} steps); "
                "its checkpoints are gone, so it cannot be continued: start a new run"
            )
        self._resume = (run, doc)
        return self

    def _start_run(self):
        import mlflow

        if self.resume_run_id:
            run, doc = self.prepare()._resume
            self.cfg = bind(RunConfig, doc).validate()
            mlflow.set_experiment(experiment_id=run.info.experiment_id)
            self.run = mlflow.start_run(run_id=self.resume_run_id)
            self.last_logged = max(
                tracking.logged_steps(self.resume_run_id, "train/loss"), default=-1
            )
            _say(f"resuming run {self.resume_run_id} (logged up to step {self.last_logged})")
        else:
            cfg = self.cfg
            tracking.setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
            self.run = mlflow.start_run(run_name=cfg.name)
            rid = self.run.info.run_id
            cfg.output_dir = str(Path(cfg.output_dir).resolve())  # a resume may start elsewhere
            self.run_dir = Path(cfg.output_dir) / f"{cfg.name}-{rid[:8]}"
            mlflow.set_tag(RUN_DIR_TAG, str(self.run_dir))
            mlflow.log_dict(cfg.to_dict(), "config.json")
            params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
            mlflow.log_params(params)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = mlflow.get_tracking_uri()
        self.run_id = self.run.info.run_id  # set last: with it, resume_command() works
        self._localise_checkpoints()

    def _localise_checkpoints(self) -> None:
        """With a local MLflow store (SQLite or files), fetch ``models:/``/``runs:/`` reward
        checkpoints here and hand actors the local folder: actor processes do not share this
        process's tracking URI. With a tracking server, actors resolve the URI themselves (set
        ``MLFLOW_TRACKING_URI`` in the job's runtime env, see README)."""
        import mlflow

        uri = mlflow.get_tracking_uri()
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

    def _start_servers(self) -> None:
        for spec in self.cfg.reward_specs() + self.cfg.eval_reward_specs():
            if spec.placement == "server":
                t = time.perf_counter()
                self.clients[spec.key] = RewardClient(
                    spec, self.cfg.reward_server, seed=self.cfg.seed
                ).start()
                _say(f"reward server {spec.key} ready ({time.perf_counter() - t:.1f}s)")

    def _start_group(self, resuming: bool = False) -> int:
        """Start the worker group and restore the newest good checkpoint; returns its step
        (0: none, which ``resuming`` refuses: the run's logged steps would be retrained)."""
        t = time.perf_counter()
        self.group = WorkerGroup(self.cfg, self.clients).start()
        _say(
            f"{self.cfg.scaling.num_workers} generator worker(s) ready ({time.perf_counter() - t:.1f}s)"
        )
        for folder in checkpoint_folders(self.run_dir):
            try:
                verify_checkpoint(folder)  # raises, naming the bad file
                step, state = self.group.load(str(folder / "resume"))
            except CheckpointError as e:
                _say(f"skipping checkpoint: {e}")
                log.error("%s", e)
                continue
            except WorkerGroupError as e:
                _say(f"skipping checkpoint {folder}: cannot load it ({e.__cause__ or e})")
                self.group.kill()
                self.group = WorkerGroup(self.cfg, self.clients).start()
                continue
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.skipped_total = state.get("skipped_total", 0)
            _say(f"restored {folder.name} (step {step})")
            return step
        if resuming:
            raise ResumeError(
                f"--resume {self.run_id}: no usable checkpoint in {self.run_dir / 'checkpoints'}"
                " (see above); the run cannot be continued: start a new run"
            )
        return 0

    # ------------------------------------------------------------------ logging

    def _log(self, metrics: dict, step: int) -> None:
        import mlflow

        if step <= self.last_logged:
            return  # already in MLflow from before a resume or rebuild
        op = mlflow.log_metrics(
            {tracking.metric_key(k): float(v) for k, v in metrics.items()},
            step=step,
            synchronous=False,  # off the step's critical path; flushed before each checkpoint
        )
        self._pending_logs.append(op)
        self.high_water = max(self.high_water, step)

    def _flush_logs(self) -> None:
        """Wait for the asynchronous metric logging; raises if any of it failed (MLflow
        unreachable): MLflow only logs such failures, and the run would go on unrecorded."""
        ops, self._pending_logs = self._pending_logs, []
        for op in ops:
            op.wait()

    # ------------------------------------------------------------------ evaluation

    def _eval_set(self) -> tuple[list[str], list[int]]:
        from rlhf.prompts import read_prompts

        p = self.cfg.prompts
        prompts = read_prompts(p.eval, p.column, p.synthetic_eval, seed=p.eval_seed)
        n = self.cfg.scaling.num_workers
        padded = prompts + prompts[: (-len(prompts)) % n]
        return padded, [p.eval_seed + i for i in range(len(padded))]

    def evaluate(self, step: int) -> dict:
        import mlflow

        from rlhf.image_stats import grid, image_stats

        prompts, seeds = self._eval_set()
        out = self.group.evaluate(prompts, seeds)
        metrics = {"eval/reward": float(out["total"].mean())}
        metrics.update({f"eval/reward/{k}": float(v.mean()) for k, v in out["scores"].items()})
        import torch

        imgs = torch.from_numpy(out["images"]).permute(0, 3, 1, 2).float() / 255
        metrics.update({f"eval/{k}": v for k, v in image_stats(imgs).items()})
        self._log(metrics, step)
        picture = grid(out["images"])
        samples = self.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(picture).save(samples / f"step_{step:06d}.png")
        if step > self.last_logged:
            mlflow.log_image(picture, f"eval/samples_step_{step:06d}.png")
        parts = " ".join(
            f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if "/reward" in k
        )
        _say(f"eval @ step {step}: {parts}")
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, eval_reward: float | None) -> None:
        import mlflow

        # Every step up to a checkpoint is in MLflow before the checkpoint exists: a resume
        # from it then never leaves a gap in the metric series.
        self._flush_logs()
        folder = self.run_dir / "checkpoints" / f"step_{step:06d}"
        export = folder / "export"
        is_best = eval_reward is not None and (self.best is None or eval_reward > self.best)
        if is_best:
            self.best, self.best_step = eval_reward, step
        state = {
            "best": self.best,
            "best_step": self.best_step,
            "skipped_total": self.skipped_total,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten below
        self.group.save(str(folder / "resume"), step, state, str(export))
        (export / "policy_config.json").write_text(
            json.dumps(self.cfg.to_dict()["policy"], indent=1)
        )
        write_manifest(folder, step)
        for old in checkpoint_folders(self.run_dir)[self.cfg.checkpoint.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        if self.cfg.mlflow.register_as and step > self.last_logged:
            aliases = ("last", "best") if is_best else ("last",)
            v = tracking.register_folder(
                export,
                self.cfg.mlflow.register_as,
                self.run_id,
                aliases=aliases,
                tags={"step": str(step)},
            )
            from mlflow import MlflowClient

            MlflowClient().set_model_version_tag(
                self.cfg.mlflow.register_as, str(v), "step", str(step)
            )
            mlflow.set_tag("rlhf.last_policy_version", str(v))
            _say(
                f"checkpoint step {step}: registered {self.cfg.mlflow.register_as} v{v}"
                f"{' (best)' if is_best else ''}"
            )
        else:
            _say(f"checkpoint step {step}: {folder}")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        import mlflow

        from rlhf.prompts import read_prompts, step_batch

        t_start = time.perf_counter()
        step, bar = 0, None
        try:
            self._start_run()
            cfg = self.cfg
            self._start_servers()
            step = self._start_group(resuming=self.resume_run_id is not None)
            p = cfg.prompts
            prompts = read_prompts(p.train, p.column, p.synthetic_train, seed=cfg.seed)
            if step == 0:
                self.evaluate(0)
            if self.progress:
                bar = tqdm(
                    total=cfg.train.max_steps,
                    initial=step,
                    desc="finetune",
                    unit="step",
                    file=sys.stdout,
                    dynamic_ncols=True,
                )
            stop_reason = "max_steps"
            while step < cfg.train.max_steps:
                nxt = step + 1
                batch, seeds = step_batch(prompts, nxt, cfg.global_batch, cfg.seed)
                t = time.perf_counter()
                try:
                    m = self.group.step(nxt, batch, seeds)
                except WorkerGroupError as e:
                    step = self._rebuild(e)
                    continue
                step = nxt
                m["images_per_s"] = cfg.global_batch / (time.perf_counter() - t)
                if m.get("skipped"):
                    self.bad_in_row += 1
                    self.skipped_total += 1
                    log.warning("step %d skipped: non-finite reward or gradient", step)
                else:
                    self.bad_in_row = 0
                m["skipped_total"] = self.skipped_total
                self._log({f"train/{k}": v for k, v in m.items()}, step)
                if bar is not None:
                    bar.set_postfix_str(_step_summary(m), refresh=False)
                    bar.update(step - bar.n)  # back after a rebuild
                if self.on_step is not None:
                    self.on_step(self, step, m)
                if self.bad_in_row >= cfg.train.max_bad_steps:
                    self.checkpoint(step, None)
                    raise RunStopped(
                        f"stopped at step {step}: {self.bad_in_row} steps in a row had a "
                        f"non-finite reward or gradient (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); checkpoint saved in {self.run_dir}"
                    )
                final = step == cfg.train.max_steps
                ev = None
                if step % cfg.train.eval_every == 0 or final:
                    ev = self.evaluate(step)
                if step % cfg.checkpoint.every == 0 or final:
                    try:
                        self.checkpoint(step, ev["eval/reward"] if ev else None)
                    except WorkerGroupError as e:
                        step = self._rebuild(e)
                        continue
                if ev is not None and self._early_stop(step):
                    stop_reason = "early_stop"
                    if step % cfg.checkpoint.every and not final:
                        self.checkpoint(step, ev["eval/reward"])
                    break
            self._flush_logs()
            before, after, versions = self._logged_results()
            summary = {
                "run_id": self.run_id,
                "run_dir": str(self.run_dir),
                "checkpoints": str(self.run_dir / "checkpoints"),
                "tracking_uri": self.tracking_uri,
                "resume": self.resume_command(),
                "steps": step,
                "stop_reason": stop_reason,
                "reward_before": before,
                "reward_after": after,
                "best_step": self.best_step,
                "registered_model": cfg.mlflow.register_as,
                "versions": versions,
                "skipped_steps": self.skipped_total,
                "rebuilds": self.rebuilds,
                "samples": str(self.run_dir / "samples"),
                "wall_s": time.perf_counter() - t_start,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            mlflow.end_run()
            return summary
        except KeyboardInterrupt:
            _end_run(status="KILLED")
            raise
        except (RunStopped, UserError):
            _end_run(status="FAILED")
            raise
        except Exception as e:
            _end_run(status="FAILED")
            cause = f"{type(e).__name__}: {_first_line(e)}"
            if self.run_id is None:
                raise RunFailed(f"could not start the run: {cause}") from e
            raise RunFailed(
                f"run {self.run_id} failed after step {max(step, self.high_water)}: "
                f"{cause}; resume with: {self.resume_command()}"
            ) from e
        finally:
            if bar is not None:
                bar.close()
            self.shutdown()

    def resume_command(self) -> str:
        """The command that continues this run, from any directory."""
        uri = shlex.quote(self.tracking_uri)
        return f"MLFLOW_TRACKING_URI={uri} rlhf finetune --resume {self.run_id}"

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

    def _early_stop(self, step: int) -> bool:
        es = self.cfg.train.early_stop
        if not es.patience or self.best_step is None:
            return False
        evals_since = (step - self.best_step) // self.cfg.train.eval_every
        return evals_since >= es.patience

    def _rebuild(self, err: Exception) -> int:
        self.rebuilds += 1
        if 0 <= self.cfg.scaling.max_failures < self.rebuilds:
            raise RuntimeError(
                f"generator group failed {self.rebuilds} times (scaling.max_failures="
                f"{self.cfg.scaling.max_failures}): {err}"
            ) from err
        _say(f"generator group failed ({err}); rebuilding from the last checkpoint")
        self.group.kill()
        self.last_logged = max(self.last_logged, self.high_water)
        return self._start_group()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.kill()
            self.group = None
        for c in self.clients.values():
            try:
                c.shutdown()
            except Exception:  # best effort at teardown
                pass
        self.clients = {}


def _say(line: str) -> None:
    """A console line; a progress bar on screen is redrawn below it."""
    tqdm.write(line)
    sys.stdout.flush()


def _step_summary(m: dict) -> str:
    flag = " (skipped: non-finite reward)" if m.get("skipped") else ""
    return (
        f"loss {m.get('loss', float('nan')):+.4f} reward {m.get('reward', float('nan')):.4f} "
        f"{m.get('images_per_s', 0):.2f} img/s{flag}"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _end_run(status: str) -> None:
    """End the active MLflow run with ``status``; a failure to reach MLflow is logged, not
    raised over the error being reported."""
    import mlflow

    try:
        mlflow.end_run(status=status)
    except Exception as e:
        log.debug("could not mark the MLflow run %s: %s", status, e, exc_info=True)


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
