"""The resume bundle keeps the trainable state only; loading it back is strict about that."""

import pytest
import torch

from rlhf.export import load_trainable


def _model(extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    m[0].requires_grad_(False)  # the frozen base
    if extra:
        m.append(torch.nn.Linear(2, 2))
    return m


def _trainable_state(m: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_a_trainable_only_state_loads_and_leaves_the_frozen_base_alone():
    src = _model()
    with torch.no_grad():
        src[1].weight.add_(1.0)
    dst = _model()
    base = dst[0].weight.clone()
    load_trainable(_trainable_state(src), dst)
    assert torch.equal(dst[1].weight, src[1].weight)
    assert torch.equal(dst[0].weight, base)


def test_a_full_state_from_an_older_bundle_still_loads():
    src, dst = _model(), _model()
    with torch.no_grad():
        src[0].weight.add_(1.0)
    load_trainable(src.state_dict(), dst)
    assert torch.equal(dst[0].weight, src[0].weight)


def test_a_missing_trainable_key_or_an_unexpected_key_fails_naming_them():
    dst = _model()
    state = _trainable_state(dst)
    del state["1.bias"]
    with pytest.raises(ValueError, match=r"missing \['1.bias'\]"):
        load_trainable(state, dst)
    other = _trainable_state(_model(extra=True))
    with pytest.raises(ValueError, match=r"unexpected \['2.bias', '2.weight'\]"):
        load_trainable(other, dst)


def test_sd3s_fixed_positional_table_is_left_out_and_not_required():
    """SD3's PatchEmbed keeps its sin-cos table as a persistent buffer (pos_embed_max_size),
    432 MiB for SD3.5-Medium: bundles leave it out, and loading does not ask for it."""
    from rlhf.export import without_fixed_buffers
    from rlhf.tiny_sd3 import build_tiny_pipeline

    src = build_tiny_pipeline(seed=0).transformer
    src.requires_grad_(False)
    src.proj_out.requires_grad_(True)  # stands for the adapters
    assert "pos_embed.pos_embed" in src.state_dict()
    with without_fixed_buffers(src):
        state = {k: v for k, v in src.state_dict().items() if k.startswith("proj_out.")}
        assert "pos_embed.pos_embed" not in src.state_dict()
    assert "pos_embed.pos_embed" in src.state_dict()  # only within the block
    with torch.no_grad():
        state["proj_out.weight"] += 1.0
    dst = build_tiny_pipeline(seed=0).transformer
    dst.requires_grad_(False)
    dst.proj_out.requires_grad_(True)
    table = dst.pos_embed.pos_embed.clone()
    load_trainable(state, dst)
    assert torch.equal(dst.proj_out.weight, state["proj_out.weight"])
    assert torch.equal(dst.pos_embed.pos_embed, table)
    del state["proj_out.bias"]
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\]"):
        load_trainable(state, dst)
