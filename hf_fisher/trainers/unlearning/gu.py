"""GU projection ("Geometric-Disentanglement Unlearning"): remove from every optimizer update its component along
recent retain gradients, so that the retain loss is unchanged to first order.

Per parameter tensor we keep a FIFO history of the last ``k`` retain gradients (all-reduced across processes,
averaged over accumulation steps). After the optimizer computes its update ``Δ`` (the *realised* update, e.g.
AdamW's, weight decay included) we replace it by

``Δ' = P^{1/2} (I - Q Qᵀ) P^{-1/2} Δ``,  with ``Q`` an orthonormal basis of ``{P^{1/2} g_i}``,

where ``P = diag(1 / (sqrt(v̂) + ε))`` is Adam's preconditioner (identity for optimizers without second
moments). Then ``g_iᵀ Δ' = 0`` for every stored retain gradient (no first-order change of the retain loss), and
``Δ'`` is the closest such update to ``Δ`` in Adam's metric ``‖P^{-1/2}(·)‖`` — an update that already satisfies
the constraints is left unchanged. The projection runs in an optimizer *step hook*, on the update the optimizer
really applied (the method's first public code overrode a Trainer method that transformers never calls, so its
projection never ran); the history is saved in checkpoints so that a resumed run projects identically.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def project_update(delta: torch.Tensor, retain_grads: Iterable[torch.Tensor],
                   metric_sqrt: torch.Tensor | None = None, tolerance: float = 1e-10,
                   chunk_size: int = 1 << 16) -> torch.Tensor:
    """``Δ'`` of the module docstring for one tensor (returns ``delta``'s dtype).

    ``metric_sqrt`` is ``P^{1/2}`` (elementwise, ``delta``'s shape); ``None`` means the identity. Directions of
    the retain gradients whose singular value is below ``tolerance``·max (numerically dependent gradients) are
    dropped. The ``k`` gradients are processed as ``k × chunk_size`` blocks (cache-sized, no ``k × n`` copy):
    one pass forms their Gram matrix (accumulated in fp64, eigendecomposed in fp64), two more remove the
    component in their span and then what rounding left of it; arithmetic in fp64."""
    grads = [g.detach().reshape(-1) for g in retain_grads]
    if not grads:
        return delta
    # fp64: fp32 rounding in the Gram matrix turns near-dependent gradients into noise directions
    u = delta.detach().reshape(-1).to(torch.float64, copy=True)
    scale = None if metric_sqrt is None else metric_sqrt.detach().reshape(-1).to(torch.float64)
    if scale is not None:
        u.div_(scale)
    spans = [(s, min(s + chunk_size, u.numel())) for s in range(0, u.numel(), chunk_size)]

    def block(s: int, e: int) -> torch.Tensor:
        b = torch.stack([g[s:e] for g in grads]).to(torch.float64)
        return b.mul_(scale[s:e]) if scale is not None else b

    gram = torch.zeros(len(grads), len(grads), dtype=torch.float64, device=u.device)
    along = torch.zeros(len(grads), dtype=torch.float64, device=u.device)
    for s, e in spans:
        b = block(s, e)
        gram += b @ b.T
        along += b @ u[s:e]
    evals, evecs = torch.linalg.eigh(gram)
    top = float(evals.max())
    if top <= 0.0:
        return delta
    keep = evals > (tolerance**2) * top
    basis_map = evecs[:, keep] / evals[keep].sqrt()  # (stacked gradients)ᵀ @ basis_map is orthonormal
    for refine in (True, False):  # twice is enough (Kahan-Parlett)
        coefficients = basis_map @ (basis_map.T @ along)
        along = torch.zeros_like(along)
        for s, e in spans:
            b = block(s, e)
            u[s:e] -= coefficients @ b
            if refine:
                along += b @ u[s:e]
    if scale is not None:
        u.mul_(scale)
    return u.reshape(delta.shape).to(delta.dtype)


def adam_metric_sqrt(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> torch.Tensor | None:
    """``P^{1/2} = (sqrt(v̂) + ε)^{-1/2}`` from an Adam-type optimizer's state for ``param`` (``None`` without
    second moments, e.g. SGD: the identity metric)."""
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return None
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta2, eps = group.get("betas", (0.9, 0.999))[1], group.get("eps", 1e-8)
    step = float(state["step"]) if "step" in state else 1.0
    v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**step)
    return (v_hat.sqrt() + eps).rsqrt()


class GUProjector:
    """Retain-gradient history and the optimizer hooks that project each realised update (see the module)."""

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], history_size: int = 8):
        if history_size < 1:
            raise ValueError(f"the GU history needs at least one retain gradient, got {history_size}")
        self.params = dict(named_parameters)
        self.history_size = history_size
        self.history: dict[str, deque[torch.Tensor]] = {n: deque(maxlen=history_size) for n in self.params}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_count = 0
        self._before: dict[str, torch.Tensor] = {}
        self.last_update: dict[str, torch.Tensor] = {}

    def add_retain_gradient(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Accumulate one micro-batch's retain gradient; pushed to the history at the next optimizer step."""
        for name, g in grads.items():
            if name in self._pending:
                self._pending[name] += g.detach().float()
            else:
                self._pending[name] = g.detach().float().clone()
        self._pending_count += 1

    def push_pending(self, reduce=None) -> None:
        """Average the accumulated retain gradients (``reduce`` all-reduces across processes) into the history."""
        if not self._pending_count:
            return
        for name, g in self._pending.items():
            g = g / self._pending_count
            if reduce is not None:
                g = reduce(g)
            self.history[name].append(g)
        self._pending, self._pending_count = {}, 0

    def attach(self, optimizer: torch.optim.Optimizer, reduce=None) -> list:
        """Register the pre/post step hooks on ``optimizer``; returns their handles."""

        def before(opt, args, kwargs):
            self._before = {n: p.detach().clone() for n, p in self.params.items()}

        @torch.no_grad()
        def after(opt, args, kwargs):
            self.push_pending(reduce)
            self.last_update = {}
            for name, param in self.params.items():
                delta = param.detach() - self._before[name]
                if self.history[name]:
                    delta = project_update(delta, self.history[name], adam_metric_sqrt(opt, param))
                    param.copy_(self._before[name] + delta)
                self.last_update[name] = delta
            self._before = {}

        return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The history as flat tensors (``<name>::<i>``), for safetensors checkpoints."""
        return {f"{name}::{i}": g.contiguous() for name, grads in self.history.items() for i, g in enumerate(grads)}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in self.history:
            self.history[name].clear()
        for key in sorted(tensors, key=lambda k: (k.rsplit("::", 1)[0], int(k.rsplit("::", 1)[1]))):
            name = key.rsplit("::", 1)[0]
            if name not in self.history:
                raise ValueError(f"the saved GU history has {name!r}, which this model does not train")
            self.history[name].append(tensors[key].float())
