"""FisherTrainer: fine-tuning with a Fisher penalty (EWC, rank-1 EWC) and an online Fisher estimate.

The trainer changes one thing in the loop: at each optimizer step (after the last micro-batch's
backward, so after gradient accumulation and the DDP all-reduce), it

1. folds the task gradient into the online Fisher (if enabled), then
2. adds the penalty's exact gradient to ``.grad``, layer by layer.

The penalty therefore never enters the autograd graph of the task loss: it is applied once per
optimizer step whatever the accumulation, loss normalisation or number of processes, it is
identical on every process (it depends on the weights only), and the online Fisher sees the pure
task gradient. ``"loss"`` in the logs is the task loss; ``"fisher_penalty"`` is logged next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from hf_fisher.curvature.diagonal import DiagonalFisher, estimate_diagonal_fisher
from hf_fisher.curvature.online import STATE_FILENAME, FrozenWeightGradients, OnlineDiagonalFisher
from hf_fisher.curvature.rank_one import RankOneFisher, estimate_rank_one_fisher
from hf_fisher.curvature.store import model_name_or_path

logger = logging.get_logger(__name__)

PENALTIES = ("diagonal", "rank1", "none")
ONLINE_MODES = ("none", "mean", "ema")
FISHER_SUBFOLDER = "fisher"


@dataclass
class FisherTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the Fisher penalty and online-Fisher knobs (all prefixed ``fisher_``/``online_``)."""

    fisher_penalty: str = field(
        default="diagonal",
        metadata={"help": "Penalty on the change of the weights: 'diagonal' (EWC, λ/2 Σ F (θ-θ*)²), 'rank1' "
                  "(λ/2 · tr F · (u·(θ-θ*))² along the mean gradient u) or 'none'.", "choices": list(PENALTIES)},
    )
    fisher_lambda: float = field(default=1.0, metadata={"help": "Strength λ of the Fisher penalty (≥ 0)."})
    fisher_path: str | None = field(
        default=None,
        metadata={"help": "Folder of a saved DiagonalFisher (penalty 'diagonal') or RankOneFisher (penalty 'rank1'). "
                  "Alternatively pass `fisher=` or `fisher_dataset=` to FisherTrainer."},
    )
    fisher_kind: str = field(
        default="empirical",
        metadata={"help": "When the Fisher is estimated at train start: 'empirical' (data labels) or 'sampled' "
                  "(labels drawn from the model). Rank-1 needs 'empirical'.", "choices": ["empirical", "sampled"]},
    )
    fisher_max_batches: int | None = field(
        default=None, metadata={"help": "Cap on the reference batches used to estimate the Fisher at train start."}
    )
    fisher_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names whose weights are penalised (full fine-tuning; default: "
                  "every linear layer but the output embeddings). With LoRA the adapted layers are used."},
    )
    fisher_seed: int = field(default=0, metadata={"help": "Seed of the sampled labels when fisher_kind='sampled'."})
    online_fisher: str = field(
        default="none",
        metadata={"help": "Accumulate a diagonal Fisher from the training gradients: 'mean' (running mean), 'ema' or "
                  "'none'. Of the trainable weights; under LoRA of the adapted layers' weights (the gradient of ΔW, "
                  "from hooks), which the penalty and fisher_merge use. Saved in every checkpoint and next to the "
                  f"final model (subfolder '{FISHER_SUBFOLDER}/').", "choices": list(ONLINE_MODES)},
    )
    online_fisher_decay: float = field(default=0.99, metadata={"help": "Decay of the online Fisher's EMA."})

    def __post_init__(self) -> None:
        if self.fisher_penalty not in PENALTIES:
            raise ValueError(f"fisher_penalty must be one of {PENALTIES}, got {self.fisher_penalty!r}.")
        if self.online_fisher not in ONLINE_MODES:
            raise ValueError(f"online_fisher must be one of {ONLINE_MODES}, got {self.online_fisher!r}.")
        if not (math.isfinite(self.fisher_lambda) and self.fisher_lambda >= 0):
            raise ValueError(f"fisher_lambda must be a finite number ≥ 0, got {self.fisher_lambda}.")
        if self.fisher_kind not in ("empirical", "sampled"):
            raise ValueError(f"fisher_kind must be 'empirical' or 'sampled', got {self.fisher_kind!r}.")
        if self.fisher_penalty == "rank1" and self.fisher_kind != "empirical":
            raise ValueError("fisher_penalty='rank1' needs fisher_kind='empirical': sampled labels give a zero mean "
                             "gradient, hence no rank-1 direction.")
        if not 0.0 < self.online_fisher_decay < 1.0:
            raise ValueError(f"online_fisher_decay must lie strictly in (0, 1), got {self.online_fisher_decay}.")
        super().__post_init__()


@dataclass
class _PenaltyUnit:
    """One penalised tensor: a parameter, or the ΔW = s·BA of a LoRA layer, keyed by its Fisher entry."""

    key: str
    params: tuple[nn.Parameter, ...]
    displacement: Callable[[], torch.Tensor]  # θ − θ* in fp32, differentiable w.r.t. ``params``


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of a PEFT model (empty for any other model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _fisher_key(module_name: str, fisher: Mapping[str, torch.Tensor]) -> str | None:
    """The Fisher entry of a LoRA layer's base weight, under the PEFT or the plain model's naming."""
    stripped = module_name.removeprefix("base_model.model.")
    for key in (f"{module_name}.base_layer.weight", f"{module_name}.weight", f"{stripped}.weight",
                f"{stripped}.base_layer.weight"):
        if key in fisher:
            return key
    return None


def _lora_units(layers: dict[str, nn.Module], fisher: Mapping[str, torch.Tensor]) -> list[_PenaltyUnit]:
    units: list[_PenaltyUnit] = []
    missing: list[str] = []
    for name, layer in layers.items():
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters:
            if any(p.requires_grad for p in layer.parameters(recurse=False)):
                raise ValueError(f"Layer {name!r} is a trainable LoRA layer of a type FisherTrainer does not support "
                                 "(only linear LoRA layers); exclude it from target_modules.")
            continue
        if len(adapters) > 1:
            raise ValueError(f"Layer {name!r} has several active adapters {adapters}; train one adapter at a time.")
        adapter = adapters[0]
        if layer.use_dora.get(adapter, False):
            raise ValueError(f"Layer {name!r} uses DoRA, whose weight change is not s·BA; FisherTrainer penalises "
                             "plain LoRA only. Set use_dora=False.")
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if not (a.requires_grad or b.requires_grad):
            continue
        key = _fisher_key(name, fisher)
        if key is None:
            missing.append(name)
            continue
        units.append(_lora_unit(key, layer, adapter, tuple(fisher[key].shape)))
    if missing:
        raise ValueError(
            f"The Fisher has no entry for the base weight of adapted layers {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Estimate it with target_modules covering every LoRA target "
            "(on the base model or the PEFT model)."
        )
    return units


def _lora_unit(key: str, layer: nn.Module, adapter: str, fisher_shape: tuple[int, ...]) -> _PenaltyUnit:
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = float(layer.scaling[adapter])
    transpose = bool(getattr(layer, "fan_in_fan_out", False))

    def delta_w() -> torch.Tensor:
        dw = scaling * (b.float() @ a.float())  # (out, in)
        return dw.T if transpose else dw

    with torch.no_grad():
        start = delta_w()
    if tuple(start.shape) != fisher_shape:
        raise ValueError(f"Fisher entry {key!r} has shape {fisher_shape} but the adapter's ΔW is "
                         f"{tuple(start.shape)}; the Fisher was estimated on another model.")
    reference = None if not bool(start.any()) else start.clone()  # ΔW at train start (zero for a standard init)

    def displacement() -> torch.Tensor:
        dw = delta_w()
        return dw if reference is None else dw - reference

    return _PenaltyUnit(key, (a, b), displacement)


def _parameter_units(model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> list[_PenaltyUnit]:
    params = dict(model.named_parameters())
    mismatched = [f"{k}: Fisher {tuple(v.shape)} vs model {tuple(params[k].shape)}" for k, v in fisher.items()
                  if k in params and tuple(params[k].shape) != tuple(v.shape)]
    unknown = [k for k in fisher if k not in params]
    if mismatched or unknown:
        problems = (f"shape mismatch: {mismatched[:3]}" if mismatched else "") + (
            f"{'; ' if mismatched else ''}not parameters of the model: {unknown[:3]}" if unknown else "")
        raise ValueError(f"The Fisher does not fit the model ({problems}); estimate it on this model.")
    units = []
    for key in fisher:
        p = params.get(key)
        if p is None or not p.requires_grad:
            continue
        reference = p.detach().float().clone()  # θ*: the weights at train start

        def displacement(p: nn.Parameter = p, reference: torch.Tensor = reference) -> torch.Tensor:
            return p.float() - reference

        units.append(_PenaltyUnit(key, (p,), displacement))
    return units


class FisherPenalty:
    """The Fisher penalty of a model against its weights at construction time θ*.

    Diagonal: ``λ/2 Σ F ⊙ (θ − θ*)²``. Rank-1: ``λ/2 · scale · (u · (θ − θ*))²``. For a PEFT LoRA
    model, θ − θ* of an adapted layer is its weight change ``ΔW = s·BA`` (minus ΔW at construction,
    zero for PEFT's default init), weighted by the Fisher of the base layer's weight; otherwise the
    trainable parameters that have a Fisher entry are penalised. ΔW is built one layer at a time.
    """

    def __init__(self, model: nn.Module, fisher: DiagonalFisher | RankOneFisher, strength: float):
        if not isinstance(fisher, (DiagonalFisher, RankOneFisher)):
            raise TypeError(f"fisher must be a DiagonalFisher or RankOneFisher, got {type(fisher).__name__}.")
        self.strength = float(strength)
        self.rank_one = isinstance(fisher, RankOneFisher)
        self.scale = fisher.scale if self.rank_one else 1.0
        layers = _lora_layers(model)
        self.units = _lora_units(layers, fisher) if layers else _parameter_units(model, fisher)
        if not self.units:
            raise ValueError(
                f"No trainable weight of the model has a Fisher entry (the Fisher covers {len(fisher)} tensors "
                f"such as {list(fisher)[:3]}). Estimate the Fisher on this model, or unfreeze the weights it covers."
            )
        device = self.units[0].params[0].device
        self.weights = {u.key: fisher[u.key].to(device=device, dtype=torch.float32) for u in self.units}

    @property
    def keys(self) -> list[str]:
        return [u.key for u in self.units]

    @torch.no_grad()
    def value(self) -> float:
        """The penalty at the current weights."""
        if self.rank_one:
            c = sum(float((self.weights[u.key] * u.displacement()).sum()) for u in self.units)
            return 0.5 * self.strength * self.scale * c * c
        return 0.5 * self.strength * sum(float((self.weights[u.key] * u.displacement().square()).sum())
                                         for u in self.units)

    def add_gradients(self, grad_scale: float = 1.0) -> float:
        """Add ``grad_scale ·`` ∇penalty to each parameter's ``.grad`` (one unit at a time); return the penalty.

        Uses ``torch.autograd.grad``, which leaves DDP's gradient hooks alone.
        """
        if self.strength == 0.0:
            return 0.0
        if self.rank_one:
            with torch.no_grad():
                c = sum(float((self.weights[u.key] * u.displacement()).sum()) for u in self.units)
            coefficient = self.strength * self.scale * c
            for u in self.units:
                with torch.enable_grad():
                    projection = (self.weights[u.key] * u.displacement()).sum()
                    grads = torch.autograd.grad(projection, u.params)
                self._accumulate(u.params, grads, coefficient * grad_scale)
            return 0.5 * self.strength * self.scale * c * c
        total = 0.0
        for u in self.units:
            with torch.enable_grad():
                term = 0.5 * self.strength * (self.weights[u.key] * u.displacement().square()).sum()
                grads = torch.autograd.grad(term, u.params)
            self._accumulate(u.params, grads, grad_scale)
            total += float(term.detach())
        return total

    @staticmethod
    def _accumulate(params: tuple[nn.Parameter, ...], grads: tuple[torch.Tensor, ...], factor: float) -> None:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                g = (g * factor).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)


class FisherTrainer(Trainer):
    """A ``transformers.Trainer`` with a Fisher penalty against the starting weights and an online Fisher.

    The reference Fisher comes from ``fisher=`` (a :class:`DiagonalFisher` or :class:`RankOneFisher`),
    ``args.fisher_path`` (a saved one), or ``fisher_dataset=`` (estimated when the trainer is built, on
    the starting model — also when resuming, so build the trainer from the starting model). The
    reference weights θ* are the model's weights when the trainer is built.
    """

    def __init__(self, *trainer_args: Any, fisher: DiagonalFisher | RankOneFisher | None = None,
                 fisher_dataset: Any = None, **trainer_kwargs: Any):
        args = trainer_kwargs.get("args", trainer_args[1] if len(trainer_args) > 1 else None)
        if not isinstance(args, FisherTrainingArguments):
            raise TypeError(
                f"FisherTrainer needs FisherTrainingArguments, got {type(args).__name__}; build the arguments with "
                "hf_fisher.FisherTrainingArguments(output_dir=..., fisher_lambda=...)."
            )
        sources = [s for s in (fisher, args.fisher_path, fisher_dataset) if s is not None]
        if args.fisher_penalty != "none" and len(sources) != 1:
            raise ValueError(
                f"fisher_penalty={args.fisher_penalty!r} needs exactly one Fisher source: `fisher=` (an estimate), "
                f"args.fisher_path (a saved folder) or `fisher_dataset=` (estimated at start); got {len(sources)}. "
                "Use fisher_penalty='none' for no penalty."
            )
        if args.fisher_penalty == "none" and sources:
            raise ValueError("A Fisher source was given but fisher_penalty='none'; set fisher_penalty='diagonal' or "
                             "'rank1' to use it, or drop it.")
        expected = RankOneFisher if args.fisher_penalty == "rank1" else DiagonalFisher
        if fisher is not None and args.fisher_penalty != "none" and not isinstance(fisher, expected):
            raise TypeError(f"fisher_penalty={args.fisher_penalty!r} needs a {expected.__name__}, got "
                            f"{type(fisher).__name__}; estimate it with the matching function.")
        super().__init__(*trainer_args, **trainer_kwargs)
        self.fisher_penalty: FisherPenalty | None = None
        if args.fisher_penalty != "none":
            if fisher is None:
                fisher = self._reference_fisher(expected, fisher_dataset)
            self.fisher_penalty = FisherPenalty(self.model, fisher, args.fisher_lambda)
        self.online_fisher: OnlineDiagonalFisher | None = None
        self._online_params: dict[str, nn.Parameter] = {}
        self._frozen_grads: FrozenWeightGradients | None = None
        self._frozen_names: list[str] = []
        if args.online_fisher != "none":
            self._setup_online_fisher(args)
        self._penalty_sum = 0.0
        self._penalty_count = 0

    def _setup_online_fisher(self, args: FisherTrainingArguments) -> None:
        """Track the trainable parameters; under LoRA, the adapted layers' weights (ΔW) instead of A and B."""
        lora_targets: dict[str, tuple[nn.Module, bool]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, layer in _lora_layers(self.model).items():
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if adapters and any(p.requires_grad for p in layer.lora_A[adapters[0]].parameters()):
                key = f"{name}.base_layer.weight"
                lora_targets[key] = (layer, bool(getattr(layer, "fan_in_fan_out", False)))
                shapes[key] = tuple(layer.get_base_layer().weight.shape)
        self._online_params = {n: p for n, p in self.model.named_parameters()
                               if p.requires_grad and not (lora_targets and "lora_" in n)}
        shapes.update({n: tuple(p.shape) for n, p in self._online_params.items()})
        if not shapes:
            raise ValueError("online_fisher needs trainable parameters, but the model has none.")
        self.online_fisher = OnlineDiagonalFisher(
            shapes, mode=args.online_fisher, decay=args.online_fisher_decay, device=self.args.device
        )
        if lora_targets:
            self._frozen_grads = FrozenWeightGradients(lora_targets)
            self._frozen_names = list(lora_targets)

    def _step_gradients(self) -> dict[str, torch.Tensor]:
        """This optimizer step's gradients of the tracked tensors (ΔW gradients all-reduced like DDP's)."""
        grads = {n: p.grad for n, p in self._online_params.items() if p.grad is not None}
        if self._frozen_grads is not None:
            sums = self._frozen_grads.pop()
            world = self.accelerator.num_processes
            for name in self._frozen_names:  # fixed order: every process takes part in every all-reduce
                g = sums.get(name)
                if g is None:
                    g = torch.zeros(self.online_fisher.state[name].shape, device=self.args.device)
                if world > 1:
                    torch.distributed.all_reduce(g)
                    g.div_(world)
                grads[name] = g
        return grads

    def _reference_fisher(self, expected: type, fisher_dataset: Any) -> DiagonalFisher | RankOneFisher:
        """Load the Fisher from ``args.fisher_path`` or estimate it on ``fisher_dataset`` (sharded by process)."""
        args: FisherTrainingArguments = self.args  # type: ignore[assignment]
        if args.fisher_path is not None:
            return expected.from_pretrained(args.fisher_path, device=self.args.device)
        layers = _lora_layers(self.model)
        if layers:
            targets: Any = [f"{n}.base_layer" for n, m in layers.items() if hasattr(m, "base_layer")]
        else:
            targets = args.fisher_target_modules.split(",") if args.fisher_target_modules else None
        loader = self.get_eval_dataloader(fisher_dataset)
        accelerator = self.accelerator if self.accelerator.num_processes > 1 else None
        description = "FisherTrainer reference data"
        if expected is RankOneFisher:
            return estimate_rank_one_fisher(self.model, loader, target_modules=targets,
                                            max_batches=args.fisher_max_batches, accelerator=accelerator,
                                            data_description=description)
        return estimate_diagonal_fisher(self.model, loader, kind=args.fisher_kind, target_modules=targets,
                                        max_batches=args.fisher_max_batches, accelerator=accelerator,
                                        seed=args.fisher_seed, data_description=description)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The usual step; at an optimizer step's last micro-batch, update the online Fisher and add the penalty."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            scaler = getattr(self.accelerator, "scaler", None)
            grad_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            if self.online_fisher is not None:
                grads = self._step_gradients()
                if all(bool(torch.isfinite(g).all()) for g in grads.values()):  # fp16 overflow: step is skipped
                    self.online_fisher.update(grads, scale=grad_scale)
            if self.fisher_penalty is not None:
                self._penalty_sum += self.fisher_penalty.add_gradients(grad_scale)
                self._penalty_count += 1
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean penalty since the last log next to the (task) ``loss``."""
        if "loss" in logs and self._penalty_count:
            logs["fisher_penalty"] = self._penalty_sum / self._penalty_count
            self._penalty_sum, self._penalty_count = 0.0, 0
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (or adapter) and, with an online Fisher, ``fisher/`` next to it."""
        super().save_model(output_dir, _internal_call)
        if self.online_fisher is not None and self.args.should_save:
            folder = Path(output_dir or self.args.output_dir) / FISHER_SUBFOLDER
            self.online_fisher.save_pretrained(
                folder, model_name_or_path=model_name_or_path(self.model),
                data_description="online, from the training gradients of FisherTrainer",
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Also restore the online Fisher's exact state when resuming from a checkpoint."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.online_fisher is None:
            return
        folder = Path(checkpoint) / FISHER_SUBFOLDER
        if (folder / STATE_FILENAME).is_file():
            self.online_fisher.load_state(folder)
        else:
            logger.warning(f"No online Fisher in {checkpoint}; it restarts from zero.")
