"""Fast RandLoRA layers: PEFT's RandLoRA function, contracted per token or through a dense update (the cheaper).

Notation (one adapted layer, ``d = min(in, out)``, ``D = max(in, out)``, ``n = ⌈d / r⌉`` bases, ``R = n·r``):
shared random bases ``A`` (r, 1, ≥d) and ``B`` (≥D, ≥n, r); trainable ``λ`` (r, n) and ``γ`` (n, d). PEFT forms the
scaled basis ``S = flatten₀₁(λ[:, :, None] · A · γ[None])`` (R × d) and the flattened ``Bf = flatten₁₂(B)`` (D × R) and
adds ``s · x Sᵀ Bfᵀ`` (input is the small side) or ``s · x Bf S`` (output is the small side), ``s = alpha / r``.
Both are ``x ΔWᵀ`` with ``ΔW = s · Bf S`` or its transpose. Per token that costs ``R·(in + out)`` multiply-adds;
building ``ΔW`` once costs ``D·R·d`` however many tokens there are, which is cheaper for batches of more than a few
hundred tokens (see :func:`contraction_costs`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D


def contraction_costs(
    tokens: int, in_features: int, out_features: int, rank: int, *, grad: bool, fold: bool
) -> dict[str, int]:
    """Multiply-adds that each contraction order adds to the base layer for one forward (+ backward if ``grad``).

    ``rank`` is ``R = n·r`` (the flattened basis width). ``fold`` means the merged path runs one matmul with
    ``W + ΔW`` instead of the base matmul (no extra per-token work in the forward and the input gradient).
    """
    small, large = min(in_features, out_features), max(in_features, out_features)
    build = large * rank * small  # ΔW = Bf S, or the contraction Bfᵀ dΔW in the backward
    per_token_forward = tokens * rank * (in_features + out_features)
    dense = tokens * in_features * out_features  # one extra x ΔWᵀ, dΔW = gᵀ x, or g ΔW
    if not grad:
        return {"per_token": per_token_forward, "merged": build + (0 if fold else dense)}
    # per token: forward 2 matmuls; backward: dh, dS (small side), dx (= 3 small-side-sized and 2 large-side-sized)
    per_token = tokens * rank * (3 * small + 2 * large)
    # merged: build ΔW, rebuild it in the backward, dΔW = gᵀx, Bfᵀ dΔW; unfolded adds x ΔWᵀ and g ΔW
    merged = 3 * build + dense + (0 if fold else 2 * dense)
    return {"per_token": per_token, "merged": merged}


def _sliced_bases(
    basis_a: torch.Tensor, basis_b: torch.Tensor, small: int, large: int, n_bases: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's part of the shared bases: ``A`` (r, 1, d) and the flattened ``Bf`` (D, n·r), basis-major."""
    return basis_a[:, :, :small], basis_b[:large, :n_bases, :].flatten(start_dim=1)


def _scale(basis_a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``S`` (R × d): row ``k·n + b`` is ``λ[k, b] · A[k] ∘ γ[b]`` (rank-major, as PEFT flattens it)."""
    return (lam[:, :, None] * basis_a * gamma[None]).flatten(end_dim=1)


def _scale_backward(
    grad_s: torch.Tensor, basis_a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of λ and γ from the gradient of ``S`` (never materialising anything larger than ``S``)."""
    g = grad_s.view(lam.shape[0], lam.shape[1], -1)  # (r, n, d)
    a = basis_a[:, 0, :]  # (r, d)
    grad_lam = torch.einsum("kbj,kj->kb", g * gamma[None], a)
    grad_gamma = torch.einsum("kbj,kb->bj", g * a[:, None, :], lam)
    return grad_lam, grad_gamma


class _ScaledBasis(torch.autograd.Function):
    """``S`` from (A, λ, γ), saving only those three for the backward (not the R × d product)."""

    @staticmethod
    def forward(ctx: Any, basis_a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(basis_a, lam, gamma)
        return _scale(basis_a, lam, gamma)

    @staticmethod
    def backward(ctx: Any, grad_s: torch.Tensor):
        basis_a, lam, gamma = ctx.saved_tensors
        grad_lam, grad_gamma = _scale_backward(grad_s.to(lam.dtype), basis_a.to(lam.dtype), lam, gamma)
        return None, grad_lam, grad_gamma


def _accumulation_dtype(lam: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when the adapter itself is fp64: the dense update is never formed in half precision."""
    return torch.promote_types(lam.dtype, torch.float32)


def dense_update(
    basis_a: torch.Tensor, flat_b: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, scaling: float,
    input_is_small: bool, row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ΔW`` (out × in) in fp32 (fp64 if λ is fp64) from the layer's sliced bases and its λ, γ.

    ``row_scale`` (out) and ``col_scale`` (in), used by ``basis="fisher"``, give ``diag(u) ΔW diag(v)``.
    """
    dtype = _accumulation_dtype(lam)
    s = _scale(basis_a.to(dtype), lam.to(dtype), gamma.to(dtype))
    product = flat_b.to(dtype) @ s  # (D, d)
    product = product if input_is_small else product.T
    product.mul_(scaling)
    return _apply_scales(product, row_scale, col_scale)


def _apply_scales(matrix: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
    """``diag(row) · matrix · diag(col)`` in place (either may be None)."""
    if row is not None:
        matrix.mul_(row.to(matrix.dtype)[:, None])
    if col is not None:
        matrix.mul_(col.to(matrix.dtype)[None, :])
    return matrix


class _MergedRandLora(torch.autograd.Function):
    """``y = x (W + ΔW)ᵀ + bias`` (or ``x ΔWᵀ`` when ``weight`` is None) with ΔW rebuilt in the backward, never saved.

    Gradients: the input's (through ``W + ΔW``), λ and γ (through ``dΔW = gᵀ x`` contracted with the bases), and the
    base weight/bias only if they require grad. The random bases get none.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, basis_a: torch.Tensor,
        flat_b: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, scaling: float, input_is_small: bool,
        row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        delta = dense_update(basis_a, flat_b, lam, gamma, scaling, input_is_small, row_scale, col_scale)
        matrix = delta if weight is None else delta.add_(weight)
        out = F.linear(x, matrix.to(x.dtype), bias if weight is not None else None)
        ctx.save_for_backward(x, weight, basis_a, flat_b, lam, gamma, row_scale, col_scale)
        ctx.scaling, ctx.input_is_small, ctx.has_bias = scaling, input_is_small, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight, basis_a, flat_b, lam, gamma, row_scale, col_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = grad_lam = grad_gamma = None
        if needs[0]:
            matrix = dense_update(basis_a, flat_b, lam, gamma, ctx.scaling, ctx.input_is_small, row_scale, col_scale)
            if weight is not None:
                matrix.add_(weight)
            grad_x = grad_out @ matrix.to(grad_out.dtype)
            del matrix
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if needs[1] or needs[5] or needs[6]:
            grad_delta = g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)  # (out, in)
            if needs[1]:
                grad_weight = grad_delta.to(weight.dtype)
            if needs[5] or needs[6]:
                dtype = _accumulation_dtype(lam)
                gd = _apply_scales(grad_delta.to(dtype, copy=True), row_scale, col_scale)
                gd = gd if ctx.input_is_small else gd.T  # (D, d)
                grad_s = (flat_b.to(dtype).T @ gd).mul_(ctx.scaling)  # (R, d)
                grad_lam, grad_gamma = _scale_backward(grad_s, basis_a.to(dtype), lam.to(dtype), gamma.to(dtype))
                grad_lam, grad_gamma = grad_lam.to(lam.dtype), grad_gamma.to(gamma.dtype)
        if needs[2] and ctx.has_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_weight, grad_bias, None, None, grad_lam, grad_gamma, None, None, None, None


def _is_4bit(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Params4bit"


class _BasisRef:
    """A plain (non-module) handle on the tuner's shared bases, so layers do not register them (no per-layer copy)."""

    def __init__(self, store_a: nn.Module, store_b: nn.Module) -> None:
        self.store_a, self.store_b = store_a, store_b

    def get(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.store_a, adapter), getattr(self.store_b, adapter)


class FastRandLoraLayer(BaseTunerLayer):
    """Adapter state of one layer: λ, γ per adapter (trainable), a reference to the shared bases (not stored here)."""

    adapter_layer_names = ("randlora_lambda", "randlora_gamma")
    other_param_names = (
        "r", "scaling", "randlora_dropout", "num_bases", "contraction", "randlora_row_scale", "randlora_col_scale",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.num_bases: dict[str, int] = {}
        self.contraction: dict[str, str] = {}
        self.randlora_dropout = nn.ModuleDict({})
        self.randlora_lambda = nn.ParameterDict({})
        self.randlora_gamma = nn.ParameterDict({})
        # basis="fisher" only: fixed per-layer row (out) and column (in) scales, saved with the adapter
        self.randlora_row_scale = BufferDict({}, persistent=True)
        self.randlora_col_scale = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.last_contraction: str | None = None  # which path the last forward took (for tests and benchmarks)
        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            shape = base.weight.ds_shape if hasattr(base.weight, "ds_shape") else base.weight.shape
            in_features, out_features = shape
        else:
            in_features, out_features = base.in_features, base.out_features
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.kwargs = kwargs

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, adapter_name: str, bases: _BasisRef, config, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` (λ, γ initialised as PEFT does: λ = 0, γ = 1 / max(γ.shape))."""
        r = config.r
        small = min(self.in_features, self.out_features)
        if r > small:
            raise ValueError(
                f"r={r} exceeds min(in_features, out_features)={small} of a targeted layer: RandLoRA needs r ≤ the "
                "smaller dimension of every targeted layer. Lower r or exclude that layer from target_modules."
            )
        object.__setattr__(self, "_bases", bases)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.randlora_alpha / r
        n_bases = -(-small // r)
        self.num_bases[adapter_name] = n_bases
        self.contraction[adapter_name] = config.contraction
        self.randlora_dropout[adapter_name] = (
            nn.Dropout(p=config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        )
        self.randlora_lambda[adapter_name] = nn.Parameter(torch.randn(r, n_bases))
        self.randlora_gamma[adapter_name] = nn.Parameter(torch.ones(n_bases, small) / max(n_bases, small))
        if config.init_weights:
            with torch.no_grad():
                self.randlora_lambda[adapter_name].zero_()
        if getattr(config, "basis", "random") == "fisher":  # identity until initialize_fisher_basis sets them
            self.randlora_row_scale[adapter_name] = torch.ones(self.out_features)
            self.randlora_col_scale[adapter_name] = torch.ones(self.in_features)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---- the function ----------------------------------------------------------------------------------------
    def _layer_bases(self, adapter: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        basis_a, basis_b = self._bases.get(adapter)
        small, large = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        a, b = _sliced_bases(basis_a, basis_b, small, large, self.num_bases[adapter])
        return a.to(device), b.to(device)

    def _scales(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(row, column) scales of a ``basis="fisher"`` adapter, else (None, None)."""
        if adapter in self.randlora_row_scale:
            return self.randlora_row_scale[adapter], self.randlora_col_scale[adapter]
        return None, None

    @property
    def _input_is_small(self) -> bool:
        return self.in_features <= self.out_features

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base weight's layout (transposed for GPT-2's Conv1D), computed in fp32."""
        lam, gamma = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
        a, b = self._layer_bases(adapter, lam.device)
        delta = dense_update(a, b, lam, gamma, self.scaling[adapter], self._input_is_small, *self._scales(adapter))
        return delta.T if getattr(self, "fan_in_fan_out", False) else delta

    def choose_contraction(self, adapter: str, tokens: int, *, grad: bool, fold: bool) -> str:
        """``merged`` or ``per_token`` for this adapter and batch (the config's choice, or the cheaper one)."""
        choice = self.contraction[adapter]
        if self.training and not isinstance(self.randlora_dropout[adapter], nn.Identity):
            return "per_token"  # dropout acts on the adapter's input only: the dense form cannot express it
        if choice != "auto":
            return choice
        rank = self.r[adapter] * self.num_bases[adapter]
        costs = contraction_costs(tokens, self.in_features, self.out_features, rank, grad=grad, fold=fold)
        return "merged" if costs["merged"] < costs["per_token"] else "per_token"


class Linear(nn.Module, FastRandLoraLayer):
    """Fast RandLoRA around an ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, bases: _BasisRef, config, **kwargs) -> None:
        nn.Module.__init__(self)
        FastRandLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, bases, config)

    def _foldable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        base = self.get_base_layer()
        return (
            type(base) is nn.Linear
            and not args
            and not kwargs
            and base.weight.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float64)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.randlora_lambda]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        compute_dtype = x.dtype if x.dtype == torch.float64 or x.device.type != "cpu" else torch.float32
        tokens = x.numel() // max(x.shape[-1], 1)
        fold_ok = self._foldable(x, args, kwargs)
        result = None
        paths = []
        for adapter in active:
            lam, gamma = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
            grad = torch.is_grad_enabled() and (lam.requires_grad or gamma.requires_grad or x.requires_grad)
            fold = fold_ok and result is None
            path = self.choose_contraction(adapter, tokens, grad=grad, fold=fold)
            paths.append(path)
            a, b = self._layer_bases(adapter, x.device)
            scaling, small_in = self.scaling[adapter], self._input_is_small
            row, col = self._scales(adapter)
            if path == "merged":
                args_ = (a, b, lam, gamma, scaling, small_in, row, col)
                if fold:
                    base = self.get_base_layer()
                    result = _MergedRandLora.apply(x, base.weight, base.bias, *args_)
                    continue
                delta = _MergedRandLora.apply(x.to(compute_dtype), None, None, *args_)
            else:
                s = _ScaledBasis.apply(a.to(lam.dtype), lam, gamma).to(compute_dtype)
                h = self.randlora_dropout[adapter](x.to(compute_dtype))
                if col is not None:
                    h = h * col.to(compute_dtype)
                if small_in:
                    delta = F.linear(F.linear(h, s), b.to(compute_dtype)) * scaling
                else:
                    delta = F.linear(F.linear(h, b.T.to(compute_dtype)), s.T) * scaling
                if row is not None:
                    delta = delta * row.to(compute_dtype)
            if result is None:
                result = self.base_layer(x, *args, **kwargs)
            result = result + delta
        self.last_contraction = paths[0] if len(set(paths)) == 1 else ",".join(paths)
        return result.to(previous_dtype)

    # ---- merging --------------------------------------------------------------------------------------------
    def _dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense fp32 (fp64 stays fp64) tensor; 4-bit bitsandbytes weights are dequantized."""
        weight = self.get_base_layer().weight
        if _is_4bit(weight):
            import bitsandbytes as bnb

            return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
        return weight.data.to(torch.promote_types(weight.dtype, torch.float32))

    def _store_base_weight(self, dense: torch.Tensor) -> None:
        """Write ``dense`` back into the base weight, re-quantizing (same 4-bit settings) where the base is 4-bit."""
        base = self.get_base_layer()
        weight = base.weight
        if _is_4bit(weight):
            import bitsandbytes as bnb

            requantized = bnb.nn.Params4bit(
                dense.to("cpu"), requires_grad=False, blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                quant_storage=weight.quant_storage, module=base,
            )
            base.weight = requantized.to(weight.device)
        else:
            weight.data = dense.to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' ΔW to the base weight (checked for NaN/inf first if ``safe_merge``).

        A 4-bit base is dequantized, updated and re-quantized, so merging it is exact only up to 4-bit rounding.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.randlora_lambda:
                continue
            delta = self.get_delta_weight(adapter)
            merged = self._dense_base_weight().to(delta.dtype) + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._store_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ΔW again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.randlora_lambda:
                delta = self.get_delta_weight(adapter)
                self._store_base_weight(self._dense_base_weight().to(delta.dtype) - delta)

    def __repr__(self) -> str:
        return "fast_randlora." + super().__repr__()
