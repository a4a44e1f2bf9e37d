"""The training engine around the trainable transformer: DeepSpeed ZeRO-2/3, or plain torch.

:func:`build_engine` works in any process where torch.distributed is initialised (gloo on
CPU, NCCL on GPU), e.g. inside a Ray actor; it takes the transformer only: the frozen VAE and
text encoders stay outside the engine. :class:`PlainEngine` offers the same four members
(call, ``module``, ``backward``, ``step``) over a plain torch AdamW, for single-process runs
and as the reference the DeepSpeed tests compare against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class EngineConfig:
    """Optimiser and ZeRO settings.

    ``zero_stage``: None picks 2 for LoRA and 3 for full fine-tuning. ``grad_clip``: global
    L2 norm of the parameter gradients (0: off). AdamW is torch's (``torch_adam``): it needs
    no compiled op, on CPU or GPU. ``zero3_persistence_threshold`` and
    ``zero3_prefetch_bucket_size`` (elements) pass to DeepSpeed's ``stage3_*`` keys; None
    keeps DeepSpeed's defaults. Tests set both to 0 so that a tiny model's parameters stay
    partitioned, as a big model's are.
    """

    zero_stage: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    zero3_persistence_threshold: int | None = None
    zero3_prefetch_bucket_size: int | None = None

    def validate(self, path: str = "engine") -> None:
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"{path}.zero_stage={self.zero_stage} must be one of {ZERO_STAGES}")
        if self.lr <= 0:
            raise ValueError(f"{path}.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"{path}.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{path}.betas={self.betas} must be two numbers in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"{path}.eps={self.eps} must be > 0")
        if self.grad_clip < 0:
            raise ValueError(f"{path}.grad_clip={self.grad_clip} must be >= 0 (0: off)")
        for key in ("zero3_persistence_threshold", "zero3_prefetch_bucket_size"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ValueError(f"{path}.{key}={v} must be >= 0 or null (DeepSpeed's default)")


def zero_stage_for(cfg: EngineConfig, finetune_mode: str) -> int:
    if cfg.zero_stage is not None:
        return cfg.zero_stage
    return 3 if finetune_mode == "full" else 2


def deepspeed_config(
    cfg: EngineConfig,
    micro_batch: int,
    finetune_mode: str = "lora",
    bf16: bool = False,
    world_size: int = 1,
) -> dict:
    """The DeepSpeed config dict: one micro-batch per rank and step, no accumulation.

    ``bf16`` (full fine-tuning on GPU) keeps fp32 master weights in the optimiser. With LoRA
    it stays off: the frozen base is already bf16 and the adapters train in fp32.
    """
    stage = zero_stage_for(cfg, finetune_mode)
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if stage == 3:
        if cfg.zero3_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
        if cfg.zero3_prefetch_bucket_size is not None:
            zero["stage3_prefetch_bucket_size"] = cfg.zero3_prefetch_bucket_size
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def build_engine(
    transformer: nn.Module,
    cfg: EngineConfig,
    micro_batch: int,
    finetune_mode: str = "lora",
):
    """A DeepSpeed engine around ``transformer`` (trainable parameters as set by
    :func:`rlhf.generator.apply_finetune`). torch.distributed must be initialised, or the
    usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables set."""
    import deepspeed
    import torch.distributed as dist

    from rlhf.console import library_prints

    cfg.validate()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with library_prints():
            deepspeed.init_distributed(dist_backend=backend)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the transformer has no trainable parameters (see finetune.mode)")
    on_cuda = params[0].device.type == "cuda"
    bf16 = finetune_mode == "full" and on_cuda and params[0].dtype == torch.bfloat16
    ds_cfg = deepspeed_config(cfg, micro_batch, finetune_mode, bf16, dist.get_world_size())
    with library_prints():
        engine, *_ = deepspeed.initialize(model=transformer, model_parameters=params, config=ds_cfg)
    log.info(
        "DeepSpeed ZeRO-%d engine: %d trainable tensors, world %d",
        ds_cfg["zero_optimization"]["stage"],
        len(params),
        dist.get_world_size(),
    )
    return engine


class PlainEngine:
    """DeepSpeed's engine interface over a plain ``torch.optim.AdamW`` (one process)."""

    def __init__(self, module: nn.Module, cfg: EngineConfig):
        cfg.validate()
        self.module = module
        self.cfg = cfg
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the module has no trainable parameters (see finetune.mode)")
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        self._grad_norm: float | None = None
        self.global_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(
                self.params, self.cfg.grad_clip, torch.tensor(self._grad_norm)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm
