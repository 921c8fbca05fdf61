"""The weighted low-rank primitive against an independent solver and the closed forms it must reduce to."""

import pytest
import torch

from hf_fisher.lowrank import fisher_weights, weighted_low_rank


def _weighted_error(w, approx, d_r, d_c):
    weights = torch.outer(d_r if d_r is not None else torch.ones(w.shape[0], dtype=w.dtype),
                          d_c if d_c is not None else torch.ones(w.shape[1], dtype=w.dtype))
    return float((weights * (w - approx)).norm())


def _als(w, rank, weights, iters=500, restarts=5, seed=0):
    """Alternating weighted least squares for min Σ w_ij² (W − BA)_ij²: an independent iterative solver."""
    g = torch.Generator().manual_seed(seed)
    best = None
    sq = weights.square()
    for _ in range(restarts):
        a = torch.randn(rank, w.shape[1], generator=g, dtype=w.dtype)
        b = torch.zeros(w.shape[0], rank, dtype=w.dtype)
        for _ in range(iters):
            for i in range(w.shape[0]):  # rows of B: weighted least squares against A
                m = a * sq[i][None, :]
                b[i] = torch.linalg.solve(m @ a.T + 1e-12 * torch.eye(rank, dtype=w.dtype), m @ w[i])
            for j in range(w.shape[1]):  # columns of A against B
                m = b * sq[:, j][:, None]
                a[:, j] = torch.linalg.solve(b.T @ m + 1e-12 * torch.eye(rank, dtype=w.dtype), m.T @ w[:, j])
        err = float((weights * (w - b @ a)).norm())
        best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("side", ["row", "column", "both"])
def test_weighted_svd_is_the_optimum(side):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    fisher = torch.rand(7, 5, generator=g, dtype=torch.float64) ** 3 * 10
    d_r, d_c = fisher_weights(fisher, side=side)
    factors = weighted_low_rank(w, 2, row_weights=d_r, col_weights=d_c)
    ours = _weighted_error(w, factors.product(), d_r, d_c)
    weights = torch.outer(d_r if d_r is not None else torch.ones(7, dtype=w.dtype),
                          d_c if d_c is not None else torch.ones(5, dtype=w.dtype))
    reference = _als(w, 2, weights, iters=200)
    assert ours <= reference * (1 + 1e-6)
    assert reference <= ours * (1 + 1e-3)  # ALS reaches the same optimum
    # The unweighted SVD is worse under the weighted error (the weighting matters).
    plain = weighted_low_rank(w, 2).product()
    assert _weighted_error(w, plain, d_r, d_c) > ours * (1 + 1e-3)


def test_constant_fisher_gives_plain_svd():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(9, 6, generator=g)
    d_r, _ = fisher_weights(torch.full((9, 6), 0.37))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncated = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(weighted_low_rank(w, 3, row_weights=d_r).product(), truncated, atol=1e-5, rtol=1e-5)


def test_principal_and_minor_components_split_the_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    d_r = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    top = weighted_low_rank(w, 3, row_weights=d_r, components="principal")
    bottom = weighted_low_rank(w, 1, row_weights=d_r, components="minor")
    torch.testing.assert_close(top.product() + bottom.product(), w)
    assert bottom.singular_values[0] <= top.singular_values.min()


def test_fisher_weight_formulas_and_epsilon():
    f = torch.tensor([[1.0, 3.0], [0.0, 0.0], [4.0, 0.0]])
    d_r, d_c = fisher_weights(f, side="row", eps=1e-6)
    assert d_c is None
    mean_row = f.sum(1).mean()
    torch.testing.assert_close(d_r, torch.sqrt(f.sum(1) + 1e-6 * mean_row))
    assert d_r[1] > 0  # a zero row stays finite and invertible
    d_r, d_c = fisher_weights(f, side="both", eps=0.0)
    torch.testing.assert_close(d_r, f.mean(1).sqrt())
    torch.testing.assert_close(d_c, f.mean(0).sqrt())


def test_bad_input_is_rejected():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rank must be between 1 and min"):
        weighted_low_rank(w, 4)
    with pytest.raises(ValueError, match="NaN/Inf"):
        fisher_weights(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="negative"):
        fisher_weights(torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match="row_weights must be 4 finite positive"):
        weighted_low_rank(w, 2, row_weights=torch.zeros(4))


def test_randomized_svd_matches_full_on_principal_components():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 8, generator=g) @ torch.randn(8, 30, generator=g)  # exactly rank 8
    full = weighted_low_rank(w, 8).product()
    fast = weighted_low_rank(w, 8, niter=4).product()
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)
