"""Fisher-weighted averaging of models and of LoRA adapters ("Merging Models with Fisher-Weighted Averaging").

Per coordinate, ``θ = Σₘ wₘ (Fₘ + ε) θₘ / Σₘ wₘ (Fₘ + ε)``: each model's posterior is approximated
by a Gaussian whose precision is its diagonal Fisher, and the merge maximises their joint density.
A tensor without a Fisher (in every model) is plainly averaged with the weights ``w``.

LoRA adapters over one base model are merged through their weight changes ``ΔWₘ = sₘ Bₘ Aₘ``
(the base is shared, so merging ``W₀ + ΔWₘ`` is merging the ``ΔWₘ``), with the Fisher of each
model's base-layer weight, and returned as

* ``"svd"``: a LoRA of rank ``lora_rank`` from the truncated SVD of the merged ΔW (best rank-r
  approximation in Frobenius norm);
* ``"concat"``: the exact adapter of rank ``Σ rₘ``, ``[c₁s₁B₁ | … ] · [A₁; …]``, for the
  *layer-wise* Fisher merge (``cₘ ∝ wₘ · mean Fₘ`` per layer; an element-wise Fisher average of
  low-rank matrices is not low-rank, so the concatenation is exact only at layer granularity);
* ``"merged"``: the base model with the element-wise merged ΔW added (no adapter).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from hf_fisher.trainers.fisher import _fisher_key, _lora_layers

LoraOutput = Literal["svd", "concat", "merged"]
FisherLike = Mapping[str, torch.Tensor] | None


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"Got {len(weights)} weights for {n} models; pass one weight per model.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero; got {weights}.")
    total = sum(weights)
    return [w / total for w in weights]


def _normalised(fishers: Sequence[FisherLike], normalize: bool) -> list[FisherLike]:
    """Each Fisher divided by its global L2 norm (the paper's reference code), or as given."""
    if not normalize:
        return list(fishers)
    out: list[FisherLike] = []
    for fisher in fishers:
        if fisher is None:
            out.append(None)
            continue
        norm = math.sqrt(sum(float(t.double().square().sum()) for t in fisher.values()))
        if norm == 0.0:
            raise ValueError("A Fisher is identically zero, so it cannot be normalised; check how it was estimated.")
        out.append({k: v / norm for k, v in fisher.items()})
    return out


def _weighted_average(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor | None],
                      weights: Sequence[float], eps: float, name: str) -> torch.Tensor:
    """``Σ w (F+ε) θ / Σ w (F+ε)`` in fp32 (plain ``Σ w θ`` when no model has a Fisher for this tensor)."""
    present = [f is not None for f in fishers]
    if not any(present):
        return sum(w * t.float() for w, t in zip(weights, tensors, strict=True))
    if not all(present):
        raise ValueError(
            f"Only some models have a Fisher for {name!r} ({sum(present)} of {len(present)}); estimate every model's "
            "Fisher on the same target modules."
        )
    numerator = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for w, t, f in zip(weights, tensors, fishers, strict=True):
        if tuple(f.shape) != tuple(t.shape):
            raise ValueError(f"The Fisher of {name!r} has shape {tuple(f.shape)}, the tensor {tuple(t.shape)}.")
        weight = w * (f.to(t.device, torch.float32) + eps)
        numerator.add_(weight * t.float())
        denominator.add_(weight)
    return numerator / denominator


def fisher_merge(
    models: Sequence[nn.Module],
    fishers: Sequence[FisherLike],
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
    normalize: bool = False,
    lora_output: LoraOutput = "svd",
    lora_rank: int | None = None,
) -> nn.Module:
    """Merge models (or PEFT LoRA adapters over one base) by Fisher-weighted averaging; inputs are left untouched.

    Args:
        models: two or more models of one architecture, or PEFT models with one LoRA adapter each.
        fishers: one per model: a :class:`~hf_fisher.DiagonalFisher` (or name → tensor mapping) keyed
            by parameter names (for adapters: the base layers' weights, under the plain or the PEFT
            model's names), or None.
        weights: non-negative model weights (normalised to sum 1); equal by default.
        eps: added to every Fisher, so coordinates no model cares about are plainly averaged.
        normalize: divide each Fisher by its global L2 norm first (as the paper's code does).
        lora_output: for adapters, "svd", "concat" or "merged" (see the module docstring).
        lora_rank: rank of the "svd" output (default: the largest input rank).

    Returns a new model: a copy of the first model with merged weights, a new PEFT model with the
    merged adapter ("svd"/"concat"), or the base model with the merged ΔW added ("merged").
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"fisher_merge needs at least two models, got {len(models)}.")
    if len(fishers) != len(models):
        raise ValueError(f"Got {len(fishers)} Fishers for {len(models)} models; pass one (or None) per model.")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and ≥ 0, got {eps}.")
    w = _check_weights(weights, len(models))
    fishers = _normalised(fishers, normalize)
    lora = [bool(_lora_layers(m)) for m in models]
    if any(lora) and not all(lora):
        raise ValueError("Either every model or none must be a PEFT LoRA model; got a mix.")
    if all(lora):
        return _merge_lora(models, fishers, w, eps, lora_output, lora_rank)
    return _merge_full(models, fishers, w, eps)


def _merge_full(models: list[nn.Module], fishers: list[FisherLike], weights: list[float], eps: float) -> nn.Module:
    params = [dict(m.named_parameters()) for m in models]
    names = list(params[0])
    for i, p in enumerate(params[1:], start=1):
        if list(p) != names or any(p[n].shape != params[0][n].shape for n in names):
            raise ValueError(f"Model {i} does not have the parameters (names and shapes) of model 0; fisher_merge "
                             "merges models of one architecture only.")
    for i, fisher in enumerate(fishers):
        unknown = [k for k in (fisher or {}) if k not in params[0]]
        if unknown:
            raise ValueError(f"The Fisher of model {i} has entries the models lack, e.g. {unknown[:3]}; estimate "
                             "it on these models.")
    merged = {
        n: _weighted_average([p[n].detach() for p in params], [None if f is None else f.get(n) for f in fishers],
                             weights, eps, n)
        for n in names
    }
    result = copy.deepcopy(models[0])
    with torch.no_grad():
        for n, p in result.named_parameters():
            p.copy_(merged[n].to(p.dtype))
    return result


def _adapter_of(layer: nn.Module, name: str) -> str:
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        raise ValueError(f"Layer {name!r} has {len(adapters)} active linear LoRA adapters; merge one adapter per "
                         "model.")
    if layer.use_dora.get(adapters[0], False):
        raise ValueError(f"Layer {name!r} uses DoRA, whose weight change is not s·BA; fisher_merge merges plain LoRA.")
    return adapters[0]


def _delta_w(layer: nn.Module, adapter: str) -> torch.Tensor:
    """``s·BA`` in the base weight's layout, fp32."""
    dw = float(layer.scaling[adapter]) * (layer.lora_B[adapter].weight.detach().float()
                                          @ layer.lora_A[adapter].weight.detach().float())
    return dw.T if getattr(layer, "fan_in_fan_out", False) else dw


def _merge_lora(models: list[nn.Module], fishers: list[FisherLike], weights: list[float], eps: float,
                output: LoraOutput, rank: int | None) -> nn.Module:
    if output not in ("svd", "concat", "merged"):
        raise ValueError(f'lora_output must be "svd", "concat" or "merged", got {output!r}.')
    if rank is not None and rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {rank}.")
    all_layers = [_lora_layers(m) for m in models]
    names = list(all_layers[0])
    for i, layers in enumerate(all_layers[1:], start=1):
        if list(layers) != names:
            raise ValueError(f"Adapter {i} adapts other layers than adapter 0; merge adapters with the same "
                             "target_modules.")
    for i, m in enumerate(models):
        if any(p.requires_grad and "modules_to_save" in n for n, p in m.named_parameters()):
            raise ValueError(f"Adapter {i} has modules_to_save; fisher_merge merges the LoRA weights only.")
    adapters = [{n: _adapter_of(layers[n], n) for n in names} for layers in all_layers]
    fisher_keys: list[dict[str, str | None]] = []
    for i, fisher in enumerate(fishers):
        keys = {n: (None if fisher is None else _fisher_key(n, fisher)) for n in names}
        missing = [n for n, k in keys.items() if fisher is not None and k is None]
        if missing:
            raise ValueError(f"The Fisher of model {i} has no entry for the base weight of adapted layers "
                             f"{missing[:3]}; estimate it with target_modules covering every LoRA target.")
        fisher_keys.append(keys)
    for n in names:
        base = [layers[n].get_base_layer().weight for layers in all_layers]
        if any(not torch.equal(b, base[0]) for b in base[1:]):
            raise ValueError(f"The adapters sit on different base weights (layer {n!r}); merge adapters trained "
                             "from one base model.")

    # One layer at a time: only the current layer's ΔW's are ever materialised.
    result = copy.deepcopy(models[0]).unload() if output == "merged" else None
    modules = dict(result.named_modules()) if result is not None else {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in names:
        layer_fishers = [None if k[n] is None else f[k[n]] for f, k in zip(fishers, fisher_keys, strict=True)]
        if output == "concat":
            factors[n] = _concat_factors(all_layers, adapters, n, layer_fishers, weights, eps)
            continue
        deltas = [_delta_w(layers[n], adapters[i][n]) for i, layers in enumerate(all_layers)]
        merged_dw = _weighted_average(deltas, layer_fishers, weights, eps, n)
        del deltas
        if output == "merged":
            weight = modules[n.removeprefix("base_model.model.")].weight
            with torch.no_grad():
                weight.add_(merged_dw.to(weight.dtype))
            continue
        r = rank or max(int(layers[n].r[adapters[i][n]]) for i, layers in enumerate(all_layers))
        dw = merged_dw.T if getattr(all_layers[0][n], "fan_in_fan_out", False) else merged_dw
        u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)  # factor ΔW in PEFT's (out, in) form
        r = min(r, s.numel())
        root = s[:r].sqrt()
        factors[n] = ((u[:, :r] * root).float(), (root[:, None] * vh[:r]).float())  # B (out, r), A (r, in)
    if result is not None:
        return result
    return _build_adapter(models[0], factors)


def _concat_factors(all_layers, adapters, n, layer_fishers, weights, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """``ΔW = Σ cₘ sₘ Bₘ Aₘ`` exactly, with layer-wise Fisher weights ``cₘ ∝ wₘ (mean Fₘ + ε)``."""
    if all(f is None for f in layer_fishers):
        coefficients = list(weights)
    elif any(f is None for f in layer_fishers):
        raise ValueError(f"Only some models have a Fisher for layer {n!r}; give every model a Fisher or none.")
    else:
        raw = [w * (float(f.double().mean()) + eps) for w, f in zip(weights, layer_fishers, strict=True)]
        coefficients = [c / sum(raw) for c in raw]
    bs, as_ = [], []
    for i, layers in enumerate(all_layers):
        layer, adapter = layers[n], adapters[i][n]
        b = layer.lora_B[adapter].weight.detach().float() * (coefficients[i] * float(layer.scaling[adapter]))
        a = layer.lora_A[adapter].weight.detach().float()
        bs.append(b)
        as_.append(a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)  # B (out, Σr), A (Σr, in), as PEFT stores them


def _build_adapter(template: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A new PEFT model on a copy of the template's base, with LoRA factors ``B, A`` per layer and scaling 1."""
    from peft import LoraConfig, get_peft_model

    config = template.peft_config[template.active_adapter]
    ranks = {n: b.shape[1] for n, (b, _) in factors.items()}
    r = max(ranks.values())
    targets = [n.removeprefix("base_model.model.") for n in factors]
    new_config = LoraConfig(
        r=r, lora_alpha=r, target_modules=targets, fan_in_fan_out=config.fan_in_fan_out, bias="none",
        lora_dropout=0.0, task_type=config.task_type,
        rank_pattern={re.escape(t): ranks[n] for t, n in zip(targets, factors, strict=True) if ranks[n] != r},
        alpha_pattern={re.escape(t): ranks[n] for t, n in zip(targets, factors, strict=True) if ranks[n] != r},
    )
    base = copy.deepcopy(template).unload()
    model = get_peft_model(base, new_config)
    if config.base_model_name_or_path:  # keep the inputs' base model, so the saved adapter names it
        model.peft_config["default"].base_model_name_or_path = config.base_model_name_or_path
    layers = _lora_layers(model)
    with torch.no_grad():
        for n, (b, a) in factors.items():
            layer = layers[n]
            if float(layer.scaling["default"]) != 1.0:
                raise RuntimeError(f"Internal error: merged adapter of {n!r} has scaling {layer.scaling['default']}.")
            layer.lora_B["default"].weight.copy_(b.to(layer.lora_B["default"].weight.dtype))
            layer.lora_A["default"].weight.copy_(a.to(layer.lora_A["default"].weight.dtype))
    return model
