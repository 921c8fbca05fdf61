"""Model passes behind the unlearning metrics: answer log-probs, greedy hits, Min-K%++ z-scores and KL.

Everything is batched (right padding for scoring, left padding for generation), in eval mode, without
gradients, and in fp32 for the softmax whatever the model dtype.
"""

from __future__ import annotations

import inspect
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


def _answer_start(labels: Sequence[int]) -> int:
    """Index of the first position whose logits score an answer token (one before the first label)."""
    for t in range(1, len(labels)):
        if labels[t] != -100:
            return t - 1
    raise ValueError("a row has no answer tokens (all labels are -100); score_answers needs answers")


def _collate(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device) -> dict[str, torch.Tensor]:
    """``pad_collate`` of token lists (labels padded with -100, a mask of ones), on ``device``."""
    rows = [{"input_ids": i, "attention_mask": [1] * len(i), "labels": y} for i, y in zip(ids, labels, strict=True)]
    return {k: v.to(device) for k, v in pad_collate(rows, pad_token_id).items()}


def _token_stats(logits: torch.Tensor, targets: torch.Tensor, z_scores: bool):
    """Per-row answer log-probs, greedy hits and z-scores; ``logits[:, t]`` scores ``targets[:, t]`` (-100: skip)."""
    logits = logits.float()
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    token = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    hit = logits.argmax(-1) == targets
    if z_scores:
        p = logp.exp()
        mu = (p * logp).sum(-1)
        # two-pass variance: E[x²] - μ² loses ~1e-4 in fp32 to cancellation
        sigma = (p * (logp - mu.unsqueeze(-1)).square()).sum(-1).clamp_min(1e-12).sqrt()
        z = (token - mu) / sigma
    for i in range(targets.shape[0]):
        m = mask[i]
        yield token[i][m].cpu(), hit[i][m].cpu(), z[i][m].cpu() if z_scores else token.new_empty(0)


@torch.no_grad()
def score_answers(
    model: nn.Module, rows: Sequence[Mapping[str, Any]], *, pad_token_id: int, batch_size: int = 16,
    z_scores: bool = True, share_prompts: bool = True,
) -> AnswerScores:
    """Teacher-forced scores of the labelled (answer) tokens of each row (``input_ids``/``labels`` lists).

    The z-score of token ``y`` is ``(log p(y) - μ) / σ`` with ``μ``, ``σ²`` the mean and variance of ``log p``
    under ``p`` over the vocabulary (Min-K%++); ``z_scores=False`` skips them (empty tensors), saving two passes
    over the vocabulary.

    With ``share_prompts`` (the default) rows are grouped by their prompt (the tokens before the answer): each
    distinct prompt runs through the model once, its key/value cache is copied to every row that shares it, and
    only the answers run on top — so the true, paraphrased and perturbed answers of a question cost one prompt
    pass, and vocabulary-sized logits are computed on answer positions only. The result equals the plain
    full-sequence pass (``share_prompts=False``) up to float rounding. ``batch_size`` counts rows per model pass.
    """
    starts = [_answer_start(row["labels"]) for row in rows]  # validates every row before any model pass
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[tuple | None] = [None] * len(rows)
    try:
        if share_prompts and all(s > 0 for s in starts):
            _score_shared(model, rows, starts, out, pad_token_id, batch_size, z_scores, device)
        else:
            for begin in range(0, len(rows), batch_size):
                chunk = list(range(begin, min(begin + batch_size, len(rows))))
                batch = _collate([rows[i]["input_ids"] for i in chunk], [rows[i]["labels"] for i in chunk],
                                 pad_token_id, device)
                logits = forward_logits(model, batch)[:, :-1]
                for i, stats in zip(chunk, _token_stats(logits, batch["labels"][:, 1:], z_scores), strict=True):
                    out[i] = stats
    finally:
        model.train(was_training)
    return AnswerScores(*(list(part) for part in zip(*out, strict=True))) if out else AnswerScores([], [], [])


def _cache_argument(model: nn.Module) -> str:
    """The forward's keyword for a key/value cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _score_shared(model, rows, starts, out, pad_token_id, batch_size, z_scores, device) -> None:
    """``score_answers`` with one prompt pass per distinct prompt (see there)."""
    cache_arg = _cache_argument(model)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (row, s) in enumerate(zip(rows, starts, strict=True)):
        groups.setdefault(tuple(row["input_ids"][:s]), []).append(i)
    # pack whole prompt groups into passes of at most batch_size rows (a larger group is split)
    passes: list[list[tuple[tuple[int, ...], list[int]]]] = [[]]
    filled = 0
    for prompt, members in groups.items():
        for begin in range(0, len(members), batch_size):
            part = members[begin : begin + batch_size]
            if filled + len(part) > batch_size:
                passes.append([])
                filled = 0
            passes[-1].append((prompt, part))
            filled += len(part)
    for chunk in passes:
        prompts = [p for p, _ in chunk]
        prompt = _collate(prompts, prompts, pad_token_id, device)
        prompt_mask = prompt["attention_mask"]
        output = model(input_ids=prompt["input_ids"], attention_mask=prompt_mask, use_cache=True, logits_to_keep=1)
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        owner = torch.tensor([g for g, (_, members) in enumerate(chunk) for _ in members], device=device)
        cache.reorder_cache(owner)  # row r continues from the cache of its prompt owner[r]
        members = [i for _, part in chunk for i in part]
        suffix = _collate([rows[i]["input_ids"][starts[i]:] for i in members],
                          [rows[i]["labels"][starts[i]:] for i in members], pad_token_id, device)
        positions = torch.tensor([starts[i] for i in members], device=device).unsqueeze(1) + torch.arange(
            suffix["input_ids"].shape[1], device=device)
        logits = model(input_ids=suffix["input_ids"],
                       attention_mask=torch.cat([prompt_mask[owner], suffix["attention_mask"]], dim=1),
                       position_ids=positions, use_cache=True, **{cache_arg: cache}).logits[:, :-1]
        for i, stats in zip(members, _token_stats(logits, suffix["labels"][:, 1:], z_scores), strict=True):
            out[i] = stats


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
