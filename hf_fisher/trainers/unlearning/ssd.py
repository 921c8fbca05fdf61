"""Selective Synaptic Dampening (Foster et al., 2024): retrain-free unlearning from two diagonal Fishers.

Parameters much more important to the forget set than to the reference data (``I_F > α·I_D``) are dampened:
``θ ← θ · min(λ·I_D / I_F, 1)``; every other parameter is left as it is. The importances are diagonal Fishers from
the curvature engine — the paper uses the mean of squared mini-batch gradients of the loss on each data set,
i.e. ``estimate_diagonal_fisher(model, loader, kind="empirical", reduction="batch")`` — with the reference
data being the full training set (retain ∪ forget) or the retain set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_fisher.curvature import DiagonalFisher


@torch.no_grad()
def selective_synaptic_dampening(
    model: nn.Module,
    forget_fisher: DiagonalFisher,
    reference_fisher: DiagonalFisher,
    alpha: float = 10.0,
    lam: float = 1.0,
) -> dict[str, Any]:
    """Dampen ``model``'s parameters selected by SSD, in place; returns how many were dampened, per parameter.

    ``alpha`` (selection threshold) and ``lam`` (dampening strength) follow the paper (defaults 10 and 1 for
    image models; LLMs usually need tuning, e.g. α ∈ [0.1, 100], λ ∈ [0.1, 5]). Parameters present in only one
    Fisher, or absent from the model, raise ``ValueError`` before anything changes."""
    if not alpha > 0 or not lam > 0:
        raise ValueError(f"alpha and lam must be > 0, got alpha={alpha}, lam={lam}")
    forget_names, reference_names = set(forget_fisher.keys()), set(reference_fisher.keys())
    if forget_names != reference_names:
        only = sorted(forget_names ^ reference_names)[:3]
        raise ValueError(f"the two Fishers cover different parameters (e.g. {only}); estimate both on the same "
                         "target_modules")
    params = dict(model.named_parameters())
    for name in forget_names:
        if name not in params:
            raise ValueError(f"the Fisher has {name!r}, which the model lacks; was it estimated for another model?")
        if tuple(params[name].shape) != tuple(forget_fisher[name].shape) or tuple(params[name].shape) != tuple(
                reference_fisher[name].shape):
            raise ValueError(f"shape mismatch for {name!r} between the model and the Fishers")
    report: dict[str, Any] = {"dampened": 0, "total": 0, "per_parameter": {}}
    for name in sorted(forget_names):
        param = params[name]
        forget = forget_fisher[name].to(param.device, torch.float32)
        reference = reference_fisher[name].to(param.device, torch.float32)
        selected = forget > alpha * reference
        factor = torch.where(selected, (lam * reference / forget.clamp_min(torch.finfo(torch.float32).tiny))
                             .clamp(max=1.0), torch.ones_like(forget))
        param.mul_(factor.to(param.dtype))
        count = int(selected.sum())
        report["per_parameter"][name] = count
        report["dampened"] += count
        report["total"] += param.numel()
    return report
