"""hf_fisher: Fisher-information methods for the Hugging Face stack."""

__version__ = "0.1.0"

from hf_fisher.compression import compress_fwsvd, load_compressed_model  # noqa: E402
from hf_fisher.curvature import (  # noqa: E402
    DiagonalFisher,
    KFACFactors,
    estimate_diagonal_fisher,
    estimate_kfac,
)
from hf_fisher.data import build_fictitious_facts  # noqa: E402
from hf_fisher.lowrank import fisher_weights, weighted_low_rank  # noqa: E402
from hf_fisher.models import load_default_model, load_model  # noqa: E402
from hf_fisher.tuners.fwsvd import (  # noqa: E402
    initialize_lora_fwsvd,
    load_fwsvd_for_training,
    save_fwsvd_adapter,
)
from hf_fisher.tuners.randlora import (  # noqa: E402
    FastRandLoraConfig,
    convert_from_peft_randlora,
    convert_to_peft_randlora,
    initialize_fisher_basis,
)

__all__ = [
    "DiagonalFisher",
    "FastRandLoraConfig",
    "KFACFactors",
    "__version__",
    "build_fictitious_facts",
    "compress_fwsvd",
    "convert_from_peft_randlora",
    "convert_to_peft_randlora",
    "estimate_diagonal_fisher",
    "estimate_kfac",
    "fisher_weights",
    "initialize_fisher_basis",
    "initialize_lora_fwsvd",
    "load_compressed_model",
    "load_default_model",
    "load_fwsvd_for_training",
    "load_model",
    "save_fwsvd_adapter",
    "weighted_low_rank",
]
