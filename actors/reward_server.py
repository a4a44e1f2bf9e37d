"""RewardServer: one reward model in a Ray actor, batching concurrent requests.

Generator workers send images and prompts and get back the scores and, for the DRaFT-K
backward pass, the vector-Jacobian product ``d(weight * sum(scores)) / d(images)``; the
worker finishes with ``images.backward(-grad)``. Concurrent calls are queued and run together,
up to ``max_batch_size`` images per forward. Every reward here scores each sample on its
own (per-sample preprocessing, no batch statistics), so a request's scores and gradient do not
depend on what it was batched with.

:class:`RewardClient` is the caller's side: a picklable handle that creates or finds the named
server. Ray restarts a dead server (``resources.max_restarts``) and resends the calls lost
with it: the server's methods are pure, so each is marked ``max_task_retries=-1``.

Wire format: the client sends numpy arrays, because Ray moves those through its object store
without pickling (torch tensors are pickled, several times slower at image sizes). The server
answers in the kind it was sent: numpy for numpy, torch for torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from actors.options import actor_options
from rewards.base import _RANGE_TOL, check_images
from rewards.registry import RewardSpec, build_reward
from rlhf.run_config import ServerConfig

log = logging.getLogger(__name__)

SCORE, GRAD = "score", "grad"


@dataclass
class _Request:
    kind: str
    images: torch.Tensor  # (b, 3, H, W) float, CPU
    prompts: list[str]
    weight: float
    future: asyncio.Future
    arrived: float

    @property
    def key(self) -> tuple:
        # Only requests of one kind and one image shape/dtype can share a forward.
        return (self.kind, tuple(self.images.shape[1:]), self.images.dtype)

    def __len__(self) -> int:
        return len(self.prompts)


class RewardServer:
    """One reward model behind an asyncio Ray actor (``ray.remote(RewardServer)``).

    Args:
        spec: a reward spec (``{name, checkpoint, options}``), see :mod:`rewards.registry`.
        max_batch_size, batch_wait_ms: see :class:`ServerConfig`.
        seed: seeds torch before the model is built (random-init tiny rewards).
        tracking_uri: the MLflow store that ``models:/`` and ``runs:/`` checkpoints come
            from (the actor process does not see a URI the caller set after Ray started).
        forward_threads: see :class:`ServerConfig`.
    """

    def __init__(
        self,
        spec: dict | RewardSpec | str,
        max_batch_size: int = 64,
        batch_wait_ms: float = 0.0,
        seed: int | None = None,
        tracking_uri: str | None = None,
        forward_threads: int = 0,
    ):
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.from_dict(spec)
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            if "mlflow" in sys.modules:
                sys.modules["mlflow"].set_tracking_uri(tracking_uri)
        if seed is not None:
            torch.manual_seed(seed)
        gpu = ray.is_initialized() and bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = build_reward(self.spec).eval().requires_grad_(False).to(self.device)
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_ms) / 1000
        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        cpus = _assigned_cpus()
        self.forward_threads = int(forward_threads) or (cpus if self.device.type == "cpu" else 1)
        # Set here, not left to OMP_NUM_THREADS: Ray keeps a value inherited from the driver's
        # environment, so a server on 0 CPUs would otherwise run the driver's thread count.
        torch.set_num_threads(max(1, cpus // self.forward_threads))
        # Forwards run in these threads: the event loop stays free to queue new requests.
        self._executor = ThreadPoolExecutor(self.forward_threads, thread_name_prefix="forward")
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()
        self.stats = {"batches": 0, "requests": 0, "images": 0, "errors": 0, "compute_s": 0.0}
        log.info("reward server %s on %s (pid %d)", self.spec.key, self.device, os.getpid())

    # ------------------------------------------------------------------ public methods

    @ray.method(max_task_retries=-1)
    async def score(self, images, prompts: Sequence[str] | None):
        """Args: images ``(B, 3, H, W)`` float in [0, 1], torch or numpy; prompts ``B``
        strings (None for an image-only reward). Returns: scores ``(B,)`` float32, CPU."""
        req, as_numpy = self._request(SCORE, images, prompts, 1.0)
        scores, _ = await self._submit(req)
        return _out(scores, as_numpy)

    @ray.method(max_task_retries=-1)
    async def score_and_grad(self, images, prompts: Sequence[str] | None, weight: float = 1.0):
        """Returns ``(scores (B,) float32, grad (B, 3, H, W))`` with
        ``grad = d(weight * sum(scores)) / d(images)`` in the images' dtype, CPU."""
        req, as_numpy = self._request(GRAD, images, prompts, weight)
        scores, grad = await self._submit(req)
        return _out(scores, as_numpy), _out(grad, as_numpy)

    @ray.method(max_task_retries=-1)
    async def ping(self) -> bool:
        return True

    @ray.method(max_task_retries=-1)
    async def info(self) -> dict:
        """Name, device, pid, and counts: ``batches`` (forwards run), ``requests``,
        ``images``, ``errors`` (requests refused or failed), ``compute_s`` (time spent in
        forwards). The counts start at 0 in each process (a restart shows as a new pid)."""
        return {
            "name": self.spec.key,
            "reward": getattr(self.model, "reward_name", self.spec.name),
            "device": str(self.device),
            "pid": os.getpid(),
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait_s * 1000,
            "forward_threads": self.forward_threads,
            "torch_threads": torch.get_num_threads(),
            "queued": len(self._pending),
            **self.stats,
        }

    # ------------------------------------------------------------------ queueing

    def _request(self, kind, images, prompts, weight) -> tuple[_Request, bool]:
        try:
            as_numpy = isinstance(images, np.ndarray)
            if as_numpy:
                if images.dtype.kind not in "fiub":
                    raise ValueError(
                        f"images must be a float array in [0, 1], got dtype {images.dtype}"
                    )
                with warnings.catch_warnings():
                    # Ray hands arrays over read-only; the server never writes to them.
                    warnings.simplefilter("ignore", UserWarning)
                    images = torch.from_numpy(images)
            # Shape and dtype on an empty slice; the values in one pass (NaN shows in min/max).
            check_images(images[:0] if images.dim() == 4 else images)
            if images.numel():
                lo, hi = (float(v) for v in torch.aminmax(images.detach()))
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError("images contain NaN or infinite values")
                if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
                    raise ValueError(
                        f"images must have values in [0, 1], got range [{lo:.3f}, {hi:.3f}]"
                    )
            if prompts is None and not getattr(self.model, "uses_prompts", True):
                prompts = [""] * len(images)
            if prompts is None:
                raise ValueError(f"reward {self.spec.key!r} needs prompts")
            if not isinstance(prompts, Sequence):
                raise ValueError(
                    f"prompts must be a sequence of strings, got {type(prompts).__name__}"
                )
            if isinstance(prompts, str):
                raise ValueError("prompts must be a sequence of strings, not a single string")
            if len(prompts) != len(images):
                raise ValueError(
                    f"got {len(images)} images but {len(prompts)} prompts; they must match"
                )
            prompts = list(prompts)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must all be strings")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
            ):
                raise ValueError(f"weight={weight!r} must be a finite number")
            if images.device.type != "cpu":
                images = images.cpu()
        except (ValueError, TypeError) as e:
            self.stats["errors"] += 1
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"bad request to reward {self.spec.key!r}: {e}") from e
        req = _Request(kind, images.detach(), prompts, float(weight), None, time.monotonic())
        return req, as_numpy

    async def _submit(self, req: _Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        loop = asyncio.get_running_loop()
        if self._runner is None or self._runner.done():
            self._wakeup = asyncio.Event()
            self._runner = loop.create_task(self._run())
        req.future = loop.create_future()
        self._pending.append(req)
        self._wakeup.set()
        return await req.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.forward_threads)
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # A free forward thread first: what queues meanwhile joins the next batch.
            await self._slots.acquire()
            batch = await self._gather()
            task = loop.create_task(self._serve_batch(loop, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_batch(self, loop, batch: list[_Request]) -> None:
        try:
            await self._serve(loop, batch)
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("reward %s: serving a batch failed", self.spec.key)
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
        finally:
            self._slots.release()

    async def _gather(self) -> list[_Request]:
        """The oldest request and the queued ones that can share its forward, after waiting
        until ``batch_wait_ms`` past its arrival (or until the batch is full)."""
        first = self._pending[0]
        deadline = first.arrived + self.batch_wait_s
        while sum(len(r) for r in self._pending if r.key == first.key) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, rest, n = [], deque(), 0
        for r in self._pending:
            if r.key == first.key and (not batch or n + len(r) <= self.max_batch_size):
                batch.append(r)
                n += len(r)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    async def _serve(self, loop, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._compute, batch)
        except Exception as e:
            if len(batch) > 1:
                # Run them one by one so that only the request at fault fails.
                for r in batch:
                    await self._serve(loop, [r])
                return
            log.warning("reward %s: request failed: %r", self.spec.key, e)
            self.stats["errors"] += 1
            results = [e]
        n = sum(len(r) for r in batch)
        self.stats["compute_s"] += time.perf_counter() - t0
        self.stats["batches"] += math.ceil(n / self.max_batch_size)
        self.stats["requests"] += len(batch)
        self.stats["images"] += n
        for r, res in zip(batch, results):
            if r.future.done():  # the caller was cancelled
                continue
            if isinstance(res, Exception):
                r.future.set_exception(res)
            else:
                r.future.set_result(res)

    # ------------------------------------------------------------------ compute

    def _compute(self, batch: list[_Request]) -> list[tuple]:
        """Runs in the forward thread: one merged forward (chunked past max_batch_size),
        split back per request."""
        grad = batch[0].kind == GRAD
        x = batch[0].images if len(batch) == 1 else torch.cat([r.images for r in batch])
        prompts = [p for r in batch for p in r.prompts]
        w = torch.cat([torch.full((len(r),), r.weight) for r in batch]) if grad else None
        scores, grads = [], []
        for i in range(0, len(prompts), self.max_batch_size):
            j = i + self.max_batch_size
            s, g = self._forward(x[i:j], prompts[i:j], None if w is None else w[i:j])
            scores.append(s)
            grads.append(g)
        sizes = [len(r) for r in batch]
        scores = torch.cat(scores).split(sizes)
        if not grad:
            return [(s, None) for s in scores]
        grads = torch.cat(grads).split(sizes)
        return [(s, g.to(r.images.dtype)) for s, g, r in zip(scores, grads, batch)]

    def _forward(self, x, prompts, weights) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device, torch.float32, non_blocking=True)
        if weights is None:
            with torch.inference_mode():
                return self.model.score(x, prompts).float().cpu(), None
        # A fresh leaf: never mark the caller's tensor as requiring grad.
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            s = self.model.score(x, prompts)
            # sum_i w_i s_i: each sample's gradient is its request's weight times d s_i / d x_i.
            (g,) = torch.autograd.grad((s * weights.to(s)).sum(), x)
        return s.detach().float().cpu(), g.cpu()


def _assigned_cpus() -> int:
    """Whole CPUs Ray gave this actor (at least 1); 1 outside an actor."""
    cpus = 1.0
    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except Exception:  # not inside an actor
        pass
    return max(1, int(cpus))


def _out(t: torch.Tensor, as_numpy: bool):
    # Split views share the batch's storage; torch pickling would ship all of it.
    return t.numpy() if as_numpy else t.clone()


_RemoteRewardServer = ray.remote(RewardServer)


def server_name(spec: RewardSpec, seed: int | None = None) -> str:
    """``reward-<key>-<hash>``: the same model (name, checkpoint, options, seed) shares one
    server; a different one with the same key gets its own."""
    ident = {"name": spec.name, "checkpoint": spec.checkpoint, "options": spec.options}
    digest = hashlib.sha1(json.dumps({**ident, "seed": seed}, sort_keys=True, default=str).encode())
    return f"reward-{spec.key}-{digest.hexdigest()[:8]}"


class RewardClient:
    """The caller's handle on one reward server; picklable, so it can be passed to actors.

    The server is a named actor: the first :meth:`start` (or call) creates it, later ones and
    other processes find it by name. Create it from the driver or the coordinator, so that
    the server's lifetime follows that process and not a worker's.

    Ray resends calls lost to a server that died and restarts it (see the module's note); a
    server gone for good (killed without restart, or out of ``max_restarts``) is created
    again once per call. A bad request raises the server's ``ValueError`` at once.
    """

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
        self.name = name or server_name(self.spec, seed)
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

    def _get_or_create(self):
        cfg = self.config
        opts = actor_options(cfg.resources, self.name, get_if_exists=True)
        return _RemoteRewardServer.options(**opts).remote(
            dataclasses.asdict(self.spec),
            cfg.max_batch_size,
            cfg.batch_wait_ms,
            self.seed,
            tracking_uri=_tracking_uri(self.spec),
            forward_threads=cfg.forward_threads,
        )

    def start(self) -> RewardClient:
        """Create (or find) the server and wait until it has loaded its model."""
        self._call("ping")
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1] (any device); prompts ``B`` strings.
        Returns: scores ``(B,)`` float32 on the images' device."""
        scores = self._call("score", _to_wire(images), _prompts(prompts))
        return torch.tensor(scores, device=_device(images))

    def score_and_grad(
        self, images: torch.Tensor, prompts: Sequence[str] | None, weight: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(scores (B,), grad (B, 3, H, W))``, ``grad = d(weight * sum(scores)) /
        d(images)`` with the images' dtype and device, ready for ``images.backward(-grad)``."""
        scores, grad = self._call("score_and_grad", _to_wire(images), _prompts(prompts), weight)
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        device = _device(images)
        return torch.tensor(scores, device=device), torch.tensor(grad, dtype=dtype, device=device)

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


def _prompts(prompts):
    return list(prompts) if prompts is not None and not isinstance(prompts, str) else prompts


def _device(images) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
