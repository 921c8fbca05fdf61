"""Selective Synaptic Dampening against a hand example and the engine's Fisher."""

from __future__ import annotations

import pytest
import torch

from hf_fisher.curvature import DiagonalFisher, estimate_diagonal_fisher
from hf_fisher.curvature.store import CurvatureMetadata
from hf_fisher.trainers.unlearning import selective_synaptic_dampening
from tests.helpers import make_batches, tiny_llama

NAME = "model.layers.0.mlp.down_proj.weight"


def _fisher(values: dict[str, torch.Tensor]) -> DiagonalFisher:
    meta = CurvatureMetadata(curvature_type="diagonal_fisher", kind="empirical", n_sequences=1, n_tokens=1,
                             normalization="test")
    return DiagonalFisher(values, meta)


def test_hand_example():
    model = tiny_llama()
    weight = dict(model.named_parameters())[NAME]
    before = weight.detach().clone()
    forget = torch.full(weight.shape, 1.0)
    reference = torch.full(weight.shape, 1.0)
    forget[0, 0], reference[0, 0] = 50.0, 2.0  # 50 > 10·2: dampened by min(1·2/50, 1) = 0.04
    forget[0, 1], reference[0, 1] = 19.0, 2.0  # 19 < 20: kept
    forget[0, 2], reference[0, 2] = 30.0, 2.5  # 30 > 25: factor 2.5/30
    report = selective_synaptic_dampening(model, _fisher({NAME: forget}), _fisher({NAME: reference}))
    expected = before.clone()
    expected[0, 0] *= 0.04
    expected[0, 2] *= 2.5 / 30
    torch.testing.assert_close(weight.detach(), expected)
    assert report["dampened"] == 2 and report["per_parameter"][NAME] == 2
    # lam large enough: the factor is capped at 1, nothing changes even though parameters are selected
    again = tiny_llama()
    selective_synaptic_dampening(again, _fisher({NAME: forget}), _fisher({NAME: reference}), lam=100.0)
    torch.testing.assert_close(dict(again.named_parameters())[NAME].detach(), before)


def test_with_engine_fishers_and_errors():
    model = tiny_llama()
    forget_batches = make_batches(4, 2, 10, 96, seed=1)
    reference_batches = make_batches(8, 2, 10, 96, seed=2)
    forget = estimate_diagonal_fisher(model, forget_batches, kind="empirical", reduction="batch")
    reference = estimate_diagonal_fisher(model, reference_batches, kind="empirical", reduction="batch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="different parameters"):
        selective_synaptic_dampening(model, forget, _fisher({NAME: reference[NAME]}))
    with pytest.raises(ValueError, match="alpha and lam"):
        selective_synaptic_dampening(model, forget, reference, alpha=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # refused: untouched
    report = selective_synaptic_dampening(model, forget, reference, alpha=1.0)
    assert 0 < report["dampened"] < report["total"]
    for name, param in model.named_parameters():
        if name in forget:
            ratio = forget[name] / reference[name].clamp_min(1e-30)
            unchanged = ratio <= 1.0
            assert torch.equal(param.detach()[unchanged], state[name][unchanged])
            shrunk = param.detach().abs() <= state[name].abs() + 1e-12
            assert bool(shrunk.all())
