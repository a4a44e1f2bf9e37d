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
