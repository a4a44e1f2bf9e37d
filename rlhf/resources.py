"""Placement as plain config sections: what one Ray actor asks for (:class:`ActorResources`)
and what a worker group asks for (:class:`ScalingConfig`, in Ray Train's words).

They sit below the actor shells (``actors/``) so that the run schemas (:mod:`rlhf.run_config`)
describe placements without importing Ray; :func:`actors.options.actor_options` turns an
:class:`ActorResources` into ``.options(...)``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field


@dataclass
class ActorResources:
    """What one actor asks Ray for, and how Ray restarts it.

    num_cpus, num_gpus: logical shares; fractions are allowed up to 1, whole numbers above
        (Ray's rule). ``num_gpus > 0`` is also what makes an actor put its model on CUDA.
    max_restarts: how often Ray restarts a dead actor (-1: forever, 0: never).
    max_task_retries: how often Ray resends a method call lost to a restart (-1: forever).
    max_concurrency: concurrent method calls; None keeps Ray's default (1 for a threaded
        actor, 1000 for an asyncio one).
    resources: custom resources, e.g. ``{"accelerator_type:H100": 0.01}``.
    """

    num_cpus: float = 1
    num_gpus: float = 0
    max_restarts: int = -1
    max_task_retries: int = 0
    max_concurrency: int | None = None
    resources: dict = field(default_factory=dict)

    def validate(self, path: str = "resources") -> None:
        for key in ("num_cpus", "num_gpus"):
            check_quantity(getattr(self, key), f"{path}.{key}")
        for key in ("max_restarts", "max_task_retries"):
            v = getattr(self, key)
            if not is_int(v) or v < -1:
                raise ValueError(f"{path}.{key}={v!r} must be an integer >= -1 (-1: unlimited)")
        if self.max_concurrency is not None and (
            not is_int(self.max_concurrency) or self.max_concurrency < 1
        ):
            raise ValueError(
                f"{path}.max_concurrency={self.max_concurrency!r} must be an integer >= 1 or null"
            )
        check_custom_resources(
            self.resources, f"{path}.resources", f"{path}.num_cpus", f"{path}.num_gpus"
        )


def check_custom_resources(resources, where: str, cpu_key: str, gpu_key: str) -> None:
    """Custom resources ``{name: quantity}``; CPU and GPU have their own keys."""
    if not isinstance(resources, dict):
        raise ValueError(f"{where}={resources!r} must be a mapping")
    for name, v in resources.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: key {name!r} must be a non-empty string")
        if name in ("CPU", "GPU"):
            raise ValueError(f"{where}.{name}: use {cpu_key if name == 'CPU' else gpu_key} instead")
        check_quantity(v, f"{where}.{name}")


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_quantity(v, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0:
        raise ValueError(f"{where}={v!r} must be a number >= 0")
    if v > 1 and float(v) != int(v):
        raise ValueError(f"{where}={v!r}: a share above 1 must be a whole number (Ray's rule)")


@dataclass
class ScalingConfig:
    """A worker group in Ray Train's words (``ray.train.ScalingConfig``, ``FailureConfig``):
    the ``scaling`` section of ``rlhf train-reward`` and of ``rlhf finetune``.

    num_workers: ranks of one torch.distributed group (gloo on CPU, NCCL with ``use_gpu``).
    use_gpu: each worker gets ``gpus_per_worker`` GPUs (0: one) and computes on CUDA.
    cpus_per_worker: logical CPUs per worker, also its torch thread count (at least 1).
    gpus_per_worker: GPU share per worker with ``use_gpu`` (fractions up to 1; 0: one).
    resources_per_worker: custom resources per worker, e.g. ``{"accelerator_type:H100": 0.01}``.
    max_failures: how often a failed group is restarted from its last checkpoint (-1: forever).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    resources_per_worker: dict = field(default_factory=dict)
    max_failures: int = 0

    def validate(self, path: str = "scaling") -> None:
        if not is_int(self.num_workers) or self.num_workers < 1:
            raise ValueError(f"{path}.num_workers={self.num_workers!r} must be an integer >= 1")
        check_quantity(self.cpus_per_worker, f"{path}.cpus_per_worker")
        check_quantity(self.gpus_per_worker, f"{path}.gpus_per_worker")
        if self.gpus_per_worker and not self.use_gpu:
            raise ValueError(
                f"{path}.gpus_per_worker={self.gpus_per_worker} needs {path}.use_gpu=true"
            )
        if not is_int(self.max_failures) or self.max_failures < -1:
            raise ValueError(
                f"{path}.max_failures={self.max_failures!r} must be an integer >= -1 "
                "(-1: unlimited)"
            )
        check_custom_resources(
            self.resources_per_worker,
            f"{path}.resources_per_worker",
            f"{path}.cpus_per_worker",
            f"{path}.gpus_per_worker",
        )

    @property
    def gpus(self) -> float:
        """GPUs per worker: ``gpus_per_worker`` (0: one) with ``use_gpu``, else 0."""
        return (self.gpus_per_worker or 1) if self.use_gpu else 0

    def ray_resources(self) -> dict:
        """``resources_per_worker`` for ``ray.train.ScalingConfig`` (CPU, GPU and custom)."""
        out = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus
        return out

    def actor_resources(self) -> ActorResources:
        """One worker as an actor; Ray does not restart it (``max_failures`` restarts the
        whole group from its last checkpoint)."""
        return ActorResources(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus,
            max_restarts=0,
            resources=dict(self.resources_per_worker),
        )
