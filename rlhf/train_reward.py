"""Reward-model training as a Ray Train job (``rlhf train-reward``).

The driver validates the config, starts (or joins) Ray, and runs a ``TorchTrainer`` whose
workers each call :func:`train_func`: data parallel over DDP (or DeepSpeed ZeRO), gloo on CPU
and NCCL on GPU. Rank 0 logs to MLflow and, at the end, registers the best model. Rerunning a
job with the same name resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.objective import Objective, build_model
from rewards.registry import load_reward, save_reward
from rewards.training import (
    StepResult,
    make_dataset,
    make_eval_loader,
    make_optimizer,
    run_training,
    total_steps,
)
from rlhf import console, tracking
from rlhf.config import bind, flatten
from rlhf.export import load_deepspeed_checkpoint
from rlhf.reward_run_config import RewardTrainConfig

log = logging.getLogger(__name__)
STATE_FILE = "train_state.json"
OPTIM_FILE = "optim.pt"
MODEL_DIR = "model"
DS_TAG = "state"


class _ObjectiveModule(nn.Module):
    """Routes the loss through ``forward`` so DDP/DeepSpeed see every step."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.model = objective.model
        self.objective = objective

    def forward(self, batch):
        return self.objective(batch)


def storage_path(cfg: RewardTrainConfig) -> str:
    """Ray Train's ``storage_path``: ``output_dir``, absolute (runs land in ``<it>/<name>``)."""
    return str(Path(cfg.output_dir).resolve())


def _progress_line(r: StepResult, total: int, t0: float, start: int) -> str:
    done = r.step - start
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (total - r.step) / rate if rate > 0 else float("nan")
    return (
        f"step {r.step}/{total} loss {r.metrics['loss']:.4f} "
        f"{r.metrics['triplets_per_s']:.1f} triplets/s eta {eta:.0f}s"
    )


def _save_checkpoint(
    folder: Path, model, optimizer, scheduler, step: int, run_id, strategy, engine
):
    folder.mkdir(parents=True, exist_ok=True)
    if strategy == "deepspeed":
        # Every rank writes its own ZeRO partition; Ray merges the ranks' files.
        engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
    if _rank() == 0:
        save_reward(model, folder / MODEL_DIR)
        if strategy != "deepspeed":
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                folder / OPTIM_FILE,
            )
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "mlflow_run_id": run_id}))


def deepspeed_engine(cfg: RewardTrainConfig, module: nn.Module, optimizer, scheduler, resume_from):
    """DeepSpeed ZeRO around the objective (``scaling.strategy: deepspeed``); restores
    ``resume_from`` (a checkpoint's ``deepspeed/`` folder, or None) with
    ``torch.load(weights_only=True)``, as the fine-tuning resume does. Collective."""
    import deepspeed

    with console.library_prints():
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config={
                "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": cfg.optim.grad_clip,
                "zero_optimization": {"stage": cfg.scaling.zero_stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
    if resume_from is not None:
        load_deepspeed_checkpoint(engine, resume_from, DS_TAG)
    return engine, optimizer, scheduler


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def train_func(config: dict) -> None:
    """One Ray Train worker."""
    import ray.train

    console.setup()  # -v (RLHF_VERBOSE) decides what this worker's libraries may print
    cfg = bind(RewardTrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    model, teacher, ict_model = build_model(cfg)
    objective = Objective(cfg, model, teacher, ict_model)
    train_ds = make_dataset(cfg.data, "train")
    eval_loader = make_eval_loader(make_dataset(cfg.data, "eval"), 64) if rank == 0 else None
    total = total_steps(cfg, len(train_ds))
    start, run_id, ckpt_dir = _resume(model, rank)
    eng = _prepare(cfg, objective, total, ckpt_dir, world)
    if rank == 0:
        run_id = _start_run(config["tracking_uri"], cfg, run_id)
    on_step = _on_step(cfg, rank, total, start, run_id, model, eng, config.get("interrupt_after"))
    run_training(
        cfg,
        model,
        eng.forward,
        train_ds,
        eval_loader,
        rank=rank,
        world=world,
        backward=eng.backward,
        step_fn=eng.step_fn,
        optimizer=eng.optimizer,
        scheduler=eng.scheduler,
        start_step=start,
        on_step=on_step,
    )
    if rank == 0:
        import mlflow

        mlflow.end_run()


def _resume(model: nn.Module, rank: int) -> tuple[int, str | None, Path | None]:
    """``(step, MLflow run id, checkpoint folder)`` of the checkpoint Ray Train hands this
    worker, its weights loaded into ``model``; ``(0, None, None)`` when there is none."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, None, None
    # A private copy per rank: ranks sharing one copy raced on its files.
    ckpt_dir = Path(ckpt.to_directory(tempfile.mkdtemp(prefix=f"resume_r{rank}_")))
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    resumed = load_reward(ckpt_dir / MODEL_DIR)
    model.load_state_dict(resumed.state_dict())
    return state["step"], state["mlflow_run_id"], ckpt_dir


@dataclass
class _Engine:
    """What the loop drives: ``forward`` (DDP, the DeepSpeed engine or the objective itself),
    ``backward`` and ``step_fn`` (None: the loop's own), the optimizer and scheduler, and the
    DeepSpeed engine (None under DDP)."""

    forward: Callable
    backward: Callable | None
    step_fn: Callable | None
    optimizer: Any
    scheduler: Any
    engine: Any = None


def _prepare(cfg: RewardTrainConfig, objective: Objective, total: int, ckpt_dir, world: int):
    """DeepSpeed or DDP around ``objective``, the optimizer and scheduler restored from
    ``ckpt_dir`` (a checkpoint folder, or None). Collective."""
    import ray.train.torch

    wrapped = _ObjectiveModule(objective)
    optimizer, scheduler = make_optimizer(cfg.optim, objective.model.parameters(), total)
    if cfg.scaling.strategy == "deepspeed":
        engine, optimizer, scheduler = deepspeed_engine(
            cfg, wrapped, optimizer, scheduler, ckpt_dir / "deepspeed" if ckpt_dir else None
        )
        return _Engine(engine, engine.backward, engine.step, optimizer, scheduler, engine)
    if ckpt_dir is not None:
        st = torch.load(ckpt_dir / OPTIM_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
    ddp = ray.train.torch.prepare_model(wrapped) if world > 1 else wrapped
    return _Engine(ddp, None, None, optimizer, scheduler)


def _start_run(tracking_uri: str, cfg: RewardTrainConfig, run_id: str | None) -> str:
    """Start (``run_id`` None, logging the config) or reopen the MLflow run; its id."""
    import mlflow

    # The driver resolved the store; workers may run with another environment or cwd.
    tracking.setup(tracking_uri, cfg.mlflow.experiment)
    if run_id is None:
        run = mlflow.start_run(run_name=cfg.name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(asdict(cfg)).items()})
    else:
        run = mlflow.start_run(run_id=run_id)
    return run.info.run_id


def _on_step(
    cfg: RewardTrainConfig,
    rank: int,
    total: int,
    start: int,
    run_id: str | None,
    model: nn.Module,
    eng: _Engine,
    interrupt_after: int | None,
) -> Callable[[StepResult, bool], None]:
    """The loop's ``on_step``: rank 0 logs each step's metrics (once: a step already in the
    run is not logged again) and prints progress; every rank saves a checkpoint and reports it
    to Ray Train at the same steps. ``interrupt_after``: fail after that step (tests)."""
    import ray.train

    mlflow = None
    if rank == 0:
        import mlflow

        already = set(tracking.logged_steps(run_id, "train/loss"))
    t0 = time.perf_counter()
    last_print = [0.0]

    def on_step(r: StepResult, is_eval: bool) -> None:
        if rank == 0:
            if r.step not in already:
                mlflow.log_metrics(
                    {
                        tracking.metric_key(k if "/" in k else f"train/{k}"): v
                        for k, v in r.metrics.items()
                    },
                    step=r.step,
                    # Off the step's critical path; flushed before each checkpoint.
                    synchronous=False,
                )
            now = time.perf_counter()
            if now - last_print[0] > 5 or is_eval or r.step == total:
                last_print[0] = now
                print(_progress_line(r, total, t0, start), flush=True)
        # Every rank must report at the same steps (DeepSpeed saves are collective too).
        if r.step % cfg.checkpoint.every == 0 or r.step == total:
            if rank == 0:
                mlflow.flush_async_logging()
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(
                    Path(d),
                    model,
                    eng.optimizer,
                    eng.scheduler,
                    r.step,
                    run_id,
                    cfg.scaling.strategy,
                    eng.engine,
                )
                metrics = {"step": r.step, "mean_acc": r.metrics.get("eval/mean", -1.0)}
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if interrupt_after and r.step == interrupt_after:
            raise RuntimeError(f"interrupted after step {r.step} (interrupt_after)")

    return on_step


def run_job(cfg: RewardTrainConfig, interrupt_after: int | None = None) -> dict:
    """Run the job on the current Ray cluster (starting a local one if none), register the
    best checkpoint's model in MLflow, and return a summary."""
    import ray

    if not ray.is_initialized():
        # "local": a new Ray, never whatever cluster `ray start` left on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", configure_logging=False)
    tracking.setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    result = _trainer(cfg, interrupt_after, uri).fit()
    return _register_best(cfg, result)


def _trainer(cfg: RewardTrainConfig, interrupt_after: int | None, tracking_uri: str):
    """The ``TorchTrainer`` of the job: :func:`train_func` on ``scaling`` workers, Ray Train's
    checkpoints kept by held-out mean accuracy, restarts up to ``scaling.max_failures``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = cfg.scaling
    return TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": asdict(cfg),
            "interrupt_after": interrupt_after,
            "tracking_uri": tracking_uri,
        },
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.ray_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep,
                checkpoint_score_attribute="mean_acc",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
        ),
    )


def _register_best(cfg: RewardTrainConfig, result) -> dict:
    """Register the model of ``result``'s best checkpoint (by held-out mean accuracy) under
    ``mlflow.register_as`` (or the kind) and return the job's summary."""
    import mlflow

    best = max(result.best_checkpoints, key=lambda cm: cm[1].get("mean_acc", -1))
    best_ckpt, best_metrics = best
    with best_ckpt.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        run_id = state["mlflow_run_id"]
        name = cfg.mlflow.register_as or cfg.kind
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(Path(d) / MODEL_DIR, Path(tmp) / "reward")
            version = tracking.register_folder(
                Path(tmp) / "reward",
                name,
                run_id,
                tags={"best_step": str(state["step"]), "kind": cfg.kind},
            )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("best/mean_acc", best_metrics.get("mean_acc", -1))
    summary = {
        "kind": cfg.kind,
        "run_id": run_id,
        "registered_model": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "best_step": state["step"],
        "best_mean_acc": best_metrics.get("mean_acc"),
        "steps": result.metrics.get("step"),
    }
    return summary
