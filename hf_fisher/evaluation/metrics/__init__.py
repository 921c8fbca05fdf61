"""Metric formulas of unlearning evaluation (TOFU / MUSE / MIA), as pure functions of scores, plus local
``evaluate`` modules.

Every function here takes numbers a model produced (token log-probabilities, argmax hits, truth ratios) and
returns a number, so each one is checked against a hand computation in the tests; the model passes live in
:mod:`hf_fisher.evaluation.scoring`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str):
    """Load one of hf_fisher's local ``evaluate`` modules (``"rouge"``) without the Hub."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no local evaluate module {name!r}; available: {available}")
    import evaluate

    return evaluate.load(str(folder))


def truth_ratio(paraphrased_log_prob: float, perturbed_log_probs: Sequence[float]) -> float:
    """TOFU's truth ratio from length-normalised log-likelihoods (mean token log-prob of each answer).

    ``R = exp(mean_j log p̄(perturbed_j) - log p̄(paraphrased))``: the geometric mean probability of the wrong
    answers over that of the paraphrased true answer. Near 0: the model prefers the truth; near 1: it cannot tell.
    """
    if not perturbed_log_probs:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return math.exp(float(np.mean(perturbed_log_probs)) - float(paraphrased_log_prob))


def forget_truth_ratio_score(ratios: Sequence[float]) -> float:
    """Forget-set aggregate: mean of ``min(R, 1/R)`` (1 = indifferent between true and wrong answers)."""
    return float(np.mean([min(r, 1.0 / r) for r in ratios]))


def retain_truth_ratio_score(ratios: Sequence[float]) -> float:
    """Retain-set aggregate: mean of ``max(0, 1 - R)`` (1 = always prefers the true answer)."""
    return float(np.mean([max(0.0, 1.0 - r) for r in ratios]))


def forget_quality(ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value between truth ratios on the forget set of the evaluated model and
    of the retain model (never trained on the forget set): 1 = indistinguishable, tiny = still remembers."""
    if len(ratios) == 0 or len(retain_model_ratios) == 0:
        raise ValueError("forget_quality needs truth ratios from both models")
    return float(stats.ks_2samp(np.asarray(ratios), np.asarray(retain_model_ratios)).pvalue)


def normalised_probability(true_log_prob: float, wrong_log_probs: Sequence[float]) -> float:
    """``p̄_true / (p̄_true + Σ p̄_wrong)`` with ``p̄ = exp(mean token log-prob)``: TOFU's probability for
    multiple-choice style sets (world facts), where raw probabilities of short answers are not comparable."""
    values = np.exp(np.asarray([true_log_prob, *wrong_log_probs], dtype=np.float64))
    return float(values[0] / values.sum())


def extraction_strength(hits: Sequence[bool] | torch.Tensor) -> float:
    """``1 - k*/n`` with ``k*`` the shortest prefix of the answer after which teacher-forced greedy decoding
    reproduces every remaining token; 0 when even the last token is wrong (nothing is extracted)."""
    hits = [bool(h) for h in (hits.tolist() if isinstance(hits, torch.Tensor) else hits)]
    n = len(hits)
    if n == 0:
        raise ValueError("extraction_strength needs at least one answer token")
    k = n
    while k > 0 and hits[k - 1]:
        k -= 1
    return 1.0 - k / n


def exact_memorization(hits: Sequence[bool] | torch.Tensor) -> float:
    """Fraction of answer tokens that teacher-forced greedy decoding predicts correctly."""
    hits = torch.as_tensor(hits, dtype=torch.float64)
    if hits.numel() == 0:
        raise ValueError("exact_memorization needs at least one answer token")
    return float(hits.mean())


def min_k_percent(values: Sequence[float] | torch.Tensor, k: float = 0.4) -> float:
    """Mean of the lowest ``ceil(k·n)`` values: Min-K% on token log-probs, Min-K%++ on their z-scores.

    Higher means "more likely seen in training" (a membership score)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("min_k_percent needs at least one token")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    count = max(1, math.ceil(k * values.numel()))
    return float(values.sort().values[:count].mean())


def zlib_score(total_log_prob: float, text: str) -> float:
    """Membership score of the zlib attack: log-likelihood over the zlib-compressed length of the text."""
    return float(total_log_prob) / len(zlib.compress(text.encode("utf-8")))


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC that a member scores higher than a non-member (ties count ½): the Mann-Whitney statistic."""
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("auc needs scores of members and of non-members")
    ranks = stats.rankdata(np.concatenate([members, others]))
    u = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * others.size))


def privleak(auc_model: float, auc_retain_model: float) -> float:
    """MUSE's PrivLeak: ``(AUC_model - AUC_retain) / AUC_retain × 100`` (0 = leaks like a never-trained model)."""
    return (auc_model - auc_retain_model) / auc_retain_model * 100.0


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean, 0 if any value is 0 (model utility is only as good as its worst part)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of nothing")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic_mean needs non-negative values, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def recovery(attacked: float, unlearned: float, original: float) -> float:
    """Share of the forgotten amount an attack brings back: ``(m_attacked - m_unlearned)/(m_original -
    m_unlearned)``; NaN when unlearning changed nothing (there is nothing to recover)."""
    gap = original - unlearned
    if abs(gap) < 1e-12:
        return float("nan")
    return (attacked - unlearned) / gap
