"""Fisher-shaped RandLoRA bases: the full-rank update ``diag(u) ΔW diag(v)`` follows the loss's sensitivity.

``u`` (out) and ``v`` (in) are the square-root row and column Fisher weights of each adapted layer's base weight
(:func:`hf_fisher.fisher_weights` with ``side="both"``: ``u_i = sqrt(mean_j F_ij)``, ``v_j = sqrt(mean_i F_ij)``),
each divided by its mean so that the update keeps the size of a random-basis one and the same learning rate applies.
Rows and columns the data is sensitive to get larger basis vectors; λ and γ stay the only trainable parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fisher.curvature import DiagonalFisher
from hf_fisher.lowrank import fisher_weights


def _fisher_keys(module_name: str) -> list[str]:
    """Names a Fisher may use for a tuner layer's base weight: on the PEFT model or on the bare model."""
    bare = module_name
    for prefix in ("base_model.model.", "base_model."):
        if bare.startswith(prefix):
            bare = bare[len(prefix) :]
            break
    return [f"{module_name}.base_layer.weight", f"{module_name}.weight", f"{bare}.weight"]


def initialize_fisher_basis(
    peft_model: nn.Module,
    fisher: DiagonalFisher | dict[str, torch.Tensor],
    *,
    adapter_name: str = "default",
    eps: float = 1e-6,
) -> None:
    """Set the row/column basis scales of every ``basis="fisher"`` layer of ``adapter_name`` from a diagonal Fisher.

    ``fisher`` is a :class:`~hf_fisher.DiagonalFisher` (or a dict) of the base model's weights, e.g. from
    ``estimate_diagonal_fisher(model, loader, target_modules=...)`` on the task data. All scales are computed (in
    fp32) and checked before any is written, so bad input leaves the model untouched.
    """
    from hf_fisher.tuners.randlora.layer import FastRandLoraLayer

    layers = {
        name: m for name, m in peft_model.named_modules()
        if isinstance(m, FastRandLoraLayer) and adapter_name in m.randlora_lambda
    }
    if not layers:
        raise ValueError(f"The model has no fast RandLoRA layer with adapter {adapter_name!r}.")
    not_fisher = [name for name, m in layers.items() if adapter_name not in m.randlora_row_scale]
    if not_fisher:
        raise ValueError(
            f"Adapter {adapter_name!r} was created with basis='random' ({not_fisher[0]!r}); create it with "
            "FastRandLoraConfig(basis='fisher', ...) to give it Fisher-shaped bases."
        )
    updates = []
    for name, layer in layers.items():
        key = next((k for k in _fisher_keys(name) if k in fisher), None)
        if key is None:
            raise ValueError(
                f"The Fisher has no entry for {name!r} (looked for {_fisher_keys(name)}). Estimate it on the same "
                "model with target_modules covering every adapted layer."
            )
        f = fisher[key].detach().float()
        if getattr(layer, "fan_in_fan_out", False):
            f = f.T
        if tuple(f.shape) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"The Fisher of {name!r} has shape {tuple(f.shape)} but the layer is "
                f"{(layer.out_features, layer.in_features)} (out, in): this Fisher belongs to another model."
            )
        try:
            rows, cols = fisher_weights(f, side="both", eps=eps)
        except ValueError as err:
            raise ValueError(f"Layer {name!r}: {err}") from None
        updates.append((layer, rows / rows.mean(), cols / cols.mean()))
    with torch.no_grad():
        for layer, rows, cols in updates:
            row_buf, col_buf = layer.randlora_row_scale[adapter_name], layer.randlora_col_scale[adapter_name]
            row_buf.copy_(rows.to(row_buf.device, row_buf.dtype))
            col_buf.copy_(cols.to(col_buf.device, col_buf.dtype))
