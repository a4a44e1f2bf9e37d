"""The schema of a fine-tuning run (``rlhf finetune CONFIG``): one validated YAML.

Sections: ``policy`` (generator, finetune, sampler, draft, engine: :class:`PolicyConfig`),
``rewards`` (the optimised reward: a list of ``{name, weight, checkpoint, placement,
options}``), ``eval_rewards`` (extra rewards only scored at evaluation), ``prompts``,
``workers`` (generator worker group), ``reward_server``, ``train`` (steps, evaluation,
checkpoints, stopping rules), ``mlflow``. Every error names its key path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from actors.options import ActorResources
from actors.server_config import ServerConfig
from rewards.errors import ConfigError
from rewards.registry import EVAL_ONLY, RewardSpec
from rlhf.policy_config import PolicyConfig

PROMPT_SUFFIXES = (".txt", ".parquet", ".csv", ".jsonl")


def ray_job_submission_id() -> str | None:
    """The submission id when this process is the entrypoint of a ``ray job submit`` (Ray
    hands the entrypoint its job config in ``RAY_JOB_CONFIG_JSON_ENV_VAR``); else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        meta = {}
    return meta.get("job_submission_id") or "(unknown id)"


@dataclass
class PromptsConfig:
    """Training and held-out prompts: ``synthetic`` (the procedural grammar of the synthetic
    triplets), ``world`` (the miniature world's easy prompts, GenEval's categories in turn;
    ``synthetic_train``/``synthetic_eval`` set the counts) or a file: ``.txt`` (one prompt per line), ``.parquet``/``.csv``/``.jsonl``
    (column ``column``). Held-out prompts are sampled with ``eval_seeds`` fixed seeds."""

    train: str = "synthetic"
    eval: str = "synthetic"
    column: str = "prompt"
    synthetic_train: int = 512
    synthetic_eval: int = 8
    eval_seed: int = 10_000

    def validate(self, path: str = "prompts") -> None:
        for key in ("train", "eval"):
            v = getattr(self, key)
            if v in ("synthetic", "world"):
                continue
            if Path(v).suffix not in PROMPT_SUFFIXES:
                raise ValueError(
                    f"{path}.{key}={v!r} must be 'synthetic', 'world' or a {PROMPT_SUFFIXES} file"
                )
            if not Path(v).is_file():
                raise ValueError(f"{path}.{key}={v!r}: file not found")
        for key in ("synthetic_train", "synthetic_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key}={getattr(self, key)} must be >= 1")


@dataclass
class WorkersConfig:
    """The generator worker group: ``num_workers`` ranks of one torch.distributed group, each
    sampling ``batch_size`` prompts per step (global batch = both multiplied).
    ``text_encoder``: the resources of the text-encoder actor that serves every worker's
    prompt embeddings when ``policy.generator.text_encoders: actor`` (unused otherwise)."""

    num_workers: int = 1
    batch_size: int = 1
    resources: ActorResources = field(default_factory=lambda: ActorResources(max_restarts=0))
    text_encoder: ActorResources = field(
        default_factory=lambda: ActorResources(max_restarts=-1, max_task_retries=-1)
    )
    max_rebuilds: int = 3

    def validate(self, path: str = "workers") -> None:
        if self.num_workers < 1:
            raise ValueError(f"{path}.num_workers={self.num_workers} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"{path}.batch_size={self.batch_size} must be >= 1")
        if self.max_rebuilds < 0:
            raise ValueError(f"{path}.max_rebuilds={self.max_rebuilds} must be >= 0")
        self.resources.validate(f"{path}.resources")
        self.text_encoder.validate(f"{path}.text_encoder")


@dataclass
class EarlyStopConfig:
    """Stop when held-out ``eval/reward`` has not improved by ``min_delta`` for ``patience``
    evaluations (0: off)."""

    patience: int = 0
    min_delta: float = 0.0

    def validate(self, path: str = "train.early_stop") -> None:
        if self.patience < 0:
            raise ValueError(f"{path}.patience={self.patience} must be >= 0 (0: off)")


@dataclass
class TrainConfig:
    """``max_steps`` DRaFT-K updates; evaluate every ``eval_every`` and checkpoint every
    ``checkpoint_every`` steps (and at the end); keep the last ``keep_checkpoints`` resume
    bundles. A step whose reward or gradient is not finite is skipped on every rank;
    ``max_bad_steps`` of them in a row stop the run with a checkpoint."""

    max_steps: int = 100
    eval_every: int = 25
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    max_bad_steps: int = 3
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def validate(self, path: str = "train") -> None:
        for key in ("max_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key}={getattr(self, key)} must be >= 1")
        if self.max_bad_steps < 1:
            raise ValueError(f"{path}.max_bad_steps={self.max_bad_steps} must be >= 1")
        self.early_stop.validate(f"{path}.early_stop")


@dataclass
class RunMlflowConfig:
    """``tracking_uri`` null: ``MLFLOW_TRACKING_URI``, else the embedded store in the working
    directory. Policy checkpoints are registered as ``register_as`` (null: not registered)."""

    tracking_uri: str | None = None
    experiment: str = "finetune"
    register_as: str | None = "policy"


@dataclass
class RunConfig:
    name: str = "finetune"
    seed: int = 0
    output_dir: str = "runs"
    allow_negative_weights: bool = False
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rewards: list[dict] = field(default_factory=lambda: [{"name": "ict_hp"}])
    eval_rewards: list[dict] = field(default_factory=list)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    reward_server: ServerConfig = field(default_factory=ServerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: RunMlflowConfig = field(default_factory=RunMlflowConfig)

    def validate(self) -> RunConfig:
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty name without '/'")
        job = ray_job_submission_id()
        if job and not Path(self.output_dir).is_absolute():
            # A job's working directory is Ray's temporary copy of --working-dir, removed
            # with the job: checkpoints written there could never be resumed.
            raise ValueError(
                f"output_dir={self.output_dir!r} is relative, and this is Ray job {job}: it "
                "would land in the job's temporary working directory and be lost; give an "
                "absolute path on storage every node sees"
            )
        self.policy.validate("policy.")
        self.prompts.validate()
        self.workers.validate()
        self.reward_server.validate()
        self.train.validate()
        if not self.rewards:
            raise ValueError("rewards: give at least one reward to optimise")
        specs = self.reward_specs()
        if not any(s.weight != 0 for s in specs):
            raise ValueError("rewards: every weight is 0; nothing to optimise")
        for i, s in enumerate(specs):
            if s.name in EVAL_ONLY:
                raise ValueError(
                    f"rewards[{i}].name={s.name} is an evaluator, not a training reward: "
                    "put it in eval_rewards"
                )
            if s.weight < 0 and not self.allow_negative_weights:
                raise ValueError(
                    f"rewards[{i}].weight={s.weight} is negative: set allow_negative_weights=true "
                    "to minimise a reward on purpose"
                )
        keys = [s.key for s in specs + self.eval_reward_specs()]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(
                f"rewards: duplicate reward key(s) {dup}; give each a distinct 'label'"
            )
        return self

    def check_inputs(self) -> None:
        """What :meth:`validate` cannot see from the YAML alone, checked before Ray or an
        MLflow run starts: every reward's import path imports and its checkpoint exists
        (local path, MLflow model or run, hub repository), and the prompt files hold prompts.
        Errors name the key (``rewards[0].checkpoint``, ``prompts.train``)."""
        import mlflow

        from rewards.registry import check_reward
        from rlhf import tracking
        from rlhf.prompts import read_prompts

        mlflow.set_tracking_uri(tracking.tracking_uri(self.mlflow.tracking_uri))
        for field_name in ("rewards", "eval_rewards"):
            for i, d in enumerate(getattr(self, field_name)):
                where = f"{field_name}[{i}]"
                check_reward(RewardSpec.from_dict(d, where), where)
        for key in ("train", "eval"):
            source = getattr(self.prompts, key)
            try:
                read_prompts(source, self.prompts.column, n_synthetic=1)
            except ValueError as e:
                raise ConfigError(f"prompts.{key}={source!r}: {e}") from e

    def reward_specs(self) -> list[RewardSpec]:
        return [RewardSpec.from_dict(d, f"rewards[{i}]") for i, d in enumerate(self.rewards)]

    def eval_reward_specs(self) -> list[RewardSpec]:
        out = []
        for i, d in enumerate(self.eval_rewards):
            s = RewardSpec.from_dict(d, f"eval_rewards[{i}]")
            out.append(dataclasses.replace(s, weight=0.0))
        return out

    @property
    def global_batch(self) -> int:
        return self.workers.num_workers * self.workers.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
