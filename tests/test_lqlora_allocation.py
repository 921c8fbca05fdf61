"""Bit-allocation integer program: brute-force agreement, budget respected, infeasible budgets."""

import itertools

import numpy as np
import pytest

from hf_fisher import solve_bit_allocation


def _brute_force(errors, bits, sizes, budget):
    best = None
    for choice in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        rows = np.arange(errors.shape[0])
        if bits[rows, choice].sum() <= budget * sizes.sum() + 1e-9:
            total = errors[rows, choice].sum()
            if best is None or total < best[0]:
                best = (total, list(choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_tiny_instances(seed):
    rng = np.random.default_rng(seed)
    n_mat, n_cfg = 4, 4
    sizes = rng.integers(10, 1000, n_mat).astype(float)
    bpp = np.sort(rng.uniform(2, 8, n_cfg))
    bits = sizes[:, None] * bpp[None, :] + rng.integers(0, 64, (n_mat, n_cfg))  # per-matrix overheads
    # Errors fall with more bits, at a matrix-specific rate.
    errors = rng.uniform(0.5, 5, n_mat)[:, None] * np.exp(-rng.uniform(0.5, 1.5) * bpp)[None, :] * sizes[:, None]
    budget = float(rng.uniform(bpp[0] + 0.2, bpp[-1]))
    try:
        result = solve_bit_allocation(errors, bits, sizes, budget, mip_rel_gap=0.0)
        default_gap = solve_bit_allocation(errors, bits, sizes, budget)
    except ValueError:
        assert _brute_force(errors, bits, sizes, budget) is None
        return
    expected_total, expected_choice = _brute_force(errors, bits, sizes, budget)
    assert result.total_error == pytest.approx(expected_total, rel=1e-9)
    assert result.choice == expected_choice
    rows = np.arange(n_mat)
    assert bits[rows, result.choice].sum() <= budget * sizes.sum() + 1e-6
    assert result.bits_per_parameter <= budget + 1e-9
    # The default relative gap (1e-4) is a proven bound on the distance to the optimum.
    assert expected_total <= default_gap.total_error <= expected_total * (1 + 1e-4) + 1e-12
    assert default_gap.bits_per_parameter <= budget + 1e-9


def test_per_config_bits_and_budget_extremes():
    errors = np.array([[4.0, 2.0, 1.0], [8.0, 3.0, 0.5]])
    sizes = np.array([100, 300])
    bpp = np.array([2.0, 3.0, 4.0])
    rich = solve_bit_allocation(errors, bpp, sizes, budget=4.0)
    assert rich.choice == [2, 2] and rich.bits_per_parameter == pytest.approx(4.0)
    poor = solve_bit_allocation(errors, bpp, sizes, budget=2.0)
    assert poor.choice == [0, 0]
    # 3.25 bits = 1300 bits: [0, 2] needs 1400 (infeasible); [2, 1] (1300 bits, error 4) beats [1, 1] (error 5).
    mid = solve_bit_allocation(errors, bpp, sizes, budget=3.25)
    assert mid.choice == [2, 1] and mid.total_error == pytest.approx(4.0)
    assert mid.bits_per_parameter == pytest.approx(3.25)


def test_infeasible_budget_names_the_minimum():
    errors = np.ones((2, 2))
    with pytest.raises(ValueError, match=r"at least 2\.1875"):
        solve_bit_allocation(errors, np.array([[200.0, 400.0], [675.0, 900.0]]), np.array([100, 300]), budget=2.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match="storage_bits must have shape"):
        solve_bit_allocation(np.ones((2, 3)), np.ones(2), np.array([1, 1]), 3.0)
    with pytest.raises(ValueError, match="sizes must be"):
        solve_bit_allocation(np.ones((2, 3)), np.ones(3), np.array([1]), 3.0)
    with pytest.raises(ValueError, match="finite"):
        solve_bit_allocation(np.array([[1.0, np.nan]]), np.ones(2), np.array([1]), 3.0)
