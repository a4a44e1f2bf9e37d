"""The SD3 generator and the flow-matching Euler sampler against diffusers, on the tiny SD3."""

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlhf.config import load_config
from rlhf.generator import (
    FinetuneConfig,
    GeneratorConfig,
    build_tiny_pipeline,
    load_generator,
    set_attention_backend,
)
from rlhf.policy_config import PolicyConfig
from rlhf.run_config import RunConfig
from rlhf.sampler import SamplerConfig, sample, schedule, seeded_generators
from rlhf.tokenizers import build_clip_tokenizer

PROMPTS = ["a red cube on a table", "an astronaut riding a horse"]
SEEDS = [3, 4]


pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def tiny_policy() -> PolicyConfig:
    """The quickstart's policy: the tiny SD3 on a CPU (64 px, 4 steps, K=2)."""
    return load_config(RunConfig, QUICKSTART).policy


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_policy()
    return load_generator(cfg.generator, None, "cpu"), cfg.sampler


def _pipeline_images(gen, sampler, prompts, seeds, **kw):
    return gen.pipe(
        prompt=prompts,
        num_inference_steps=sampler.steps,
        height=sampler.height,
        width=sampler.width,
        generator=seeded_generators(seeds),
        max_sequence_length=sampler.max_sequence_length,
        output_type="pt",
        **kw,
    ).images


@pytest.mark.parametrize("guidance", [0.0, 3.5])
def test_no_grad_sampling_reproduces_pipeline(tiny, guidance):
    gen, sampler = tiny
    sampler = SamplerConfig(**{**sampler.__dict__, "guidance_scale": guidance})
    sampler.negative_prompt = "blurry"
    ours = sample(gen.transformer, gen, PROMPTS, SEEDS, sampler)
    ref = _pipeline_images(
        gen, sampler, PROMPTS, SEEDS, guidance_scale=guidance, negative_prompt=["blurry"] * 2
    )
    assert ours.shape == (2, 3, 64, 64) and ours.dtype == torch.float32
    assert 0 <= float(ours.min()) and float(ours.max()) <= 1
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # Not trivially constant: the two prompts/seeds give different images.
    assert (ours[0] - ours[1]).abs().max() > 1e-2


def test_sample_noise_depends_on_each_seed_only(tiny):
    gen, sampler = tiny
    both = sample(gen.transformer, gen, PROMPTS, SEEDS, sampler)
    second = sample(gen.transformer, gen, PROMPTS[1:], SEEDS[1:], sampler)
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"shift": 3.0},
        {"shift": 1.0},
        {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    ],
)
def test_schedule_is_the_schedulers(config):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    timesteps, sigmas = schedule(sched.config, 4, (16, 16), 2)
    kwargs = {}
    if config.get("use_dynamic_shifting"):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        kwargs["mu"] = calculate_shift(64, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(4, **kwargs)
    assert torch.equal(timesteps, sched.timesteps) and torch.equal(sigmas, sched.sigmas)
    assert len(sigmas) == 5 and float(sigmas[-1]) == 0.0


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    tok = build_clip_tokenizer({"model_max_length": 77})
    texts = ["a photo of a cat", "Hello, World!! 123 naïve café's don't", ""]
    ours = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = open_clip.tokenize(texts)
    ref[ref == 0] = tok.pad_token_id  # open_clip pads with 0, SD3's CLIP-L tokenizer with EOS
    assert torch.equal(ours.input_ids, ref)
    assert len(tok) == 49408


def test_attention_backends_on_cpu():
    pipe = build_tiny_pipeline(0)
    assert set_attention_backend(pipe.transformer, "auto") == "sdpa"
    assert set_attention_backend(pipe.transformer, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="generator.attention=xformers"):
        set_attention_backend(pipe.transformer, "xformers")
    with pytest.raises(ValueError, match="generator.attention='flash'"):
        set_attention_backend(pipe.transformer, "flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_xformers_is_reported_unusable_without_a_gpu_with_the_reason():
    from rlhf.attention import xformers_unusable

    why = xformers_unusable()
    assert why in ("no CUDA device",) or why.startswith("cannot import xformers.ops")


def test_lora_targets_the_joint_attention_projections():
    gen = load_generator(
        GeneratorConfig(model="tiny", load_t5=False), FinetuneConfig(rank=2, alpha=4), "cpu"
    )
    names = [n for n, p in gen.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    targets = {n.split(".lora_")[0].split("attn.")[-1] for n in names}
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"} <= targets
    assert "to_add_out" in targets  # every block but the last (context_pre_only) has it
    assert all(
        p.dtype == torch.float32 for n, p in gen.transformer.named_parameters() if "lora_" in n
    )
    assert not any(p.requires_grad for p in gen.vae.parameters())
    assert not any(p.requires_grad for p in gen.pipe.text_encoder.parameters())
    assert gen.transformer.is_gradient_checkpointing and gen.vae.is_gradient_checkpointing


def test_load_from_local_folder_matches_tiny(tiny, tmp_path):
    gen, sampler = tiny
    gen.pipe.save_pretrained(tmp_path / "sd3")
    local = load_generator(
        GeneratorConfig(model=str(tmp_path / "sd3"), load_t5=False, dtype="float32"), None, "cpu"
    )
    a = sample(gen.transformer, gen, PROMPTS, SEEDS, sampler)
    b = sample(local.transformer, local, PROMPTS, SEEDS, sampler)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="generator.model"):
        load_generator(GeneratorConfig(model=str(tmp_path / "nope" / "x" / "y")), None, "cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"draft": {"k": 5}}, "draft.k=5 must be <= sampler.steps=4"),
        ({"sampler": {"height": 100}}, "sampler.height=100"),
        ({"generator": {"attention": "flash"}}, "generator.attention='flash'"),
        ({"finetune": {"mode": "half"}}, "finetune.mode='half'"),
        ({"engine": {"zero_stage": 4}}, "engine.zero_stage=4"),
        ({"engine": {"zero3_prefetch_bucket_size": -1}}, "engine.zero3_prefetch_bucket_size=-1"),
        ({"draft": {"lv_n": 2, "k": 2}}, "draft.lv_n=2"),
        ({"draft": {"anchor_weight": 0.1}, "finetune": {"mode": "full"}}, "finetune.mode=lora"),
        ({"draft": {"k_mode": "uniform", "k_min": 3, "k": 2}}, "draft.k_min=3"),
    ],
)
def test_policy_config_errors_name_the_key(change, message):
    cfg = tiny_policy()
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        cfg.validate()


def test_zero3_keeps_deepspeed_defaults_unless_set():
    from rlhf.engine import EngineConfig, deepspeed_config

    zero = deepspeed_config(EngineConfig(), 2, "full")["zero_optimization"]
    assert zero["stage"] == 3 and not any(k.startswith("stage3_") for k in zero)
    cfg = EngineConfig(zero3_persistence_threshold=0, zero3_prefetch_bucket_size=0)
    zero = deepspeed_config(cfg, 2, "full")["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == zero["stage3_prefetch_bucket_size"] == 0


def test_presets_validate():
    tiny_policy().validate()
    paper = PolicyConfig()  # the defaults are the paper's GPU setting
    paper.validate()
    assert paper.generator.model == "stabilityai/stable-diffusion-3.5-large-turbo"
    assert (paper.sampler.steps, paper.sampler.guidance_scale, paper.draft.k) == (4, 0.0, 1)


def test_lora_init_depends_on_the_seed_only():
    """Every rank must start from the same adapters, whatever its global RNG went through."""
    cfg = GeneratorConfig(model="tiny", load_t5=False, seed=0)

    def lora_a(global_seed):
        torch.manual_seed(global_seed)
        gen = load_generator(cfg, FinetuneConfig(rank=2, alpha=2), "cpu")
        return {
            n: p.detach().clone() for n, p in gen.transformer.named_parameters() if "lora_A" in n
        }

    a, b = lora_a(1), lora_a(2)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    load_generator(cfg, FinetuneConfig(rank=2, alpha=2), "cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
