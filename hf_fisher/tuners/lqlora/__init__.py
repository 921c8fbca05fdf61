"""LQ-LoRA: each target weight W ≈ Q + L₁L₂ with Q NormalFloat-quantized (fixed) and L₁L₂ a trained LoRA.

Parts: :mod:`.quantizer` (NF-k with double quantization and bit packing), :mod:`.decomposition`
(alternating randomized SVD / quantization, optionally Fisher-weighted), :mod:`.allocation` (the integer
program choosing one quantization config per matrix under a bit budget) and :mod:`.model` (the quantized
base layer, PEFT integration, save and load).
"""

from hf_fisher.tuners.lqlora.allocation import BitAllocation, solve_bit_allocation
from hf_fisher.tuners.lqlora.decomposition import LQDecomposition, lq_decompose
from hf_fisher.tuners.lqlora.model import (
    LQLoraConfig,
    NFQuantizedLinear,
    build_error_table,
    export_bitsandbytes,
    export_dequantized,
    guard_bitsandbytes_cpu,
    load_lqlora_model,
    prepare_lqlora_model,
    save_lqlora_model,
    storage_report,
)
from hf_fisher.tuners.lqlora.quantizer import NFConfig, QuantizedTensor, nf_dequantize, nf_levels, nf_quantize

__all__ = [
    "BitAllocation",
    "LQDecomposition",
    "LQLoraConfig",
    "NFQuantizedLinear",
    "build_error_table",
    "export_bitsandbytes",
    "export_dequantized",
    "guard_bitsandbytes_cpu",
    "load_lqlora_model",
    "prepare_lqlora_model",
    "save_lqlora_model",
    "storage_report",
    "lq_decompose",
    "solve_bit_allocation","NFConfig", "QuantizedTensor", "nf_dequantize", "nf_levels", "nf_quantize"]
