"""Reward-model training: the reward's config sections, data, optimiser, one plain loop (the
objective and the model to train are in :mod:`rewards.objective`).

The same pieces run in a single plain process (tests, benchmarks) and inside a Ray Train
worker (:mod:`rlhf.train_reward`), which only adds the process group, reporting and
checkpointing around :func:`run_training`. ``cfg`` below is the run schema that holds these
sections, :class:`rlhf.reward_run_config.RewardTrainConfig` (defined above this layer; only its
fields are read here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from rewards.data import RankedDataset, TripletDataset, is_ranked_file
from rewards.evaluate import pair_accuracy, preference_accuracy, score_triplets

log = logging.getLogger(__name__)
# ict and hp as the paper; pickscore: a CLIP trained on I2 > I1 alone with PickScore's
# recipe (the paper's pairwise baseline); imagereward: BLIP + MLP on ranked pairs (ImageReward).
KINDS = ("ict", "hp", "pickscore", "imagereward")


@dataclass
class DataConfig:
    """``train``/``eval``: a Parquet triplet file, or ``synthetic`` (generated and cached); for
    ``kind: imagereward`` also a Parquet file of ranked images (ImageRewardDB's ``prompt,
    images, ranking``, see :class:`rewards.data.RankedDataset`)."""

    train: str = "synthetic"
    eval: str = "synthetic"
    image_root: str | None = None
    image_size: int = 64
    synthetic_train: int = 2000
    synthetic_eval: int = 400
    synthetic_seed: int = 0
    cache_dir: str = ".rlhf_cache/data"


@dataclass
class LabelConfig:
    """Where ICT labels come from: ``data`` (the E1/E2/R1/R2 columns), ``teacher`` (a CLIP
    cosine reward spec, thresholded by ``theta``; data labels win where present), ``rule``
    (fixed E1/E2 and word-overlap similarity, for synthetic triplets)."""

    source: str = "data"
    theta: float = 0.3
    teacher: dict | None = None
    rule_e1: float = 0.6
    rule_e2: float = 0.9


@dataclass
class LossConfig:
    """ICT: ``neg_*`` (see :func:`rewards.losses.ict_loss`). HP: ``hp_weight`` * margin ranking
    (global-batch mean) + ``icthp_weight`` * ICT-HP ranking (global-batch *sum*, as the
    reference; see :func:`rewards.losses.ict_hp_loss`)."""

    neg_weight: float = 0.5
    neg_scale: float = 20.0
    neg_threshold: float = 6.0
    neg_sharpness: float = 20.0
    margin: float = 0.3
    hp_weight: float = 1.0
    icthp_weight: float = 0.0


@dataclass
class FreezeConfig:
    text_fraction: float = 0.0
    vision_fraction: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    warmup_steps: int = 0
    grad_clip: float = 1.0


# --------------------------------------------------------------------------- data


def dataset_path(cfg: DataConfig, split: str) -> Path:
    """The Parquet file for ``split``, generating synthetic triplets on first use."""
    p = getattr(cfg, split)
    if p != "synthetic":
        return Path(p)
    from rewards.synthetic import write_synthetic_parquet

    n = cfg.synthetic_train if split == "train" else cfg.synthetic_eval
    # Eval triplets use another seed so that they are held out.
    seed = cfg.synthetic_seed + (0 if split == "train" else 10_000)
    out = Path(cfg.cache_dir) / f"synthetic_{split}_n{n}_s{seed}_px{cfg.image_size}.parquet"
    if not out.exists():
        write_synthetic_parquet(out, n, seed=seed, image_size=cfg.image_size)
    return out


def make_dataset(cfg: DataConfig, split: str) -> TripletDataset | RankedDataset:
    path = dataset_path(cfg, split)
    cls = RankedDataset if is_ranked_file(path) else TripletDataset
    return cls(path, image_root=cfg.image_root, image_size=cfg.image_size)


class _SkippingSampler(DistributedSampler):
    """A DistributedSampler that can start part-way into an epoch (resume)."""

    skip = 0

    def __iter__(self):
        it = super().__iter__()
        for _ in range(self.skip):
            next(it, None)
        return it


def make_train_loader(
    ds: TripletDataset, batch_size: int, rank: int, world: int, seed: int
) -> DataLoader:
    """Each rank gets ``batch_size`` triplets per step; every triplet is seen once per epoch
    (the tail that does not fill a global batch is dropped)."""
    sampler = _SkippingSampler(
        ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, collate_fn=ds.collate, drop_last=True
    )


def make_eval_loader(ds: TripletDataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=ds.collate)


# --------------------------------------------------------------------------- the loop


def make_optimizer(cfg: OptimConfig, params, total_steps: int):
    """AdamW and transformers' linear warm-up (from 0) + cosine decay to 0 at ``total_steps``."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total_steps)


def total_steps(cfg, n_train: int) -> int:
    """Optimiser steps: whole global batches (``optim.batch_size`` x ``scaling.num_workers``)
    per epoch, times ``optim.epochs``, capped at ``optim.max_steps``."""
    per_epoch = n_train // (cfg.optim.batch_size * cfg.scaling.num_workers)
    if per_epoch < 1:
        raise ValueError(
            f"data.train has {n_train} triplets, fewer than one global batch "
            f"(optim.batch_size={cfg.optim.batch_size} x scaling.num_workers="
            f"{cfg.scaling.num_workers})"
        )
    steps = per_epoch * cfg.optim.epochs
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


def evaluate_model(model, loader) -> dict[str, float]:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        if isinstance(loader.dataset, RankedDataset):
            return pair_accuracy(model, loader, device)
        return preference_accuracy(score_triplets(model, loader, device, progress=False))
    finally:
        model.train(was)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank of the process group (``flag`` itself without
    one). ``device``: where the vote's tensor lives, the model's (CUDA under NCCL)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@dataclass
class StepResult:
    step: int
    epoch: int
    metrics: dict[str, float]


def run_training(
    cfg,
    model,
    objective: Callable,
    train_ds: TripletDataset,
    eval_loader: DataLoader | None,
    *,
    rank: int = 0,
    world: int = 1,
    backward: Callable | None = None,
    step_fn: Callable | None = None,
    optimizer=None,
    scheduler=None,
    start_step: int = 0,
    on_step: Callable[[StepResult, bool], None] | None = None,
):
    """The training loop shared by the plain process and Ray Train workers.

    ``backward``/``step_fn`` default to ``loss.backward()`` and clip + optimizer + scheduler
    steps (DeepSpeed passes its engine's). Resumes at ``start_step`` (epoch and batch offset
    derived from it). ``on_step(result, is_eval)`` receives metrics each step; eval metrics
    (``eval/I2>I1`` ...) are added every ``eval_every`` steps and at the last step.
    """
    total = total_steps(cfg, len(train_ds))
    per_epoch = len(train_ds) // (cfg.optim.batch_size * world)
    loader = make_train_loader(train_ds, cfg.optim.batch_size, rank, world, cfg.seed)
    if optimizer is None:
        optimizer, scheduler = make_optimizer(cfg.optim, model.parameters(), total)
    backward = backward or (lambda loss: loss.backward())
    step_fn = step_fn or _default_step(cfg.optim.grad_clip, model, optimizer, scheduler)
    device = next(model.parameters()).device
    step = start_step
    t_last, n_since = time.perf_counter(), 0
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = offset * cfg.optim.batch_size
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out, skipped = _update(batch, step, objective, backward, step_fn, optimizer, device)
            step += 1
            n_since += batch["images"].shape[0] * world
            metrics = {k: float(v.detach()) for k, v in out.items()}
            metrics["lr"] = float(optimizer.param_groups[0]["lr"])
            metrics["skipped"] = float(skipped)
            now = time.perf_counter()
            metrics["triplets_per_s"] = n_since / max(now - t_last, 1e-9)
            t_last, n_since = now, 0
            is_eval = eval_loader is not None and (step % cfg.eval_every == 0 or step == total)
            if is_eval:
                metrics.update(
                    {f"eval/{k}": v for k, v in evaluate_model(model, eval_loader).items()}
                )
            if on_step:
                on_step(StepResult(step, epoch, metrics), is_eval)
            if step >= total:
                break
    return model


def _default_step(grad_clip: float, model, optimizer, scheduler) -> Callable[[], None]:
    """Clip the trainable parameters' gradient norm to ``grad_clip`` (0: no clipping), then
    step the optimizer and the scheduler."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _update(batch, step: int, objective, backward, step_fn, optimizer, device):
    """``(objective's outputs, skipped)`` for one batch, updated unless every rank skips it."""
    # A batch whose rows were all unreadable: every rank skips the step together.
    if any_rank(batch["images"].shape[0] == 0, device):
        log.warning("step %d: empty batch (unreadable rows), skipped", step)
        return {"loss": torch.tensor(float("nan"))}, True
    out = objective(batch)
    loss = out["loss"]
    # All ranks skip together, or the gradient all-reduce would hang.
    skipped = any_rank(not bool(torch.isfinite(loss.detach())), device)
    if skipped:
        log.warning("step %d: non-finite loss %s, update skipped", step, loss.item())
        optimizer.zero_grad(set_to_none=True)
    else:
        backward(loss)
        step_fn()
    return out, skipped
