"""Online diagonal Fisher: a running mean or EMA of squared gradients, accumulated during training.

Where :func:`~hf_fisher.curvature.estimate_diagonal_fisher` makes a dedicated pass over data, this
accumulator consumes gradients that training computes anyway (one update per optimizer step), so the
Fisher of the fine-tuned model comes for free. Its raw state round-trips exactly through
safetensors, so a resumed run continues the very same estimate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from hf_fisher.curvature.diagonal import DiagonalFisher
from hf_fisher.curvature.store import CurvatureMetadata

OnlineMode = Literal["mean", "ema"]

STATE_FILENAME = "online_fisher_state.safetensors"
STATE_CONFIG = "online_fisher_state.json"

NORMALIZATION = (
    "online: {mode} over optimizer steps of the squared gradient of the training loss (the effective batch's "
    "gradient, after gradient accumulation and the all-reduce across processes){correction}"
)


class OnlineDiagonalFisher:
    """Running mean (``mode="mean"``) or exponential moving average (``mode="ema"``) of squared gradients.

    ``update(grads)`` folds one gradient per tensor into the estimate; :meth:`to_diagonal_fisher`
    returns it as a :class:`DiagonalFisher` (the EMA bias-corrected by ``1 - decay**steps``, as in Adam).
    Accumulators are fp32 whatever the gradients' dtype.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, mode: OnlineMode = "ema", decay: float = 0.99,
                 device: torch.device | str = "cpu"):
        if mode not in ("mean", "ema"):
            raise ValueError(f'mode must be "mean" or "ema", got {mode!r}.')
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must lie strictly between 0 and 1 (e.g. 0.99), got {decay}.")
        if not shapes:
            raise ValueError("OnlineDiagonalFisher needs at least one tensor to track; got none.")
        self.mode: OnlineMode = mode
        self.decay = float(decay)
        self.steps = 0
        self.state = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}

    @torch.no_grad()
    def update(self, grads: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
        """Fold in one step's gradients (divided by ``scale``, e.g. a mixed-precision loss scale).

        Every tracked tensor must be present; a missing gradient (a parameter unused this step)
        counts as zero.
        """
        unknown = set(grads) - set(self.state)
        if unknown:
            raise KeyError(f"Gradients for untracked tensors {sorted(unknown)[:5]}; track them at construction.")
        self.steps += 1
        for name, acc in self.state.items():
            grad = grads.get(name)
            sq = torch.zeros_like(acc) if grad is None else grad.detach().to(acc.device, torch.float32).square()
            if scale != 1.0:
                sq.div_(scale * scale)
            if self.mode == "mean":
                acc.add_(sq.sub_(acc), alpha=1.0 / self.steps)
            else:
                acc.mul_(self.decay).add_(sq, alpha=1.0 - self.decay)

    def to_diagonal_fisher(self, *, model_name_or_path: str | None = None,
                           data_description: str | None = None) -> DiagonalFisher:
        """The current estimate as a :class:`DiagonalFisher` (bias-corrected for the EMA)."""
        if self.steps == 0:
            raise ValueError("The online Fisher has seen no gradient yet; train for at least one step first.")
        correction = 1.0 if self.mode == "mean" else 1.0 - self.decay**self.steps
        entries = {k: v / correction for k, v in self.state.items()}
        metadata = CurvatureMetadata(
            curvature_type=DiagonalFisher.CURVATURE_TYPE,
            kind="empirical",
            n_sequences=0,
            n_tokens=0,
            normalization=NORMALIZATION.format(
                mode="running mean" if self.mode == "mean" else f"exponential moving average (decay {self.decay})",
                correction="" if self.mode == "mean" else ", bias-corrected by 1 - decay**steps",
            ),
            model_name_or_path=model_name_or_path,
            data_description=data_description,
            reduction="batch",
            extra={"online": {"mode": self.mode, "decay": self.decay, "steps": self.steps}},
        )
        return DiagonalFisher(entries, metadata)

    def save_pretrained(self, save_directory: str | os.PathLike, **fisher_metadata: str | None) -> None:
        """Write the estimate (a loadable :class:`DiagonalFisher`) and the exact raw state for resuming."""
        out = Path(save_directory)
        if self.steps:
            self.to_diagonal_fisher(**fisher_metadata).save_pretrained(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state.items()}, str(out / STATE_FILENAME))
        (out / STATE_CONFIG).write_text(json.dumps({"mode": self.mode, "decay": self.decay, "steps": self.steps}))

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore the raw state written by :meth:`save_pretrained` (bit-exact), checking that it fits."""
        folder = Path(directory)
        if not (folder / STATE_FILENAME).is_file():
            raise FileNotFoundError(f"No {STATE_FILENAME} in {str(folder)!r}: no online Fisher was saved there.")
        config = json.loads((folder / STATE_CONFIG).read_text())
        if config["mode"] != self.mode or float(config["decay"]) != self.decay:
            raise ValueError(
                f"The saved online Fisher in {str(folder)!r} is {config['mode']} (decay {config['decay']}), but this "
                f"run uses {self.mode} (decay {self.decay}); resume with the same online_fisher settings."
            )
        tensors = load_file(str(folder / STATE_FILENAME))
        if set(tensors) != set(self.state) or any(tensors[k].shape != v.shape for k, v in self.state.items()):
            raise ValueError(
                f"The saved online Fisher in {str(folder)!r} tracks other tensors than this run "
                f"({len(tensors)} saved vs {len(self.state)} trainable); resume with the same model and adapter."
            )
        for name, acc in self.state.items():
            acc.copy_(tensors[name])
        self.steps = int(config["steps"])


class FrozenWeightGradients:
    """Gradients ``∂L/∂W`` of frozen linear weights, built from hooks as ``gᵀa`` during ordinary backward passes.

    Under LoRA the base weights are frozen, so autograd never forms their gradient, yet it is exactly the
    gradient with respect to the adapter's weight change ΔW that a Fisher of the adapted layers needs.
    ``modules`` maps the Fisher entry name to ``(module, transposed)``: the module whose input ``a`` and
    output gradient ``g`` give the weight gradient (for a PEFT LoRA layer: the LoRA wrapper, whose output
    gradient equals the base layer's), ``transposed`` for weights stored (in, out). Sums over every call
    of the module until :meth:`pop`; fp32 whatever the activations' dtype.
    """

    def __init__(self, modules: Mapping[str, tuple[torch.nn.Module, bool]]):
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, (module, transposed) in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name, transposed)))

    def _hook(self, name: str, transposed: bool):
        def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            a = args[0].detach()

            def backward_hook(g: torch.Tensor) -> None:
                a2 = a.reshape(-1, a.shape[-1]).float()
                g2 = g.reshape(-1, g.shape[-1]).float()
                grad = a2.T @ g2 if transposed else g2.T @ a2
                if name in self.sums:
                    self.sums[name].add_(grad)
                else:
                    self.sums[name] = grad

            output.register_hook(backward_hook)

        return forward_hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The gradients summed since the last call (then reset)."""
        sums, self.sums = self.sums, {}
        return sums

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
