"""Weighted low-rank approximation: the primitive shared by FWSVD (LoRA init, compression) and LQ-LoRA.

Given a weight ``W`` (out × in) and positive row weights ``d_r`` (out) and/or column weights ``d_c`` (in),
the rank-r minimiser of the weighted error

    ‖ D_r (W − L) D_c ‖_F ,   D_r = diag(d_r), D_c = diag(d_c), rank(L) ≤ r

is closed form: ``L = D_r⁻¹ · SVD_r(D_r W D_c) · D_c⁻¹`` (substitute ``L' = D_r L D_c``, which has the same
rank, and apply Eckart–Young). With a diagonal Fisher ``F`` the weights come from it:

* ``side="row"`` (FWSVD, Hsu et al. 2022): ``d_r,i = sqrt(Σ_j F_ij)``, one importance per output row.
* ``side="column"``: ``d_c,j = sqrt(Σ_i F_ij)``, one per input feature.
* ``side="both"`` (LQ-LoRA): ``F_ij ≈ r_i c_j`` with ``r`` the row means and ``c`` the column means (a rank-one
  approximation of F), so ``d_r = sqrt(r)``, ``d_c = sqrt(c)``.

A row or column with zero Fisher would get weight 0 and an unbounded inverse: weights are computed as
``sqrt(s + eps · mean(s))`` (relative ``eps``, default 1e-6), so they stay finite and scale-invariant.
All factorisations run in fp32 (or fp64 if given) whatever the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

WeightSide = Literal["row", "column", "both"]
Components = Literal["principal", "minor"]


@dataclass
class LowRankFactors:
    """``W ≈ B @ A`` with ``B`` (out × r) and ``A`` (r × in); ``singular_values`` of the weighted matrix."""

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor

    def product(self) -> torch.Tensor:
        return self.B @ self.A


def fisher_weights(
    fisher: torch.Tensor, side: WeightSide = "row", eps: float = 1e-6
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row and/or column weights (``d_r``, ``d_c``) from a diagonal Fisher of a weight's shape."""
    if fisher.ndim != 2:
        raise ValueError(f"The Fisher of a Linear weight must be 2-D (out × in), got shape {tuple(fisher.shape)}.")
    if not torch.isfinite(fisher).all():
        raise ValueError("The Fisher has NaN/Inf values; estimate it again (check the model's dtype and data).")
    if (fisher < 0).any():
        raise ValueError("The Fisher has negative entries; a diagonal Fisher is a mean of squares and must be >= 0.")
    f = fisher.float() if fisher.dtype != torch.float64 else fisher

    def stabilised(s: torch.Tensor) -> torch.Tensor:
        floor = eps * s.mean() if s.mean() > 0 else torch.ones((), dtype=s.dtype, device=s.device)
        return torch.sqrt(s + floor)

    if side == "row":
        return stabilised(f.sum(dim=1)), None
    if side == "column":
        return None, stabilised(f.sum(dim=0))
    if side == "both":
        return stabilised(f.mean(dim=1)), stabilised(f.mean(dim=0))
    raise ValueError(f'side must be "row", "column" or "both", got {side!r}.')


def weighted_low_rank(
    weight: torch.Tensor,
    rank: int,
    *,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
    components: Components = "principal",
    niter: int | None = None,
) -> LowRankFactors:
    """Rank-``rank`` factors minimising ``‖D_r (W − B A) D_c‖_F`` (see the module docstring).

    ``components="principal"`` keeps the ``rank`` largest weighted singular components (the optimum);
    ``"minor"`` keeps the ``rank`` smallest ones (the least important directions, for knowledge-preserving
    adapter inits). ``niter`` switches to a randomized SVD (``torch.svd_lowrank`` with that many subspace
    iterations) for the principal components of large matrices. The factors split the singular values
    evenly: ``B = D_r⁻¹ U √S``, ``A = √S Vᵀ D_c⁻¹``, in fp32 (fp64 if ``weight`` is fp64).
    """
    if weight.ndim != 2:
        raise ValueError(f"weighted_low_rank needs a 2-D weight, got shape {tuple(weight.shape)}.")
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(
            f"rank must be between 1 and min(out, in) = {min(out_f, in_f)} for a {out_f} x {in_f} weight, got {rank}."
        )
    if components not in ("principal", "minor"):
        raise ValueError(f'components must be "principal" or "minor", got {components!r}.')
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    for name, d, size in (("row_weights", row_weights, out_f), ("col_weights", col_weights, in_f)):
        if d is not None and (d.shape != (size,) or not torch.isfinite(d).all() or (d <= 0).any()):
            raise ValueError(f"{name} must be {size} finite positive numbers, got shape {tuple(d.shape)}.")
    d_r = row_weights.to(dtype=dtype, device=w.device) if row_weights is not None else None
    d_c = col_weights.to(dtype=dtype, device=w.device) if col_weights is not None else None
    m = w
    if d_r is not None:
        m = d_r[:, None] * m
    if d_c is not None:
        m = m * d_c[None, :]
    if niter is not None and components == "principal":
        u, s, v = torch.svd_lowrank(m, q=min(rank + 10, min(out_f, in_f)), niter=niter)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        keep = slice(0, rank) if components == "principal" else slice(len(s) - rank, len(s))
        u, s, vh = u[:, keep], s[keep], vh[keep]
    root = s.sqrt()
    b = u * root[None, :]
    a = root[:, None] * vh
    if d_r is not None:
        b = b / d_r[:, None]
    if d_c is not None:
        a = a / d_c[None, :]
    return LowRankFactors(B=b, A=a, singular_values=s)
