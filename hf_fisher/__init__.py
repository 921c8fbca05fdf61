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
from hf_fisher.evaluation import evaluate_unlearning  # noqa: E402
from hf_fisher.lowrank import fisher_weights, weighted_low_rank  # noqa: E402
from hf_fisher.merging import fisher_merge  # noqa: E402
from hf_fisher.models import load_default_model, load_model  # noqa: E402
from hf_fisher.trainers import (  # noqa: E402
    FisherTrainer,
    FisherTrainingArguments,
    UnlearningArguments,
    UnlearningTrainer,
)
from hf_fisher.trainers.unlearning import (  # noqa: E402
    KFADEArguments,
    KFADETrainer,
    apply_unlearning_update,
    selective_synaptic_dampening,
)
from hf_fisher.tuners.fwsvd import (  # noqa: E402
    initialize_lora_fwsvd,
    load_fwsvd_for_training,
    save_fwsvd_adapter,
)

__all__ = [
    "DiagonalFisher",
    "FisherTrainer",
    "FisherTrainingArguments",
    "KFACFactors",
    "KFADEArguments",
    "KFADETrainer",
    "UnlearningArguments",
    "UnlearningTrainer",
    "__version__",
    "apply_unlearning_update",
    "build_fictitious_facts",
    "compress_fwsvd",
    "estimate_diagonal_fisher",
    "estimate_kfac",
    "evaluate_unlearning",
    "fisher_merge",
    "fisher_weights",
    "initialize_lora_fwsvd",
    "load_compressed_model",
    "load_default_model",
    "load_fwsvd_for_training",
    "load_model",
    "save_fwsvd_adapter",
    "selective_synaptic_dampening",
    "weighted_low_rank",
]
