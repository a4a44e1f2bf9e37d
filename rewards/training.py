"""Reward-model training: the reward's config sections, objective, data, one plain loop.

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
from rewards.labels import fill_labels, rule_labels, teacher_labels
from rewards.losses import hp_loss, ict_hp_loss, ict_loss, pairwise_loss
from rewards.registry import RewardSpec, build_reward

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


# --------------------------------------------------------------------------- objective


def _gather(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradient (so in-batch negatives span every rank).

    Ranks may hold different batch sizes (corrupt rows are dropped), so rows are padded to
    the largest and the padding cut off again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    import torch.distributed.nn as dist_nn

    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    parts = dist_nn.all_gather(t.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


class Objective:
    """``batch -> {"loss": scalar, <parts>...}`` for ICT or HP training."""

    def __init__(self, cfg, model, teacher=None, ict_model=None):
        self.cfg, self.model, self.teacher, self.ict_model = cfg, model, teacher, ict_model

    def labels(self, batch) -> torch.Tensor:
        lc = self.cfg.labels
        labels = batch["labels"]
        if lc.source == "rule":
            rows = [
                rule_labels(e, r, lc.rule_e1, lc.rule_e2)
                for e, r in zip(batch["easy_prompt"], batch["refine_prompt"])
            ]
            return torch.tensor(rows, dtype=labels.dtype)
        computed = None
        if lc.source == "teacher" and torch.isnan(labels).any():
            computed = teacher_labels(
                self.teacher,
                batch["images"],
                batch["easy_prompt"],
                batch["refine_prompt"],
                lc.theta,
            )
        return fill_labels(labels, computed)

    def _ranked(self, batch) -> dict[str, torch.Tensor]:
        """ImageReward's loss: ``softplus(worse - better)`` on raw head outputs, the mean
        over every ranked pair of the global batch. Triplets give I1 < I2, I2 < I3, I1 < I3."""
        if "pairs" in batch:
            images, prompts, pairs = batch["images"], batch["prompts"], batch["pairs"]
        else:
            b = batch["images"].shape[0]
            images = batch["images"].reshape(b * 3, *batch["images"].shape[2:])
            prompts = [p for p in batch["easy_prompt"] for _ in range(3)]
            # [better, worse] within each triplet (I1, I2, I3 at 3i, 3i+1, 3i+2).
            pairs = torch.tensor([[1, 0], [2, 1], [2, 0]], device=images.device)
            pairs = (pairs + 3 * torch.arange(b, device=images.device).view(b, 1, 1)).view(-1, 2)
        logits = self.model.logits(images, prompts)
        return pairwise_loss(_gather(logits[pairs[:, 1]]), _gather(logits[pairs[:, 0]]))

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        images = batch["images"]  # (B, 3, 3, H, W)
        b = images.shape[0]
        flat = images.reshape(b * 3, *images.shape[2:])
        lc = self.cfg.loss
        if self.cfg.kind == "ict":
            text = self.model.text_features(
                list(batch["easy_prompt"]) + list(batch["refine_prompt"])
            )
            easy, ref = text.chunk(2)
            img = self.model.image_features(flat).view(b, 3, -1)
            labels = self.labels(batch).to(img)
            return ict_loss(
                _gather(easy),
                _gather(ref),
                _gather(img),
                _gather(labels),
                lc.neg_weight,
                lc.neg_scale,
                lc.neg_threshold,
                lc.neg_sharpness,
            )
        if self.cfg.kind == "imagereward":
            return self._ranked(batch)
        if self.cfg.kind == "pickscore":
            prompts = list(batch["easy_prompt"])
            s1 = self.model.score(images[:, 0], prompts)
            s2 = self.model.score(images[:, 1], prompts)
            return pairwise_loss(_gather(s1), _gather(s2))
        # Over the global batch, as the reference: the ICT-HP term is a batch sum, which a
        # per-rank sum averaged by DDP would divide by the number of workers.
        logits = _gather(self.model.logits(flat).view(b, 3))
        out = hp_loss(logits, lc.margin)
        out["loss"] = lc.hp_weight * out["loss"]
        if lc.icthp_weight > 0:
            with torch.no_grad():
                # ``flat`` is triplet-major (I1, I2, I3 of triplet 0, then of triplet 1, ...).
                prompts = [p for p in batch["easy_prompt"] for _ in range(3)]
                cos = self.ict_model.score(flat, prompts)
            extra = ict_hp_loss(_gather(cos.view(b, 3)), logits, lc.margin)
            out.update({k: v for k, v in extra.items() if k != "loss"})
            out["loss"] = out["loss"] + lc.icthp_weight * extra["loss"]
        return out


def build_model(cfg):
    """The trainable reward model (train mode, freezing applied), plus the frozen helpers."""
    model = build_reward(RewardSpec.from_dict({"name": cfg.kind, **cfg.model}, "model")).train()
    model.backbone.freeze(cfg.freeze.text_fraction, cfg.freeze.vision_fraction)
    if cfg.kind == "hp":
        # HP never uses the text tower; keep it out of the optimizer and of DDP's bookkeeping.
        model.backbone.freeze(text_fraction=1.0)
    for name, p in model.named_parameters():
        # Cosine rewards do not use CLIP's contrastive temperature: a parameter without a
        # gradient would stall DDP.
        if name.endswith(("logit_scale", "logit_bias")):
            p.requires_grad_(False)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            # DeepSpeed cannot broadcast 0-dim parameters; frozen ones work as buffers
            # (same state-dict key, so checkpoints are unchanged).
            if p is not None and p.dim() == 0 and not p.requires_grad:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach())
    teacher = ict_model = None
    if cfg.labels.source == "teacher":
        teacher = build_reward(RewardSpec.from_dict(cfg.labels.teacher, "labels.teacher"))
        teacher.requires_grad_(False)
    if cfg.ict_model:
        ict_model = build_reward(
            RewardSpec.from_dict({"name": "ict", **cfg.ict_model}, "ict_model")
        )
        ict_model.requires_grad_(False)
    return model, teacher, ict_model


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


def _any_rank(flag: bool, device: torch.device) -> bool:
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
    params = [p for p in model.parameters() if p.requires_grad]

    def default_step():
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    step_fn = step_fn or default_step
    device = next(model.parameters()).device
    step = start_step
    t_last, n_since = time.perf_counter(), 0
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = offset * cfg.optim.batch_size
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # A batch whose rows were all unreadable: every rank skips the step together.
            if _any_rank(batch["images"].shape[0] == 0, device):
                log.warning("step %d: empty batch (unreadable rows), skipped", step)
                out = {"loss": torch.tensor(float("nan"))}
                skipped = True
            else:
                out = objective(batch)
                loss = out["loss"]
                # All ranks skip together, or the gradient all-reduce would hang.
                skipped = _any_rank(not bool(torch.isfinite(loss.detach())), device)
                if skipped:
                    log.warning("step %d: non-finite loss %s, update skipped", step, loss.item())
                    optimizer.zero_grad(set_to_none=True)
                else:
                    backward(loss)
                    step_fn()
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
