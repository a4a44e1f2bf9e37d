"""The one place that turns a small resources config into Ray actor ``.options(...)``.

Every actor group (reward servers, generator workers) describes its placement with an
:class:`ActorResources` in its config and calls :func:`actor_options`, so restart policy,
GPU share and custom resources are spelled the same way everywhere.
"""

from __future__ import annotations

from rlhf.resources import ActorResources

# Keys that ActorResources owns; passing them again through ``extra`` would silently win.
_OWN_KEYS = (
    "num_cpus",
    "num_gpus",
    "max_restarts",
    "max_task_retries",
    "max_concurrency",
    "resources",
)


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
