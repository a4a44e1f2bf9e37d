"""The run schema of ``rlhf train-reward`` (:class:`RewardTrainConfig`): one validated YAML
with the reward sections of :mod:`rewards.training` (data, labels, loss, freeze, optim) and
the sections every run has (:mod:`rlhf.run_sections`). Every error names its key path; a key
that was renamed names its new place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rewards.data import is_ranked_file
from rewards.registry import RewardSpec
from rewards.training import (
    KINDS,
    DataConfig,
    FreezeConfig,
    LabelConfig,
    LossConfig,
    OptimConfig,
)
from rlhf.resources import ScalingConfig
from rlhf.run_sections import CheckpointConfig, MlflowConfig, check_run_location


@dataclass
class RewardScalingConfig(ScalingConfig):
    """:class:`~rlhf.resources.ScalingConfig` plus how the replicas train: ``strategy: ddp``
    or ``deepspeed`` (ZeRO stage ``zero_stage``)."""

    num_workers: int = 2
    strategy: str = "ddp"
    zero_stage: int = 2

    def validate(self, path: str = "scaling") -> None:
        super().validate(path)
        if self.strategy not in ("ddp", "deepspeed"):
            raise ValueError(f"{path}.strategy={self.strategy!r} must be ddp or deepspeed")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{path}.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")


@dataclass
class RewardTrainConfig:
    """``rlhf train-reward CONFIG``: a Ray Train job. ``model`` is a reward spec without its
    name (the name is ``kind``); ``ict_model`` a frozen trained ICT used by HP's ICT-HP loss
    term. The plain loop (:func:`rewards.training.run_training`) reads the reward sections and
    ``scaling.num_workers``; the Ray Train driver (:mod:`rlhf.train_reward`) the rest.
    ``mlflow.register_as``: the best checkpoint's registered model name (null: ``kind``)."""

    RENAMED: ClassVar[dict[str, str]] = {"checkpoint.storage_path": "output_dir"}

    name: str = "reward"
    kind: str = "ict"
    model: dict = field(default_factory=dict)
    ict_model: dict | None = None
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: RewardScalingConfig = field(default_factory=RewardScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="reward-models"))
    eval_every: int = 50
    seed: int = 0
    output_dir: str = "runs"

    def validate(self) -> RewardTrainConfig:
        """Raise ``ValueError`` naming the key for values that would fail later."""
        check_run_location(self.name, self.output_dir)
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
        RewardSpec.from_dict({"name": self.kind, **self.model}, "model")
        for split in ("train", "eval"):
            p = getattr(self.data, split)
            if p != "synthetic" and not Path(p).exists():
                raise ValueError(f"data.{split}={p!r}: no such file (or use 'synthetic')")
            if p != "synthetic" and self.kind != "imagereward" and is_ranked_file(p):
                raise ValueError(
                    f"data.{split}={p!r} holds ranked images (prompt, images, ranking): "
                    "only kind=imagereward trains on them"
                )
        if self.labels.source not in ("data", "teacher", "rule"):
            raise ValueError(f"labels.source={self.labels.source!r} must be data, teacher or rule")
        if self.labels.source == "teacher" and not self.labels.teacher:
            raise ValueError("labels.teacher must be a reward spec when labels.source=teacher")
        if self.labels.theta <= 0:
            raise ValueError(f"labels.theta={self.labels.theta} must be > 0")
        if self.loss.icthp_weight > 0 and not self.ict_model:
            raise ValueError("loss.icthp_weight > 0 needs ict_model (a trained ICT spec)")
        if self.loss.icthp_weight > 0 and self.kind != "hp":
            raise ValueError("loss.icthp_weight applies to kind=hp only")
        self.scaling.validate()
        for key, val in (
            ("optim.batch_size", self.optim.batch_size),
            ("optim.epochs", self.optim.epochs),
            ("eval_every", self.eval_every),
        ):
            if val < 1:
                raise ValueError(f"{key}={val} must be >= 1")
        self.checkpoint.validate(self.eval_every)
        if self.checkpoint.every % self.eval_every:
            # Ray Train keeps the best checkpoints by held-out accuracy: each needs one.
            raise ValueError(
                f"checkpoint.every={self.checkpoint.every} must be a multiple of "
                f"eval_every={self.eval_every}"
            )
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr={self.optim.lr} must be > 0")
        for key in ("text_fraction", "vision_fraction"):
            v = getattr(self.freeze, key)
            if not 0 <= v <= 1:
                raise ValueError(f"freeze.{key}={v} must be in [0, 1]")
        return self
