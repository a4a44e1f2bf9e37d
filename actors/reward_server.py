"""RewardServer: one reward model in a Ray actor, batching concurrent requests.

Generator workers send images and prompts and get back the scores and, for the DRaFT-K
backward pass, the vector-Jacobian product ``d(weight * sum(scores)) / d(images)``
(:func:`rewards.scoring.score_and_grad`, per-sample weights); the worker finishes with
``images.backward(-grad)``. Concurrent calls are queued and run together, up to
``max_batch_size`` images per forward. Every reward here scores each sample on its own
(per-sample preprocessing, no batch statistics), so a request's scores and gradient do not
depend on what it was batched with.

The caller's side is :class:`actors.reward_client.RewardClient`. Every method is pure, so each
is marked ``max_task_retries=-1``: Ray resends the calls lost to a restart. The server answers
in the kind it was sent: numpy for numpy (the client's wire format), torch for torch.

:class:`ServerCore` holds what does not depend on how requests arrive (the model, request
checks, the merged forward, the counts); :class:`RewardServer` queues on an asyncio loop (the
object-store transport), :class:`actors.direct_transport.DirectRewardServer` on threads (Ray's
direct tensor transport refuses asyncio actors).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch

from rewards.base import _RANGE_TOL, check_images
from rewards.registry import RewardSpec, build_reward
from rewards.scoring import score_and_grad

log = logging.getLogger(__name__)

SCORE, GRAD = "score", "grad"


@dataclass
class _Request:
    kind: str
    images: torch.Tensor  # (b, 3, H, W) float, CPU
    prompts: list[str]
    weight: float
    future: object  # asyncio.Future or concurrent.futures.Future, set by the queue
    arrived: float

    @property
    def key(self) -> tuple:
        # Only requests of one kind and one image shape/dtype can share a forward.
        return (self.kind, tuple(self.images.shape[1:]), self.images.dtype)

    def __len__(self) -> int:
        return len(self.prompts)


class ServerCore:
    """One reward model, its request checks, merged forwards and counts; the queueing and the
    Ray methods are the subclasses'.

    Args:
        spec: a reward spec (``{name, checkpoint, options}``), see :mod:`rewards.registry`.
        max_batch_size, batch_wait_ms: see :class:`~rlhf.run_config.ServerConfig`.
        seed: seeds torch before the model is built (random-init tiny rewards).
        tracking_uri: the MLflow store that ``models:/`` and ``runs:/`` checkpoints come
            from (the actor process does not see a URI the caller set after Ray started).
        forward_threads: see :class:`~rlhf.run_config.ServerConfig`.
    """

    # Whether answers stay on the compute device (a GPU transport) or go to host memory.
    answer_on_device = False

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
        cpus = _assigned_cpus()
        self.forward_threads = int(forward_threads) or (cpus if self.device.type == "cpu" else 1)
        # Set here, not left to OMP_NUM_THREADS: Ray keeps a value inherited from the driver's
        # environment, so a server on 0 CPUs would otherwise run the driver's thread count.
        torch.set_num_threads(max(1, cpus // self.forward_threads))
        # Forwards run in these threads: the queue stays free to take new requests.
        self._executor = ThreadPoolExecutor(self.forward_threads, thread_name_prefix="forward")
        self._stats_lock = threading.Lock()  # counts change in the forward threads
        self.stats = {"batches": 0, "requests": 0, "images": 0, "errors": 0, "compute_s": 0.0}
        log.info("reward server %s on %s (pid %d)", self.spec.key, self.device, os.getpid())

    def _info(self) -> dict:
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

    def _request(self, kind, images, prompts, weight) -> tuple[_Request, bool]:
        try:
            as_numpy = isinstance(images, np.ndarray)
            images = _check_images(images)
            if prompts is None and not getattr(self.model, "uses_prompts", True):
                prompts = [""] * len(images)
            if prompts is None:
                raise ValueError(f"reward {self.spec.key!r} needs prompts")
            prompts = _check_prompts(prompts, len(images))
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
            ):
                raise ValueError(f"weight={weight!r} must be a finite number")
        except (ValueError, TypeError) as e:
            with self._stats_lock:
                self.stats["errors"] += 1
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"bad request to reward {self.spec.key!r}: {e}") from e
        req = _Request(kind, images.detach(), prompts, float(weight), None, time.monotonic())
        return req, as_numpy

    def _batch_full(self) -> bool:
        first = self._pending[0]
        return sum(len(r) for r in self._pending if r.key == first.key) >= self.max_batch_size

    def _take_batch(self) -> list[_Request]:
        """The oldest request and the queued ones that can share its forward (up to
        ``max_batch_size`` images), taken off the queue."""
        first = self._pending[0]
        batch, rest, n = [], deque(), 0
        for r in self._pending:
            if r.key == first.key and (not batch or n + len(r) <= self.max_batch_size):
                batch.append(r)
                n += len(r)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    # ------------------------------------------------------------------ compute

    def _serve(self, batch: list[_Request]) -> list:
        """Runs in a forward thread: each request's ``(scores, grad)``, or the exception that
        request caused. A failed merged forward is run again one request at a time, so that
        only the request at fault fails."""
        t0 = time.perf_counter()
        try:
            results = self._compute(batch)
        except Exception as e:
            if len(batch) > 1:
                return [res for r in batch for res in self._serve([r])]
            log.warning("reward %s: request failed: %r", self.spec.key, e)
            with self._stats_lock:
                self.stats["errors"] += 1
            results = [e]
        n = sum(len(r) for r in batch)
        with self._stats_lock:
            self.stats["compute_s"] += time.perf_counter() - t0
            self.stats["batches"] += math.ceil(n / self.max_batch_size)
            self.stats["requests"] += len(batch)
            self.stats["images"] += n
        return results

    def _compute(self, batch: list[_Request]) -> list[tuple]:
        """One merged forward (chunked past max_batch_size), split back per request."""
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
        # The request was checked on arrival: the model's score, not its checking forward.
        w = 1.0 if weights is None else weights
        x = x.to(self.device, torch.float32, non_blocking=True)
        key = self.spec.key
        s = score_and_grad({key: (w, self.model.score)}, x, prompts, grad=weights is not None)
        if self.answer_on_device:  # a GPU transport: no round trip through host memory
            return s.components[key], s.grad
        return s.components[key].cpu(), None if s.grad is None else s.grad.cpu()


class RewardServer(ServerCore):
    """One reward model behind an asyncio Ray actor (``ray.remote(RewardServer)``): the
    object-store transport. Args: see :class:`ServerCore`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wakeup: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()

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
        """See :meth:`ServerCore._info`."""
        return self._info()

    # ------------------------------------------------------------------ queueing

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
            results = await loop.run_in_executor(self._executor, self._serve, batch)
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("reward %s: serving a batch failed", self.spec.key)
            results = [e] * len(batch)
        finally:
            self._slots.release()
        for r, res in zip(batch, results):
            if r.future.done():  # the caller was cancelled
                continue
            if isinstance(res, Exception):
                r.future.set_exception(res)
            else:
                r.future.set_result(res)

    async def _gather(self) -> list[_Request]:
        """The oldest request and the queued ones that can share its forward, after waiting
        until ``batch_wait_ms`` past its arrival (or until the batch is full)."""
        deadline = self._pending[0].arrived + self.batch_wait_s
        while not self._batch_full():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                break
        return self._take_batch()


def _check_images(images) -> torch.Tensor:
    """A request's images as a tensor where they arrived (host memory, or the server's GPU over
    a GPU transport), or ``ValueError``: ``(B, 3, H, W)`` float in [0, 1], numpy or torch."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "fiub":
            raise ValueError(f"images must be a float array in [0, 1], got dtype {images.dtype}")
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
            raise ValueError(f"images must have values in [0, 1], got range [{lo:.3f}, {hi:.3f}]")
    return images


def _check_prompts(prompts, n: int) -> list[str]:
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, not a single string")
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; they must match")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must all be strings")
    return prompts


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
