"""RewardClient: the caller's handle on one :class:`~actors.reward_server.RewardServer`.

A picklable :class:`~rewards.handles.RewardHandle` that creates or finds the named server.
Ray restarts a dead server (``resources.max_restarts``) and resends the calls lost with it:
the server's methods are pure, so each is marked ``max_task_retries=-1``; a server gone for
good is created again.

Wire format (``reward_server.transport: object_store``): the client sends numpy arrays, because
Ray moves those through its object store without pickling (torch tensors are pickled, several
times slower at image sizes). With ``gloo`` / ``nccl`` / ``cuda_ipc`` the server is a
:class:`~actors.direct_transport.DirectRewardServer` and torch tensors travel by Ray's direct
tensor transport; the caller must then be a suitable actor (see that module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from actors.direct_transport import DirectChannel, DirectRewardServer
from actors.options import actor_options
from actors.reward_server import RewardServer
from rewards.handles import SpecHandle
from rewards.registry import RewardSpec
from rlhf.run_config import ServerConfig

log = logging.getLogger(__name__)

_RemoteRewardServer = ray.remote(RewardServer)
# At the class, not in .options(): Ray reads enable_tensor_transport from the class only.
_RemoteDirectServer = ray.remote(enable_tensor_transport=True)(DirectRewardServer)
# Threads of a direct server when resources.max_concurrency is not set: callers that may wait
# on it at once (each holds a thread), plus info().
_DIRECT_CONCURRENCY = 64


def server_name(spec: RewardSpec, seed: int | None = None, transport: str = "object_store") -> str:
    """``reward-<key>-<hash>``: the same model (name, checkpoint, options, seed) over the
    same transport shares one server; a different one with the same key gets its own."""
    ident = {"name": spec.name, "checkpoint": spec.checkpoint, "options": spec.options}
    ident["seed"] = seed
    if transport != "object_store":  # a different actor class
        ident["transport"] = transport
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode())
    return f"reward-{spec.key}-{digest.hexdigest()[:8]}"


class RewardClient(SpecHandle):
    """The caller's handle on one reward server; picklable, so it can be passed to actors.

    The server is a named actor: the first :meth:`start` (or call) creates it, later ones and
    other processes find it by name. Create it from the driver or the coordinator, so that
    the server's lifetime follows that process and not a worker's.

    Ray resends calls lost to a server that died and restarts it (see the module's note); a
    server gone for good (killed without restart, or out of ``max_restarts``) is created
    again once per call (over a direct transport a restart costs more: see
    :mod:`actors.direct_transport`). A bad request raises the server's ``ValueError`` at once.
    """

    in_process = False  # a RewardHandle computing in another process

    def __init__(
        self,
        spec: dict | RewardSpec | str,
        config: ServerConfig | None = None,
        *,
        seed: int | None = None,
        name: str | None = None,
    ):
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.from_dict(spec)
        self.config = config or ServerConfig()
        self.config.validate()
        self.seed = seed
        self.name = name or server_name(self.spec, seed, self.config.transport)
        self._handle = None

    def __getstate__(self) -> dict:
        # Each process looks the server up by name.
        return {**self.__dict__, "_handle": None}

    @property
    def handle(self):
        """The server's actor handle (created if no server of this name is alive)."""
        if self._handle is None:
            self._handle = self._get_or_create()
        return self._handle

    @property
    def direct(self) -> bool:
        """Whether images and gradients travel by Ray's direct tensor transport."""
        return self.config.transport != "object_store"

    def _get_or_create(self):
        cfg = self.config
        opts = actor_options(cfg.resources, self.name, get_if_exists=True)
        args = (dataclasses.asdict(self.spec), cfg.max_batch_size, cfg.batch_wait_ms, self.seed)
        kwargs = {"tracking_uri": _tracking_uri(self.spec), "forward_threads": cfg.forward_threads}
        if not self.direct:
            return _RemoteRewardServer.options(**opts).remote(*args, **kwargs)
        opts.setdefault("max_concurrency", _DIRECT_CONCURRENCY)
        return _RemoteDirectServer.options(**opts).remote(*args, transport=cfg.transport, **kwargs)

    def start(self) -> RewardClient:
        """Create (or find) the server and wait until it has loaded its model."""
        self._call("ping")
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1] (any device); prompts ``B`` strings.
        Returns: scores ``(B,)`` float32 on the images' device."""
        return self.start_call(images, prompts, grad=False)()[0]

    def score_and_grad(
        self, images: torch.Tensor, prompts: Sequence[str] | None, weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(scores (B,), grad (B, 3, H, W))``, ``grad = d(w * sum(scores)) /
        d(images)`` with the images' dtype and device, ready for ``images.backward(-grad)``;
        ``w`` is ``weight``, or the spec's when None."""
        return self.start_call(images, prompts, grad=True, weight=weight)()

    def start_call(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None,
        grad: bool = True,
        weight: float | None = None,
    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        """Send :meth:`score_and_grad` (``grad``, with ``weight``) or :meth:`score` without
        waiting; the returned function waits and returns ``(scores, grad or None)`` as those
        do, with the same errors and retries. The caller's thread can compute meanwhile, and
        several servers compute at once, with no thread of ours in between: a helper thread
        that touched a tensor would give the process a second OpenMP team, and libgomp,
        counting more threads than cores, then stops spinning between parallel regions in
        every thread (BENCHMARKS.md section 6). Over a direct transport the call is made
        when the returned function is called (its channel waits)."""
        w = self.weight if weight is None else weight
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        device = _device(images)
        method = "score_and_grad" if grad else "score"
        wire = _to_direct(images, self.config.transport) if self.direct else _to_wire(images)
        args = (wire, _prompts(prompts), *((w,) if grad else ()))
        ref = None  # None: the call is made (or made again) on waiting, with its retries
        if not self.direct:
            try:
                ref = getattr(self.handle, method).remote(*args)
            except RayActorError:
                pass

        def wait():
            out = self._call(method, *args) if ref is None else self._get(ref, method, args)
            scores, g = out if grad else (out, None)
            return _answer(scores, device), None if g is None else _answer(g, device, dtype)

        return wait

    def _get(self, ref, method: str, args: tuple):
        try:
            return ray.get(ref, timeout=self.config.timeout_s)
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise e.cause from None
            raise
        except RayActorError:
            return self._call(method, *args)  # Ray's retries are spent: find or recreate it

    def info(self) -> dict:
        return self._call("info")

    def shutdown(self) -> None:
        """Stop the server for good (no restart)."""
        if self._handle is not None or self._exists():
            ray.kill(self.handle, no_restart=True)
        self._handle = None

    def _exists(self) -> bool:
        try:
            ray.get_actor(self.name)
            return True
        except ValueError:
            return False

    def _call(self, method: str, *args):
        recreated = False
        while True:
            try:
                if self.direct and method in ("score", "score_and_grad"):
                    channel = DirectChannel.to(self.handle, self.config.transport)
                    return channel.call(method, *args, timeout=self.config.timeout_s)
                ref = getattr(self.handle, method).remote(*args)
                return ray.get(ref, timeout=self.config.timeout_s)
            except RayTaskError as e:
                if isinstance(e.cause, ValueError):
                    raise e.cause from None
                raise
            except RayActorError as e:
                if e.actor_init_failed or recreated:
                    raise
                log.warning("reward server %s is gone (%s); creating it again", self.name, e)
                recreated = True
                # Replaced only after the lookup: dropping the creator's last handle first
                # would make Ray destroy a server it is still restarting.
                self._handle = self._get_or_create()


def _tracking_uri(spec: RewardSpec) -> str | None:
    """The caller's MLflow store, when the spec loads anything from MLflow."""
    text = json.dumps(dataclasses.asdict(spec), default=str)
    if not any(f'"{s}' in text for s in ("models:/", "runs:/", "mlflow-artifacts:/")):
        return None
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not os.path.isabs(uri[len("sqlite:///") :]):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


def _to_wire(images):
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        t = images.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.cpu().contiguous().numpy()
    return images  # the server says what is wrong with it


def _answer(value, device, dtype=None) -> torch.Tensor:
    """An answer (a tensor over a direct transport, a numpy array over the object store) on
    the caller's device, in ``dtype`` when given."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def _to_direct(images, transport: str):
    """Images as the direct transport sends them: Gloo CPU float tensors (bfloat16 as
    float32), NCCL tensors on this process's GPU."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not (isinstance(images, torch.Tensor) and images.is_floating_point()):
        return images  # the server says what is wrong with it
    t = images.detach()
    if transport == "gloo":
        t = t.float() if t.dtype == torch.bfloat16 else t
        return t.cpu().contiguous()
    return t.cuda().contiguous()


def _prompts(prompts):
    return list(prompts) if prompts is not None and not isinstance(prompts, str) else prompts


def _device(images) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
