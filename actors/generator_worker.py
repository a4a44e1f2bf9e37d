"""GeneratorWorker: one rank of the DRaFT-K policy, and the group that runs N of them.

Each worker holds the SD3 generator (frozen VAE and text encoders) and a DeepSpeed engine
around the trainable transformer; the N workers form one torch.distributed group (gloo on
CPU, NCCL on GPU) whose address and free port the group picks on rank 0's node. Rewards with
``placement: colocated`` run inside each worker; ``placement: server`` ones go through a
:class:`~actors.reward_client.RewardClient`. Either way the worker gets the scores and the
image gradient ``d(Σ w·r)/d(images)`` and finishes the backward pass itself, so the
parameter gradients are the same (a test asserts it).

A step whose reward or image gradient is not finite on any rank is skipped on every rank
(they agree through an all-reduce before the backward, which is collective under ZeRO).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from actors.options import actor_options
from actors.reward_client import RewardClient
from actors.text_encoder import TextEncoderClient, start_text_encoder
from rlhf.config import bind
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)


class SkippedStep(Exception):
    """The step's rewards or image gradients are not finite on some rank."""


def _finite_everywhere(*tensors: torch.Tensor) -> bool:
    import torch.distributed as dist

    ok = all(bool(torch.isfinite(t).all()) for t in tensors)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        ok = float(flag) == 0.0
    return ok


class GeneratorWorker:
    """One rank. Created by :class:`WorkerGroup`; ``cfg`` is a :class:`RunConfig` as a dict."""

    def __init__(self, cfg: dict, rank: int, world: int):
        self.cfg: RunConfig = bind(RunConfig, cfg)
        self.rank, self.world = rank, world
        self.engine = None
        self.eval_only: set[str] = set()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="reward-call")

    # ------------------------------------------------------------------ set-up

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port on it (rank 0's become the group's master)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        master_addr: str,
        master_port: int,
        clients: dict[str, RewardClient],
        text_encoder=None,
    ) -> dict:
        """Join the process group, load the generator, build the engine and the rewards.
        ``text_encoder``: the text-encoder actor serving prompt embeddings, when
        ``policy.generator.text_encoders: actor``."""
        import deepspeed

        from rewards.handles import build_handles
        from rlhf.engine import build_engine
        from rlhf.generator import load_generator

        cfg = self.cfg
        t0 = time.perf_counter()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        on_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
        device = "cuda" if on_gpu else "cpu"
        policy = cfg.policy
        torch.manual_seed(policy.generator.seed)
        self.gen = load_generator(policy.generator, policy.finetune, device)
        if text_encoder is not None:
            self.gen.prompt_encoder = TextEncoderClient(text_encoder)
        self.engine = build_engine(
            self.gen.transformer, policy.engine, cfg.train.batch_size, policy.finetune.mode
        )
        self.eval_only = {spec.key for spec in cfg.eval_reward_specs()}  # not in training
        specs = cfg.reward_specs() + cfg.eval_reward_specs()
        self.rewards = build_handles(specs, clients, device, seed=cfg.seed)
        return {
            "rank": self.rank,
            "device": device,
            "node_id": ray.get_runtime_context().get_node_id(),
            "setup_s": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ scoring

    def _score(self, images: torch.Tensor, prompts: list[str], grad: bool = True):
        """Scores and the image gradient of the optimised (weighted) rewards. Training
        (``grad``) scores the ``rewards`` only; evaluation adds the ``eval_rewards``."""
        from rewards.handles import score_handles

        t0 = time.perf_counter()
        handles = [h for h in self.rewards if not (grad and h.key in self.eval_only)]
        scores = score_handles(handles, images, prompts, grad=grad, pool=self._pool)
        self._reward_s = time.perf_counter() - t0
        return scores

    # ------------------------------------------------------------------ training

    def step(self, step: int, prompts: Sequence[str], seeds: Sequence[int]) -> dict:
        """One DRaFT-K or ReFL (``policy.draft.mode``) update on this rank's share; returns its
        metrics (``skipped`` = 1 when a non-finite reward or gradient on any rank made every
        rank skip it)."""
        from rlhf.draft import draft_step

        def score_fn(images, ps):
            scores = self._score(images, ps)
            if not _finite_everywhere(scores.total, scores.grad, images):
                raise SkippedStep
            return scores

        p = self.cfg.policy
        t0 = time.perf_counter()
        try:
            m = draft_step(
                self.engine,
                self.gen,
                None,
                list(prompts),
                list(seeds),
                p.sampler,
                p.draft,
                step,
                score_fn=score_fn,
            )
        except SkippedStep:
            return {"skipped": 1.0, "time_s": time.perf_counter() - t0}
        m["skipped"] = 0.0
        m["reward_s"] = self._reward_s  # scoring and image gradients, local and remote
        return m

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str], seeds: Sequence[int]) -> dict:
        """No-grad samples of this rank's held-out share: per-sample scores of every reward
        and the images as uint8 ``(B, H, W, 3)``."""
        from rlhf.image_stats import to_uint8
        from rlhf.sampler import sample

        p = self.cfg.policy
        images = sample(self.engine, self.gen, list(prompts), list(seeds), p.sampler)
        s = self._score(images, list(prompts), grad=False)
        return {
            "scores": {k: v.cpu().numpy() for k, v in s.components.items()},
            "total": s.total.cpu().numpy(),
            "images": to_uint8(images),
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str, step: int, state: dict, export: str | None) -> bool:
        """Collective: the resume bundle under ``folder``, and (if given) the policy export."""
        from rlhf.export import export_policy, save_resume

        save_resume(self.engine, folder, step, state)
        if export:
            export_policy(self.engine, export, self.cfg.policy.finetune.mode)
        return True

    def load(self, folder: str) -> tuple[int, dict]:
        from rlhf.export import load_resume

        return load_resume(self.engine, folder)


class WorkerGroupError(RuntimeError):
    """A worker died or failed; the group must be rebuilt."""


class WorkerGroup:
    """N :class:`GeneratorWorker` actors forming one torch.distributed group."""

    def __init__(self, cfg: RunConfig, clients: dict[str, RewardClient]):
        self.cfg = cfg
        self.clients = clients
        self.workers: list = []
        self.infos: list[dict] = []
        self.text_encoder = None

    def start(self) -> WorkerGroup:
        n = self.cfg.scaling.num_workers
        res = self.cfg.scaling.actor_resources()
        remote = ray.remote(GeneratorWorker)
        cfg = self.cfg.to_dict()
        if self.cfg.policy.generator.text_encoders == "actor":
            self.text_encoder = start_text_encoder(
                self.cfg.policy.generator, self.cfg.text_encoder.resources
            )
        self.workers = [
            remote.options(**actor_options(res, None)).remote(cfg, rank, n) for rank in range(n)
        ]
        addr, port = self._get([self.workers[0].address.remote()])[0]
        infos = self._get(
            [w.setup.remote(addr, port, self.clients, self.text_encoder) for w in self.workers]
        )
        self.infos = infos
        log.info("generator group up: %d workers at %s:%d (%s)", n, addr, port, infos[0]["device"])
        return self

    def _get(self, refs: list):
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise WorkerGroupError(f"generator worker failed: {e}") from e

    def _sharded(self, method: str, items: list[list], *args) -> list:
        n = len(self.workers)
        per = len(items[0]) // n
        refs = [
            getattr(w, method).remote(*args, *[x[r * per : (r + 1) * per] for x in items])
            for r, w in enumerate(self.workers)
        ]
        return self._get(refs)

    def step(self, step: int, prompts: list[str], seeds: list[int]) -> dict:
        """Run one step on every rank; returns the metrics averaged over ranks."""
        outs = self._sharded("step", [prompts, seeds], step)
        keys = set().union(*outs)
        return {k: float(np.mean([o[k] for o in outs if k in o])) for k in keys}

    def evaluate(self, prompts: list[str], seeds: list[int]) -> dict:
        outs = self._sharded("evaluate", [prompts, seeds])
        return {
            "scores": {
                k: np.concatenate([o["scores"][k] for o in outs]) for k in outs[0]["scores"]
            },
            "total": np.concatenate([o["total"] for o in outs]),
            "images": np.concatenate([o["images"] for o in outs]),
        }

    def save(self, folder: str, step: int, state: dict, export: str | None) -> None:
        self._get([w.save.remote(folder, step, state, export) for w in self.workers])

    def load(self, folder: str) -> tuple[int, dict]:
        return self._get([w.load.remote(folder) for w in self.workers])[0]

    def kill(self) -> None:
        for w in [*self.workers, self.text_encoder]:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone (or no text encoder)
                pass
        self.workers = []
        self.text_encoder = None
