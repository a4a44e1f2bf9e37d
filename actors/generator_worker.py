"""GeneratorWorker: one rank of the DRaFT-K policy, run as a Ray Train worker.

``rlhf finetune`` runs the generator workers as the workers of a Ray Train ``TorchTrainer``
(:func:`train_func`): Ray Train starts them, forms their torch.distributed group (gloo on
CPU, NCCL on GPU), restarts the group when a worker dies (``FailureConfig``) and stores the
checkpoints they report (``CheckpointConfig``). Each worker holds the SD3 generator (frozen
VAE and text encoders) and a DeepSpeed engine around the trainable transformer, and follows
the plans of the :class:`~actors.coordinator.Coordinator` actor: rank 0 asks it what to do
next (a step on given prompts and seeds, an evaluation, a checkpoint, stop), every rank does
its share, rank 0 hands back the gathered results.

Rewards with ``placement: colocated`` run inside each worker; ``placement: server`` ones go
through a :class:`~actors.reward_client.RewardClient`. Either way the worker gets the scores
and the image gradient ``d(Σ w·r)/d(images)`` and finishes the backward pass itself, so the
parameter gradients are the same (a test asserts it).

A step whose reward or image gradient is not finite on any rank is skipped on every rank
(they agree through an all-reduce before the backward, which is collective under ZeRO).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from actors.reward_client import RewardClient
from actors.text_encoder import TextEncoderClient
from rewards.training import any_rank
from rlhf.config import bind
from rlhf.run_config import RunConfig

log = logging.getLogger(__name__)


class SkippedStep(Exception):
    """The step's rewards or image gradients are not finite on some rank."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _finite_everywhere(device: torch.device, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is finite on every rank (one vote on ``device``)."""
    return not any_rank(not all(bool(torch.isfinite(t).all()) for t in tensors), device)


class GeneratorWorker:
    """One rank; ``cfg`` is a :class:`RunConfig` as a dict. Built by :func:`train_func`
    inside Ray Train's process group, or alone (one rank, e.g. in tests and benchmarks)."""

    def __init__(self, cfg: dict, rank: int, world: int):
        self.cfg: RunConfig = bind(RunConfig, cfg)
        self.rank, self.world = rank, world
        self.engine = None
        self.eval_only: set[str] = set()
        # Only for remote handles without start_call (RewardClient has it): threads are made on
        # first use, and a thread that touches tensors slows every OpenMP region here (see
        # RewardClient.start_call).
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="reward-call")

    # ------------------------------------------------------------------ set-up

    def setup(self, clients: dict[str, RewardClient], text_encoder=None) -> dict:
        """Load the generator, build the engine and the rewards. The process group is Ray
        Train's; a lone rank (``world == 1``, no group yet) makes its own in memory.
        ``text_encoder``: the text-encoder actor serving prompt embeddings, when
        ``policy.generator.text_encoders: actor``."""
        import torch.distributed as dist

        from rewards.handles import build_handles
        from rlhf.engine import build_engine
        from rlhf.generator import load_generator

        cfg = self.cfg
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        on_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        if not dist.is_initialized():
            if self.world != 1:
                raise RuntimeError(f"rank {self.rank} of {self.world}: no process group")
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks; Ray Train sets it
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
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(),
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
            if not _finite_everywhere(self.gen.device, scores.total, scores.grad, images):
                raise SkippedStep
            return scores

        p = self.cfg.policy
        on_gpu = self.gen.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
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
        if on_gpu:  # this step's peak of this process's CUDA allocations
            m["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
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


# --------------------------------------------------------------------------- Ray Train


class _Group:
    """The worker group as one rank sees it: rank 0 talks to the coordinator, every rank
    gets its answer; results travel to rank 0 over the process group."""

    def __init__(self, rank: int, world: int, coordinator):
        self.rank, self.world, self.coordinator = rank, world, coordinator

    def ask(self, method: str, *args) -> dict:
        """Rank 0 calls the coordinator's ``method`` with ``args``; every rank gets its plan."""
        box = (
            [ray.get(getattr(self.coordinator, method).remote(*args))] if self.rank == 0 else [None]
        )
        if self.world > 1:
            _dist().broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        _dist().gather_object(obj, out, dst=0)
        return out


def _share(rank: int, world: int, *items: list) -> list[list]:
    per = len(items[0]) // world
    return [list(x[rank * per : (rank + 1) * per]) for x in items]


def _save_checkpoint(worker: GeneratorWorker, plan: dict, rank: int) -> None:
    """Collective: every rank writes its part of the checkpoint into the plan's staging
    folder (shared storage, as for any multi-rank DeepSpeed save), rank 0 adds the policy
    config and reports the folder to Ray Train, which copies it to the plan's ``folder``
    (``<run_dir>/checkpoints/<name>``) and rotates old checkpoints out; then rank 0 writes
    the manifest there, last: a checkpoint with a manifest has arrived whole."""
    import ray.train

    from rlhf.checkpointing import write_manifest

    staging = Path(plan["staging"])
    worker.save(str(staging / "resume"), plan["step"], plan["state"], str(staging / "export"))
    if rank == 0:
        (staging / "export" / "policy_config.json").write_text(json.dumps(plan["policy"], indent=1))
    checkpoint = ray.train.Checkpoint.from_directory(str(staging)) if rank == 0 else None
    ray.train.report(
        {"step": plan["step"]}, checkpoint=checkpoint, checkpoint_dir_name=plan["name"]
    )
    if rank == 0:  # the upload is synchronous: every file is in place now
        write_manifest(Path(plan["folder"]), plan["step"])
        shutil.rmtree(staging, ignore_errors=True)


def train_func(config: dict) -> None:
    """One generator worker of the run's ``TorchTrainer``: set up, restore the checkpoint the
    coordinator names, then follow its plans until it says stop.

    ``config``: ``cfg`` (the :class:`RunConfig` as a dict), ``coordinator`` (the
    :class:`~actors.coordinator.Coordinator` actor's handle), ``clients`` (reward servers by
    key), ``text_encoder`` (the text-encoder actor or None).
    """
    import ray.train

    from rlhf import console

    console.setup()  # -v (RLHF_VERBOSE) decides what this worker's libraries may print
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    group = _Group(rank, world, config["coordinator"])
    worker = GeneratorWorker(config["cfg"], rank, world)
    info = worker.setup(config["clients"], config["text_encoder"])
    plan = group.ask("group_started", group.gather(info))
    step, state, restored = 0, {}, None
    for folder in plan["restore"]:
        try:
            step, state = worker.load(str(Path(folder) / "resume"))
        except Exception as e:
            # The next group (Ray Train restarts this one) skips it.
            ray.get(group.coordinator.checkpoint_unusable.remote(folder, f"{e}"))
            raise
        restored = folder
        break
    plan = group.ask("restored", restored, step, state)
    while plan["do"] != "stop":
        if plan["do"] == "step":
            mine = _share(rank, world, plan["prompts"], plan["seeds"])
            out = worker.step(plan["step"], *mine)
        elif plan["do"] == "evaluate":
            out = worker.evaluate(*_share(rank, world, plan["prompts"], plan["seeds"]))
        elif plan["do"] == "checkpoint":
            out = _save_checkpoint(worker, plan, rank)
        else:
            raise ValueError(f"unknown plan {plan['do']!r}")
        plan = group.ask("advance", group.gather(out))
