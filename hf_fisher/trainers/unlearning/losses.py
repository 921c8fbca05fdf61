"""Unlearning objectives: gradient ascent, GradDiff, NPO and SimNPO, as small pluggable loss objects.

Every quantity is a mean over *sequences* of a per-sequence value (the NLL of an answer is the mean over its
answer tokens, i.e. the tokens whose label is not ``-100``). That choice makes a loss independent of how a
global batch is cut: two processes x 2 sequences, one process x 4, or 2 accumulation steps x 2 give the same
gradient — unlike a mean over all tokens of a micro-batch, whose value depends on the padding of each cut.

Conventions follow open-unlearning's trainers, so that numbers are comparable:

* GradAscent: ``-NLL_forget``.
* GradDiff: ``-γ·NLL_forget + α·R`` with ``R`` the retain NLL or the KL to the reference model (γ = α = 1).
* NPO: ``γ·(2/β)·mean(-log σ(-β·(log p_θ(y|x) - log p_ref(y|x)))) + α·R`` with *summed* answer log-probs
  (β = 0.1, γ = α = 1).
* SimNPO: ``γ·(2/β)·mean(-log σ(β·(NLL_mean(y|x) - δ))) + α·R``: no reference, length-normalised
  (β = 4.5, δ = 0, γ = 0.125, α = 1; open-unlearning's γ weighs the forget term).

The retain KL is ``KL(p_ref ‖ p_θ)`` summed over the vocabulary, averaged over a sequence's answer tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = Mapping[str, torch.Tensor]
ReferenceForward = Callable[[Batch], torch.Tensor]
"""Maps a batch to the reference model's logits (computed without gradients)."""

RETAIN_LOSSES = ("nll", "kl")


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes; labels are kept out so the model computes no loss of its own."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` (labels are not passed: we compute our own per-sequence losses)."""
    return model(**_model_inputs(batch)).logits


def answer_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next-token label and the mask of answer positions, both ``(batch, len - 1)``.

    Position ``t`` scores ``labels[:, t + 1]`` from ``logits[:, t]`` (the causal-LM shift); positions whose label
    is ``-100`` get log-probability 0 and mask ``False``. Computed in fp32 whatever the logits' dtype.
    """
    shift_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = torch.log_softmax(shift_logits, dim=-1)
    token = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return token * mask, mask


def _answer_counts(mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(
            "a sequence in the batch has no answer tokens (all labels are -100); unlearning losses need labels on "
            "the answer — build rows with hf_fisher.data.format_question_answer or drop empty rows"
        )
    return counts


def sequence_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed answer log-probability ``log p(y|x)`` of each sequence, shape ``(batch,)``."""
    token, mask = answer_token_log_probs(logits, labels)
    _answer_counts(mask)
    return token.sum(dim=1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean answer-token NLL of each sequence, shape ``(batch,)``."""
    token, mask = answer_token_log_probs(logits, labels)
    return -token.sum(dim=1) / _answer_counts(mask)


def sequence_kl(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref ‖ p_θ)`` per answer token, averaged over each sequence's answer tokens, shape ``(batch,)``."""
    mask = labels[:, 1:] != -100
    counts = _answer_counts(mask)
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    log_q = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_token * mask).sum(dim=1) / counts


@dataclass
class UnlearningLoss:
    """Base of the unlearning objectives: ``loss(model, batch, reference) -> (scalar loss, logged parts)``.

    ``batch`` has a ``"forget"`` and (when ``uses_retain``) a ``"retain"`` part, each with ``input_ids``,
    ``attention_mask`` and ``labels``; ``reference`` returns the reference model's logits for a batch (``None``
    when the loss needs no reference). Subclass and implement :meth:`forget_term` to add a method.
    """

    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: str = "nll"

    name = "base"
    uses_retain = True
    forget_needs_reference = False

    def __post_init__(self) -> None:
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, got {self.retain_loss!r}")

    @property
    def needs_reference(self) -> bool:
        """Whether a reference model must be kept (NPO's ratio, or a KL retain term)."""
        return self.forget_needs_reference or (self.uses_retain and self.retain_loss == "kl")

    def forget_term(
        self, logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def retain_term(self, model: nn.Module, batch: Batch, reference: ReferenceForward | None) -> torch.Tensor:
        logits = forward_logits(model, batch)
        if self.retain_loss == "nll":
            return sequence_nll(logits, batch["labels"]).mean()
        assert reference is not None
        return sequence_kl(logits, reference(batch), batch["labels"]).mean()

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Batch], reference: ReferenceForward | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.needs_reference and reference is None:
            raise ValueError(f"the {self.name} loss needs a reference model; pass reference=...")
        forget = batch["forget"]
        logits = forward_logits(model, forget)
        reference_logits = reference(forget) if self.forget_needs_reference else None
        forget_value = self.forget_term(logits, forget["labels"], reference_logits)
        loss = self.forget_weight * forget_value
        logs = {"forget_loss": float(forget_value.detach())}
        if self.uses_retain and self.retain_weight != 0:
            if "retain" not in batch:
                raise ValueError(f"the {self.name} loss needs a 'retain' part in each batch")
            retain_value = self.retain_term(model, batch["retain"], reference)
            loss = loss + self.retain_weight * retain_value
            logs["retain_loss"] = float(retain_value.detach())
        return loss, logs


@dataclass
class GradAscent(UnlearningLoss):
    """Gradient ascent on the forget set: minimise ``-NLL_forget`` (no retain term)."""

    name = "grad_ascent"
    uses_retain = False

    def forget_term(self, logits, labels, reference_logits):
        return -sequence_nll(logits, labels).mean()


@dataclass
class GradDiff(UnlearningLoss):
    """``-γ·NLL_forget + α·(retain NLL or KL to the reference)``."""

    name = "grad_diff"

    def forget_term(self, logits, labels, reference_logits):
        return -sequence_nll(logits, labels).mean()


@dataclass
class NPO(UnlearningLoss):
    """Negative preference optimisation: ``(2/β)·mean(-log σ(-β·log(p_θ/p_ref)))`` on the forget set."""

    beta: float = 0.1
    name = "npo"
    forget_needs_reference = True

    def forget_term(self, logits, labels, reference_logits):
        log_ratio = sequence_log_prob(logits, labels) - sequence_log_prob(reference_logits, labels)
        return (-F.logsigmoid(-self.beta * log_ratio)).mean() * 2.0 / self.beta


@dataclass
class SimNPO(UnlearningLoss):
    """Reference-free NPO: ``(2/β)·mean(-log σ(β·(NLL_mean - δ)))`` on the forget set (γ = 0.125 by default)."""

    forget_weight: float = 0.125
    beta: float = 4.5
    delta: float = 0.0
    name = "simnpo"

    def forget_term(self, logits, labels, reference_logits):
        return (-F.logsigmoid(self.beta * (sequence_nll(logits, labels) - self.delta))).mean() * 2.0 / self.beta


UNLEARNING_LOSSES: dict[str, type[UnlearningLoss]] = {
    "grad_ascent": GradAscent,
    "grad_diff": GradDiff,
    "npo": NPO,
    "simnpo": SimNPO,
}


def build_unlearning_loss(name: str, **overrides: Any) -> UnlearningLoss:
    """The loss called ``name`` with its defaults, updated by the non-``None`` ``overrides``."""
    if name not in UNLEARNING_LOSSES:
        raise ValueError(f"unknown unlearning loss {name!r}; choose one of {sorted(UNLEARNING_LOSSES)}")
    cls = UNLEARNING_LOSSES[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in overrides.items() if v is not None and k in fields})
