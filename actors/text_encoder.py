"""TextEncoder: the Ray actor that holds SD3's text encoders for the generator workers.

With ``policy.generator.text_encoders: actor`` the workers load no text encoder; each step
they send their prompts here and get the embeddings back (through the object store: a row of
SD3.5-Large is 2.7 MB in bf16). The actor wraps :class:`rlhf.prompt_encoder.PromptEncoder`,
which encodes a prompt once and serves it from its cache afterwards, so the encoders run
once per distinct prompt of the run. It keeps no state that a restart would lose but the
cache, so Ray restarts it and resends lost calls (``text_encoder.resources``).
"""

from __future__ import annotations

import dataclasses
import logging

import ray
import torch

from actors.options import actor_options
from rlhf.config import bind
from rlhf.generator import GeneratorConfig, PromptEmbeds

log = logging.getLogger(__name__)

CACHE_SIZE = 1024  # rows kept in CPU memory: 2.8 GB at SD3.5-Large


class TextEncoder:
    """One process with the text encoders of ``generator`` (a :class:`GeneratorConfig` as a
    dict), on a GPU when the actor was given one, else on the CPU."""

    def __init__(self, generator: dict, num_cpus: float = 1, cache_size: int = CACHE_SIZE):
        from rlhf.prompt_encoder import PromptEncoder, load_text_encoders

        torch.set_num_threads(max(1, int(num_cpus)))
        on_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        cfg = bind(GeneratorConfig, generator)
        self.encoder = PromptEncoder(
            load_text_encoders(cfg, "cuda" if on_gpu else "cpu"), cache_size
        )

    def encode(
        self,
        prompts: list[str],
        guidance_scale: float,
        negative_prompt: str,
        max_sequence_length: int,
    ) -> PromptEmbeds:
        """See :meth:`PromptEncoder.__call__`; CPU tensors."""
        return self.encoder(prompts, guidance_scale, negative_prompt, max_sequence_length)

    def stats(self) -> dict:
        """``encoded``: prompts run through the encoders; ``served``: rows returned."""
        return {"encoded": self.encoder.encoded, "served": self.encoder.served}


class TextEncoderClient:
    """What a worker attaches as :attr:`rlhf.generator.Generator.prompt_encoder`."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(
        self,
        prompts: list[str],
        guidance_scale: float,
        negative_prompt: str,
        max_sequence_length: int,
    ) -> PromptEmbeds:
        ref = self.handle.encode.remote(
            list(prompts), guidance_scale, negative_prompt, max_sequence_length
        )
        return ray.get(ref)


def start_text_encoder(generator: GeneratorConfig, resources) -> ray.actor.ActorHandle:
    """The text-encoder actor for ``generator`` placed by ``resources``
    (:class:`~rlhf.resources.ActorResources`)."""
    remote = ray.remote(TextEncoder).options(**actor_options(resources, None))
    return remote.remote(dataclasses.asdict(generator), resources.num_cpus)
