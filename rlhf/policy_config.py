"""The policy side of a DRaFT-K run as one validated config: generator, finetune, sampler,
draft, engine. A top-level run config nests it (or its five sections); ``validate()`` checks
each section and the rules across them, naming the key path (``draft.k=5 must be <=
sampler.steps=4``).

The defaults are the GPU setting of the paper (SD3.5-Large-Turbo, 4 steps, guidance 0,
DRaFT-1, LoRA, ZeRO-2, xformers where available); the tiny SD3 on a CPU is the ``policy`` of
``configs/quickstart.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.draft import DraftConfig
from rlhf.engine import EngineConfig
from rlhf.generator import TINY, FinetuneConfig, GeneratorConfig
from rlhf.sampler import SamplerConfig


@dataclass
class PolicyConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the key path; ``prefix`` is where this config sits in a
        bigger one (``"policy."``)."""
        self.generator.validate(f"{prefix}generator")
        self.finetune.validate(f"{prefix}finetune")
        self.sampler.validate(f"{prefix}sampler")
        self.engine.validate(f"{prefix}engine")
        self.draft.validate(
            self.sampler,
            self.finetune,
            path=f"{prefix}draft",
            sampler_path=f"{prefix}sampler",
            finetune_path=f"{prefix}finetune",
        )
        if self.generator.model == TINY and self.generator.load_t5:
            raise ValueError(
                f"{prefix}generator.load_t5=true: the tiny model has no T5 encoder; set it false"
            )
