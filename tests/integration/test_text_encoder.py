"""Prompt embeddings from the text-encoder actor (``policy.generator.text_encoders: actor``)
on a real local Ray: the same images and DRaFT gradients as with the generator's own text
encoders, with and without classifier-free guidance; each prompt encoded once; and a worker
group that runs its steps without text encoders of its own."""

import pytest
import ray
import torch

from actors.coordinator import Coordinator
from actors.generator_worker import GeneratorWorker
from actors.text_encoder import TextEncoderClient, start_text_encoder
from rewards.registry import build_reward
from rewards.scoring import score_and_grad
from rlhf.config import load_config
from rlhf.draft import DraftConfig, rollout_images, surrogate_loss
from rlhf.generator import FinetuneConfig, GeneratorConfig, load_generator
from rlhf.resources import ActorResources
from rlhf.run_config import RunConfig
from rlhf.sampler import SamplerConfig
from tests.integration.test_finetune import QUICKSTART, SMALL

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["a red cube on a table", "an astronaut riding a horse", "a red cube on a table"]
SEEDS = [11, 12, 13]


def _generator(text_encoders: str):
    gen = load_generator(
        GeneratorConfig(model="tiny", load_t5=False, text_encoders=text_encoders),
        FinetuneConfig(rank=4, alpha=8.0),
        "cpu",
    )
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():  # non-zero B: every adapter weight gets a gradient
        for n, p in gen.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return gen


def _images_and_grads(gen, reward, sampler):
    gen.transformer.zero_grad(set_to_none=True)
    ro = rollout_images(gen.transformer, gen, PROMPTS, SEEDS, sampler, DraftConfig(k=2), 2)
    scores = score_and_grad({"r": (1.0, reward)}, ro.images, ro.prompts)
    surrogate_loss(ro, scores.grad).backward()
    grads = {n: p.grad.clone() for n, p in gen.transformer.named_parameters() if p.requires_grad}
    return ro.images.detach(), grads


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["no-cfg", "cfg"])
def test_actor_embeddings_give_the_same_images_and_gradients(ray_local, guidance):
    sampler = SamplerConfig(
        steps=4,
        height=32,
        width=32,
        max_sequence_length=16,
        guidance_scale=guidance,
        negative_prompt="blurry, low quality",
    )
    torch.manual_seed(0)
    reward = build_reward({"name": "ict_hp", "options": {"backbone": "tiny"}}).eval()
    reward.requires_grad_(False)
    local = _generator("local")
    remote = _generator("actor")
    assert remote.pipe.text_encoder is None and remote.pipe.text_encoder_2 is None
    handle = start_text_encoder(
        GeneratorConfig(model="tiny", load_t5=False), ActorResources(num_cpus=0)
    )
    try:
        remote.prompt_encoder = TextEncoderClient(handle)
        img_a, grad_a = _images_and_grads(local, reward, sampler)
        img_b, grad_b = _images_and_grads(remote, reward, sampler)
        # The second step asks again: every prompt comes from the cache.
        img_c, _ = _images_and_grads(remote, reward, sampler)
        stats = ray.get(handle.stats.remote())
    finally:
        ray.kill(handle, no_restart=True)
    # Not bit for bit: the actor encodes each distinct prompt once, in other batches than the
    # pipeline does, and a batched matmul's last bits depend on the batch (pooled rows differ
    # by <= 1e-6). Measured without CFG: images 1.7e-6, gradients 6e-6 relative; with: 0.
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=5e-6)
    torch.testing.assert_close(img_b, img_c, rtol=0, atol=0)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for n in grad_a:
        torch.testing.assert_close(grad_a[n], grad_b[n], rtol=1e-4, atol=1e-6, msg=n)
    assert sum(g.abs().sum() for g in grad_a.values()) > 0
    unique = len(set(PROMPTS)) + (guidance > 1)  # the negative prompt is one row
    assert stats == {"encoded": unique, "served": 2 * (len(PROMPTS) + (guidance > 1))}


def test_worker_group_steps_with_the_text_encoder_actor(ray_local, tmp_path):
    """A 1-worker group under DeepSpeed: the same step metrics with either switch value."""
    metrics = {}
    for mode in ("local", "actor"):
        cfg = load_config(
            RunConfig,
            QUICKSTART,
            [
                *SMALL,
                f"output_dir={tmp_path / mode}",
                "scaling.num_workers=1",
                "rewards=[{name: hp, weight: 1.0, placement: colocated, options: {backbone: tiny}}]",
                "eval_rewards=[]",
                f"policy.generator.text_encoders={mode}",
                "text_encoder.resources.num_cpus=0",
            ],
        )
        co = Coordinator(cfg)  # the coordinator starts the run's actors, the text encoder too
        co._start_actors()
        worker = ray.remote(GeneratorWorker).options(num_cpus=1).remote(cfg.to_dict(), 0, 1)
        try:
            assert (co.text_encoder is not None) == (mode == "actor")
            ray.get(worker.setup.remote({}, co.text_encoder))
            metrics[mode] = ray.get(worker.step.remote(0, PROMPTS[:2], SEEDS[:2]))
        finally:
            ray.kill(worker)
            co.shutdown()
    a, b = metrics["local"], metrics["actor"]
    for key in ("reward", "loss", "grad_norm"):
        assert key in a, sorted(a)
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
