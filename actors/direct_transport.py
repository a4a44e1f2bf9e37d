"""Reward traffic over Ray's direct tensor transport (RDT): Gloo between CPU actors, NCCL
between GPU actors on different devices, CUDA IPC between processes on one GPU, instead of
the object store (``reward_server.transport``).

What Ray 2.60's RDT allows, read in its code (``ray/actor.py``, ``ray/_private/worker.py``,
``ray/experimental/rdt/``, ``ray/experimental/collective/``), and how this module fits it:

- Only actors hold RDT tensors. A tensor travels when an actor task whose call was made with
  ``tensor_transport=...`` *returns* it and its ref is *passed as an argument* to a task on
  another actor of the same collective group. ``ray.put(x, _tensor_transport="gloo")`` is
  refused (two-sided transport), and so is ``ray.get`` of such a ref ("ray.get is not allowed
  on RDT objects using the two-sided transport GLOO"): a caller's own thread can neither send
  nor receive. So the caller must be an actor of a class declared with
  ``@ray.remote(enable_tensor_transport=True)`` (Ray reads it from the class, not from
  ``.options()``):
  the images are the return of a task on its own ``_ray_system`` thread (the one Ray adds for
  transfers), and the answer is the argument of another task there, which hands it back to
  the waiting thread through this process's memory (:data:`_MAILBOX`).
- Only the process that created a collective group can submit calls that use it (Ray keeps
  the group in the creator's memory, ``RemoteCommunicatorManager``). So each caller creates its
  own two-member group ``[caller, server]`` on its first call (:class:`DirectChannel`), not
  the driver or the coordinator. ``create_collective_group`` cannot be used from inside the
  caller: it runs each member's set-up as a task on that member and waits, and the caller's
  own task would queue behind the one that is waiting. So the caller joins its rank in its
  own thread while the server joins by a task, and the group is registered in this process
  as ``create_collective_group`` does.
- The server must not be an asyncio actor (RDT's documented limit): :class:`DirectRewardServer`
  is a threaded actor batching with :class:`~actors.reward_server.ServerCore`'s logic.
- A failed or hung (``RAY_rdt_fetch_fail_timeout_milliseconds``, 60 s) collective transfer
  makes Ray kill both actors, server and caller (``RDTManager._abort_transport``); Ray then
  restarts the server per ``resources.max_restarts``. A restarted server has lost its groups,
  so the next transfer to it should fail the same way (read from the code, not tested). Unlike the object store path, a server
  restart therefore costs the callers too: the worker group's failure to handle (Ray Train
  restarts it).

Ray Train's worker actors are created by Ray Train without ``enable_tensor_transport``, so a
``train_func`` cannot use the two-sided transports in Ray 2.60; :func:`check_caller` says so
at the first call instead of falling back silently.

- NCCL connects one rank per GPU: a caller and a server on one device fail at the first
  transfer ("Duplicate GPU detected", seen on an H100). :class:`DirectChannel` checks first.
- ``cuda_ipc`` (Ray's one-sided CUDA IPC transport, for a server on the caller's own GPU)
  needs none of the above: ``ray.put`` with a one-sided transport is allowed from any
  process, and so is ``ray.get`` of its refs, so any process that Ray assigned the server's
  GPU can call, Ray Train workers included (:class:`IpcChannel`; verified on an H100 by
  ``tests/gpu/test_reward_transport_gpu.py``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence

import ray
import torch

from actors.reward_server import GRAD, SCORE, ServerCore, _Request

log = logging.getLogger(__name__)

TRANSPORTS = ("gloo", "nccl", "cuda_ipc")
ONE_SIDED = ("cuda_ipc",)  # no collective group; any process holding the GPU can call

# Tensors on their way between a caller's thread and its ``_ray_system`` thread.
_MAILBOX: dict[str, object] = {}
_channels: dict[tuple, DirectChannel] = {}
_channels_lock = threading.Lock()


class TransportUnavailable(RuntimeError):
    """``reward_server.transport`` names a direct transport this caller cannot use."""


class DirectRewardServer(ServerCore):
    """One reward model behind a threaded Ray actor whose answers travel by RDT.

    Create it with ``ray.remote(enable_tensor_transport=True)`` and ``max_concurrency`` of at least the
    callers that may wait on it at once, plus one for :meth:`info`. Each method call carries
    ``.options(tensor_transport=...)``; the images argument arrives as a tensor on the server
    (Gloo: CPU, NCCL: CUDA), the returned tensors stay here until the caller has taken them.

    Args: see :class:`~actors.reward_server.ServerCore`; ``transport``: ``gloo``, ``nccl`` or
    ``cuda_ipc`` (NCCL and CUDA IPC answer on the server's CUDA device).
    """

    def __init__(self, *args, transport: str = "gloo", **kwargs):
        super().__init__(*args, **kwargs)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} must be one of {TRANSPORTS}")
        if transport != "gloo" and self.device.type != "cuda":
            raise ValueError(
                f"reward_server.transport={transport} needs a server on a GPU (num_gpus > 0)"
            )
        self.transport = transport
        # NCCL and CUDA IPC move GPU tensors: answers stay on this GPU (Gloo: host memory).
        self.answer_on_device = transport != "gloo"
        self._cv = threading.Condition()
        self._slots = threading.Semaphore(self.forward_threads)
        self._runner: threading.Thread | None = None

    @ray.method(max_task_retries=-1)
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """Args: images ``(B, 3, H, W)`` float in [0, 1]; prompts ``B`` strings.
        Returns: scores ``(B,)`` float32."""
        scores, _ = self._submit(self._request(SCORE, images, prompts, 1.0)[0])
        return scores

    @ray.method(max_task_retries=-1)
    def score_and_grad(self, images: torch.Tensor, prompts: Sequence[str] | None, weight=1.0):
        """Returns ``(scores (B,) float32, grad (B, 3, H, W))``, ``grad = d(weight *
        sum(scores)) / d(images)`` in the images' dtype."""
        return self._submit(self._request(GRAD, images, prompts, weight)[0])

    @ray.method(max_task_retries=-1)
    def ping(self) -> bool:
        return True

    @ray.method(max_task_retries=-1)
    def info(self) -> dict:
        """See :meth:`~actors.reward_server.ServerCore._info`; plus ``transport``."""
        with self._cv:
            return {**self._info(), "transport": self.transport}

    def _submit(self, req: _Request):
        req.future = concurrent.futures.Future()
        with self._cv:
            if self._runner is None:
                self._runner = threading.Thread(target=self._run, name="batcher", daemon=True)
                self._runner.start()
            self._pending.append(req)
            self._cv.notify_all()
        return req.future.result()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending)
            # A free forward thread first: what queues meanwhile joins the next batch.
            self._slots.acquire()
            with self._cv:
                deadline = self._pending[0].arrived + self.batch_wait_s
                while not self._batch_full():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = self._take_batch()
            self._executor.submit(self._serve_batch, batch)

    def _serve_batch(self, batch: list[_Request]) -> None:
        try:
            results = self._serve(batch)
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("reward %s: serving a batch failed", self.spec.key)
            results = [e] * len(batch)
        finally:
            self._slots.release()
        for r, res in zip(batch, results):
            if isinstance(res, Exception):
                r.future.set_exception(res)
            else:
                r.future.set_result(res)


def check_caller(transport: str):
    """This actor's own handle, or :class:`TransportUnavailable` saying why this process
    cannot send or receive over ``transport``."""
    key = f"reward_server.transport={transport}"
    try:
        me = ray.get_runtime_context().current_actor
    except RuntimeError:
        raise TransportUnavailable(
            f"{key}: the caller must be a Ray actor (RDT moves tensors between actors only; "
            "this is the driver or a task). Use transport: object_store here."
        ) from None
    if not me._ray_enable_tensor_transport:
        raise TransportUnavailable(
            f"{key}: the calling actor's class was not declared with "
            "@ray.remote(enable_tensor_transport=True), so Ray gives it no thread for "
            "transfers (Ray Train's worker actors are declared without it). Use transport: "
            "object_store, or declare the caller's class with enable_tensor_transport=True."
        )
    return me


class DirectChannel:
    """The caller's side of RDT to one server: this actor and the server in one collective
    group, created by this process on first use (see the module's note)."""

    _ids = itertools.count()

    def __init__(self, server, transport: str):
        self.server = server
        self.transport = transport
        self.me = check_caller(transport)
        if transport == "nccl":
            _check_separate_gpus(server)
        self.group = f"reward-{transport}-{uuid.uuid4().hex[:12]}"
        joined = server.__ray_call__.remote(_join, 2, 1, self.group, transport)
        _join(None, 2, 0, self.group, transport)
        ray.get(joined)
        from ray.experimental.collective.collective import RemoteCommunicatorManager
        from ray.experimental.collective.communicator import CommunicatorHandle

        handle = CommunicatorHandle([self.me, server], self.group, transport)
        RemoteCommunicatorManager.get().add_remote_communicator(handle)
        log.info("reward transport %s: group %s with %s", transport, self.group, server)

    @classmethod
    def to(cls, server, transport: str) -> DirectChannel | IpcChannel:
        """The channel of this process to ``server`` (created on first use)."""
        # Ray 2.60's ray.get_actor, in a process that has not seen the handle before, builds
        # it without the class's enable_tensor_transport; the server's class declares it.
        server._ray_enable_tensor_transport = True
        key = (server._actor_id, transport)
        with _channels_lock:
            if key not in _channels:
                one_sided = transport in ONE_SIDED
                _channels[key] = IpcChannel(server) if one_sided else cls(server, transport)
            return _channels[key]

    def call(self, method: str, images: torch.Tensor, *args, timeout: float | None = None):
        """``server.method(images, *args)`` with ``images`` and the answer's tensors moved by
        the transport. Raises what the server raised."""
        box_in, box_out = f"in-{next(self._ids)}", f"out-{next(self._ids)}"
        _MAILBOX[box_in] = images
        system = {"concurrency_group": "_ray_system"}
        try:
            x_ref = self.me.__ray_call__.options(**system, tensor_transport=self.transport)
            x_ref = x_ref.remote(_take, box_in)
            ref = getattr(self.server, method).options(tensor_transport=self.transport)
            ref = ref.remote(x_ref, *args)
            del x_ref  # the server holds it now; dropping ours frees the sent copy after
            if not ray.wait([ref], timeout=timeout)[0]:
                raise ray.exceptions.GetTimeoutError(f"reward server: {method} timed out")
            # The hand-over task and the receive both run on this actor's one _ray_system
            # thread: asked for before the answer exists, the hand-over would wait there for
            # a receive queued behind it.
            rdt = ray._private.worker.global_worker.rdt_manager
            if rdt.wait_for_tensor_transport_metadata(ref.hex(), timeout=1.0) is None:
                ray.get(ref, _use_object_store=True, timeout=timeout)  # raises the task's error
                raise RuntimeError(f"reward server answered {method} without tensors")
            kept = self.me.__ray_call__.options(**system).remote(_keep, box_out, ref)
            ray.get(kept, timeout=timeout)
            return _MAILBOX.pop(box_out)
        finally:
            _MAILBOX.pop(box_in, None)
            _MAILBOX.pop(box_out, None)


class IpcChannel:
    """The caller's side of CUDA IPC to one server on the same GPU (``cuda_ipc``).

    A one-sided transport: the images are put into this process's RDT store (``ray.put``
    with ``_tensor_transport``, allowed for one-sided transports from any process) and the
    server maps them through their IPC handle; the answer's tensors come back the same way
    and are copied here before the server's are released, since a mapped tensor lives only as
    long as its owner keeps it. No collective group, so callers need not be declared with
    ``enable_tensor_transport`` (Ray Train workers can call). Both sides must have been
    assigned the same GPU by Ray; Ray's receiver says so otherwise.
    """

    def __init__(self, server):
        gpus = ray.get_gpu_ids()
        if not gpus:
            raise TransportUnavailable(
                "reward_server.transport=cuda_ipc: this process has no GPU assigned by Ray; "
                "the caller must hold (a share of) the server's GPU. Use transport: "
                "object_store here."
            )
        self.server = server
        log.info("reward transport cuda_ipc to %s (GPU %s)", server, gpus)

    def call(self, method: str, images: torch.Tensor, *args, timeout: float | None = None):
        """``server.method(images, *args)`` with ``images`` and the answer's tensors mapped
        by CUDA IPC. Raises what the server raised."""
        if not (isinstance(images, torch.Tensor) and images.is_cuda):
            raise ValueError("reward_server.transport=cuda_ipc sends CUDA tensors only")
        x_ref = ray.put(images, _tensor_transport="cuda_ipc")
        ref = getattr(self.server, method).options(tensor_transport="cuda_ipc")
        ref = ref.remote(x_ref, *args)
        out = ray.get(ref, timeout=timeout)
        own = _own(out)
        del out, ref, x_ref  # the server may now free its copy, and this one the images
        return own


def _own(value):
    """``value`` with every tensor copied into this process's memory."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_own(v) for v in value)
    return value


def _where(actor=None) -> tuple[str, list]:
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def _check_separate_gpus(server) -> None:
    """NCCL connects one rank per GPU: two processes on one device fail at the first
    transfer ("Duplicate GPU detected", seen on an H100), after which Ray kills both. Say so
    before that happens."""
    node, gpus = _where()
    s_node, s_gpus = ray.get(server.__ray_call__.remote(_where))
    shared = sorted(set(gpus) & set(s_gpus)) if node == s_node else []
    if shared:
        raise TransportUnavailable(
            f"reward_server.transport=nccl: this caller and the server share GPU {shared}, and "
            "NCCL cannot connect two processes on one GPU. Use transport: cuda_ipc for a "
            "server on the caller's GPU."
        )


def _join(actor, world_size: int, rank: int, group: str, transport: str) -> None:
    import ray.util.collective as collective

    collective.init_collective_group(world_size, rank, transport, group_name=group)


def _take(actor, box: str):
    return _MAILBOX.pop(box)


def _keep(actor, box: str, value) -> None:
    _MAILBOX[box] = value
