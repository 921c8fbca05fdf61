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
from hf_fisher.finetuning import (  # noqa: E402
    FinetuneArguments,
    FinetuneTrainingArguments,
    finetune,
    load_finetuned,
)
from hf_fisher.hub import publish  # noqa: E402
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
from hf_fisher.tuners.lqlora import (  # noqa: E402
    LQLoraConfig,
    export_bitsandbytes,
    export_dequantized,
    load_lqlora_model,
    nf_dequantize,
    nf_quantize,
    prepare_lqlora_model,
    save_lqlora_model,
    solve_bit_allocation,
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
    "FinetuneArguments",
    "FinetuneTrainingArguments",
    "FisherTrainer",
    "FisherTrainingArguments",
    "KFACFactors",
    "KFADEArguments",
    "KFADETrainer",
    "LQLoraConfig",
    "UnlearningArguments",
    "UnlearningTrainer",
    "__version__",
    "apply_unlearning_update",
    "build_fictitious_facts",
    "compress_fwsvd",
    "convert_from_peft_randlora",
    "convert_to_peft_randlora",
    "estimate_diagonal_fisher",
    "estimate_kfac",
    "evaluate_unlearning",
    "export_bitsandbytes",
    "export_dequantized",
    "finetune",
    "fisher_merge",
    "fisher_weights",
    "initialize_fisher_basis",
    "initialize_lora_fwsvd",
    "load_compressed_model",
    "load_default_model",
    "load_finetuned",
    "load_fwsvd_for_training",
    "load_lqlora_model",
    "load_model",
    "nf_dequantize",
    "nf_quantize",
    "prepare_lqlora_model",
    "publish",
    "save_fwsvd_adapter",
    "save_lqlora_model",
    "selective_synaptic_dampening",
    "solve_bit_allocation",
    "weighted_low_rank",
]
