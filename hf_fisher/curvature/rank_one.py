"""Rank-1 Fisher along the mean gradient ("Avoid Catastrophic Forgetting with Rank-1 Fisher").

When per-sequence gradients are nearly collinear, the empirical Fisher ``E[g gᵀ]`` is effectively
``σ u uᵀ`` with ``u`` the unit mean gradient and ``σ = E[‖g‖²] = tr F``. One pass gives both: the
summed per-sequence gradient (for ``u``) and the summed squared gradient (for ``tr F``), through the
same hooks as the diagonal Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hf_fisher.curvature.collect import TargetLayer, check_finite, find_target_layers, run_curvature_pass
from hf_fisher.curvature.diagonal import _DiagonalCollector
from hf_fisher.curvature.store import (
    CurvatureMetadata,
    TensorCurvatureEstimate,
    model_name_or_path,
)

NORMALIZATION = (
    "rank one: F ≈ scale · u uᵀ, u = mean per-sequence gradient of the summed log-likelihood (unit norm over all "
    "tensors), scale = trace of the per-sequence empirical Fisher"
)


class _GradientSumCollector(_DiagonalCollector):
    """Per-sequence squared gradients (as the diagonal Fisher) plus the plain summed gradient."""

    def __init__(self, layers: dict[str, TargetLayer], max_chunk_elements: int):
        super().__init__(layers, "sample", max_chunk_elements)
        self.grad_sums = {name: torch.zeros_like(t) for name, t in self.sums.items()}

    def on_output_grad(self, layer: TargetLayer, g: torch.Tensor) -> None:
        a = self.inputs[layer.name]
        a2 = a.reshape(-1, layer.in_features).float()
        g2 = g.reshape(-1, layer.out_features).float()
        self.grad_sums[layer.weight_name].add_(a2.T @ g2 if layer.transposed else g2.T @ a2)
        if layer.has_bias:
            self.grad_sums[layer.bias_name].add_(g2.sum(dim=0))
        super().on_output_grad(layer, g)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {**self.sums, **{f"grad::{k}": v for k, v in self.grad_sums.items()}}


class RankOneFisher(TensorCurvatureEstimate):
    """``F ≈ scale · u uᵀ``: ``self[name]`` is the part of the unit direction ``u`` in that parameter.

    ``scale`` (in ``metadata.extra["scale"]``) is the Fisher's trace. :meth:`quadratic_form` gives
    ``dᵀ F d = scale · (u · d)²`` for a parameter displacement ``d``.
    """

    FILENAME = "rank_one_fisher.safetensors"
    LABEL = "rank-1 Fisher"
    CURVATURE_TYPE = "rank_one_fisher"
    ENTRY = "direction"

    @property
    def scale(self) -> float:
        return float(self.metadata.extra["scale"])

    def projection(self, displacement: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u · d`` summed over the tensors of ``displacement`` (fp32)."""
        total = torch.zeros((), dtype=torch.float32)
        for name, d in displacement.items():
            total = total + (self[name].to(d.device) * d.float()).sum().cpu()
        return total

    def quadratic_form(self, displacement: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``dᵀ F d = scale · (u · d)²``."""
        return self.scale * self.projection(displacement).square()



def estimate_rank_one_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    target_modules: str | Iterable[str] | None = None,
    max_batches: int | None = None,
    accelerator: Any = None,
    data_description: str | None = None,
    max_chunk_elements: int = 1 << 26,
) -> RankOneFisher:
    """Estimate the rank-1 empirical Fisher (mean-gradient direction, trace as scale) of the target layers.

    Uses the data's labels (the sampled-label Fisher has a zero mean gradient, so no direction). Same
    target selection, masking and multi-process all-reduce as :func:`estimate_diagonal_fisher`.
    """
    layers = find_target_layers(model, target_modules)
    collector = _GradientSumCollector(layers, max_chunk_elements)
    totals = run_curvature_pass(
        model, dataloader, collector, kind="empirical", max_batches=max_batches, accelerator=accelerator, seed=0,
        description="rank-1 Fisher",
    )
    n = totals.n_sequences
    mean_grad = {name: s / n for name, s in collector.grad_sums.items()}
    check_finite(mean_grad)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in mean_grad.values()))
    if norm == 0.0:
        raise ValueError(
            "The mean gradient over the reference data is exactly zero, so the rank-1 Fisher has no direction. "
            "Use more (or other) reference data, or the diagonal penalty."
        )
    trace = sum(float(s.double().sum()) for s in collector.sums.values()) / n
    first = next(iter(layers.values())).module.weight
    metadata = CurvatureMetadata(
        curvature_type=RankOneFisher.CURVATURE_TYPE,
        kind="empirical",
        n_sequences=totals.n_sequences,
        n_tokens=totals.n_tokens,
        normalization=NORMALIZATION,
        model_name_or_path=model_name_or_path(model),
        data_description=data_description,
        model_dtype=str(first.dtype).removeprefix("torch."),
        extra={"scale": trace, "mean_gradient_norm": norm},
    )
    return RankOneFisher({name: (g / norm).float() for name, g in mean_grad.items()}, metadata)
