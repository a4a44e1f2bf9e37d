"""The transformer's attention backend: PyTorch SDPA or xformers' memory-efficient kernels.

``auto`` takes xformers on CUDA only when its kernels actually run with this PyTorch (a wheel
built for another PyTorch imports, warns, and then has nothing to dispatch to); otherwise
SDPA, which PyTorch routes to its own flash / memory-efficient kernels.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa")


def set_attention_backend(transformer, backend: str) -> str:
    """Set the attention of every joint-attention block; returns the backend in use.

    ``auto``: xformers when its CUDA kernels run here and the transformer is on CUDA, else
    SDPA (logged). ``xformers`` where it cannot run (not installed, not on CUDA, or a build
    whose kernels do not load with this PyTorch) raises ``ValueError`` with the reason.
    """
    from diffusers.models.attention_processor import (
        JointAttnProcessor2_0,
        XFormersJointAttnProcessor,
    )

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"generator.attention={backend!r} must be one of {ATTENTION_BACKENDS}")
    on_cuda = next(transformer.parameters()).device.type == "cuda"
    if backend == "xformers" and not on_cuda:
        raise ValueError(
            "generator.attention=xformers needs a CUDA device (xformers has no CPU "
            "kernels); set generator.attention=sdpa"
        )
    why_not = xformers_unusable() if on_cuda and backend != "sdpa" else None
    if backend == "auto":
        backend = "xformers" if on_cuda and why_not is None else "sdpa"
        if on_cuda and why_not is not None:
            log.info("attention: SDPA (xformers unusable: %s)", why_not)
    if backend == "xformers":
        if why_not is not None:
            raise ValueError(
                f"generator.attention=xformers but xformers cannot run here: {why_not} "
                "(pip install 'rlhf-diffusion[gpu]' with an xformers built for this PyTorch), "
                "or set generator.attention=sdpa"
            )
        processor = XFormersJointAttnProcessor()
    else:
        processor = JointAttnProcessor2_0()
    transformer.set_attn_processor(processor)
    return backend


@functools.lru_cache(maxsize=1)
def xformers_unusable() -> str | None:
    """None when xformers' memory-efficient attention runs on this CUDA device, else why not.

    Importing xformers is not enough: a wheel built for another PyTorch imports, warns, and
    then has no kernel to dispatch to. One tiny attention call on the GPU settles it."""
    try:
        import xformers.ops as xops
    except Exception as e:  # not installed, or broken
        return f"cannot import xformers.ops ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{type(e).__name__}: {first}"
    return None
