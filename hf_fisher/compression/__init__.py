"""Low-rank compression of a model's linear layers: Fisher-weighted SVD (FWSVD) or plain SVD.

:func:`compress_fwsvd` replaces each target ``nn.Linear`` by :class:`LowRankLinear` (``x → A x → B (A x) + b``)
with factors from :func:`hf_fisher.weighted_low_rank`: weighted by the diagonal Fisher when one is given
(Hsu et al., 2022: the layer keeps the directions that matter for the loss), plain truncated SVD otherwise.
The ranks are recorded in ``model.config.fwsvd_compression``, so :func:`load_compressed_model` rebuilds the
architecture from a folder written by ``model.save_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from hf_fisher.curvature import DiagonalFisher, find_target_layers
from hf_fisher.lowrank import WeightSide, fisher_weights, weighted_low_rank

CONFIG_KEY = "fwsvd_compression"


class LowRankLinear(nn.Module):
    """``y = B (A x) + b``: a rank-r stand-in for an ``nn.Linear`` (``A``: r × in, ``B``: out × r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lowrank_B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank_B(self.lowrank_A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose factors need at most ``(1 − ratio)`` of the dense weight's parameters."""
    return max(1, math.floor((1.0 - ratio) * out_features * in_features / (out_features + in_features)))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def compress_fwsvd(
    model: nn.Module,
    fisher: DiagonalFisher | None = None,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    target_modules: str | Iterable[str] | None = None,
    side: WeightSide = "row",
    eps: float = 1e-6,
) -> dict[str, int]:
    """Replace each target ``nn.Linear`` of ``model`` by a rank-r :class:`LowRankLinear`, in place.

    Give exactly one of ``rank`` (the same for every layer) or ``ratio`` (the fraction of each layer's
    parameters to remove, e.g. 0.5). With ``fisher`` the factorisation is FWSVD (``side`` as in
    :func:`hf_fisher.fisher_weights`); without, plain SVD. Layers where the factors would not save parameters
    are left dense. All factors are computed (fp32) before the first layer is replaced, so an error leaves the
    model untouched. Returns the rank of each compressed layer.
    """
    if (rank is None) == (ratio is None):
        raise ValueError("Pass exactly one of rank= (same rank everywhere) or ratio= (share of parameters to drop).")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}.")
    layers = find_target_layers(model, target_modules)
    plans = []
    for name, layer in layers.items():
        if layer.transposed:
            raise ValueError(f"{name!r} is a transposed Conv1D layer; compress_fwsvd handles nn.Linear layers.")
        r = rank if rank is not None else rank_for_ratio(layer.out_features, layer.in_features, ratio)
        if r > min(layer.out_features, layer.in_features):
            raise ValueError(
                f"rank {r} exceeds min(out, in) = {min(layer.out_features, layer.in_features)} for {name!r}."
            )
        if r * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
            continue  # no saving: keep the dense layer
        d_r = d_c = None
        if fisher is not None:
            key = layer.weight_name
            if key not in fisher:
                raise ValueError(f"The Fisher has no entry {key!r}; estimate it with the same target_modules.")
            if tuple(fisher[key].shape) != tuple(layer.module.weight.shape):
                raise ValueError(f"The Fisher of {key!r} has another shape than the weight: it is for another model.")
            try:
                d_r, d_c = fisher_weights(fisher[key].to(layer.module.weight.device), side=side, eps=eps)
            except ValueError as err:
                raise ValueError(f"{name!r}: {err}") from None
        plans.append((name, layer, r, d_r, d_c))
    factors = [
        weighted_low_rank(layer.module.weight, r, row_weights=d_r, col_weights=d_c)
        for name, layer, r, d_r, d_c in plans
    ]
    ranks: dict[str, int] = {}
    for (name, layer, r, _, _), f in zip(plans, factors, strict=True):
        old = layer.module
        new = LowRankLinear(
            layer.in_features, layer.out_features, r, old.bias is not None, dtype=old.weight.dtype,
            device=old.weight.device,
        )
        with torch.no_grad():
            new.lowrank_A.weight.copy_(f.A.to(old.weight.dtype))
            new.lowrank_B.weight.copy_(f.B.to(old.weight.dtype))
            if old.bias is not None:
                new.lowrank_B.bias.copy_(old.bias)
        new.train(old.training)
        _replace(model, name, new)
        ranks[name] = r
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, {"ranks": ranks, "fisher_weighted": fisher is not None, "side": side})
    return ranks


def load_compressed_model(
    path: str | os.PathLike, model_class: type | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a model saved after :func:`compress_fwsvd`: rebuild its low-rank layers, then load the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    config = AutoConfig.from_pretrained(folder)
    info = getattr(config, CONFIG_KEY, None)
    if info is None:
        raw = json.loads((folder / "config.json").read_text())
        info = raw.get(CONFIG_KEY)
    if not info:
        raise ValueError(f"{str(folder)!r} holds no compressed model (no {CONFIG_KEY!r} in its config).")
    model_class = model_class or AutoModelForCausalLM
    # A real (not meta) build: non-persistent buffers such as rotary frequencies are not in the checkpoint.
    model = model_class.from_config(config, dtype=dtype) if dtype else model_class.from_config(config)
    for name, r in info["ranks"].items():
        old = model.get_submodule(name)
        _replace(model, name, LowRankLinear(old.in_features, old.out_features, r, old.bias is not None,
                                            dtype=old.weight.dtype))
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Compressed checkpoint does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model
