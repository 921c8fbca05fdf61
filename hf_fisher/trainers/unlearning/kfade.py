"""K-FADE: a few uphill Gauss-Newton steps on the forget set, preconditioned by K-FAC of the retain set, with each
step sized so that the predicted change of the model's outputs on the retain set stays within a budget.

What follows the paper's abstract ("Gauss-Newton Unlearning for the LLM Era"): uphill Gauss-Newton steps on the
forget loss; K-FAC (or EK-FAC) as the curvature; a constraint on the outputs over the retain set turned into a
constraint on the weights; a total update that can be re-applied after further fine-tuning; first-order cost.

What is our reading (the full text was not available to us):

* the curvature ``G_R`` is the K-FAC of the retain set's Gauss-Newton, i.e. the Fisher with labels sampled from
  the model (``estimate_kfac(kind="sampled", kfac_type="expand")``), for the block linear layers (not the
  embeddings nor the output head, whose vocab² factor is infeasible); only those layers move;
* by default (``kfade_curvature_tokens="all"``) the curvature covers every retain token, prompt and answer: a
  weight change also moves the prompt tokens' hidden states, which reach the answers through attention. With
  answer tokens only (``"answer"``) the factors never see the prompt activations, and on the default model a
  step in the directions they miss changed the measured retain KL ~10⁵× more than predicted (demo, 40 retain
  rows); the budget then still bounds the answers' KL, since it bounds the KL summed over all tokens;
* each step: ``g = ∇ L`` with ``L = -NLL_forget`` (gradient *ascent* on the forget answers, written as descent on
  ``L``); ``d = (G_R + λI)⁻¹ g`` per layer, with one ``λ = damping ×`` the mean K-FAC eigenvalue over all layers
  (a per-layer relative λ lets layers with tiny K-FAC curvature take steps far outside the quadratic model);
  ``Δ = -η d`` with ``η = sqrt(2 ε / gᵀd)``, so that ``½ Δᵀ(G_R + λI)Δ = ε``: the predicted mean retain KL
  ``½ ΔᵀG_RΔ`` is at most ``ε`` (equal to it without damping);
* ``ε`` is given per answer token (``kfade_epsilon``, nats) and converted to the per-sequence KL that ``G_R``
  measures with the retain set's mean answer length;
* K-FAC is block-diagonal: it ignores how layers interact, so a step that moves many layers at once can change
  the retain outputs several times more than predicted (we measured 3-8x on small random models; along one
  layer the prediction holds). Backtracking on the measured KL is therefore on by default;
* optional backtracking halves a step while the KL measured on a fixed retain probe batch exceeds
  ``kfade_backtrack_tolerance × ε``, and undoes the step (logged as ``kfade_rejected``) when it still does after
  ``kfade_max_backtracks`` halvings; optional refresh of the factors every ``kfade_refresh_every`` steps;
* the total update ``Δ = θ - θ₀`` is kept in the optimizer state (so checkpoints resume it exactly) and saved
  as an *unlearning update*; :func:`apply_unlearning_update` adds it to a model again.

``KFADETrainer`` is an :class:`UnlearningTrainer` with :class:`KFADEOptimizer`: the Trainer's loop does the
forward/backward (gradient accumulation, DDP all-reduce, resume) and ``optimizer.step()`` takes the K-FADE step.
Set ``max_steps`` to the number of steps (1-5) and the batch to cover the forget set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_fisher.cards import unlearning_card, write_card
from hf_fisher.curvature import KFACFactors, estimate_kfac
from hf_fisher.curvature.collect import find_target_layers
from hf_fisher.data.facts import pad_collate
from hf_fisher.trainers.unlearning.losses import GradAscent, forward_logits, sequence_kl
from hf_fisher.trainers.unlearning.trainer import UnlearningArguments, UnlearningTrainer, _is_peft_model

UPDATE_FILE = "unlearning_update.safetensors"
UPDATE_CONFIG = "unlearning_update.json"
CURVATURE_DIR = "kfade_curvature"


@dataclass
class KFADEArguments(UnlearningArguments):
    """``UnlearningArguments`` for K-FADE; ``learning_rate`` multiplies the budgeted step (1.0 = the budget)."""

    kfade_epsilon: float = field(
        default=0.02, metadata={"help": "Retain KL budget per step, in nats per answer token (predicted by K-FAC)."}
    )
    kfade_damping: float = field(
        default=0.1, metadata={"help": "Damping λ as a multiple of the mean K-FAC eigenvalue over all layers."}
    )
    kfade_curvature: str = field(default="kfac", metadata={"help": "kfac or ekfac (eigenvalue-corrected)."})
    kfade_curvature_tokens: str = field(
        default="all", metadata={"help": "Retain tokens whose outputs the curvature protects: 'all' (prompt and "
                                 "answer) or 'answer' (answer tokens only; can step far outside its model)."}
    )
    kfade_curvature_batches: int | None = field(
        default=None, metadata={"help": "Retain batches for the curvature pass, a seeded random subset of the retain "
                                "rows (None: the whole retain set)."}
    )
    kfade_backtracking: bool = field(
        default=True, metadata={"help": "Halve a step while the measured retain KL exceeds the tolerance."}
    )
    kfade_backtrack_tolerance: float = field(
        default=2.0, metadata={"help": "Backtrack while measured KL > tolerance × ε."}
    )
    kfade_max_backtracks: int = field(
        default=8, metadata={"help": "At most this many halvings per step; a step still over budget is undone."}
    )
    kfade_probe_size: int = field(default=16, metadata={"help": "Retain rows of the fixed backtracking probe."})
    kfade_target_modules: str | None = field(
        default=None, metadata={"help": "Regex of the linear layers K-FADE moves (None: every block linear)."}
    )
    kfade_refresh_every: int = field(
        default=0, metadata={"help": "Re-estimate the curvature every N steps (0: never)."}
    )
    unlearning_loss: str = field(default="grad_ascent", metadata={"help": "Forget objective (K-FADE: grad_ascent)."})
    learning_rate: float = field(default=1.0, metadata={"help": "Multiplier of the budgeted K-FADE step."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Keep constant: ε sets the step."})
    weight_decay: float = field(default=0.0, metadata={"help": "Unused by K-FADE."})

    def __post_init__(self):
        if not self.kfade_epsilon > 0:
            raise ValueError(f"kfade_epsilon must be > 0 (a retain KL budget), got {self.kfade_epsilon}")
        if self.kfade_damping < 0:
            raise ValueError(f"kfade_damping must be >= 0, got {self.kfade_damping}")
        if self.kfade_curvature not in ("kfac", "ekfac"):
            raise ValueError(f"kfade_curvature must be 'kfac' or 'ekfac', got {self.kfade_curvature!r}")
        if self.kfade_curvature_tokens not in ("all", "answer"):
            raise ValueError(f"kfade_curvature_tokens must be 'all' or 'answer', got {self.kfade_curvature_tokens!r}")
        super().__post_init__()


class RetainProbe:
    """A fixed retain batch and the model's logits on it at the start of a step, to measure the step's KL."""

    def __init__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]):
        self.model = model
        self.batch = dict(batch)
        self._before: torch.Tensor | None = None

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return forward_logits(self.model, self.batch)
        finally:
            self.model.train(was_training)

    def snapshot(self) -> None:
        self._before = self._logits()

    def kl(self) -> float:
        """Mean over probe sequences of the summed answer-token ``KL(p_before ‖ p_now)`` (the units of ``G_R``)."""
        assert self._before is not None, "call snapshot() first"
        labels = self.batch["labels"]
        per_token_mean = sequence_kl(self._logits(), self._before, labels)
        return float((per_token_mean * (labels[:, 1:] != -100).sum(1)).mean())


class KFADEOptimizer(torch.optim.Optimizer):
    """One KL-budgeted Gauss-Newton step per ``step()`` on the gradients already in ``.grad``.

    ``Δ = -lr · sqrt(2ε / gᵀd) · d`` with ``d = (G + λI)⁻¹ g`` per layer of ``factors`` (see the module
    docstring); ``epsilon`` is per answer token and converted into a per-sequence KL with
    ``tokens_per_sequence`` (default: the factors' supervised tokens per sequence). ``probe`` enables backtracking;
    ``refresh`` (a callable returning new factors) gives the factors at the first step when ``factors`` is
    ``None``, and again every ``refresh_every`` steps. The running total update of each parameter is kept in
    ``state[p]["update"]``; the last step's numbers in ``last_step``.
    """

    def __init__(
        self,
        named_parameters: Sequence[tuple[str, nn.Parameter]],
        factors: KFACFactors | None,
        *,
        epsilon: float,
        damping: float = 0.1,
        lr: float = 1.0,
        use_eigenvalue_correction: bool = True,
        probe: RetainProbe | None = None,
        backtrack_tolerance: float = 2.0,
        max_backtracks: int = 4,
        refresh: Callable[[], KFACFactors] | None = None,
        refresh_every: int = 0,
        tokens_per_sequence: float | None = None,
    ):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if factors is None and refresh is None:
            raise ValueError("pass factors, or refresh= to estimate them at the first step")
        named_parameters = list(named_parameters)
        super().__init__([p for _, p in named_parameters], {"lr": lr})
        self.names = {p: n for n, p in named_parameters}
        self.factors = factors
        self.epsilon = float(epsilon)
        self.damping = float(damping)
        self.use_eigenvalue_correction = use_eigenvalue_correction
        self.probe = probe
        self.backtrack_tolerance = backtrack_tolerance
        self.max_backtracks = max_backtracks
        self.refresh = refresh
        self.refresh_every = refresh_every
        self.tokens_per_sequence = tokens_per_sequence
        self.steps_taken = 0
        self.last_step: dict[str, float] = {}

    def absolute_damping(self) -> float:
        """``λ = damping ×`` the mean Kronecker eigenvalue over all layers' weights (one λ for the network).

        A per-layer relative damping would let layers whose K-FAC curvature is tiny (e.g. attention queries
        and keys of a model whose attention is nearly uniform) take huge steps the quadratic model cannot see;
        one global λ bounds every layer's step by its gradient."""
        self.factors.eigendecompose()
        total, count = 0.0, 0
        for module in self.factors:
            spectrum = KFACFactors._spectrum(self.factors[module], self.use_eigenvalue_correction,
                                             torch.device("cpu"))
            total += float(spectrum.double().sum())
            count += spectrum.numel()
        return self.damping * total / max(count, 1)

    def direction(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(G + λI)⁻¹ g`` layer by layer."""
        return self.factors.precondition(grads, damping=self.absolute_damping(),
                                         use_eigenvalue_correction=self.use_eigenvalue_correction)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        due = self.refresh_every and self.steps_taken and self.steps_taken % self.refresh_every == 0
        if self.factors is None or (self.refresh is not None and due):
            self.factors = self.refresh()
        meta = self.factors.metadata
        per_sequence = self.tokens_per_sequence or meta.n_tokens / max(meta.n_sequences, 1)
        epsilon = self.epsilon * per_sequence
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = {self.names[p]: p.grad.float() for p in params}
        missing = [n for n in grads if n.rsplit(".", 1)[0] not in self.factors]
        if missing:
            raise ValueError(f"no curvature for {missing[:3]}; K-FADE updates only layers in the K-FAC factors")
        d = self.direction(grads)
        g_dot_d = sum(float((grads[n].double() * d[n].double()).sum()) for n in d)
        if not g_dot_d > 0:
            raise FloatingPointError(f"gᵀ(G+λI)⁻¹g = {g_dot_d} is not positive: zero gradient or broken curvature")
        eta = math.sqrt(2.0 * epsilon / g_dot_d) * self.param_groups[0]["lr"]
        curvature = self.factors.multiply(d, use_eigenvalue_correction=self.use_eigenvalue_correction)
        predicted = 0.5 * eta**2 * sum(float((d[n].double() * curvature[n].double()).sum()) for n in d)
        if self.probe is not None:
            self.probe.snapshot()
        scale = eta
        for p in params:
            p.add_(d[self.names[p]].to(p.dtype), alpha=-scale)
        measured = float("nan")
        halvings = 0
        if self.probe is not None:
            measured = self.probe.kl()
            while measured > self.backtrack_tolerance * epsilon and halvings < self.max_backtracks:
                for p in params:
                    p.add_(d[self.names[p]].to(p.dtype), alpha=scale / 2)
                scale /= 2
                predicted /= 4
                halvings += 1
                measured = self.probe.kl()
            if measured > self.backtrack_tolerance * epsilon:  # still over budget: undo the step
                for p in params:
                    p.add_(d[self.names[p]].to(p.dtype), alpha=scale)
                scale, predicted, measured = 0.0, 0.0, self.probe.kl()
        for p in params:
            state = self.state[p]
            if "update" not in state:
                state["update"] = torch.zeros_like(p, dtype=torch.float32)
            state["update"].add_(d[self.names[p]].float(), alpha=-scale)
        self.steps_taken += 1
        self.last_step = {"eta": scale, "g_dot_d": g_dot_d, "predicted_kl": predicted, "measured_kl": measured,
                          "backtracks": float(halvings), "rejected": float(scale == 0.0)}
        return None

    def total_update(self) -> dict[str, torch.Tensor]:
        """``θ - θ₀`` of every parameter moved so far (fp32), by parameter name."""
        return {self.names[p]: self.state[p]["update"].clone() for group in self.param_groups
                for p in group["params"] if "update" in self.state[p]}

    def state_dict(self):
        out = super().state_dict()
        out["kfade"] = {"steps_taken": self.steps_taken}
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps_taken = int(state_dict.pop("kfade", {}).get("steps_taken", 0))
        super().load_state_dict(state_dict)


def _retain_rows_for(dataset: Any) -> list[dict[str, Any]]:
    retain = getattr(dataset, "retain", None)
    if retain is None:
        raise ValueError("K-FADE needs retain data for its curvature; pass retain_dataset=...")
    return retain


class KFADETrainer(UnlearningTrainer):
    """K-FADE (see the module docstring). ``retain_curvature`` may pass precomputed :class:`KFACFactors`
    (e.g. loaded with ``KFACFactors.from_pretrained``); otherwise they are estimated from the retain set when
    training starts (sharded over processes and all-reduced)."""

    _checks_trainable_parameters = False  # the K-FAC target layers are made trainable below

    def __init__(self, model: nn.Module | None = None, args: KFADEArguments | None = None, *,
                 retain_curvature: KFACFactors | None = None, **kwargs: Any):
        if args is None:
            args = KFADEArguments(output_dir="kfade_output")
        if not isinstance(args, KFADEArguments):
            raise TypeError("KFADETrainer needs KFADEArguments")
        if model is not None and _is_peft_model(model):
            raise ValueError("K-FADE updates the base weights; merge the adapter first (model.merge_and_unload())")
        kwargs.setdefault("unlearning_loss", GradAscent())
        super().__init__(model, args, **kwargs)
        self.retain_rows = _retain_rows_for(self.train_dataset)
        self.retain_curvature = retain_curvature
        layers = find_target_layers(self.model, args.kfade_target_modules)
        self._target_parameters = {f"{name}.{kind}" for name in layers for kind in ("weight", "bias")}
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in self._target_parameters)

    def _pad_id(self) -> int:
        return self.data_collator.pad_token_id

    def estimate_retain_curvature(self) -> KFACFactors:
        """K-FAC (or EK-FAC) of the retain set at the current weights, this process's shard, all-reduced."""
        rank, world = self.args.process_index, self.args.world_size
        # a seeded shuffle, so that kfade_curvature_batches takes a random subset rather than the first people
        order = torch.randperm(len(self.retain_rows), generator=torch.Generator().manual_seed(self.args.seed + 1))
        rows = [self.retain_rows[i] for i in order.tolist()][rank::world]
        if self.args.kfade_curvature_tokens == "all":  # every token's output is protected, not only the answer's
            rows = [{**row, "labels": list(row["input_ids"])} for row in rows]
        batch = self.args.per_device_train_batch_size
        loader = [pad_collate(rows[i : i + batch], self._pad_id()) for i in range(0, len(rows), batch)]
        model = self.accelerator.unwrap_model(self.model)
        self.retain_curvature = estimate_kfac(
            model, [{k: v.to(self.args.device) for k, v in b.items()} for b in loader], kind="sampled",
            target_modules=self.args.kfade_target_modules,
            kfac_type="expand", eigenvalue_correction=self.args.kfade_curvature == "ekfac",
            max_batches=self.args.kfade_curvature_batches, seed=self.args.seed,
            accelerator=self.accelerator if world > 1 else None, data_description="K-FADE retain set",
        )
        return self.retain_curvature

    def create_optimizer(self, model=None):
        """The K-FADE optimizer; the retain curvature is estimated at its first step (or loaded on resume)."""
        if self.optimizer is None:
            probe = None
            if self.args.kfade_backtracking:
                generator = torch.Generator().manual_seed(self.args.seed)
                picks = torch.randperm(len(self.retain_rows), generator=generator)[: self.args.kfade_probe_size]
                batch = pad_collate([self.retain_rows[i] for i in picks.tolist()], self._pad_id())
                probe = RetainProbe(self.model, {k: v.to(self.args.device) for k, v in batch.items()})
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.optimizer = KFADEOptimizer(
                named, self.retain_curvature, epsilon=self.args.kfade_epsilon, damping=self.args.kfade_damping,
                lr=self.args.learning_rate, use_eigenvalue_correction=self.args.kfade_curvature == "ekfac",
                probe=probe, backtrack_tolerance=self.args.kfade_backtrack_tolerance,
                max_backtracks=self.args.kfade_max_backtracks, refresh=self.estimate_retain_curvature,
                refresh_every=self.args.kfade_refresh_every, tokens_per_sequence=self._answer_tokens_per_row(),
            )
        return self.optimizer

    def _answer_tokens_per_row(self) -> float:
        """Mean number of answer tokens per retain row: converts ε (per answer token) into a per-sequence KL."""
        counts = [sum(1 for label in row["labels"][1:] if label != -100) for row in self.retain_rows]
        return sum(counts) / max(len(counts), 1)

    def kfade_optimizer(self) -> KFADEOptimizer | None:
        """The K-FADE optimizer under any Accelerate wrapper (``None`` before training)."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, KFADEOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoints also hold the retain curvature, so that a resumed run takes the same steps."""
        super()._save_optimizer_and_scheduler(output_dir)
        optimizer = self.kfade_optimizer()
        if optimizer is not None and optimizer.factors is not None and self.args.should_save:
            optimizer.factors.save_pretrained(Path(output_dir) / CURVATURE_DIR)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        optimizer = self.kfade_optimizer()
        if checkpoint is not None and optimizer is not None and (Path(checkpoint) / CURVATURE_DIR).is_dir():
            factors = KFACFactors.from_pretrained(Path(checkpoint) / CURVATURE_DIR,
                                                  model=self.accelerator.unwrap_model(self.model))
            optimizer.factors = factors
            self.retain_curvature = factors

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the last K-FADE step's size, predicted and measured retain KL (per sequence) to the logs."""
        optimizer = self.kfade_optimizer()
        if "loss" in logs and optimizer is not None and optimizer.last_step:
            logs.update({f"kfade_{k}": v for k, v in optimizer.last_step.items()})
        super().log(logs, *args, **kwargs)

    def unlearning_update(self) -> dict[str, torch.Tensor]:
        """The total update ``θ - θ₀`` applied so far, by parameter name."""
        optimizer = self.kfade_optimizer()
        if optimizer is None:
            raise RuntimeError("no K-FADE step has been taken yet; call train() first")
        return optimizer.total_update()

    def save_unlearning_update(self, directory: str | os.PathLike, *,
                               metrics: Mapping[str, Mapping[str, float]] | None = None,
                               forget_description: str | None = None) -> Path:
        """Write the total update as ``unlearning_update.safetensors`` (+ a JSON description and a model card)."""
        config = {"method": "k-fade", "epsilon_per_token": self.args.kfade_epsilon,
                  "damping": self.args.kfade_damping, "curvature": self.args.kfade_curvature,
                  "steps": self.state.global_step,
                  "base_model": getattr(getattr(self.model, "config", None), "_name_or_path", None)}
        if forget_description is None:
            n_forget = len(getattr(self.train_dataset, "forget", ()))
            forget_description = f"{n_forget} forget examples given to KFADETrainer"
        return save_unlearning_update(self.unlearning_update(), directory, config, metrics=metrics,
                                      forget_description=forget_description)


def save_unlearning_update(update: Mapping[str, torch.Tensor], directory: str | os.PathLike,
                           config: Mapping[str, Any] | None = None, *,
                           metrics: Mapping[str, Mapping[str, float]] | None = None,
                           forget_description: str | None = None) -> Path:
    """Save an unlearning update (parameter name → Δ) as safetensors plus a JSON description; returns the folder.

    The folder's README.md is hf_fisher's card (:func:`hf_fisher.cards.unlearning_card`): method and base model
    from ``config["method"]`` / ``config["base_model"]`` (``"custom"`` / unrecorded when absent), the rest of
    ``config`` as settings, plus ``metrics`` and ``forget_description``.
    """
    if not update:
        raise ValueError("the unlearning update is empty; nothing to save")
    config = dict(config or {})
    settings = {k: v for k, v in config.items() if k not in ("method", "base_model")}
    card = unlearning_card(method=str(config.get("method") or "custom"),
                           base_model=str(config.get("base_model") or ""),
                           forget_description=forget_description or "not described", metrics=metrics,
                           settings=settings, update_file=UPDATE_FILE)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in update.items()}, str(folder / UPDATE_FILE),
              metadata={"format": "pt", "hf_fisher": "unlearning_update"})
    (folder / UPDATE_CONFIG).write_text(json.dumps(config, indent=1, default=str))
    write_card(card, folder)
    return folder


def load_unlearning_update(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an update saved by :func:`save_unlearning_update` (a folder or the safetensors file)."""
    path = Path(path)
    file = path / UPDATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {UPDATE_FILE} in {path}")
    return load_file(str(file))


@torch.no_grad()
def apply_unlearning_update(model: nn.Module, update: Mapping[str, torch.Tensor] | str | os.PathLike,
                            scale: float = 1.0) -> nn.Module:
    """Add an unlearning update ``Δ`` (a dict, or a saved folder/file) to ``model``'s weights, in place.

    Every name and shape is checked before any weight changes: a mismatched update raises ``ValueError`` and
    leaves the model untouched. ``scale`` multiplies ``Δ`` (``-1`` undoes it)."""
    if not isinstance(update, Mapping):
        update = load_unlearning_update(update)
    params = dict(model.named_parameters())
    missing = [n for n in update if n not in params]
    if missing:
        raise ValueError(f"the update has parameters the model lacks: {missing[:3]} (of {len(missing)}); "
                         "was it made for another architecture?")
    wrong = [(n, tuple(update[n].shape), tuple(params[n].shape)) for n in update
             if tuple(update[n].shape) != tuple(params[n].shape)]
    if wrong:
        raise ValueError(f"shape mismatch for {wrong[:3]} (update vs model); was it made for another model size?")
    for name, delta in update.items():
        param = params[name]
        param.add_(delta.to(device=param.device, dtype=torch.float32).to(param.dtype), alpha=scale)
    return model


__all__ = [
    "KFADEArguments",
    "KFADEOptimizer",
    "KFADETrainer",
    "RetainProbe",
    "apply_unlearning_update",
    "load_unlearning_update",
    "save_unlearning_update",
]
