"""``evaluate_unlearning``: one call that measures how much a model forgot, what it kept, what it leaks, and
what attacks bring back — and writes a JSON file, a markdown table and a plot.

Metrics (TOFU / MUSE conventions; formulas in :mod:`hf_fisher.evaluation.metrics`):

* forget quality: KS-test p-value between the forget-set truth ratios of the model and of the retain model;
* model utility: harmonic mean of answer probability, ROUGE-L recall of the greedy answer and truth-ratio score
  on the retain set and on world facts;
* on the forget set: truth ratio (``mean min(R, 1/R)``), answer probability, ROUGE-L recall, extraction
  strength, exact memorisation;
* membership inference, forget (members) vs holdout (never trained): AUCs of LOSS, zlib, Min-K% and Min-K%++,
  and PrivLeak of each against the retain model;
* retain KL: mean answer-token ``KL(p_original ‖ p_model)`` on the retain set;
* attacks (:mod:`hf_fisher.evaluation.attacks`): relearning on half of the forget people, scored on the other
  half, and bitsandbytes NF4 / FP4 / int8 reloads; recovery = ``(m_attacked - m_model)/(m_original - m_model)``
  for answer probability, ROUGE-L recall and extraction strength. The relearning attack is also run on the
  retain model, as the baseline of how fast never-seen facts are learned.

The retain model can be given as a model, or as the result dict (or JSON path) of an earlier
``evaluate_unlearning`` of it, so it need not be re-scored for every unlearned model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from torch import nn

from hf_fisher.data.facts import format_question_answer, generate_answers
from hf_fisher.evaluation import metrics as M
from hf_fisher.evaluation.attacks import QUANTIZATION_MODES, quantization_attack, relearning_attack
from hf_fisher.evaluation.scoring import AnswerScores, mean_kl_to, score_answers

ATTACKS = ("relearning", "quantization")
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
REQUIRED_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answers")


class _Rows:
    """One split's rows with the true, paraphrased and perturbed answers tokenized once, shared by all models."""

    def __init__(self, dataset: Any, tokenizer: Any, name: str, limit: int | None = None):
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"split {name!r} has no {missing} column(s); evaluate_unlearning needs questions with true, "
                "paraphrased and perturbed answers (see hf_fisher.build_fictitious_facts)"
            )
        full = dataset.select_columns(["question", "answer"])[:]
        self.keys = set(zip(full["question"], full["answer"], strict=True))  # of the whole split, for overlap checks
        if limit is not None and len(dataset) > limit:
            dataset = dataset.select(range(limit))
        if len(dataset) == 0:
            raise ValueError(f"split {name!r} is empty; evaluation needs at least one question")
        table = dataset[:]
        self.name = name
        self.questions: list[str] = list(table["question"])
        self.answers: list[str] = list(table["answer"])
        self.people: list[int] = list(table["person_id"]) if "person_id" in table else list(range(len(dataset)))
        if any(not a for a in self.answers):
            raise ValueError(f"split {name!r} has rows without an answer; every question needs its answer")
        encode = lambda q, a: format_question_answer(tokenizer, q, a, max_length=None)  # noqa: E731
        self.true = [encode(q, a) for q, a in zip(self.questions, self.answers, strict=True)]
        self.paraphrased = [encode(q, a) for q, a in zip(self.questions, table["paraphrased_answer"], strict=True)]
        self.perturbed = [[encode(q, a) for a in wrong] for q, wrong in zip(self.questions, table["perturbed_answers"],
                                                                             strict=True)]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, indices: Sequence[int]) -> _Rows:
        out = object.__new__(_Rows)
        out.name = self.name
        for attr in ("questions", "answers", "people", "true", "paraphrased", "perturbed"):
            setattr(out, attr, [getattr(self, attr)[i] for i in indices])
        out.keys = set(zip(out.questions, out.answers, strict=True))
        return out


class _Scorer:
    """Scores models on prepared rows with one tokenizer and one set of options."""

    def __init__(self, tokenizer: Any, *, batch_size: int, max_new_tokens: int, min_k: float):
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.min_k = min_k
        self._rouge = None

    def rouge_recall(self, predictions: list[str], references: list[str]) -> list[float]:
        if self._rouge is None:
            self._rouge = M.load_metric("rouge")
        scores = self._rouge.compute(predictions=predictions, references=references, rouge_types=["rougeL"],
                                     use_aggregator=False)
        return list(scores["rougeL_recall"])

    def answers(self, model: nn.Module, rows: _Rows, *, perturbed: bool, paraphrased: bool) -> dict[str, Any]:
        """Per-row probability, extraction strength, exact memorisation and membership scores of true answers,
        with the mean log-probs of the paraphrased and perturbed answers when asked — all in one scoring call, so
        that the answers of a question share one prompt pass."""
        flat = [p for group in rows.perturbed for p in group] if perturbed else []
        candidates = rows.true + (rows.paraphrased if paraphrased else []) + flat
        s = score_answers(model, candidates, pad_token_id=self.pad, batch_size=self.batch_size * 4)
        n = len(rows)
        mean_lp = s.mean_log_probs()
        true = AnswerScores(s.token_log_probs[:n], s.hits[:n], s.z_scores[:n])
        out: dict[str, Any] = {
            "probability": np.exp(mean_lp[:n]).tolist(),
            "extraction_strength": [M.extraction_strength(h) for h in true.hits],
            "exact_memorization": [M.exact_memorization(h) for h in true.hits],
            "mean_log_prob": mean_lp[:n].tolist(),
            "mia_loss": mean_lp[:n].tolist(),
            "mia_zlib": [M.zlib_score(t, a) for t, a in zip(true.total_log_probs(), rows.answers, strict=True)],
            "mia_min_k": [M.min_k_percent(t, self.min_k) for t in true.token_log_probs],
            "mia_min_k_plus_plus": [M.min_k_percent(z, self.min_k) for z in true.z_scores],
        }
        rest = mean_lp[n:]
        if paraphrased:
            out["_paraphrased"], rest = rest[:n], rest[n:]
        if perturbed:
            groups, start = [], 0
            for group in rows.perturbed:
                groups.append(rest[start : start + len(group)].tolist())
                start += len(group)
            out["_perturbed"] = groups
        return out

    def rouge(self, model: nn.Module, rows: _Rows) -> list[float]:
        # decoding is memory-bound on small models: wider batches read the weights fewer times per token
        generated = generate_answers(model, self.tokenizer, rows.questions, self.max_new_tokens, self.batch_size * 4)
        return self.rouge_recall(generated, rows.answers)

    def split(self, model: nn.Module, rows: _Rows, *, truth: bool = True, rouge: bool = True,
              world: bool = False) -> dict[str, Any]:
        """Per-row metrics of one split, with their means under ``"mean"``."""
        per_row = self.answers(model, rows, perturbed=truth or world, paraphrased=truth)
        paraphrased, perturbed = per_row.pop("_paraphrased", None), per_row.pop("_perturbed", None)
        if world:  # the true answer's probability normalised over the true and perturbed answers
            per_row["probability"] = [M.normalised_probability(lp, wrong) for lp, wrong in
                                      zip(per_row["mean_log_prob"], perturbed, strict=True)]
        if truth:
            per_row["truth_ratio"] = [M.truth_ratio(lp, wrong) for lp, wrong in
                                      zip(paraphrased, perturbed, strict=True)]
        if rouge:
            per_row["rougeL_recall"] = self.rouge(model, rows)
        means = {k: float(np.mean(v)) for k, v in per_row.items() if not k.startswith("mia_")}
        if truth:
            means.pop("truth_ratio")
        return {"per_row": per_row, "mean": means}


@dataclass
class _Benchmark:
    """The prepared splits and the scorer: scores a model on all of them and summarises the result."""

    forget: _Rows
    retain: _Rows
    holdout: _Rows
    world: _Rows | None
    scorer: _Scorer

    def full(self, m: nn.Module) -> dict[str, Any]:
        """Per-split scores of ``m``."""
        out = {
            "forget": self.scorer.split(m, self.forget),
            "retain": self.scorer.split(m, self.retain),
            "holdout": self.scorer.split(m, self.holdout, truth=False, rouge=False),
        }
        if self.world is not None:
            out["world_facts"] = self.scorer.split(m, self.world, world=True)
        return out

    def summarise(self, splits: Mapping[str, Any]) -> dict[str, Any]:
        """Headline numbers of one model's split scores (no forget quality: that needs the retain model)."""
        f, r = splits["forget"], splits["retain"]
        summary = {
            "forget_truth_ratio": M.forget_truth_ratio_score(f["per_row"]["truth_ratio"]),
            "forget_probability": f["mean"]["probability"],
            "forget_rougeL_recall": f["mean"]["rougeL_recall"],
            "forget_extraction_strength": f["mean"]["extraction_strength"],
            "forget_exact_memorization": f["mean"]["exact_memorization"],
            "retain_probability": r["mean"]["probability"],
            "retain_rougeL_recall": r["mean"]["rougeL_recall"],
            "retain_truth_ratio": M.retain_truth_ratio_score(r["per_row"]["truth_ratio"]),
        }
        parts = [summary["retain_probability"], summary["retain_rougeL_recall"], summary["retain_truth_ratio"]]
        if "world_facts" in splits:
            w = splits["world_facts"]
            summary["world_probability"] = w["mean"]["probability"]
            summary["world_rougeL_recall"] = w["mean"]["rougeL_recall"]
            summary["world_truth_ratio"] = M.retain_truth_ratio_score(w["per_row"]["truth_ratio"])
            parts += [summary["world_probability"], summary["world_rougeL_recall"], summary["world_truth_ratio"]]
        summary["model_utility"] = M.harmonic_mean(parts)
        for attack, value in _mia(f, splits["holdout"]).items():
            summary[f"mia_auc_{attack}"] = value
        return summary


def _mia(forget: Mapping[str, Any], holdout: Mapping[str, Any]) -> dict[str, float]:
    return {a: M.auc(forget["per_row"][f"mia_{a}"], holdout["per_row"][f"mia_{a}"]) for a in MIA_ATTACKS}


def _forget_scores(split: Mapping[str, Any]) -> dict[str, float]:
    """The forget-strength numbers that attacks try to bring back."""
    return {k: split["mean"][k] for k in ("probability", "rougeL_recall", "extraction_strength")}


def _recovery(attacked: Mapping[str, float], unlearned: Mapping[str, float], original: Mapping[str, float] | None):
    if original is None:
        return None
    return {k: M.recovery(attacked[k], unlearned[k], original[k]) for k in attacked}


def _load_reference_result(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, nn.Module):
        return None
    if isinstance(value, str | os.PathLike):
        return json.loads(Path(value).read_text())
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError("retain_model must be a model, an evaluate_unlearning result dict, or the path of its JSON")


def evaluate_unlearning(
    model: nn.Module,
    data: DatasetDict,
    tokenizer: Any,
    *,
    retain_model: nn.Module | Mapping[str, Any] | str | os.PathLike | None = None,
    original_model: nn.Module | None = None,
    forget_split: str = "forget10",
    retain_split: str = "retain90",
    holdout_split: str = "holdout",
    world_split: str | None = "world_facts",
    attacks: Sequence[str] = ATTACKS,
    quantization_modes: Sequence[str] = QUANTIZATION_MODES,
    relearning_steps: int = 20,
    relearning_learning_rate: float = 1e-5,
    max_retain_rows: int | None = 200,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    min_k: float = 0.4,
    seed: int = 0,
    name: str = "model",
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate an unlearned ``model`` on the fictitious-facts benchmark ``data`` (see the module docstring).

    ``data`` is a ``DatasetDict`` like :func:`hf_fisher.build_fictitious_facts`'s (tokenized or not: answers are
    tokenized here with ``tokenizer``'s chat template). ``retain_model`` (a model, or an earlier result of this
    function for it) gives forget quality and PrivLeak; ``original_model`` (the model before unlearning) gives
    retain KL and attack recovery. ``max_retain_rows`` caps the retain rows scored (the first ones; ``None``:
    all). With ``output_dir`` the result is also written there as ``<name>.json``, ``<name>.md`` and
    ``<name>.png``. Returns a JSON-serialisable dict whose ``"summary"`` holds the headline numbers.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    for mode in quantization_modes:
        if mode not in QUANTIZATION_MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose from {QUANTIZATION_MODES}")
    for split in (forget_split, retain_split, holdout_split, world_split):
        if split is not None and split not in data:
            raise ValueError(f"data has no split {split!r}; it has {sorted(data)}")
    forget = _Rows(data[forget_split], tokenizer, forget_split)
    retain = _Rows(data[retain_split], tokenizer, retain_split, max_retain_rows)
    holdout = _Rows(data[holdout_split], tokenizer, holdout_split)
    world = _Rows(data[world_split], tokenizer, world_split) if world_split is not None else None
    if forget.keys & retain.keys:
        raise ValueError(
            f"{len(forget.keys & retain.keys)} question(s) are in both {forget_split!r} and {retain_split!r}; "
            "forget and retain sets must be disjoint"
        )
    if "relearning" in attacks and len(forget) < 2:
        raise ValueError("the relearning attack needs at least two forget rows (one half to train, one to test)")
    retain_reference = _load_reference_result(retain_model)
    scorer = _Scorer(tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, min_k=min_k)
    started = time.perf_counter()

    bnb_logger = logging.getLogger("bitsandbytes")
    bnb_level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)  # int8 matmuls warn about fp16 casts on every call
    try:
        bench = _Benchmark(forget, retain, holdout, world, scorer)
        result = _evaluate(bench, model, retain_model, retain_reference, original_model, attacks=attacks,
                           quantization_modes=quantization_modes,
                           relearning_steps=relearning_steps, relearning_learning_rate=relearning_learning_rate,
                           seed=seed, name=name, batch_size=batch_size)
    finally:
        bnb_logger.setLevel(bnb_level)
    result["seconds"] = time.perf_counter() - started
    if output_dir is not None:
        write_report(result, output_dir)
    return result


def _evaluate(bench: _Benchmark, model, retain_model, retain_reference, original_model, *, attacks,
              quantization_modes, relearning_steps, relearning_learning_rate, seed, name, batch_size):
    """The model passes of :func:`evaluate_unlearning` (arguments already checked)."""
    forget, retain, scorer = bench.forget, bench.retain, bench.scorer
    splits = bench.full(model)
    summary = bench.summarise(splits)
    result: dict[str, Any] = {"name": name, "summary": summary, "splits": splits}

    retain_summary = None
    if isinstance(retain_model, nn.Module):
        retain_splits = bench.full(retain_model)
        retain_summary = bench.summarise(retain_splits)
        result["retain_model"] = {"summary": retain_summary, "splits": retain_splits}
    elif retain_reference is not None:
        retain_summary = retain_reference["summary"]
        retain_splits = retain_reference["splits"]
        if retain_splits["forget"]["per_row"].get("truth_ratio") is None or len(
            retain_splits["forget"]["per_row"]["truth_ratio"]) != len(forget):
            raise ValueError("the retain-model result was computed on another forget split; re-evaluate it")
        result["retain_model"] = {"summary": retain_summary, "splits": retain_splits}
    if retain_summary is not None:
        summary["forget_quality"] = M.forget_quality(
            splits["forget"]["per_row"]["truth_ratio"], result["retain_model"]["splits"]["forget"]["per_row"][
                "truth_ratio"])
        for attack in MIA_ATTACKS:
            summary[f"privleak_{attack}"] = M.privleak(summary[f"mia_auc_{attack}"],
                                                       retain_summary[f"mia_auc_{attack}"])

    original_forget = original_split = None
    if original_model is not None:
        summary["retain_kl"] = float(np.mean(mean_kl_to(model, original_model, retain.true,
                                                        pad_token_id=scorer.pad, batch_size=batch_size)))
        original_split = scorer.split(original_model, forget, truth=False)
        original_forget = _forget_scores(original_split)
        result["original_model"] = {"forget": original_forget}

    result["attacks"] = {}
    if "quantization" in attacks:
        unlearned = _forget_scores(splits["forget"])
        for mode in quantization_modes:
            attacked = _forget_scores(scorer.split(quantization_attack(model, mode), forget, truth=False))
            result["attacks"][f"quantization_{mode}"] = {
                "forget": attacked, "recovery": _recovery(attacked, unlearned, original_forget)}
    if "relearning" in attacks:
        retain_module = retain_model if isinstance(retain_model, nn.Module) else None
        result["attacks"]["relearning"] = _relearning(
            model, splits["forget"], retain_module,
            result["retain_model"]["splits"]["forget"] if retain_module is not None else None, original_split,
            forget, scorer, steps=relearning_steps, learning_rate=relearning_learning_rate, seed=seed)
    return result


def _subset_scores(split: Mapping[str, Any], indices: Sequence[int]) -> dict[str, float]:
    """``_forget_scores`` of the rows ``indices`` of an already scored split."""
    per_row = split["per_row"]
    return {k: float(np.mean([per_row[k][i] for i in indices]))
            for k in ("probability", "rougeL_recall", "extraction_strength")}


def _relearning(model, model_forget, retain_model, retain_forget, original_forget, forget: _Rows,
                scorer: _Scorer, *, steps: int, learning_rate: float, seed: int) -> dict[str, Any]:
    """Fine-tune on the first half of the forget people, measure on the second half.

    ``*_forget`` are the forget-split scores already computed for each model (reused for the held-out half
    before the attack, rather than scored again)."""
    people = sorted(set(forget.people))
    if len(people) >= 2:
        train_people = set(people[: len(people) // 2])
        train = [i for i, p in enumerate(forget.people) if p in train_people]
    else:
        train = list(range(0, len(forget), 2))
    test = [i for i in range(len(forget)) if i not in set(train)]
    train_rows, test_rows = forget.subset(train), forget.subset(test)

    def attack(m, scored):
        attacked = relearning_attack(m, train_rows.true, pad_token_id=scorer.pad, steps=steps,
                                     learning_rate=learning_rate, seed=seed)
        return _subset_scores(scored, test), _forget_scores(scorer.split(attacked, test_rows, truth=False))

    before, after = attack(model, model_forget)
    original = _subset_scores(original_forget, test) if original_forget is not None else None
    out = {"steps": steps, "learning_rate": learning_rate, "n_train_rows": len(train), "n_test_rows": len(test),
           "forget_before": before, "forget": after, "recovery": _recovery(after, before, original)}
    if retain_model is not None:
        retain_before, retain_after = attack(retain_model, retain_forget)
        out["retain_model"] = {"forget_before": retain_before, "forget": retain_after,
                               "recovery": _recovery(retain_after, retain_before, original)}
    return out


# ---------------------------------------------------------------------------------------------------------
# reports

SUMMARY_COLUMNS = (
    ("forget_quality", "FQ"), ("model_utility", "MU"), ("forget_truth_ratio", "forget TR"),
    ("forget_probability", "forget p"), ("forget_rougeL_recall", "forget ROUGE-L"),
    ("forget_extraction_strength", "ES"), ("mia_auc_min_k_plus_plus", "MIA AUC (Min-K%++)"),
    ("privleak_min_k_plus_plus", "PrivLeak"), ("retain_kl", "retain KL"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the headline numbers of several named results (``{name: evaluate_unlearning(...)}``)."""
    head = "| model | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for label, result in results.items():
        s = result["summary"]
        lines.append(f"| {label} | " + " | ".join(_fmt(s.get(key)) for key, _ in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def attack_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of attack recovery (answer probability / ROUGE-L / extraction strength)."""
    lines = ["| model | attack | forget p | forget ROUGE-L | ES | recovery p | recovery ROUGE-L | recovery ES |",
             "|---|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        for attack, value in result.get("attacks", {}).items():
            rec = value.get("recovery") or {}
            f = value["forget"]
            lines.append(
                f"| {label} | {attack} | {_fmt(f['probability'])} | {_fmt(f['rougeL_recall'])} | "
                f"{_fmt(f['extraction_strength'])} | {_fmt(rec.get('probability'))} | "
                f"{_fmt(rec.get('rougeL_recall'))} | {_fmt(rec.get('extraction_strength'))} |"
            )
    return "\n".join(lines)


def plot_forget_quality_vs_utility(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Scatter of forget quality (log scale) against model utility, one point per named result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, result in results.items():
        s = result["summary"]
        if s.get("forget_quality") is None:
            continue
        ax.scatter(s["model_utility"], max(s["forget_quality"], 1e-300), s=40)
        ax.annotate(label, (s["model_utility"], max(s["forget_quality"], 1e-300)), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(result: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` for one result (and its retain model if scored),
    each through a temporary file and a rename so that a crash leaves no half-written report."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = result["name"]
    rows = {name: result}
    if "retain_model" in result:
        rows["retain model"] = {"summary": result["retain_model"]["summary"]}
    markdown = (f"# Unlearning evaluation: {name}\n\n{summary_table(rows)}\n\n"
                f"## Attacks\n\n{attack_table({name: result})}\n")
    paths = {"json": folder / f"{name}.json", "md": folder / f"{name}.md", "png": folder / f"{name}.png"}

    def atomic(path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    atomic(paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(_finite(result), indent=1)))
    atomic(paths["md"], lambda tmp: Path(tmp).write_text(markdown))
    atomic(paths["png"], lambda tmp: plot_forget_quality_vs_utility(rows, tmp + ".png") or os.replace(tmp + ".png",
                                                                                                        tmp))
    return paths
