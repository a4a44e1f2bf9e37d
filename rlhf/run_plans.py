"""The plans of a fine-tuning run, without Ray: what the generator workers do next (a step
with its prompts and seeds, an evaluation of the held-out set, a checkpoint, stop) and what
is done with their results (metrics averaged and logged, evaluations scored and pictured,
checkpoints registered, the stop rules applied).

The :class:`~actors.coordinator.Coordinator` actor holds one :class:`RunLoop` and drives its
:meth:`RunLoop.plans` generator with the ranks' results. The data position *is* the step
(:mod:`rlhf.prompts`), so a plan needs no other state.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rlhf.checkpointing import CHECKPOINTS, checkpoint_name
from rlhf.run_config import RunConfig
from rlhf.run_records import RunRecords, RunStopped, step_summary

log = logging.getLogger(__name__)

STAGING = ".staging"  # under the run folder: where the ranks write a checkpoint together
PROGRESS_EVERY_S = 10.0


class RunLoop:
    """The loop of one run over its MLflow ``records``. ``say``: where console lines go;
    ``progress``: print a progress line every :data:`PROGRESS_EVERY_S` seconds;
    ``on_step(step, metrics)`` runs after each logged step."""

    def __init__(
        self,
        cfg: RunConfig,
        records: RunRecords | None,
        say: Callable[[str], None],
        *,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
    ):
        self.cfg = cfg
        self.records = records
        self.say = say
        self.progress = progress
        self.on_step = on_step
        self.step = 0
        self.bad_in_row = 0
        self.skipped_total = 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.stop_reason = "max_steps"
        self._last_progress = 0.0

    def restore(self, folder: str | None, step: int, state: dict) -> None:
        """The group restored checkpoint ``folder`` at ``step`` (None: a fresh start)."""
        if folder is not None:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.skipped_total = state.get("skipped_total", 0)
            self.say(f"restored {Path(folder).name} (step {step})")
        self.step, self.bad_in_row = step, 0

    def plans(self, step: int):
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
            self._record_step(step, outs, time.perf_counter() - t)
            if self.bad_in_row >= cfg.train.max_bad_steps:
                yield from self._checkpoint(step, None)
                raise RunStopped(
                    f"stopped at step {step}: {self.bad_in_row} steps in a row had a "
                    f"non-finite reward or gradient (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}); checkpoint saved in {self.records.run_dir}"
                )
            final = step == cfg.train.max_steps
            ev = None
            if step % cfg.train.eval_every == 0 or final:
                ev = yield from self._evaluate(step)
            if step % cfg.checkpoint.every == 0 or final:
                yield from self._checkpoint(step, ev["eval/reward"] if ev else None)
            if ev is not None and self.early_stop(step):
                self.stop_reason = "early_stop"
                if step % cfg.checkpoint.every and not final:
                    yield from self._checkpoint(step, ev["eval/reward"])
                break
        self.records.flush()

    def _record_step(self, step: int, outs: list[dict], wall_s: float) -> None:
        """The ranks' metrics of ``step`` averaged, counted (skipped steps) and logged."""
        keys = set().union(*outs)
        m = {k: float(np.mean([o[k] for o in outs if k in o])) for k in keys}
        m["images_per_s"] = self.cfg.global_batch / wall_s
        if m.get("skipped"):
            self.bad_in_row += 1
            self.skipped_total += 1
            log.warning("step %d skipped: non-finite reward or gradient", step)
        else:
            self.bad_in_row = 0
        m["skipped_total"] = self.skipped_total
        self.records.log({f"train/{k}": v for k, v in m.items()}, step)
        self._progress(step, m)
        if self.on_step is not None:
            self.on_step(step, m)

    def _progress(self, step: int, m: dict) -> None:
        now = time.perf_counter()
        if self.progress and (now - self._last_progress > PROGRESS_EVERY_S or step == 1):
            self._last_progress = now
            self.say(f"step {step}/{self.cfg.train.max_steps}: {step_summary(m)}")

    def early_stop(self, step: int) -> bool:
        es = self.cfg.train.early_stop
        if not es.patience or self.best_step is None:
            return False
        evals_since = (step - self.best_step) // self.cfg.train.eval_every
        return evals_since >= es.patience

    # ------------------------------------------------------------------ evaluation

    def eval_set(self) -> tuple[list[str], list[int]]:
        """The held-out prompts, padded to a multiple of the workers, and their seeds."""
        from rlhf.prompts import read_prompts

        p = self.cfg.prompts
        prompts = read_prompts(p.eval, p.column, p.synthetic_eval, seed=p.eval_seed)
        n = self.cfg.scaling.num_workers
        padded = prompts + prompts[: (-len(prompts)) % n]
        return padded, [p.eval_seed + i for i in range(len(padded))]

    def _evaluate(self, step: int):
        import torch
        from PIL import Image

        from rlhf.image_stats import grid, image_stats

        prompts, seeds = self.eval_set()
        outs = yield {"do": "evaluate", "prompts": prompts, "seeds": seeds}
        scores = {k: np.concatenate([o["scores"][k] for o in outs]) for k in outs[0]["scores"]}
        total = np.concatenate([o["total"] for o in outs])
        images = np.concatenate([o["images"] for o in outs])
        metrics = {"eval/reward": float(total.mean())}
        metrics.update({f"eval/reward/{k}": float(v.mean()) for k, v in scores.items()})
        imgs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        metrics.update({f"eval/{k}": v for k, v in image_stats(imgs).items()})
        self.records.log(metrics, step)
        picture = grid(images)
        samples = self.records.run_dir / "samples"
        samples.mkdir(exist_ok=True)
        Image.fromarray(picture).save(samples / f"step_{step:06d}.png")
        self.records.log_image(picture, step)
        parts = " ".join(
            f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if "/reward" in k
        )
        self.say(f"eval @ step {step}: {parts}")
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, step: int, eval_reward: float | None):
        # Every step up to a checkpoint is in MLflow before the checkpoint exists: a resume
        # from it then never leaves a gap in the metric series.
        self.records.flush()
        is_best = eval_reward is not None and (self.best is None or eval_reward > self.best)
        if is_best:
            self.best, self.best_step = eval_reward, step
        run_dir = self.records.run_dir
        name = checkpoint_name(run_dir, step)
        staging = run_dir / STAGING / name
        folder = run_dir / CHECKPOINTS / name
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
        self.records.register(folder, step, is_best)
