"""ROUGE as a local ``evaluate`` module: ``evaluate.load(path_to_this_folder)`` works offline.

``evaluate.load("rouge")`` fetches its script from the Hugging Face Hub, which is unreachable on air-gapped
machines; this module computes the same scores with Google's ``rouge_score`` package and returns, for each
requested type, precision, recall and F-measure — per example (``use_aggregator=False``) or their means.
Load it with :func:`hf_fisher.evaluation.load_metric` (``load_metric("rouge")``).
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-N / ROUGE-L precision, recall and F-measure computed with the rouge_score package."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings (one per prediction).
    rouge_types: ROUGE types to compute (default ["rouge1", "rouge2", "rougeL"]).
    use_stemmer: Porter-stem words before matching (default False).
    use_aggregator: return means over examples (default True) or one value per example.
Returns:
    {"<type>_precision", "<type>_recall", "<type>_fmeasure"} for every type, floats or lists of floats.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL"])
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
        out = {}
        for kind in rouge_types:
            for part in ("precision", "recall", "fmeasure"):
                values = [float(getattr(s[kind], part)) for s in scores]
                out[f"{kind}_{part}"] = (sum(values) / len(values) if values else 0.0) if use_aggregator else values
        return out
