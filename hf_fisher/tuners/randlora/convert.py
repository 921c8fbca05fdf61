"""One-call conversion of saved adapter folders between fast RandLoRA and vanilla PEFT RandLoRA.

Both formats name the trained tensors identically (``…<layer>.randlora_lambda`` / ``randlora_gamma``); they differ
in ``adapter_config.json`` (``peft_type``) and in how the random bases travel. PEFT 0.21 saves them once per layer
(``save_projection=True``: hundreds of MB); fast RandLoRA saves them once (PEFT's shared ``base_model.randlora_A/B``
keys) or not at all. Converting checks that every stored basis equals what ``projection_prng_key`` regenerates and
then drops it, so the converted adapter is small and loads without missing/unexpected-key warnings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_fisher.tuners.randlora.config import FastRandLoraConfig, HfFisherPeftType

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SHARED_KEYS = ("base_model.randlora_A", "base_model.randlora_B")


def _read(adapter_dir: Path, expected: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} is not a saved adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(save it with peft_model.save_pretrained(folder))."
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != expected:
        raise ValueError(
            f"{str(adapter_dir)!r} holds a {config.get('peft_type')!r} adapter; this converter expects {expected!r}."
        )
    return config, load_file(str(weights_path))


def _check_bases_and_drop(config: FastRandLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove every stored basis (shared or per layer) after checking it equals the seed's regeneration."""
    from hf_fisher.tuners.randlora.model import generate_bases

    stored = {k: v for k, v in tensors.items() if k.endswith(".randlora_A") or k.endswith(".randlora_B")}
    if not stored:
        return tensors
    shared = [tensors[k] for k in SHARED_KEYS if k in tensors]
    if len(shared) == 2:
        a, b = shared
    else:  # per-layer copies only: the largest slices give the full bases
        a = max((v for k, v in stored.items() if k.endswith("randlora_A")), key=lambda t: t.shape[-1])
        b = max((v for k, v in stored.items() if k.endswith("randlora_B")), key=lambda t: t.shape[0])
    largest = (int(b.shape[0]), int(a.shape[-1]))
    regen_a, regen_b = generate_bases(config, largest)
    if regen_a.shape != a.shape or regen_b.shape != b.shape:
        raise ValueError(
            f"The stored bases have shapes {tuple(a.shape)} and {tuple(b.shape)} but r={config.r} and the layer sizes "
            f"imply {tuple(regen_a.shape)} and {tuple(regen_b.shape)}: the config does not match the weights."
        )
    for key, value in stored.items():
        reference = regen_a if key.endswith("randlora_A") else regen_b
        part = reference[tuple(slice(0, n) for n in value.shape)]
        if not torch.equal(value.float(), part.to(torch.float32)) and not torch.equal(value, part.to(value.dtype)):
            raise ValueError(
                f"The stored basis {key!r} differs from the one projection_prng_key={config.projection_prng_key} "
                "regenerates (saved by another torch version or a different config?): it cannot be dropped safely. "
                "Load this adapter with the PEFT tuner it was saved with."
            )
    return {k: v for k, v in tensors.items() if k not in stored}


def _card(config_dict: dict, vanilla: bool, *, metrics, training, datasets, base_model):
    """hf_fisher's RandLoRA card for the converted folder (built before anything is written: bad metrics raise)."""
    from hf_fisher.cards import adapter_card

    shown = ("r", "randlora_alpha", "target_modules", "projection_prng_key", "sparse", "very_sparse", "contraction")
    settings: dict[str, Any] = {key: config_dict[key] for key in shown if key in config_dict}
    settings.update(training or {})
    base_model = base_model or config_dict.get("base_model_name_or_path") or ""
    return adapter_card(method="randlora", base_model=base_model, datasets=datasets, metrics=metrics,
                        training=settings, vanilla_peft_loadable=vanilla)


def _write(output_dir: Path, config_dict: dict, tensors: dict[str, torch.Tensor], card) -> Path:
    from hf_fisher.cards import write_card

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    write_card(card, output_dir)
    return output_dir


def _fields(config_dict: dict) -> dict:
    from peft import RandLoraConfig

    known = set(RandLoraConfig.__dataclass_fields__) - {"peft_type"}
    return {k: v for k, v in config_dict.items() if k in known}


def convert_to_peft_randlora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
) -> Path:
    """Write a fast RandLoRA adapter folder as a vanilla PEFT ``RANDLORA`` adapter (loads without hf_fisher).

    The trained λ, γ are copied unchanged; bases are dropped (after checking they are the seed's) and the config
    says ``save_projection=False``, so PEFT regenerates the same bases from ``projection_prng_key``. README.md is
    hf_fisher's RandLoRA card (with ``metrics``, ``training``, ``datasets``; ``base_model`` defaults to the config's).
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config_dict, tensors = _read(adapter_dir, HfFisherPeftType.FAST_RANDLORA.value)
    if config_dict.get("basis", "random") != "random":
        raise ValueError(
            f"{str(adapter_dir)!r} uses basis={config_dict.get('basis')!r}: its update diag(u) ΔW diag(v) is not PEFT "
            "RandLoRA's function, so vanilla PEFT cannot load it. Load it with hf_fisher (PeftModel.from_pretrained "
            "after `import hf_fisher`), or merge it into the base weights (merge_and_unload) and share those."
        )
    fast = FastRandLoraConfig(**_fields(config_dict))
    tensors = _check_bases_and_drop(fast, tensors)
    vanilla = fast.to_randlora()
    vanilla.save_projection = False
    ours_only = set(FastRandLoraConfig.__dataclass_fields__) - set(type(vanilla).__dataclass_fields__)
    out = {k: v for k, v in config_dict.items() if k not in ours_only}
    out.update({"peft_type": "RANDLORA", "save_projection": False})
    for key in ("auto_mapping", "base_model_name_or_path", "revision", "task_type"):
        if key in config_dict:
            out[key] = config_dict[key]
    card = _card(out, True, metrics=metrics, training=training, datasets=datasets, base_model=base_model)
    return _write(output_dir, out, tensors, card)


def convert_from_peft_randlora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    contraction: str = "auto",
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
) -> Path:
    """Write a vanilla PEFT ``RANDLORA`` adapter folder as a fast RandLoRA adapter (same outputs, small file).

    Per-layer copies of the bases that PEFT 0.21 saves are checked against the seed and dropped. README.md is
    hf_fisher's RandLoRA card saying the folder needs ``import hf_fisher`` (options as in the other direction).
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config_dict, tensors = _read(adapter_dir, "RANDLORA")
    fields = _fields(config_dict)
    fields.update({"save_projection": False, "contraction": contraction})
    fast = FastRandLoraConfig(**fields)
    tensors = _check_bases_and_drop(fast, tensors)
    out = dict(config_dict)
    out.update({"peft_type": HfFisherPeftType.FAST_RANDLORA.value, "save_projection": False})
    out["contraction"] = contraction
    card = _card(out, False, metrics=metrics, training=training, datasets=datasets, base_model=base_model)
    return _write(output_dir, out, tensors, card)
