"""Loading what is merged from folders: full models or PEFT adapters on one base, and a Fisher for each.

Shared by ``hf-fisher merge`` and ``examples/merge.py``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hf_fisher.curvature import DiagonalFisher, estimate_diagonal_fisher


def _load(path: str | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fisher.models import DEFAULT_MODEL_NAME, load_default_model

    if path in (None, DEFAULT_MODEL_NAME, "default"):
        return load_default_model()
    model = AutoModelForCausalLM.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # only needed to estimate a missing Fisher
    return model.eval(), tokenizer


def load_models_to_merge(
    paths: Sequence[str | os.PathLike], base_model: str | None = None
) -> tuple[list[nn.Module], bool, Any]:
    """The models in ``paths`` (all full models, or all PEFT adapter folders on one base), whether they are
    adapters, and a tokenizer (``None`` if the folders have none). ``base_model`` overrides the adapters' base."""
    paths = [str(p) for p in paths]
    adapters = [(Path(p) / "adapter_config.json").is_file() for p in paths]
    if any(adapters) and not all(adapters):
        raise ValueError("the folders mix adapter folders and full models; merge adapters or full models, not both")
    if not all(adapters):
        loaded = [_load(p) for p in paths]
        return [m for m, _ in loaded], False, loaded[0][1]
    from peft import PeftModel

    bases = {json.loads((Path(p) / "adapter_config.json").read_text()).get("base_model_name_or_path") for p in paths}
    if base_model is None:
        if len(bases) != 1:
            raise ValueError(f"the adapters name different base models {sorted(map(str, bases))}; pass the base "
                             "model to use")
        base_model = bases.pop()
    base, tokenizer = _load(base_model)
    return [PeftModel.from_pretrained(copy.deepcopy(base), p) for p in paths], True, tokenizer


def fisher_for_merging(
    model: nn.Module,
    path: str | os.PathLike,
    spec: str = "auto",
    *,
    is_adapter: bool,
    tokenizer: Any = None,
    corpus: str = "lee_background",
    seq_len: int = 128,
    max_sequences: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DiagonalFisher | None:
    """The Fisher of one model for merging: ``"none"``, a Fisher folder, or ``"auto"`` — the one saved in
    ``path/fisher`` (by ``FisherTrainer``) if it covers the merged tensors, else a sampled-label estimate on
    ``max_sequences × seq_len`` tokens of ``corpus``. For an adapter the Fisher is of its layers' base weights."""
    from hf_fisher.trainers.fisher import _fisher_key, _lora_layers

    if spec == "none":
        return None
    layers = _lora_layers(model) if is_adapter else {}

    def usable(fisher: DiagonalFisher) -> bool:
        if is_adapter:
            return all(_fisher_key(n, fisher) is not None for n in layers)
        params = dict(model.named_parameters())
        return len(fisher) > 0 and all(k in params and params[k].shape == t.shape for k, t in fisher.items())

    if spec != "auto":
        fisher = DiagonalFisher.from_pretrained(spec)
        if not usable(fisher):
            raise ValueError(f"the Fisher in {spec} does not cover the tensors of {path} that are merged")
        return fisher
    saved = Path(path) / "fisher"
    if (saved / "diagonal_fisher.safetensors").is_file():
        fisher = DiagonalFisher.from_pretrained(saved)
        if usable(fisher):
            log(f"  {path}: reusing the Fisher saved in {saved}")
            return fisher
    if tokenizer is None:
        raise ValueError(f"{path} has no saved Fisher that fits and no tokenizer to estimate one; give a Fisher "
                         "folder")
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from hf_fisher.data import load_text_corpus, pack_for_causal_lm

    log(f"  {path}: estimating the sampled-label Fisher on {max_sequences} x {seq_len} tokens of {corpus}")
    packed = pack_for_causal_lm(load_text_corpus(corpus)["train"], tokenizer, seq_len=seq_len,
                                max_sequences=max_sequences)
    loader = DataLoader(packed, batch_size=8, shuffle=False, collate_fn=default_data_collator)
    targets = [f"{n}.base_layer" for n in layers] if is_adapter else None
    return estimate_diagonal_fisher(model, loader, kind="sampled", target_modules=targets, seed=seed,
                                    data_description=f"{corpus} train, sampled labels")
