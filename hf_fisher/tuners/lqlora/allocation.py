"""The LQ-LoRA bit budget: choose one quantization config per matrix minimising the total decomposition error
under an average bits-per-parameter budget, as an exact 0/1 integer program solved by scipy's ``milp`` (HiGHS).

    minimise Σ_i Σ_c e_ic x_ic   s.t.  Σ_i Σ_c b_ic x_ic ≤ budget · Σ_i n_i,   Σ_c x_ic = 1,   x_ic ∈ {0, 1}

with ``e_ic`` the (squared) error of matrix i under config c and ``b_ic`` its storage in bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BitAllocation:
    """The chosen config index per matrix, its total error, the resulting average bits per parameter, and the
    solver's proven relative optimality gap (0 when solved exactly)."""

    choice: list[int]
    total_error: float
    bits_per_parameter: float
    solve_seconds: float
    mip_gap: float


def minimum_bits_per_parameter(storage_bits: np.ndarray, sizes: np.ndarray) -> float:
    """The lowest average bits per parameter any allocation reaches (every matrix on its cheapest config)."""
    return float(storage_bits.min(axis=1).sum() / sizes.sum())


def solve_bit_allocation(
    errors,
    storage_bits,
    sizes,
    budget: float,
    *,
    mip_rel_gap: float = 1e-4,
    time_limit: float | None = None,
) -> BitAllocation:
    """Solve the allocation integer program to a proven relative optimality gap of ``mip_rel_gap``.

    The default gap (1e-4, HiGHS' own) keeps the solve to seconds for a few hundred matrices; closing the last
    fraction of a per mille can take tens of seconds there. ``mip_rel_gap=0`` solves exactly.

    ``errors``: (n_matrices, n_configs) errors. ``storage_bits``: (n_matrices, n_configs) bits each matrix takes
    under each config, or (n_configs,) bits per parameter (then multiplied by ``sizes``). ``sizes``: (n_matrices,)
    parameter counts. ``budget``: the allowed average bits per parameter. Raises ``ValueError`` naming the
    smallest feasible budget when ``budget`` is below it.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    e = np.asarray(errors, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if e.ndim != 2 or e.size == 0:
        raise ValueError(f"errors must be a non-empty 2-D array (matrices × configs), got shape {e.shape}.")
    n_mat, n_cfg = e.shape
    if n.shape != (n_mat,) or (n <= 0).any():
        raise ValueError(f"sizes must be {n_mat} positive parameter counts (one per matrix), got shape {n.shape}.")
    b = np.asarray(storage_bits, dtype=np.float64)
    if b.shape == (n_cfg,):
        b = n[:, None] * b[None, :]
    if b.shape != (n_mat, n_cfg):
        raise ValueError(
            f"storage_bits must have shape ({n_mat}, {n_cfg}) (bits per matrix and config) or ({n_cfg},) "
            f"(bits per parameter per config), got {b.shape}."
        )
    if not (np.isfinite(e).all() and np.isfinite(b).all()) or (e < 0).any() or (b <= 0).any():
        raise ValueError("errors must be finite and >= 0 and storage_bits finite and > 0.")
    lowest = minimum_bits_per_parameter(b, n)
    if budget < lowest * (1 - 1e-12):
        raise ValueError(
            f"A budget of {budget:g} bits per parameter is infeasible: the cheapest config for every matrix "
            f"already needs {lowest:.4f} bits per parameter. Raise the budget to at least {lowest:.4f} or add "
            "cheaper configs to the grid."
        )

    start = time.perf_counter()
    # Scale the objective to O(1) so HiGHS's tolerances mean the same thing for any error magnitude.
    scale = e.max() if e.max() > 0 else 1.0
    c = (e / scale).reshape(-1)
    one_per_matrix = sparse.csr_array(
        (np.ones(n_mat * n_cfg), (np.repeat(np.arange(n_mat), n_cfg), np.arange(n_mat * n_cfg))),
        shape=(n_mat, n_mat * n_cfg),
    )
    total = n.sum()
    budget_row = (b / total).reshape(1, -1)  # average bits per parameter, O(budget)
    constraints = [
        LinearConstraint(one_per_matrix, 1.0, 1.0),
        LinearConstraint(budget_row, -np.inf, budget),
    ]
    options: dict = {"mip_rel_gap": mip_rel_gap, "disp": False}
    if time_limit is not None:
        options["time_limit"] = time_limit
    result = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, 1), options=options)
    seconds = time.perf_counter() - start
    if result.x is None:
        raise RuntimeError(f"The bit-allocation integer program found no solution: {result.message}")
    x = result.x.reshape(n_mat, n_cfg)
    choice = [int(i) for i in x.argmax(axis=1)]
    rows = np.arange(n_mat)
    used = float(b[rows, choice].sum() / total)
    gap = getattr(result, "mip_gap", None)
    return BitAllocation(
        choice=choice, total_error=float(e[rows, choice].sum()), bits_per_parameter=used, solve_seconds=seconds,
        mip_gap=float(gap) if gap is not None else 0.0,
    )
