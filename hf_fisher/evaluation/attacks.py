"""Attacks that try to bring forgotten knowledge back: relearning (a few fine-tuning steps on part of the
forget set) and quantization (reloading the weights in 4-bit NF4/FP4 or 8-bit with bitsandbytes).

Both return a *new* model and leave the attacked one untouched. The quantization attack follows "Catastrophic
Failure of LLM Unlearning via Quantization": an unlearning update smaller than a quantization bucket is rounded
away, and the quantized unlearned model lands back on the quantized original.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_fisher.data.facts import pad_collate
from hf_fisher.trainers.unlearning.losses import forward_logits, sequence_nll

QUANTIZATION_MODES = ("nf4", "fp4", "int8")


def plain_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` as a plain transformers model (PEFT adapters merged into the weights)."""
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    return model


def relearning_attack(
    model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    steps: int = 20,
    learning_rate: float = 1e-5,
    batch_size: int = 8,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune a copy of ``model`` (all weights, AdamW) for ``steps`` steps on ``rows`` (tokenized answers).

    Batches are drawn with a seeded CPU generator; the loss is the sequence-mean answer NLL used by the
    unlearning trainers. Returns the attacked copy in eval mode.
    """
    if not rows:
        raise ValueError("the relearning attack needs at least one row to fine-tune on")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    attacked = plain_model(model)
    attacked.train()
    attacked.requires_grad_(True)
    device = next(attacked.parameters()).device
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator).tolist()
        batch = {k: v.to(device) for k, v in pad_collate([rows[i] for i in picks], pad_token_id).items()}
        loss = sequence_nll(forward_logits(attacked, batch), batch["labels"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return attacked.eval()


def quantization_config(mode: str) -> BitsAndBytesConfig:
    """bitsandbytes config of one attack mode: ``"nf4"``/``"fp4"`` (4-bit, fp32 compute) or ``"int8"``."""
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=torch.float32)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization mode {mode!r}; choose one of {QUANTIZATION_MODES}")


def quantization_attack(model: nn.Module, mode: str = "nf4") -> nn.Module:
    """Reload ``model`` (adapters merged) with bitsandbytes quantization ``mode``, as a user of the published
    weights would: ``save_pretrained`` then ``from_pretrained(..., quantization_config=...)``. Its linear layers
    (all but the output head, as transformers does) become bitsandbytes layers."""
    config = quantization_config(mode)
    plain = plain_model(model)
    device = next(plain.parameters()).device
    with tempfile.TemporaryDirectory(prefix="hf_fisher_quant_") as folder:
        plain.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.float32, device_map={"": str(device)}
        )
    return quantized.eval()
