"""Model passes behind the unlearning metrics: answer log-probs, greedy hits, Min-K%++ z-scores and KL.

Everything is batched (right padding for scoring, left padding for generation), in eval mode, without
gradients, and in fp32 for the softmax whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_fisher.data.facts import generate_answers, pad_collate  # noqa: F401  (re-exported)
from hf_fisher.trainers.unlearning.losses import forward_logits, sequence_kl


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class AnswerScores:
    """Per-row scores of answers: log-prob, greedy hit and Min-K%++ z-score of every answer token."""

    token_log_probs: list[torch.Tensor]
    hits: list[torch.Tensor]
    z_scores: list[torch.Tensor]

    def mean_log_probs(self) -> np.ndarray:
        return np.array([float(t.mean()) for t in self.token_log_probs])

    def total_log_probs(self) -> np.ndarray:
        return np.array([float(t.sum()) for t in self.token_log_probs])


@torch.no_grad()
def score_answers(
    model: nn.Module, rows: Sequence[Mapping[str, Any]], *, pad_token_id: int, batch_size: int = 16,
    z_scores: bool = True,
) -> AnswerScores:
    """Teacher-forced scores of the labelled (answer) tokens of each row (``input_ids``/``labels`` lists).

    The z-score of token ``y`` is ``(log p(y) - μ) / σ`` with ``μ``, ``σ²`` the mean and variance of ``log p``
    under ``p`` over the vocabulary (Min-K%++); ``z_scores=False`` skips them (empty tensors), saving two passes
    over the vocabulary."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    log_probs: list[torch.Tensor] = []
    hits: list[torch.Tensor] = []
    zs: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = pad_collate(list(rows[start : start + batch_size]), pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = forward_logits(model, batch)[:, :-1].float()
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            if bool((mask.sum(1) == 0).any()):
                raise ValueError("a row has no answer tokens (all labels are -100); score_answers needs answers")
            logp = torch.log_softmax(logits, dim=-1)
            safe = targets.clamp_min(0).unsqueeze(-1)
            token = logp.gather(-1, safe).squeeze(-1)
            hit = logits.argmax(-1) == targets
            if z_scores:
                p = logp.exp()
                mu = (p * logp).sum(-1)
                # two-pass variance: E[x²] - μ² loses ~1e-4 in fp32 to cancellation
                sigma = (p * (logp - mu.unsqueeze(-1)).square()).sum(-1).clamp_min(1e-12).sqrt()
                z = (token - mu) / sigma
            else:
                z = token.new_empty(token.shape)
            for i in range(targets.shape[0]):
                m = mask[i]
                log_probs.append(token[i][m].cpu())
                hits.append(hit[i][m].cpu())
                zs.append(z[i][m].cpu() if z_scores else z.new_empty(0))
    finally:
        model.train(was_training)
    return AnswerScores(log_probs, hits, zs)


@torch.no_grad()
def mean_kl_to(
    model: nn.Module, reference: nn.Module, rows: Sequence[Mapping[str, Any]], *, pad_token_id: int,
    batch_size: int = 16,
) -> np.ndarray:
    """Per-row mean answer-token ``KL(p_reference ‖ p_model)``."""
    out = []
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = pad_collate(list(rows[start : start + batch_size]), pad_token_id)
            b_model = {k: v.to(model_device(model)) for k, v in batch.items()}
            b_ref = {k: v.to(model_device(reference)) for k, v in batch.items()}
            logits = forward_logits(model, b_model)
            ref_logits = forward_logits(reference, b_ref).to(logits.device)
            out.append(sequence_kl(logits, ref_logits, b_model["labels"]).cpu())
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return torch.cat(out).double().numpy()
