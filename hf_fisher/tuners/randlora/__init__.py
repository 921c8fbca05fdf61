"""Fast RandLoRA: PEFT's RandLoRA function (same bases, same outputs) in the cheaper contraction order.

Importing this package registers ``FAST_RANDLORA`` with PEFT, so ``get_peft_model(model, FastRandLoraConfig(...))``,
``PeftModel.from_pretrained`` and transformers' adapter loading build :class:`FastRandLoraModel`. Adapters are saved
with PEFT RandLoRA's own tensor names; :func:`convert_to_peft_randlora` / :func:`convert_from_peft_randlora` turn a
saved adapter folder into one that vanilla PEFT loads as ``RANDLORA``, and back.
"""

from __future__ import annotations

from peft import mapping as _peft_mapping

from hf_fisher.tuners.randlora.config import FastRandLoraConfig, HfFisherPeftType
from hf_fisher.tuners.randlora.convert import convert_from_peft_randlora, convert_to_peft_randlora
from hf_fisher.tuners.randlora.fisher_basis import initialize_fisher_basis
from hf_fisher.tuners.randlora.layer import FastRandLoraLayer, contraction_costs
from hf_fisher.tuners.randlora.model import FastRandLoraModel, generate_bases


def _register() -> None:
    """Add FAST_RANDLORA to PEFT's type tables (idempotent; register_peft_method only accepts PEFT's own types)."""
    peft_type = HfFisherPeftType.FAST_RANDLORA
    _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = FastRandLoraConfig
    _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = FastRandLoraModel
    _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = FastRandLoraModel.prefix


_register()

__all__ = [
    "FastRandLoraConfig",
    "FastRandLoraLayer",
    "FastRandLoraModel",
    "HfFisherPeftType",
    "contraction_costs",
    "convert_from_peft_randlora",
    "convert_to_peft_randlora",
    "generate_bases",
    "initialize_fisher_basis",
]
