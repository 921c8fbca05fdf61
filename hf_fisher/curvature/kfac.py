"""K-FAC: Kronecker-factored Fisher / Gauss-Newton of the linear layers of a causal LM.

For a linear layer with weight ``W`` (out × in) the Fisher block is approximated as ``A ⊗ G`` acting on
the column-major ``vec(∇W)``, i.e. ``F · vec(V) = vec(G V A)``, with

* ``A = E[a aᵀ]`` over layer inputs (a ones entry appended when the layer has a bias, so ``[∇W, ∇b]``
  is treated as one (out × in+1) matrix), and
* ``G = E[g gᵀ]`` over gradients of the sequence loss w.r.t. the layer outputs.

Sequence models share weights over tokens; following Eschenhagen et al. (2023):

* ``"expand"`` treats every supervised token as a sample:
  ``A = (1/M) Σ_tokens a aᵀ``, ``G = (1/N) Σ_tokens g gᵀ`` (M supervised tokens, N sequences).
* ``"reduce"`` aggregates over the sequence first: ``ā_n`` = mean of ``a`` over the sequence's
  supervised positions, ``ĝ_n`` = sum of ``g`` over them; ``A = (1/N) Σ ā āᵀ``, ``G = (1/N) Σ ĝ ĝᵀ``.

Either way ``A ⊗ G`` approximates the per-sequence Fisher of :mod:`hf_fisher.curvature.diagonal`
(same normalisation). Only positions whose prediction is supervised enter the factors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
    CurvatureEstimate,
    CurvatureMetadata,
    load_curvature,
    model_name_or_path,
    save_curvature,
)

KFACType = Literal["expand", "reduce"]
DampingMethod = Literal["eigenbasis", "per_factor"]

NORMALIZATION = {
    "expand": "A: mean over supervised tokens; G: sum over supervised tokens / number of sequences",
    "reduce": "A: mean over sequences of token-mean inputs; G: mean over sequences of token-summed gradients",
}


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def _block_step(d: int) -> int:
    """Block size for symmetric Gram products: 2-4 blocks for wide matrices, one block otherwise."""
    blocks = 4 if d >= 1024 else 2 if d >= 256 else 1
    return -(-d // blocks)


def accumulate_gram(buffer: torch.Tensor, x: torch.Tensor, with_bias: bool, alpha: float = 1.0) -> None:
    """``buffer += alpha · [x, 1]ᵀ [x, 1]`` on the block upper triangle only (about half the FLOPs).

    The ones column (bias) is never materialised: its entries are column sums and the row count, kept in
    the last column. Call :func:`mirror_upper_blocks` once at the end to fill the lower triangle.
    """
    x = x.float()
    d = x.shape[1]
    step = _block_step(d)
    for i in range(0, d, step):  # block row i, from the diagonal block rightwards, straight into the buffer
        end = min(i + step, d)
        buffer[i:end, i:d].addmm_(x[:, i:end].T, x[:, i:], alpha=alpha)
    if with_bias:
        buffer[:d, d].add_(x.sum(dim=0), alpha=alpha)
        buffer[d, d] += alpha * x.shape[0]


def mirror_upper_blocks(buffer: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """Complete a matrix filled by :func:`accumulate_gram`: copy its block upper triangle below the diagonal."""
    d = buffer.shape[0] - int(with_bias)
    step = _block_step(d)
    for i in range(0, d, step):
        end = min(i + step, d)  # diagonal blocks are complete already
        buffer[end:d, i:end] = buffer[i:end, end:d].T
    if with_bias:
        buffer[d, :d] = buffer[:d, d]
    return buffer


def _same_storage(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype


class _FactorInput:
    """Select and aggregate the positions that enter the factors ("expand" or "reduce")."""

    def __init__(self, kfac_type: KFACType):
        self.kfac_type = kfac_type

    def _select(self, collector: CurvatureCollector, x: torch.Tensor, mean: bool) -> torch.Tensor:
        batch = collector.batch
        assert batch is not None
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.kfac_type == "expand":
            return x[batch.mask]
        keep = batch.counts > 0
        summed = (x.float() * batch.mask.unsqueeze(-1)).sum(dim=1)[keep]
        return summed / batch.counts[keep].unsqueeze(-1) if mean else summed

    def inputs(self, collector: CurvatureCollector, a: torch.Tensor) -> torch.Tensor:
        """Layer inputs at supervised positions ("expand") or their mean per sequence ("reduce")."""
        return self._select(collector, a, mean=True)

    def output_grads(self, collector: CurvatureCollector, g: torch.Tensor) -> torch.Tensor:
        """Output gradients at supervised positions ("expand") or their sum per sequence ("reduce")."""
        return self._select(collector, g, mean=False)

    def accumulate(
        self, collector: CurvatureCollector, buffer: torch.Tensor, x: torch.Tensor, with_bias: bool, mean: bool
    ) -> None:
        """Add one batch's factor contribution: the Gram matrix of the selected (or aggregated) rows.

        For "expand" with few unsupervised positions (packed text: one per sequence), the Gram of all rows
        minus the Gram of the excluded rows avoids copying the selected rows out of ``x``.
        """
        batch = collector.batch
        assert batch is not None
        if self.kfac_type == "expand":
            flat = x.reshape(-1, x.shape[-1])
            n_excluded = batch.n_excluded
            if 8 * n_excluded <= flat.shape[0]:
                accumulate_gram(buffer, flat, with_bias)
                if n_excluded:
                    accumulate_gram(buffer, flat[~batch.mask.reshape(-1)], with_bias, alpha=-1.0)
                return
        accumulate_gram(buffer, self._select(collector, x, mean), with_bias)


class _KFACCollector(CurvatureCollector):
    """Sums of input and output-gradient outer products, accumulated in place (block upper triangles).

    Layers fed the very same input tensor (q/k/v, gate/up) share one A buffer, computed once per batch; the
    sharing is found on the first batch and checked on every later one.
    """

    def __init__(self, layers: dict[str, TargetLayer], kfac_type: KFACType):
        super().__init__(layers)
        self.select = _FactorInput(kfac_type)
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.A_owner: dict[str, str] = {}  # layer -> layer whose A buffer it shares (itself if none)
        # The last input seen and the layer that owns its A. Holding the tensor keeps its memory alive,
        # so its address cannot be reused by another input within the batch.
        self._last: tuple[torch.Tensor, TargetLayer] | None = None

    @staticmethod
    def _zeros(d: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(d, d, dtype=torch.float32, device=like.device)

    def on_input(self, layer: TargetLayer, a: torch.Tensor) -> None:
        last = self._last
        same = last is not None and last[1].has_bias == layer.has_bias and _same_storage(last[0], a)
        owner = self.A_owner.get(layer.name)
        if owner is None:  # first batch: decide sharing
            owner = last[1].name if same else layer.name
            self.A_owner[layer.name] = owner
            if owner == layer.name:
                self.A[layer.name] = self._zeros(layer.in_features + int(layer.has_bias), a)
        elif (owner != layer.name) != same or (same and last[1].name != owner):
            raise RuntimeError(
                f"Layer {layer.name!r} shared its input with {owner!r} on the first batch but not now; the model's "
                "data flow changes between batches. Estimate these layers separately (target_modules)."
            )
        if owner == layer.name:
            self.select.accumulate(self, self.A[layer.name], a, layer.has_bias, mean=True)
            self._last = (a, layer)

    def on_output_grad(self, layer: TargetLayer, g: torch.Tensor) -> None:
        if layer.name not in self.G:
            self.G[layer.name] = self._zeros(layer.out_features, g)
        self.select.accumulate(self, self.G[layer.name], g, False, mean=False)

    def end_batch(self) -> None:
        self._last = None

    def synchronize(self, accelerator: Any) -> None:
        """Adopt the input-sharing map of the processes that saw data, so every process reduces the same list."""
        from hf_fisher.curvature.collect import _all_reduce_sum

        names = list(self.layers)
        index = {name: i for i, name in enumerate(names)}
        device = next(iter(self.layers.values())).module.weight.device
        owners = torch.tensor([index.get(self.A_owner.get(n, ""), -1) for n in names], device=device)
        _all_reduce_sum([owners], accelerator, op="max")
        for name, owner in zip(names, owners.tolist(), strict=True):
            owner_name = names[owner] if owner >= 0 else name
            if self.A_owner.get(name, owner_name) != owner_name:
                raise RuntimeError(f"Processes disagree on which layer's input {name!r} shares; cannot reduce.")
            self.A_owner[name] = owner_name
            if owner_name != name:
                self.A.pop(name, None)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Completed (mirrored) sums, one per owned A and per G; missing ones (no data here) are zeros."""
        out = {}
        for layer in self.layers.values():
            if self.A_owner.setdefault(layer.name, layer.name) == layer.name:
                if layer.name not in self.A:
                    self.A[layer.name] = self._zeros(layer.in_features + int(layer.has_bias), layer.module.weight)
                out[f"{layer.name}.A"] = mirror_upper_blocks(self.A[layer.name], layer.has_bias)
            if layer.name not in self.G:
                self.G[layer.name] = self._zeros(layer.out_features, layer.module.weight)
            out[f"{layer.name}.G"] = mirror_upper_blocks(self.G[layer.name], False)
        return out

    def factor_A(self, name: str) -> torch.Tensor:
        """The (unnormalised) A sum of a layer; layers sharing a buffer get their own copy."""
        owner = self.A_owner[name]
        return self.A[owner] if owner == name else self.A[owner].clone()


class _EigenCorrectionCollector(CurvatureCollector):
    """EK-FAC: second moments of the gradient in the Kronecker eigenbasis, ``Σ (Q_Gᵀg)² (Q_Aᵀa)²ᵀ``."""

    def __init__(self, layers: dict[str, TargetLayer], kfac_type: KFACType, factors: KFACFactors):
        super().__init__(layers)
        self.select = _FactorInput(kfac_type)
        self.factors = factors
        self.inputs: dict[str, torch.Tensor] = {}
        self.sums = {
            name: torch.zeros(
                layer.out_features,
                layer.in_features + int(layer.has_bias),
                dtype=torch.float32,
                device=layer.module.weight.device,
            )
            for name, layer in layers.items()
        }

    def on_input(self, layer: TargetLayer, a: torch.Tensor) -> None:
        x = self.select.inputs(self, a).float()
        if layer.has_bias:
            x = _with_ones(x)
        self.inputs[layer.name] = x @ self.factors[layer.name].eigenvectors_A.to(x.device)

    def on_output_grad(self, layer: TargetLayer, g: torch.Tensor) -> None:
        x = self.inputs.pop(layer.name)
        y = self.select.output_grads(self, g).float() @ self.factors[layer.name].eigenvectors_G.to(g.device)
        self.sums[layer.name].add_(y.square().T @ x.square())

    def end_batch(self) -> None:
        self.inputs.clear()

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.sums


@dataclass
class KFACLayer:
    """The Kronecker factors of one linear layer, and their eigen-decomposition once computed."""

    A: torch.Tensor  # (in [+1], in [+1])
    G: torch.Tensor  # (out, out)
    has_bias: bool
    transposed: bool = False  # weight stored (in, out), as in transformers' Conv1D
    eigenvalues_A: torch.Tensor | None = None
    eigenvectors_A: torch.Tensor | None = None
    eigenvalues_G: torch.Tensor | None = None
    eigenvectors_G: torch.Tensor | None = None
    eigenvalue_correction: torch.Tensor | None = None  # EK-FAC: (out, in [+1])

    @property
    def in_features(self) -> int:
        return self.A.shape[0] - int(self.has_bias)

    @property
    def out_features(self) -> int:
        return self.G.shape[0]


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``eigh`` (half the time of fp64 at these sizes; the damping K-FAC is used with dwarfs fp32's
    ``1e-7 · ‖F‖`` eigenvalue error); tiny negative values clipped."""
    values, vectors = torch.linalg.eigh(matrix.float())
    return values.clamp_min(0.0), vectors


class KFACFactors(CurvatureEstimate[KFACLayer]):
    """K-FAC factors per linear layer (indexable by module name) and the operations built on them."""

    FILENAME = "kfac.safetensors"
    CURVATURE_TYPE = "kfac"
    ENTRY = "K-FAC factors"

    @property
    def has_eigenvalue_correction(self) -> bool:
        return all(layer.eigenvalue_correction is not None for layer in self._entries.values())

    def eigendecompose(self) -> KFACFactors:
        """Eigen-decompose every A and G (fp32 ``eigh``). Layers fed the same input (q/k/v, gate/up) have equal
        A factors, decomposed once and shared."""
        previous: KFACLayer | None = None
        for layer in self._entries.values():
            if layer.eigenvectors_A is None:
                if (previous is not None and previous.A.shape == layer.A.shape
                        and (previous.A is layer.A or torch.equal(previous.A, layer.A))):
                    layer.eigenvalues_A, layer.eigenvectors_A = previous.eigenvalues_A, previous.eigenvectors_A
                else:
                    layer.eigenvalues_A, layer.eigenvectors_A = _eigh(layer.A)
                layer.eigenvalues_G, layer.eigenvectors_G = _eigh(layer.G)
            previous = layer
        return self

    def _as_matrix(self, name: str, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        layer = self._entries[name]
        weight = grads[f"{name}.weight"].float()
        if layer.transposed:
            weight = weight.T
        if not layer.has_bias:
            return weight
        bias_name = f"{name}.bias"
        if bias_name not in grads:
            raise KeyError(
                f"Layer {name!r} has a bias in the K-FAC factors but grads has no {bias_name!r}; pass the "
                "bias gradient too (zeros if the bias is frozen)."
            )
        return torch.cat([weight, grads[bias_name].float().unsqueeze(1)], dim=1)

    def _from_matrix(self, name: str, matrix: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict:
        layer = self._entries[name]
        out: dict[str, torch.Tensor] = {}
        weight = matrix[:, : layer.in_features]
        if layer.transposed:
            weight = weight.T
        w_like = like[f"{name}.weight"]
        out[f"{name}.weight"] = weight.to(w_like.dtype).reshape(w_like.shape)
        if layer.has_bias:
            b_like = like[f"{name}.bias"]
            out[f"{name}.bias"] = matrix[:, layer.in_features].to(b_like.dtype)
        return out

    def precondition(
        self,
        grads: Mapping[str, torch.Tensor] | nn.Module,
        damping: float,
        method: DampingMethod = "eigenbasis",
        use_eigenvalue_correction: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Apply the damped inverse curvature to gradients, layer by layer.

        ``grads`` maps parameter names (``"<module>.weight"``, ``"<module>.bias"``) to gradients, or is a
        model whose ``.grad`` fields are read. Layers absent from ``grads`` are skipped.

        * ``method="eigenbasis"``: ``(A ⊗ G + λI)⁻¹ vec(∇)``, one damping on the Kronecker eigenvalues
          ``λ_G,i λ_A,j`` (replaced by the EK-FAC corrected eigenvalues when present and
          ``use_eigenvalue_correction``).
        * ``method="per_factor"``: ``(G + λI)⁻¹ ∇W (A + λI)⁻¹``, damping added to each factor.
        """
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}.")
        if method not in ("eigenbasis", "per_factor"):
            raise ValueError(f'method must be "eigenbasis" or "per_factor", got {method!r}.')

        def divide(rotated: torch.Tensor, layer: KFACLayer) -> torch.Tensor:
            if method == "per_factor":
                la, lg = layer.eigenvalues_A.to(rotated.device), layer.eigenvalues_G.to(rotated.device)
                return rotated / torch.outer(lg + damping, la + damping)
            return rotated / (self._spectrum(layer, use_eigenvalue_correction, rotated.device) + damping)

        return self._in_eigenbasis(grads, divide)

    def multiply(
        self, vectors: Mapping[str, torch.Tensor] | nn.Module, use_eigenvalue_correction: bool = True
    ) -> dict[str, torch.Tensor]:
        """The curvature times ``vectors``, layer by layer: ``(A ⊗ G) vec(V) = G V A`` (or the EK-FAC corrected
        spectrum in the Kronecker eigenbasis). ``vᵀ (A ⊗ G) v`` is the predicted second-order change of the
        loss (the mean KL, for a sampled-label Fisher) along ``v``."""
        return self._in_eigenbasis(
            vectors, lambda rotated, layer: rotated * self._spectrum(layer, use_eigenvalue_correction, rotated.device)
        )

    @staticmethod
    def _spectrum(layer: KFACLayer, use_eigenvalue_correction: bool, device: torch.device) -> torch.Tensor:
        """Eigenvalues of the Kronecker product (EK-FAC's corrected ones when present and asked for)."""
        if use_eigenvalue_correction and layer.eigenvalue_correction is not None:
            return layer.eigenvalue_correction.to(device)
        return torch.outer(layer.eigenvalues_G.to(device), layer.eigenvalues_A.to(device))

    def _in_eigenbasis(self, grads: Mapping[str, torch.Tensor] | nn.Module, transform) -> dict[str, torch.Tensor]:
        """Rotate each layer's matrix into the Kronecker eigenbasis, apply ``transform``, rotate back."""
        if isinstance(grads, nn.Module):
            grads = {n: p.grad for n, p in grads.named_parameters() if p.grad is not None}
        self.eigendecompose()
        result: dict[str, torch.Tensor] = {}
        for name, layer in self._entries.items():
            if f"{name}.weight" not in grads:
                continue
            v = self._as_matrix(name, grads)
            qa = layer.eigenvectors_A.to(v.device)
            qg = layer.eigenvectors_G.to(v.device)
            rotated = transform(qg.T @ v @ qa, layer)
            result.update(self._from_matrix(name, qg @ rotated @ qa.T, grads))
        return result

    def validate(self, model: nn.Module) -> None:
        """Raise if ``model`` lacks a layer of these factors or has it with other dimensions."""
        modules = dict(model.named_modules())
        problems = []
        for name, layer in self._entries.items():
            module = modules.get(name)
            if module is None or not hasattr(module, "weight"):
                problems.append(f"missing layer {name!r}")
                continue
            shape = tuple(module.weight.shape)
            expected = (layer.out_features, layer.in_features)
            if layer.transposed:
                expected = expected[::-1]
            if shape != expected or (getattr(module, "bias", None) is not None) != layer.has_bias:
                problems.append(f"{name}: factors for weight {expected}, bias={layer.has_bias}; model {shape}")
        if problems:
            raise ValueError(
                f"These K-FAC factors do not fit the model ({'; '.join(problems[:5])}). They were estimated on "
                f"{self.metadata.model_name_or_path or 'an unnamed model'}; estimate them again on this model."
            )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``kfac.safetensors`` (A, G and EK-FAC corrections) and ``curvature_config.json``."""
        tensors: dict[str, torch.Tensor] = {}
        layout = {}
        for name, layer in self._entries.items():
            tensors[f"{name}.A"] = layer.A
            tensors[f"{name}.G"] = layer.G
            if layer.eigenvalue_correction is not None:
                tensors[f"{name}.eigenvalue_correction"] = layer.eigenvalue_correction
            layout[name] = {"has_bias": layer.has_bias, "transposed": layer.transposed}
        self.metadata.extra["layers"] = layout
        save_curvature(save_directory, self.FILENAME, tensors, self.metadata)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu"
    ) -> KFACFactors:
        """Load saved factors; with ``model`` given, check that they fit that model."""
        tensors, metadata = load_curvature(directory, cls.FILENAME, cls.CURVATURE_TYPE)
        layers = {}
        for name, info in metadata.extra["layers"].items():
            layers[name] = KFACLayer(
                A=tensors[f"{name}.A"].to(device),
                G=tensors[f"{name}.G"].to(device),
                has_bias=bool(info["has_bias"]),
                transposed=bool(info["transposed"]),
                eigenvalue_correction=(
                    tensors[f"{name}.eigenvalue_correction"].to(device)
                    if f"{name}.eigenvalue_correction" in tensors
                    else None
                ),
            )
        factors = cls(layers, metadata)
        if model is not None:
            factors.validate(model)
        return factors


def _check_factor_sizes(layers: dict[str, TargetLayer], max_factor_bytes: int) -> None:
    for layer in layers.values():
        largest = max(layer.in_features + int(layer.has_bias), layer.out_features)
        size = largest * largest * 4
        if size > max_factor_bytes:
            raise MemoryError(
                f"Layer {layer.name!r} would need a dense {largest} x {largest} K-FAC factor "
                f"({size / 2**30:.1f} GiB in fp32), above max_factor_bytes={max_factor_bytes / 2**30:.1f} GiB. "
                "Exclude it with target_modules (the default already skips the output embeddings), use the "
                "diagonal Fisher for it, or raise max_factor_bytes."
            )


def estimate_kfac(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    kind: FisherKind = "sampled",
    target_modules: str | Iterable[str] | None = None,
    kfac_type: KFACType = "expand",
    eigenvalue_correction: bool = False,
    max_batches: int | None = None,
    accelerator: Any = None,
    seed: int = 0,
    data_description: str | None = None,
    max_factor_bytes: int = 4 << 30,
) -> KFACFactors:
    """Estimate K-FAC factors A = E[a aᵀ] and G = E[g gᵀ] for the target linear layers of a causal LM.

    Args:
        kind: "sampled" (default; labels drawn from the model, so A ⊗ G approximates the Gauss-Newton)
            or "empirical" (the data's labels).
        target_modules: as in :func:`hf_fisher.estimate_diagonal_fisher`.
        kfac_type: "expand" or "reduce" (see the module docstring).
        eigenvalue_correction: also run a second pass for EK-FAC: the Fisher's diagonal in the Kronecker
            eigenbasis replaces the products of factor eigenvalues in ``precondition``.
        accelerator: as in :func:`hf_fisher.estimate_diagonal_fisher` (sums and counts all-reduced).
        max_factor_bytes: refuse layers whose dense factor would exceed this size.
    """
    if kfac_type not in ("expand", "reduce"):
        raise ValueError(f'kfac_type must be "expand" or "reduce", got {kfac_type!r}.')
    layers = find_target_layers(model, target_modules)
    _check_factor_sizes(layers, max_factor_bytes)
    collector = _KFACCollector(layers, kfac_type)
    common = dict(kind=kind, max_batches=max_batches, accelerator=accelerator, seed=seed)
    totals = run_curvature_pass(model, dataloader, collector, description=f"K-FAC ({kfac_type})", **common)
    a_norm = totals.n_tokens if kfac_type == "expand" else totals.n_sequences
    for buffer in collector.A.values():  # each shared buffer once, in place: no second copy of the factors
        buffer.div_(a_norm)
    factors: dict[str, KFACLayer] = {}
    for name, layer in layers.items():
        factors[name] = KFACLayer(
            A=collector.factor_A(name),
            G=collector.G[name].div_(totals.n_sequences),
            has_bias=layer.has_bias,
            transposed=layer.transposed,
        )
    del collector
    check_finite({f"{n} (A)": f.A for n, f in factors.items()} | {f"{n} (G)": f.G for n, f in factors.items()})
    first = next(iter(layers.values())).module.weight
    metadata = CurvatureMetadata(
        curvature_type=KFACFactors.CURVATURE_TYPE,
        kind=kind,
        n_sequences=totals.n_sequences,
        n_tokens=totals.n_tokens,
        normalization=NORMALIZATION[kfac_type],
        model_name_or_path=model_name_or_path(model),
        data_description=data_description,
        kfac_type=kfac_type,
        model_dtype=str(first.dtype).removeprefix("torch."),
        seed=seed,
    )
    result = KFACFactors(factors, metadata)
    if eigenvalue_correction:
        result.eigendecompose()
        corrector = _EigenCorrectionCollector(layers, kfac_type, result)
        # Same seed: with kind="sampled" the second pass draws the same labels on the same data order.
        second = run_curvature_pass(model, dataloader, corrector, description="EK-FAC correction", **common)
        for name in layers:
            result[name].eigenvalue_correction = corrector.sums[name] / second.n_sequences
        check_finite({f"{n} (EK-FAC)": f.eigenvalue_correction for n, f in result.items()})
        metadata.extra["eigenvalue_correction"] = True
    return result
