"""Diagonal Fisher information of the linear layers of a causal LM."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from hf_fisher.curvature.collect import (
    CurvatureCollector,
    FisherKind,
    TargetLayer,
    check_finite,
    find_target_layers,
    run_curvature_pass,
)
from hf_fisher.curvature.store import (
    CurvatureMetadata,
    TensorCurvatureEstimate,
    model_name_or_path,
)

Reduction = Literal["sample", "batch"]

NORMALIZATION = (
    "per sequence: sum over sequences of the squared gradient of the sequence's summed log-likelihood "
    "(supervised tokens only), divided by the number of sequences"
)


class _DiagonalCollector(CurvatureCollector):
    """Sums of squared per-sequence (or per-batch) weight gradients, built from ``a`` and ``g``."""

    def __init__(self, layers: dict[str, TargetLayer], reduction: Reduction, max_chunk_elements: int):
        super().__init__(layers)
        self.reduction = reduction
        self.max_chunk_elements = max_chunk_elements
        self.sums: dict[str, torch.Tensor] = {}
        for layer in layers.values():
            w = layer.module.weight
            self.sums[layer.weight_name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            if layer.has_bias:
                self.sums[layer.bias_name] = torch.zeros(
                    layer.out_features, dtype=torch.float32, device=w.device
                )
        self.inputs: dict[str, torch.Tensor] = {}

    def on_input(self, layer: TargetLayer, a: torch.Tensor) -> None:
        self.inputs[layer.name] = a

    def on_output_grad(self, layer: TargetLayer, g: torch.Tensor) -> None:
        a = self.inputs.pop(layer.name)
        batch = a.shape[0]
        a = a.reshape(batch, -1, layer.in_features)
        g = g.reshape(batch, -1, layer.out_features)
        weight_sum = self.sums[layer.weight_name]
        if self.reduction == "batch":
            grad = g.flatten(0, 1).float().T @ a.flatten(0, 1).float()  # (out, in)
            weight_sum.add_((grad.T if layer.transposed else grad).square())
            if layer.has_bias:
                self.sums[layer.bias_name].add_(g.float().sum(dim=(0, 1)).square())
            return
        # Per-sequence gradients G_b = g_bᵀ a_b, in chunks of sequences to bound memory.
        chunk = max(1, self.max_chunk_elements // (layer.in_features * layer.out_features))
        for start in range(0, batch, chunk):
            gc = g[start : start + chunk].float()
            ac = a[start : start + chunk].float()
            if layer.transposed:
                per_seq = torch.bmm(ac.transpose(1, 2), gc)  # (b, in, out)
            else:
                per_seq = torch.bmm(gc.transpose(1, 2), ac)  # (b, out, in)
            weight_sum.add_(per_seq.square_().sum(dim=0))
        if layer.has_bias:
            self.sums[layer.bias_name].add_(g.float().sum(dim=1).square().sum(dim=0))

    def end_batch(self) -> None:
        self.inputs.clear()

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.sums


class DiagonalFisher(TensorCurvatureEstimate):
    """Diagonal Fisher information per parameter, indexable by parameter name.

    ``fisher["model.layers.0.mlp.down_proj.weight"]`` has the parameter's shape. Iterate with
    ``.items()``; the estimate's provenance is in ``.metadata``.
    """

    FILENAME = "diagonal_fisher.safetensors"
    LABEL = "diagonal Fisher"
    CURVATURE_TYPE = "diagonal_fisher"
    ENTRY = "Fisher"

    def to(self, device: torch.device | str) -> DiagonalFisher:
        """A copy with every tensor on ``device``."""
        return DiagonalFisher({k: v.to(device) for k, v in self.items()}, self.metadata)

    def summary(self) -> list[dict[str, Any]]:
        """One row per parameter: size, mean, max and share of the total Fisher mass (its trace)."""
        total = sum(float(t.double().sum()) for t in self._entries.values()) or 1.0
        return [
            {
                "name": name,
                "numel": t.numel(),
                "mean": float(t.double().mean()),
                "max": float(t.max()),
                "share": float(t.double().sum()) / total,
            }
            for name, t in self._entries.items()
        ]



def estimate_diagonal_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    kind: FisherKind = "empirical",
    target_modules: str | Iterable[str] | None = None,
    reduction: Reduction = "sample",
    max_batches: int | None = None,
    accelerator: Any = None,
    seed: int = 0,
    data_description: str | None = None,
    max_chunk_elements: int = 1 << 26,
) -> DiagonalFisher:
    """Estimate the diagonal Fisher of the target layers' weights (and biases) of a causal LM.

    ``F = (1/N) Σ_n (∇_θ log p(y_n | x_n))²`` over N sequences, where ``log p(y_n | x_n)`` sums the
    token log-likelihoods of the supervised positions (labels ≠ -100) of sequence n.

    Args:
        kind: "empirical" uses the batch's labels; "sampled" draws labels from the model's predictive
            distribution (Monte-Carlo estimate of the true Fisher, which equals the Gauss-Newton).
        target_modules: None (every linear layer except the output embeddings), a regex over module
            names, or a list of names / name suffixes as in PEFT.
        reduction: "sample" squares exact per-sequence gradients, computed from layer hooks in one
            batched pass. "batch" squares the gradient of each mini-batch's summed loss and divides by
            the number of sequences: cheaper, and biased upward by ``(B - 1) · E[g]²`` per batch of B
            sequences (unbiased in expectation for ``kind="sampled"``, whose per-sequence gradients have
            mean zero; for "empirical" the bias is large where the mean gradient is).
        max_batches: stop after this many batches (per process).
        accelerator: an ``accelerate.Accelerator``; the dataloader should be sharded by it
            (``accelerator.prepare(dataloader)``). Sums and counts are all-reduced, so the result equals
            one process over the union of the shards (pass ``Accelerator(dataloader_config=
            DataLoaderConfiguration(even_batches=False))`` or a dataset size divisible by the global batch
            size, or Accelerate repeats samples to even out the shards).
        seed: seed of the CPU generator for sampled labels (offset by process index).
        max_chunk_elements: bound on the per-sequence gradient buffer (sequences are processed in
            chunks of at most this many elements).

    The model is left exactly as it was: hooks removed, train/eval modes and requires_grad restored.
    """
    if reduction not in ("sample", "batch"):
        raise ValueError(f'reduction must be "sample" or "batch", got {reduction!r}.')
    layers = find_target_layers(model, target_modules)
    collector = _DiagonalCollector(layers, reduction, max_chunk_elements)
    totals = run_curvature_pass(
        model,
        dataloader,
        collector,
        kind=kind,
        max_batches=max_batches,
        accelerator=accelerator,
        seed=seed,
        description=f"diagonal Fisher ({kind}, {reduction})",
    )
    fisher = {name: s.div_(totals.n_sequences) for name, s in collector.sums.items()}
    check_finite(fisher)
    first = next(iter(layers.values())).module.weight
    metadata = CurvatureMetadata(
        curvature_type=DiagonalFisher.CURVATURE_TYPE,
        kind=kind,
        n_sequences=totals.n_sequences,
        n_tokens=totals.n_tokens,
        normalization=NORMALIZATION,
        model_name_or_path=model_name_or_path(model),
        data_description=data_description,
        reduction=reduction,
        model_dtype=str(first.dtype).removeprefix("torch."),
        seed=seed,
    )
    return DiagonalFisher(fisher, metadata)
