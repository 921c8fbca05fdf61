"""Unlearning metric formulas against hand computations, scipy and rouge_score; model scoring against a loop."""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy import stats

from hf_fisher.evaluation import metrics as M
from hf_fisher.evaluation.scoring import mean_kl_to, score_answers
from tests.helpers import qa_rows, tiny_gpt2, tiny_llama


def test_truth_ratio_and_aggregates():
    # perturbed mean log-probs -2 and -4 (mean -3), paraphrase -1: R = exp(-3 - (-1)) = e^-2
    assert M.truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-2))
    ratios = [0.5, 2.0, 1.0, 0.25]
    assert M.forget_truth_ratio_score(ratios) == pytest.approx((0.5 + 0.5 + 1 + 0.25) / 4)
    assert M.retain_truth_ratio_score(ratios) == pytest.approx((0.5 + 0 + 0 + 0.75) / 4)
    with pytest.raises(ValueError, match="at least one perturbed"):
        M.truth_ratio(-1.0, [])


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(loc=0.3, size=50)
    assert M.forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    assert M.forget_quality(a, a + 10) < 1e-10  # fully separated samples
    with pytest.raises(ValueError, match="both models"):
        M.forget_quality([], a)


def test_normalised_probability():
    # p̄ = e^-1 vs wrong e^-2, e^-3
    expected = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert M.normalised_probability(-1.0, [-2.0, -3.0]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "hits, expected",
    [
        ([True, True, True, True], 1.0),  # k* = 0: the whole answer comes out of greedy decoding
        ([False, True, True, True], 0.75),  # needs the first token
        ([True, False, True, True], 0.5),  # needs two tokens, even though the first was right
        ([True, True, True, False], 0.0),  # the last token is wrong: nothing is extracted (not 1/|y|)
        ([False, False, False, False], 0.0),
        ([True], 1.0),
    ],
)
def test_extraction_strength(hits, expected):
    assert M.extraction_strength(hits) == pytest.approx(expected)
    assert M.extraction_strength(torch.tensor(hits)) == pytest.approx(expected)


def test_exact_memorization_min_k_and_zlib():
    assert M.exact_memorization([True, False, True, True]) == 0.75
    # lowest ceil(0.4·5) = 2 of [-1, -5, -2, -0.5, -3] are -5, -3
    assert M.min_k_percent([-1.0, -5.0, -2.0, -0.5, -3.0], 0.4) == pytest.approx(-4.0)
    assert M.min_k_percent([-1.0], 0.4) == -1.0
    with pytest.raises(ValueError, match="k must be"):
        M.min_k_percent([-1.0], 0.0)
    text = "Ada Lovelace was born in London."
    assert M.zlib_score(-12.0, text) == pytest.approx(-12.0 / len(zlib.compress(text.encode())))


def test_auc_against_pair_counting():
    assert M.auc([3, 4], [1, 2]) == 1.0
    assert M.auc([1, 2], [3, 4]) == 0.0
    assert M.auc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(1)
    members, others = rng.integers(0, 6, 30).astype(float), rng.integers(0, 6, 25).astype(float)
    pairs = [1.0 if m > o else 0.5 if m == o else 0.0 for m, o in itertools.product(members, others)]
    assert M.auc(members, others) == pytest.approx(sum(pairs) / len(pairs))


def test_privleak_harmonic_mean_recovery():
    assert M.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert M.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.5, 0.0]) == 0.0
    assert M.recovery(attacked=0.4, unlearned=0.1, original=0.7) == pytest.approx(0.5)
    assert math.isnan(M.recovery(0.4, 0.5, 0.5))


def test_local_rouge_module_matches_rouge_score():
    predictions = ["the cat sat on the mat", "Paris is the capital", "", "a b c d"]
    references = ["the cat is on the mat today", "The capital of France is Paris", "something", "a c"]
    rouge = M.load_metric("rouge")  # offline: HF_HUB_OFFLINE=1 in conftest
    got = rouge.compute(predictions=predictions, references=references, rouge_types=["rouge1", "rougeL"],
                        use_aggregator=False)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        direct = scorer.score(r, p)
        for kind in ("rouge1", "rougeL"):
            assert got[f"{kind}_recall"][i] == pytest.approx(direct[kind].recall)
            assert got[f"{kind}_precision"][i] == pytest.approx(direct[kind].precision)
            assert got[f"{kind}_fmeasure"][i] == pytest.approx(direct[kind].fmeasure)
    mean = rouge.compute(predictions=predictions, references=references, rouge_types=["rougeL"])
    assert mean["rougeL_recall"] == pytest.approx(np.mean(got["rougeL_recall"]))
    with pytest.raises(ValueError, match="no local evaluate module"):
        M.load_metric("bleu")


def test_score_answers_matches_a_per_sequence_loop():
    model, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    rows = qa_rows(5, seed=4)  # different lengths: the batch is padded
    scores = score_answers(model, rows, pad_token_id=0, batch_size=3)
    kl = mean_kl_to(model, reference, rows, pad_token_id=0, batch_size=2)
    for i, row in enumerate(rows):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
            ref = reference(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
        logp, q = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
        positions = [t for t in range(len(row["labels"]) - 1) if row["labels"][t + 1] != -100]
        targets = [row["labels"][t + 1] for t in positions]
        expected_lp = logp[positions, targets]
        torch.testing.assert_close(scores.token_log_probs[i].double(), expected_lp, rtol=1e-5, atol=1e-5)
        expected_hits = [int(logits[t].argmax()) == y for t, y in zip(positions, targets, strict=True)]
        assert scores.hits[i].tolist() == expected_hits
        # Min-K%++ z-score: (log p(y) - E_p[log p]) / sd_p[log p], by hand over the vocabulary
        for j, (t, y) in enumerate(zip(positions, targets, strict=True)):
            p = logp[t].exp()
            mu = float((p * logp[t]).sum())
            sd = math.sqrt(float((p * (logp[t] - mu) ** 2).sum()))
            assert float(scores.z_scores[i][j]) == pytest.approx((float(logp[t, y]) - mu) / sd, rel=1e-4, abs=1e-4)
        expected_kl = np.mean([float((q[t].exp() * (q[t] - logp[t])).sum()) for t in positions])
        assert kl[i] == pytest.approx(expected_kl, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_shared_prompt_scoring_equals_full_sequence_scoring(make_model):
    """Rows with common prompts (several answers per question, a group split across passes, prompts of different
    lengths) score the same with one prompt pass per question as with full sequences."""
    model = make_model(seed=3)
    g = torch.Generator().manual_seed(7)
    rows = []
    for q in range(4):
        prompt = torch.randint(1, 96, (3 + q,), generator=g).tolist()
        for _ in range(1 + 2 * q):  # 1, 3, 5, 7 answers
            answer = torch.randint(1, 96, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
            rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    rows = rows[::2] + rows[1::2]  # members of a group are not adjacent
    shared = score_answers(model, rows, pad_token_id=0, batch_size=4)
    full = score_answers(model, rows, pad_token_id=0, batch_size=4, share_prompts=False)
    for a, b in zip(shared.token_log_probs + shared.z_scores, full.token_log_probs + full.z_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert [h.tolist() for h in shared.hits] == [h.tolist() for h in full.hits]


def test_score_answers_rejects_rows_without_answers_before_any_pass():
    model = tiny_llama()
    rows = qa_rows(3, seed=0) + [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    with pytest.raises(ValueError, match="no answer tokens"):
        score_answers(model, rows, pad_token_id=0)
