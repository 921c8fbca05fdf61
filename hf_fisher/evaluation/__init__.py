"""Evaluation of unlearning: TOFU/MUSE-style metrics, membership inference, relearning and quantization attacks,
and reports (JSON, markdown, plot)."""

from hf_fisher.evaluation.attacks import quantization_attack, relearning_attack
from hf_fisher.evaluation.metrics import load_metric
from hf_fisher.evaluation.unlearning import evaluate_unlearning, summary_table, write_report

__all__ = [
    "evaluate_unlearning",
    "load_metric",
    "quantization_attack",
    "relearning_attack",
    "summary_table",
    "write_report",
]
