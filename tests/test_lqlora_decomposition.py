"""LQ-LoRA decomposition W ≈ Q + L1 L2: best iterate, Fisher weighting, agreement with the unweighted case."""

import pytest
import torch

from hf_fisher.tuners.lqlora.decomposition import decomposition_error, lq_decompose
from hf_fisher.tuners.lqlora.quantizer import NFConfig, nf_dequantize, nf_quantize

NF3 = NFConfig(3, 32, 8, 16)


def _weight(out=96, inp=80, seed=0):
    """A matrix with a strong low-rank part plus noise, like a pretrained weight (outliers in a few directions)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g)
    return 0.02 * torch.randn(out, inp, generator=g) + 0.05 * low


def test_returns_best_iterate_and_error_is_consistent():
    w = _weight()
    dec = lq_decompose(w, 8, NF3, max_iter=8, tol=0.0)
    assert dec.error == min(dec.errors)
    assert dec.errors[dec.best_iteration] == dec.error
    assert dec.error <= dec.errors[0]
    assert dec.error == pytest.approx(decomposition_error(w - dec.reconstruct()), rel=1e-6)
    assert dec.L1.shape == (96, 8) and dec.L2.shape == (8, 80)
    # Alternating helps over the first iterate (QPiSSA) and over plain quantization.
    assert dec.error < decomposition_error(w - nf_dequantize(nf_quantize(w, NF3)))
    # Deterministic given the seed, and the global RNG is left alone.
    state = torch.random.get_rng_state()
    again = lq_decompose(w, 8, NF3, max_iter=8, tol=0.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.errors == dec.errors


def test_tolerance_stops_early_and_iteration_cap():
    w = _weight()
    loose = lq_decompose(w, 8, NF3, max_iter=50, tol=0.5)
    assert len(loose.errors) <= 2
    capped = lq_decompose(w, 8, NF3, max_iter=3, tol=0.0)
    assert len(capped.errors) <= 3


def test_constant_fisher_equals_unweighted():
    w = _weight(seed=1)
    plain = lq_decompose(w, 6, NF3, max_iter=5, tol=0.0)
    weighted = lq_decompose(w, 6, NF3, fisher=torch.full_like(w, 4.0), max_iter=5, tol=0.0)
    # Same iterates up to fp32 rounding (which may flip a code sitting exactly between two levels).
    assert weighted.best_iteration == plain.best_iteration
    assert weighted.errors == pytest.approx([2.0 * e for e in plain.errors], rel=1e-3)  # sqrt(4) x the plain error
    # Element-wise, compare one iteration: over several, a code flipped by rounding (which depends on the thread
    # count's reduction order) feeds the next SVD and the iterates drift apart by more than rounding.
    plain, weighted = (lq_decompose(w, 6, NF3, fisher=f, max_iter=1, tol=0.0) for f in (None, torch.full_like(w, 4.0)))
    differs = ~torch.isclose(weighted.reconstruct(), plain.reconstruct(), atol=1e-4, rtol=1e-4)
    assert differs.float().mean() < 0.01
    torch.testing.assert_close(weighted.L1 @ weighted.L2, plain.L1 @ plain.L2, atol=1e-3, rtol=0)


def test_fisher_weighting_lowers_the_weighted_error():
    w = _weight(seed=2)
    g = torch.Generator().manual_seed(5)
    # A strongly non-uniform, nearly rank-one Fisher: a few rows and columns matter much more.
    rows = torch.rand(w.shape[0], generator=g) ** 4 * 100 + 0.01
    cols = torch.rand(w.shape[1], generator=g) ** 4 * 100 + 0.01
    fisher = rows[:, None] * cols[None, :] * (0.5 + torch.rand(w.shape, generator=g))
    plain = lq_decompose(w, 6, NF3, max_iter=6, tol=0.0)
    weighted = lq_decompose(w, 6, NF3, fisher=fisher, max_iter=6, tol=0.0)
    plain_in_weighted_norm = decomposition_error(w - plain.reconstruct(), fisher)
    assert weighted.error == pytest.approx(decomposition_error(w - weighted.reconstruct(), fisher), rel=1e-6)
    assert weighted.error < plain_in_weighted_norm


def test_bad_input():
    w = _weight()
    with pytest.raises(ValueError, match="another matrix"):
        lq_decompose(w, 4, NF3, fisher=torch.ones(3, 3))
    with pytest.raises(ValueError, match="rank must be"):
        lq_decompose(w, 200, NF3)
    with pytest.raises(ValueError, match="max_iter"):
        lq_decompose(w, 4, NF3, max_iter=0)
