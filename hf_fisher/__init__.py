"""hf_fisher: Fisher-information methods for the Hugging Face stack."""

__version__ = "0.1.0"

from hf_fisher.curvature import (  # noqa: E402
    DiagonalFisher,
    KFACFactors,
    estimate_diagonal_fisher,
    estimate_kfac,
)
from hf_fisher.models import load_default_model, load_model  # noqa: E402

__all__ = [
    "DiagonalFisher",
    "KFACFactors",
    "__version__",
    "estimate_diagonal_fisher",
    "estimate_kfac",
    "load_default_model",
    "load_model",
]
