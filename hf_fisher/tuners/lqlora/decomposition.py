"""The LQ-LoRA decomposition ``W ≈ Q + L₁L₂``: alternate a rank-r (weighted) SVD of ``W − Q`` and the
NormalFloat quantization of ``W − L₁L₂``, keeping the best iterate.

With a diagonal Fisher ``F`` the objective is ``‖√F ⊙ (W − Q − L₁L₂)‖_F``. Its low-rank step is made closed
form by approximating ``F`` as rank one (row means × column means, :func:`hf_fisher.fisher_weights` with
``side="both"``), which turns it into a two-sided weighted SVD (:func:`hf_fisher.weighted_low_rank`); the
reported error uses the full ``F``. The first iterate (Q = 0) is QPiSSA: the principal components plus the
quantized residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_fisher.lowrank import fisher_weights, weighted_low_rank
from hf_fisher.tuners.lqlora.quantizer import NFConfig, QuantizedTensor, nf_dequantize, nf_quantize


@dataclass
class LQDecomposition:
    """Best iterate of :func:`lq_decompose`: ``W ≈ dequantize(quantized) + L1 @ L2`` (fp32 factors)."""

    quantized: QuantizedTensor
    L1: torch.Tensor  # out × r
    L2: torch.Tensor  # r × in
    error: float  # (weighted) Frobenius error of the best iterate
    best_iteration: int  # 0-based
    errors: list[float] = field(default_factory=list)  # error of every iterate, in order

    def reconstruct(self) -> torch.Tensor:
        return nf_dequantize(self.quantized) + self.L1 @ self.L2


def decomposition_error(residual: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """``‖residual‖_F``, or ``‖√F ⊙ residual‖_F`` with a diagonal Fisher (in fp64)."""
    r = residual.double()
    if fisher is not None:
        r = r * fisher.double().sqrt()
    return float(r.norm())


def lq_decompose(
    weight: torch.Tensor,
    rank: int,
    config: NFConfig,
    *,
    fisher: torch.Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
    svd_niter: int | None = 2,
    seed: int = 0,
) -> LQDecomposition:
    """Decompose ``weight`` (out × in) into NF-quantized ``Q`` plus rank-``rank`` ``L₁L₂``; return the best iterate.

    Stops when an iterate improves the best error by less than the relative ``tol`` (or makes it worse), or after
    ``max_iter`` iterates. ``svd_niter`` subspace iterations of a randomized SVD (``None``: exact SVD), seeded by
    ``seed`` without touching the global RNG. ``fisher`` (same shape as ``weight``) weights the objective.
    """
    if weight.ndim != 2:
        raise ValueError(f"lq_decompose needs a 2-D weight, got shape {tuple(weight.shape)}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}.")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}.")
    w = weight.detach().float()
    d_r = d_c = None
    if fisher is not None:
        if fisher.shape != weight.shape:
            raise ValueError(
                f"The Fisher has shape {tuple(fisher.shape)} but the weight has {tuple(weight.shape)}: "
                "it belongs to another matrix."
            )
        fisher = fisher.detach().float().to(w.device)
        d_r, d_c = fisher_weights(fisher, side="both")
    if not torch.isfinite(w).all():
        raise ValueError("The weight has NaN/Inf values; LQ-LoRA needs a finite matrix.")

    q_dense = torch.zeros_like(w)
    best: LQDecomposition | None = None
    errors: list[float] = []
    # Seed the randomized SVD without touching the caller's RNG state (CPU, and the weight's GPU if any).
    with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for it in range(max_iter):
            factors = weighted_low_rank(w - q_dense, rank, row_weights=d_r, col_weights=d_c, niter=svd_niter)
            low_rank = factors.product()
            quantized = nf_quantize(w - low_rank, config)
            q_dense = nf_dequantize(quantized)
            err = decomposition_error(w - q_dense - low_rank, fisher)
            errors.append(err)
            if best is None or err < best.error:
                improved_enough = best is None or (best.error - err) > tol * best.error
                best = LQDecomposition(quantized, factors.B, factors.A, err, it)
                if not improved_enough:
                    break
            else:
                break
    assert best is not None
    best.errors = errors
    return best
