"""The memory switches of the generator: VAE-decoder checkpointing apart from the
transformer's, the text encoders left out of the generator (``text_encoders: actor``) with a
per-prompt cache that gives the pipeline's own embeddings, and their config errors."""

import pytest
import torch

from rlhf.config import ConfigError, load_config
from rlhf.generator import GeneratorConfig, load_generator
from rlhf.prompt_encoder import PromptEncoder, load_text_encoders
from rlhf.run_config import RunConfig
from tests.unit.test_run_config import QUICKSTART

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red cube", "two blue balls on grass", "a red cube"]


def _decode_grad(gen, latents):
    z = latents.clone().requires_grad_(True)
    images = gen.decode(z)
    w = torch.linspace(-1, 1, images.numel()).reshape(images.shape)
    (images * w).sum().backward()
    return images.detach(), z.grad


def test_vae_checkpointing_is_its_own_switch_and_keeps_gradients():
    on = GeneratorConfig(model="tiny", load_t5=False, gradient_checkpointing=False)
    on.vae_gradient_checkpointing = True
    gen = load_generator(on, None, "cpu")
    assert gen.vae.is_gradient_checkpointing and not gen.transformer.is_gradient_checkpointing
    assert gen.vae.decoder.gradient_checkpointing
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    img_a, grad_a = _decode_grad(gen, latents)
    off = load_generator(GeneratorConfig(model="tiny", load_t5=False), None, "cpu")
    assert off.vae.is_gradient_checkpointing  # null follows gradient_checkpointing
    from rlhf.generator import set_gradient_checkpointing

    set_gradient_checkpointing(off.pipe, True, vae=False)
    assert off.transformer.is_gradient_checkpointing and not off.vae.is_gradient_checkpointing
    img_b, grad_b = _decode_grad(off, latents)
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-6, atol=1e-9)
    assert grad_a.abs().sum() > 0


@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_prompt_encoder_gives_the_pipelines_embeddings_once_per_prompt(guidance):
    cfg = GeneratorConfig(model="tiny", load_t5=False)
    gen = load_generator(cfg, None, "cpu")
    pipe = load_text_encoders(cfg, "cpu")
    assert pipe.vae is None and pipe.transformer.device.type == "meta"
    enc = PromptEncoder(pipe, cache_size=8)
    a = gen.encode_prompts(PROMPTS, guidance, "blurry", 16)
    b = enc(PROMPTS, guidance, "blurry", 16)
    for name in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
        x, y = getattr(a, name), getattr(b, name)
        if guidance <= 1 and name.startswith("neg"):
            assert x is None and y is None
            continue
        assert x.shape == y.shape, name
        # Other batches than the pipeline's: a batched matmul's last bits differ.
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    unique = 2 + (guidance > 1)
    assert enc.encoded == unique
    enc(PROMPTS[:2], guidance, "blurry", 16)
    assert enc.encoded == unique  # all from the cache
    enc(PROMPTS[:2], guidance, "blurry", 8)  # another max_sequence_length: another key
    assert enc.encoded == 2 * unique


def test_prompt_encoder_cache_evicts_the_least_recently_used():
    enc = PromptEncoder(load_text_encoders(GeneratorConfig(model="tiny", load_t5=False)), 2)
    enc(["a", "b"], max_sequence_length=8)
    enc(["a"], max_sequence_length=8)  # b is now the oldest
    enc(["c"], max_sequence_length=8)
    assert [p for p, _ in enc.cache] == ["a", "c"]
    enc(["b"], max_sequence_length=8)
    assert enc.encoded == 4
    with pytest.raises(ValueError, match="cache_size=0"):
        PromptEncoder(enc.pipe, 0)


def test_generator_without_text_encoders_says_what_is_missing():
    gen = load_generator(
        GeneratorConfig(model="tiny", load_t5=False, text_encoders="actor"), None, "cpu"
    )
    assert gen.pipe.text_encoder is None and gen.pipe.tokenizer is None
    with pytest.raises(ValueError, match="generator.text_encoders=actor"):
        gen.encode_prompts(PROMPTS)


@pytest.mark.parametrize(
    "override, key",
    [
        ("policy.generator.text_encoders=remote", "policy.generator.text_encoders"),
        ("policy.generator.vae_gradient_checkpointing=maybe", "vae_gradient_checkpointing"),
        ("text_encoder.resources.num_gpus=-1", "text_encoder.resources.num_gpus"),
    ],
)
def test_bad_memory_switches_name_the_key(override, key):
    with pytest.raises((ValueError, ConfigError), match=key.replace(".", r"\.")):
        load_config(RunConfig, QUICKSTART, [override])
