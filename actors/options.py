"""The one place that turns a small resources config into Ray actor ``.options(...)``.

Every actor group (reward servers, generator workers) describes its placement with an
:class:`ActorResources` in its config and calls :func:`actor_options`, so restart policy,
GPU share and custom resources are spelled the same way everywhere.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

# Keys that ActorResources owns; passing them again through ``extra`` would silently win.
_OWN_KEYS = (
    "num_cpus",
    "num_gpus",
    "max_restarts",
    "max_task_retries",
    "max_concurrency",
    "resources",
)


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
            _check_quantity(getattr(self, key), f"{path}.{key}")
        for key in ("max_restarts", "max_task_retries"):
            v = getattr(self, key)
            if not _is_int(v) or v < -1:
                raise ValueError(f"{path}.{key}={v!r} must be an integer >= -1 (-1: unlimited)")
        if self.max_concurrency is not None and (
            not _is_int(self.max_concurrency) or self.max_concurrency < 1
        ):
            raise ValueError(
                f"{path}.max_concurrency={self.max_concurrency!r} must be an integer >= 1 or null"
            )
        if not isinstance(self.resources, dict):
            raise ValueError(f"{path}.resources={self.resources!r} must be a mapping")
        for name, v in self.resources.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{path}.resources: key {name!r} must be a non-empty string")
            if name in ("CPU", "GPU"):
                key = "num_cpus" if name == "CPU" else "num_gpus"
                raise ValueError(f"{path}.resources.{name}: use {path}.{key} instead")
            _check_quantity(v, f"{path}.resources.{name}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_quantity(v, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0:
        raise ValueError(f"{where}={v!r} must be a number >= 0")
    if v > 1 and float(v) != int(v):
        raise ValueError(f"{where}={v!r}: a share above 1 must be a whole number (Ray's rule)")


def actor_options(res: ActorResources, name: str | None = None, **extra) -> dict:
    """Validated keyword arguments for ``ActorClass.options(...)``.

    Args:
        res: the actor's resources and restart policy.
        name: a named actor (found again with ``ray.get_actor(name)``).
        **extra: any other ``.options`` key (``get_if_exists``, ``namespace``,
            ``scheduling_strategy``, ``runtime_env``, ...); keys of ``res`` are refused here.
    """
    res.validate()
    clash = sorted(set(extra) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"actor_options: {clash} belong in ActorResources, not in extra options")
    opts = {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "max_restarts": res.max_restarts,
        "max_task_retries": res.max_task_retries,
    }
    if res.max_concurrency is not None:
        opts["max_concurrency"] = res.max_concurrency
    if res.resources:
        opts["resources"] = dict(res.resources)
    if name is not None:
        opts["name"] = name
    return {**opts, **extra}
