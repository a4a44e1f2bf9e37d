"""bench.gpu_step cuts DRaFT-K's step into timed phases: the cut step must be the product's
step (same LoRA gradient as rollout_images + score_and_grad + surrogate_loss)."""

import pytest
import torch

pytestmark = pytest.mark.slow


class _Capture:
    """An optimiser stand-in that keeps the gradients it is asked to apply."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("k", [1, 2])
def test_the_phased_step_gives_the_gradient_of_the_draft_step(k):
    from bench.gpu_step import PHASES, build, timed_step
    from rewards.scoring import score_and_grad
    from rlhf.draft import DraftConfig, rollout_images, surrogate_loss
    from rlhf.sampler import SamplerConfig

    gen, rewards = build("tiny", "cpu", "sdpa", rank=4)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters something to differentiate
        for n, p in gen.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    params = [p for p in gen.transformer.parameters() if p.requires_grad]
    sampler = SamplerConfig(steps=3, height=64, width=64, max_sequence_length=16)
    prompts, seeds = ["a red cube", "two blue balls"], [3, 4]

    opt = _Capture(params)
    times = timed_step(gen, rewards, opt, prompts, seeds, sampler, k)
    assert set(times) == set(PHASES) and all(t >= 0 for t in times.values())

    ro = rollout_images(gen.transformer, gen, prompts, seeds, sampler, DraftConfig(k=k), k)
    scores = score_and_grad(rewards, ro.images.detach(), ro.prompts)
    surrogate_loss(ro, scores.grad).backward()
    ref = [p.grad for p in params]
    assert max(float(g.abs().max()) for g in ref) > 0
    for got, want in zip(opt.grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
