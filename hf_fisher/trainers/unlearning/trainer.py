"""``UnlearningTrainer``: a ``transformers.Trainer`` that minimises an unlearning objective on forget/retain pairs.

Only ``compute_loss`` and ``prediction_step`` are overridden, so the Trainer's loop — Accelerate/DDP, gradient
accumulation, mixed precision, checkpoints and resume, PEFT models — works unchanged. Each batch is
``{"forget": {...}, "retain": {...}}`` (see :class:`ForgetRetainDataset`); the objective is one of
:mod:`hf_fisher.trainers.unlearning.losses` or any :class:`UnlearningLoss`.

The reference model (NPO's ratio, a KL retain term) is, in order of preference: the ``reference_model`` passed
in; for a PEFT model, the same model with its adapters disabled (no second copy in memory); otherwise a frozen
deep copy of the model taken before training starts.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_fisher.trainers.unlearning.data import ForgetRetainCollator, ForgetRetainDataset
from hf_fisher.trainers.unlearning.gu import GUProjector
from hf_fisher.trainers.unlearning.losses import (
    RETAIN_LOSSES,
    UNLEARNING_LOSSES,
    UnlearningLoss,
    build_unlearning_loss,
    forward_logits,
    sequence_kl,
    sequence_nll,
)


@dataclass
class UnlearningArguments(TrainingArguments):
    """``TrainingArguments`` plus the unlearning objective; parse them with ``HfArgumentParser`` like any other.

    Defaults follow open-unlearning (lr 1e-5, weight decay 0.01) and each method's paper defaults; ``None``
    weights mean "the method's default" (γ = 0.125 for SimNPO, 1 otherwise; α = 1).
    """

    unlearning_loss: str = field(
        default="npo", metadata={"help": f"Unlearning objective: one of {sorted(UNLEARNING_LOSSES)}."}
    )
    forget_weight: float | None = field(
        default=None, metadata={"help": "γ, weight of the forget term (None: the method's default)."}
    )
    retain_weight: float | None = field(
        default=None, metadata={"help": "α, weight of the retain term (None: 1.0; 0 disables it)."}
    )
    retain_loss: str = field(
        default="nll", metadata={"help": f"Retain term: one of {RETAIN_LOSSES} (kl = KL to the reference model)."}
    )
    npo_beta: float = field(default=0.1, metadata={"help": "β of NPO."})
    simnpo_beta: float = field(default=4.5, metadata={"help": "β of SimNPO."})
    simnpo_delta: float = field(default=0.0, metadata={"help": "δ (margin) of SimNPO."})
    projection: str = field(
        default="none",
        metadata={"help": "Update projection: 'none', or 'gu' (remove the component along recent retain gradients)."},
    )
    gu_history_size: int = field(default=8, metadata={"help": "GU: retain gradients kept per parameter tensor."})
    gu_retain_loss: str = field(
        default="nll", metadata={"help": "GU: retain gradient of 'nll' or of 'kl' (to the reference model)."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (open-unlearning: 1e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (open-unlearning: 0.01)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: batches are nested forget/retain dicts."}
    )

    def __post_init__(self):
        if self.unlearning_loss not in UNLEARNING_LOSSES:
            raise ValueError(
                f"unknown unlearning_loss {self.unlearning_loss!r}; choose one of {sorted(UNLEARNING_LOSSES)}"
            )
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, got {self.retain_loss!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.gu_retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"gu_retain_loss must be one of {RETAIN_LOSSES}, got {self.gu_retain_loss!r}")
        if self.gu_history_size < 1:
            raise ValueError(f"gu_history_size must be >= 1, got {self.gu_history_size}")
        super().__post_init__()

    def build_loss(self) -> UnlearningLoss:
        """The objective these arguments describe."""
        beta = {"npo": self.npo_beta, "simnpo": self.simnpo_beta}.get(self.unlearning_loss)
        return build_unlearning_loss(
            self.unlearning_loss,
            forget_weight=self.forget_weight,
            retain_weight=self.retain_weight,
            retain_loss=self.retain_loss,
            beta=beta,
            delta=self.simnpo_delta,
        )


PROJECTIONS = ("none", "gu")
GU_HISTORY_FILE = "gu_history.safetensors"


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _pad_token_id(model: nn.Module, processing_class: Any) -> int | None:
    for source in (processing_class, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return None


class UnlearningTrainer(Trainer):
    """Trainer for LLM unlearning (GradAscent, GradDiff, NPO, SimNPO or a custom :class:`UnlearningLoss`).

    Pass either ``train_dataset`` (a :class:`ForgetRetainDataset`) or ``forget_dataset`` and ``retain_dataset``
    (tokenized ``datasets.Dataset`` s, e.g. splits of :func:`hf_fisher.build_fictitious_facts`), from which the
    paired dataset is built with ``args.seed``. ``unlearning_loss`` overrides the objective named in ``args``.
    Logs ``forget_loss`` and ``retain_loss`` beside the total ``loss``.
    """

    _checks_trainable_parameters = True  # K-FADE chooses its own trainable tensors

    def __init__(
        self,
        model: nn.Module | None = None,
        args: UnlearningArguments | None = None,
        train_dataset: Any = None,
        *,
        forget_dataset: Any = None,
        retain_dataset: Any = None,
        reference_model: nn.Module | None = None,
        unlearning_loss: UnlearningLoss | None = None,
        data_collator: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):
        if model is None:
            raise ValueError("UnlearningTrainer needs a model")
        if self._checks_trainable_parameters and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the model has no trainable parameters (a model from PEFT's merge_and_unload keeps its base weights "
                "frozen); call model.requires_grad_(True) first, or pass the PEFT model to unlearn its adapter")
        if args is None:
            args = UnlearningArguments(output_dir="unlearning_output")
        if unlearning_loss is None:
            if not isinstance(args, UnlearningArguments):
                raise TypeError("pass UnlearningArguments, or TrainingArguments together with unlearning_loss=...")
            unlearning_loss = args.build_loss()
        self.unlearning_loss = unlearning_loss
        projection = getattr(args, "projection", "none")
        if train_dataset is None:
            if retain_dataset is None and unlearning_loss.uses_retain and unlearning_loss.retain_weight != 0:
                raise ValueError(
                    f"the {unlearning_loss.name} loss has a retain term; pass retain_dataset (or retain_weight=0)"
                )
            train_dataset = ForgetRetainDataset(forget_dataset, retain_dataset, seed=args.seed)
        elif forget_dataset is not None or retain_dataset is not None:
            raise ValueError("pass either train_dataset or forget_dataset/retain_dataset, not both")
        if projection == "gu" and getattr(train_dataset, "retain", None) is None:
            raise ValueError("projection='gu' projects updates against retain gradients; pass retain_dataset")
        if data_collator is None:
            pad = _pad_token_id(model, processing_class)
            if pad is None:
                raise ValueError("no pad token id found on the tokenizer or model config; pass data_collator=...")
            data_collator = ForgetRetainCollator(pad)

        self._reference_model: nn.Module | None = None
        self._reference_is_disabled_adapter = False
        self.gu: GUProjector | None = None
        self._gu_kl = projection == "gu" and args.gu_retain_loss == "kl"
        if unlearning_loss.needs_reference or self._gu_kl:
            if reference_model is not None:
                self._reference_model = reference_model
            elif _is_peft_model(model):
                self._reference_is_disabled_adapter = True
            else:
                self._reference_model = copy.deepcopy(model)
            if self._reference_model is not None:
                self._reference_model.eval().requires_grad_(False)
        self._logged_parts: dict[str, list[float]] = defaultdict(list)

        super().__init__(
            model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
            processing_class=processing_class, **kwargs,
        )
        if self._reference_model is not None:
            self._reference_model.to(self.args.device)

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen reference copy (``None`` when the reference is the PEFT model with adapters disabled)."""
        return self._reference_model

    @torch.no_grad()
    def reference_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the reference model on ``batch``, without gradients and in eval mode."""
        if self._reference_model is not None:
            return forward_logits(self._reference_model, batch)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return forward_logits(model, batch)
        finally:
            model.train(was_training)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the GU projection hooked onto its step when ``projection='gu'``."""
        optimizer = super().create_optimizer(model)
        if getattr(self.args, "projection", "none") == "gu" and self.gu is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.gu = GUProjector(named, self.args.gu_history_size)
            reduce = None
            if self.args.world_size > 1:
                reduce = functools.partial(self.accelerator.reduce, reduction="mean")
            self.gu.attach(optimizer, reduce)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With GU, first records the retain gradient of this micro-batch (a separate backward, no DDP sync)."""
        if self.gu is not None:
            inputs = self._prepare_inputs(inputs)
            retain = inputs["retain"]
            names = list(self.gu.params)
            params = [self.gu.params[n] for n in names]
            self.model.train()
            with torch.enable_grad():
                logits = forward_logits(self.model, retain)
                if self._gu_kl:
                    loss = sequence_kl(logits, self.reference_logits(retain), retain["labels"]).mean()
                else:
                    loss = sequence_nll(logits, retain["labels"]).mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            self.gu.add_retain_gradient(
                {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)})
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoints also hold the GU retain-gradient history, so that a resumed run projects identically."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.gu is not None and self.args.should_save:
            save_file(self.gu.state_dict(), str(Path(output_dir) / GU_HISTORY_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.gu is not None and (Path(checkpoint) / GU_HISTORY_FILE).is_file():
            tensors = load_file(str(Path(checkpoint) / GU_HISTORY_FILE), device=str(self.args.device))
            self.gu.load_state_dict(tensors)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The unlearning objective on one forget/retain batch (a mean over sequences; see the losses module)."""
        reference = self.reference_logits if self.unlearning_loss.needs_reference else None
        loss, parts = self.unlearning_loss(model, inputs, reference)
        if model.training:
            for key, value in parts.items():
                self._logged_parts[key].append(value)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation on forget/retain pairs reports the unlearning objective only (no logits are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean forget and retain terms since the last log to the Trainer's training logs."""
        if "loss" in logs and self._logged_parts:
            for key, values in self._logged_parts.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._logged_parts.clear()
        super().log(logs, *args, **kwargs)
