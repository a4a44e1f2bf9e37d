"""What a reward model is trained on: the objective per kind (ICT, HP, PickScore-style pairs,
ImageReward's ranked pairs) over the global batch, and the model to train with its frozen
helpers (the ICT teacher, the ICT model of the ICT-HP term). ``cfg`` is the run schema,
:class:`rlhf.reward_run_config.RewardTrainConfig` (only its fields are read here)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rewards.labels import fill_labels, rule_labels, teacher_labels
from rewards.losses import hp_loss, ict_hp_loss, ict_loss, pairwise_loss
from rewards.registry import RewardSpec, build_reward


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
