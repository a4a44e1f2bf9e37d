"""One DRaFT-1 step at 1024x1024 on an SD3.5-Large-shaped transformer (GPU only).

Random weights in bf16 (nothing is downloaded): the SD3.5-Large transformer shape (38 joint
blocks, 38 heads x 64, joint_attention_dim 4096, ~8B parameters), an SD3-shaped VAE, and two
1-layer CLIP text encoders with SD3's widths (768 and 1280) so the conditioning has the real
shapes (T5 off: its tokens are zeros, as diffusers does). LoRA rank 16 on the joint
attention, gradient checkpointing on, a tiny ICT-HP reward. Runs the step with SDPA and, when
installed, xformers; the two backends must give close gradients. Prints step time, peak
memory and the transformer's achieved TFLOP/s (6 x params x tokens per gradient step, a
lower bound that ignores attention and the no-grad steps' 2 x params x tokens).

    pytest -m gpu tests/gpu -s
"""

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def big():
    from bench.sd35_shapes import build_pipeline
    from rlhf.generator import FinetuneConfig, Generator, apply_finetune, set_gradient_checkpointing

    pipe = build_pipeline("large", "cuda")
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    finetune = FinetuneConfig(rank=16, alpha=16.0)
    apply_finetune(pipe.transformer, finetune)
    pipe.transformer.train()
    set_gradient_checkpointing(pipe, True)
    pipe.set_progress_bar_config(disable=True)
    return Generator(pipe, "sdpa", finetune)


def _backends():
    from rlhf.generator import xformers_unusable

    return ["sdpa", "xformers"] if xformers_unusable() is None else ["sdpa"]


def test_draft1_step_1024_sd35_large_shape(big):
    from rewards.registry import build_reward
    from rewards.scoring import score_and_grad
    from rlhf.draft import DraftConfig, rollout_images, surrogate_loss
    from rlhf.generator import set_attention_backend
    from rlhf.sampler import SamplerConfig

    gen = big
    torch.manual_seed(0)
    reward = build_reward({"name": "ict_hp", "options": {"backbone": "tiny"}}).cuda().eval()
    reward.requires_grad_(False)
    sampler = SamplerConfig(steps=4, guidance_scale=0.0, height=1024, width=1024)
    draft = DraftConfig(k=1)
    prompts, seeds = ["a photo of an astronaut riding a horse on the moon"], [0]
    params = [p for p in gen.transformer.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in gen.transformer.parameters())
    assert n_params > 7e9 and all(p.dtype == torch.float32 for p in params)
    tokens = (1024 // 16) ** 2 + 77 + sampler.max_sequence_length
    grads, report = {}, {}
    for backend in _backends():
        assert set_attention_backend(gen.transformer, backend) == backend
        for _ in range(2):  # the first is the warm-up
            for p in params:
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            ro = rollout_images(gen.transformer, gen, prompts, seeds, sampler, draft, 1)
            scores = score_and_grad({"r": (1.0, reward)}, ro.images, ro.prompts)
            surrogate_loss(ro, scores.grad).backward()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        grads[backend] = torch.cat([p.grad.float().flatten() for p in params])
        report[backend] = {
            "step_s": dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tflops_lower_bound": 6 * n_params * tokens / dt / 1e12,
        }
        assert torch.isfinite(grads[backend]).all() and grads[backend].abs().max() > 0
    print("\nDRaFT-1 step, 1024x1024, SD3.5-Large shape, bf16 + LoRA r16:", report)
    if "xformers" in grads:
        cos = torch.nn.functional.cosine_similarity(grads["sdpa"], grads["xformers"], dim=0)
        assert cos > 0.99, f"SDPA and xformers gradients differ: cosine {float(cos):.4f}"
