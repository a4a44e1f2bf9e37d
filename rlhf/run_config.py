"""The run schema of ``rlhf finetune`` (:class:`RunConfig`): one validated YAML with
``policy`` (generator, finetune, sampler, draft, engine: :class:`PolicyConfig`), ``rewards``
(the optimised reward: a list of ``{name, weight, checkpoint, placement, options}``),
``eval_rewards`` (scored at evaluation only), ``prompts``, ``reward_server``, ``text_encoder``
and ``train`` (steps, batch, evaluation, stopping rules), and the sections every run has, in
the same words as ``rlhf train-reward`` (:mod:`rlhf.reward_run_config`): ``scaling`` (the
worker group, Ray Train's words: :class:`~rlhf.resources.ScalingConfig`), ``checkpoint`` and
``mlflow`` (:mod:`rlhf.run_sections`). Every error names its key path; a key that was renamed
names its new place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rewards.builtin_rewards import EVAL_ONLY
from rewards.errors import ConfigError
from rewards.registry import RewardSpec
from rlhf.policy_config import PolicyConfig
from rlhf.resources import ActorResources, ScalingConfig
from rlhf.run_sections import CheckpointConfig, MlflowConfig, check_run_location

PROMPT_SUFFIXES = (".txt", ".parquet", ".csv", ".jsonl")


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


TRANSPORTS = ("object_store", "gloo", "nccl", "cuda_ipc")


@dataclass
class ServerConfig:
    """How reward servers are placed, batch and are called (``reward_server``).

    max_batch_size: images per forward; a larger request runs in chunks of this size.
    batch_wait_ms: how long the oldest queued request waits for others to join its batch.
        0 (default) batches only what queued up while the previous forward ran: no added
        latency for a lone caller, and concurrent callers still share forwards.
    timeout_s: per call, None waits as long as it takes (a restarting server included).
    forward_threads: batches computed at the same time. 0 picks: 1 on a GPU, else the
        server's whole CPUs (a tiny model's forward keeps few cores busy on its own; two
        batches side by side do). The server's CPUs are split between them: each forward
        gets ``max(1, floor(num_cpus) // forward_threads)`` torch threads, so a server on
        ``num_cpus: 0`` (or a fraction) computes on one thread and never competes with the
        generator for more than one core.
    transport: how images and gradients travel. ``object_store`` (default): Ray's object
        store, from any caller. ``gloo`` / ``nccl``: Ray's direct tensor transport between
        actors (CPU / GPU tensors), see :mod:`actors.direct_transport`; the caller must be an
        actor of a class declared ``@ray.remote(enable_tensor_transport=True)``, else its
        first call fails saying so. ``cuda_ipc``: the server maps the caller's GPU memory and
        the caller maps the server's (CUDA IPC, no copy through the host); caller and server
        must share one GPU assigned by Ray (fractional ``num_gpus`` on the same device), and
        any process with that GPU can call, Ray Train workers included.
    """

    resources: ActorResources = field(default_factory=ActorResources)
    max_batch_size: int = 64
    batch_wait_ms: float = 0.0
    timeout_s: float | None = None
    forward_threads: int = 0
    transport: str = "object_store"

    def validate(self, path: str = "reward_server") -> None:
        self.resources.validate(f"{path}.resources")
        if self.max_batch_size < 1:
            raise ValueError(f"{path}.max_batch_size={self.max_batch_size} must be >= 1")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"{path}.batch_wait_ms={self.batch_wait_ms} must be in [0, 10000]")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"{path}.timeout_s={self.timeout_s} must be > 0 or null")
        if not isinstance(self.forward_threads, int) or self.forward_threads < 0:
            raise ValueError(
                f"{path}.forward_threads={self.forward_threads!r} must be an integer >= 0 "
                "(0: automatic)"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"{path}.transport={self.transport!r} must be one of {', '.join(TRANSPORTS)}"
            )
        if self.transport in ("nccl", "cuda_ipc") and not self.resources.num_gpus:
            raise ValueError(
                f"{path}.transport={self.transport} moves GPU tensors: it needs "
                f"{path}.resources.num_gpus > 0"
            )


@dataclass
class TextEncoderConfig:
    """The text-encoder actor that serves every worker's prompt embeddings when
    ``policy.generator.text_encoders: actor`` (unused otherwise)."""

    resources: ActorResources = field(
        default_factory=lambda: ActorResources(max_restarts=-1, max_task_retries=-1)
    )


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
    """``max_steps`` DRaFT-K updates of ``batch_size`` prompts per worker (global batch:
    times ``scaling.num_workers``); evaluate every ``eval_every`` steps and at the end. A step
    whose reward or gradient is not finite is skipped on every rank; ``max_bad_steps`` of them
    in a row stop the run with a checkpoint."""

    max_steps: int = 100
    batch_size: int = 1
    eval_every: int = 25
    max_bad_steps: int = 3
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def validate(self, path: str = "train") -> None:
        for key in ("max_steps", "batch_size", "eval_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key}={getattr(self, key)} must be >= 1")
        self.early_stop.validate(f"{path}.early_stop")


@dataclass
class RunConfig:
    """``rlhf finetune CONFIG``. ``scaling``: the generator worker group (``max_failures``:
    rebuilds from the last checkpoint after a worker dies). ``mlflow.register_as``: the
    policy's registered model name (null: not registered)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "workers.num_workers": "scaling.num_workers",
        "workers.batch_size": "train.batch_size",
        "workers.resources.num_cpus": "scaling.cpus_per_worker",
        "workers.resources.num_gpus": "scaling.use_gpu and scaling.gpus_per_worker",
        "workers.resources.resources": "scaling.resources_per_worker",
        "workers.resources": "scaling (cpus_per_worker, use_gpu, gpus_per_worker, "
        "resources_per_worker)",
        "workers.max_rebuilds": "scaling.max_failures",
        "workers.text_encoder": "text_encoder.resources",
        "workers.resources.max_restarts": "scaling.max_failures (the group restarts from its "
        "last checkpoint)",
        "workers": "scaling, train.batch_size and text_encoder",
        "train.checkpoint_every": "checkpoint.every",
        "train.keep_checkpoints": "checkpoint.keep",
    }

    name: str = "finetune"
    seed: int = 0
    output_dir: str = "runs"
    allow_negative_weights: bool = False
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rewards: list[dict] = field(default_factory=lambda: [{"name": "ict_hp"}])
    eval_rewards: list[dict] = field(default_factory=list)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(max_failures=3))
    reward_server: ServerConfig = field(default_factory=ServerConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(
        default_factory=lambda: MlflowConfig(experiment="finetune", register_as="policy")
    )

    def validate(self) -> RunConfig:
        check_run_location(self.name, self.output_dir)
        self.policy.validate("policy.")
        self.prompts.validate()
        self.scaling.validate()
        self.reward_server.validate()
        self.text_encoder.resources.validate("text_encoder.resources")
        self.train.validate()
        self.checkpoint.validate(self.train.eval_every)
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
        return self.scaling.num_workers * self.train.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
