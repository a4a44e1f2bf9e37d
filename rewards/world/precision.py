"""The arithmetic of the world's training stages (``rlhf world build --precision``).

``fp32`` is the shipped world's. ``bf16`` runs each stage's forward passes under CPU autocast
to bfloat16, while parameters, optimiser state and losses stay fp32 (mixed precision as on a
GPU). On a CPU with AMX tiles (Intel Sapphire Rapids and later) a bf16 matrix product is
several times faster than an fp32 one; elsewhere bf16 can be slower (BENCHMARKS.md section 0).
Attention runs PyTorch's plain (math) SDPA under bf16: the fused CPU kernel's bf16 backward
is slower than its fp32 one.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def training_autocast(precision: str):
    """The context of a stage's forward pass: nothing for ``fp32``; for ``bf16``, CPU autocast
    to bfloat16 and the math SDPA backend. Outputs may come out bf16: cast them to float
    before the loss."""
    if check_precision(precision) == "fp32":
        yield
        return
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cpu", dtype=torch.bfloat16):
        yield
