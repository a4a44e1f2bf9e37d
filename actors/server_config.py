"""How reward servers are placed, batch and are called: the ``reward_server`` config node."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.options import ActorResources

TRANSPORTS = ("object_store", "gloo", "nccl")


@dataclass
class ServerConfig:
    """How reward servers are placed, batch and are called.

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
        first call fails saying so.
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
