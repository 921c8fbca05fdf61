"""FWSVD LoRA initialisation: adapters that start on the Fisher-weighted singular directions of each weight.

No new PEFT type: the model is made with a plain ``LoraConfig(init_lora_weights=True, ...)``, then
:func:`initialize_lora_fwsvd` rewrites, for every LoRA layer, the adapter and the base weight (PiSSA-style):

* ``mode="principal"``: ``(B₀, A₀)`` = the top-r Fisher-weighted components of ``W``
  (:func:`hf_fisher.weighted_low_rank`), so training starts on the directions the data cares about;
* ``mode="minor"``: the r least important weighted components (knowledge-preserving, like MiLoRA/CorDA-KPA);

and the base keeps the residual ``W − B₀A₀``. The LoRA factors are ``B₀/√s`` and ``A₀/√s`` with ``s`` the
layer's LoRA scaling (``lora_alpha / r``, or ``/ √r`` with rsLoRA), so ``s · B A = B₀ A₀`` exactly and the model's
outputs are unchanged at init.

To publish the result as an ordinary LoRA against the *original* weights, save the adapter once right after
init (``peft_model.save_pretrained(initial_dir)``) and, after training, call :func:`save_fwsvd_adapter`: it
writes a rank-2r plain LoRA (``[A; A₀]``, ``[B, −B₀]``, PEFT's PiSSA conversion) that vanilla PEFT and
transformers load without hf_fisher, plus the unconverted adapter for resuming training
(:func:`load_fwsvd_for_training`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hf_fisher.cards import adapter_card, write_card
from hf_fisher.curvature import DiagonalFisher
from hf_fisher.lowrank import WeightSide, fisher_weights, weighted_low_rank

InitMode = Literal["principal", "minor"]

UNCONVERTED_DIR = "fwsvd_unconverted"
INITIAL_DIR = "fwsvd_initial"


@dataclass
class _Plan:
    layer: nn.Module
    name: str
    weight: torch.Tensor  # the base layer's weight parameter
    transposed: bool  # PEFT's fan_in_fan_out (GPT-2 Conv1D)
    scaling: float


def _lora_layers(peft_model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }
    if not layers:
        raise ValueError(
            f"The model has no LoRA layer with adapter {adapter_name!r}. Wrap it first with "
            "peft.get_peft_model(model, LoraConfig(init_lora_weights=True, ...)), or pass the right adapter_name."
        )
    return layers


def fisher_key_candidates(module_name: str) -> list[str]:
    """Names under which a Fisher may store a LoRA layer's base weight: on the PEFT model or the bare model."""
    peft_name = f"{module_name}.base_layer.weight"
    bare = module_name
    for prefix in ("base_model.model.", "base_model."):
        if bare.startswith(prefix):
            bare = bare[len(prefix) :]
            break
    return [peft_name, f"{module_name}.weight", f"{bare}.weight"]


def _fisher_for(fisher: DiagonalFisher | dict[str, torch.Tensor], module_name: str) -> torch.Tensor:
    for key in fisher_key_candidates(module_name):
        if key in fisher:
            return fisher[key]
    raise ValueError(
        f"The Fisher has no entry for LoRA layer {module_name!r} (looked for {fisher_key_candidates(module_name)}). "
        "Estimate it on the same model with target_modules covering every LoRA target."
    )


def _check_not_quantized(name: str, base: nn.Module) -> None:
    weight = getattr(base, "weight", None)
    quantized = type(weight).__name__ in ("Params4bit", "Int8Params") or (
        weight is not None and not weight.dtype.is_floating_point
    )
    if quantized:
        raise ValueError(
            f"LoRA layer {name!r} has a quantized base weight ({type(weight).__name__}): the residual W − B₀A₀ "
            "cannot be stored exactly in it. Initialise on a full-precision model and quantize afterwards, or "
            "use LQ-LoRA, which decomposes W into quantized + low-rank parts by design."
        )


def initialize_lora_fwsvd(
    peft_model: nn.Module,
    fisher: DiagonalFisher | dict[str, torch.Tensor],
    *,
    mode: InitMode = "principal",
    adapter_name: str = "default",
    side: WeightSide = "row",
    eps: float = 1e-6,
    niter: int | None = None,
) -> None:
    """Initialise every LoRA layer of ``peft_model`` from the Fisher-weighted SVD of its base weight, in place.

    ``fisher`` is a :class:`~hf_fisher.DiagonalFisher` of the original model (names with or without PEFT's
    ``base_model.model.`` prefix); ``side`` chooses row (FWSVD), column or two-sided weighting. ``niter``
    (principal mode only) uses a randomized SVD with that many subspace iterations instead of the exact one:
    much faster for small ranks, near-optimal factors, and the residual still makes the model exact at init.
    Every check runs and every factorisation is computed (in fp32) before the first weight changes, so bad
    input leaves the model untouched. Outputs are unchanged at init up to the base weight's dtype precision.
    """
    if mode not in ("principal", "minor"):
        raise ValueError(f'mode must be "principal" or "minor", got {mode!r}.')
    if niter is not None and (mode != "principal" or niter < 0):
        raise ValueError(f"niter (randomized SVD) needs mode='principal' and niter >= 0; got mode={mode!r}, "
                         f"niter={niter}. Use niter=None for the exact SVD.")
    plans: list[_Plan] = []
    for name, layer in _lora_layers(peft_model, adapter_name).items():
        base = layer.get_base_layer()
        _check_not_quantized(name, base)
        transposed = bool(getattr(layer, "fan_in_fan_out", False))
        weight = base.weight
        shape = tuple(weight.T.shape if transposed else weight.shape)  # (out, in)
        f = _fisher_for(fisher, name)
        f_shape = tuple(f.T.shape if transposed else f.shape)
        if f_shape != shape:
            raise ValueError(
                f"The Fisher of {name!r} has shape {tuple(f.shape)} but its weight has {tuple(weight.shape)}: "
                "this Fisher belongs to another model."
            )
        rank = layer.r[adapter_name]
        if rank > min(shape):
            raise ValueError(f"LoRA rank {rank} of {name!r} exceeds min(out, in) = {min(shape)}; lower r.")
        plans.append(_Plan(layer, name, weight, transposed, float(layer.scaling[adapter_name])))

    updates = []
    for plan in plans:
        f = _fisher_for(fisher, plan.name).to(plan.weight.device)
        w = plan.weight.detach().float()
        if plan.transposed:
            f, w = f.T, w.T
        try:
            d_r, d_c = fisher_weights(f, side=side, eps=eps)
        except ValueError as err:
            raise ValueError(f"LoRA layer {plan.name!r}: {err}") from None
        factors = weighted_low_rank(
            w, plan.layer.r[adapter_name], row_weights=d_r, col_weights=d_c, components=mode, niter=niter
        )
        residual = w - factors.product()
        root = plan.scaling**0.5
        updates.append((plan, factors.B / root, factors.A / root, residual.T if plan.transposed else residual))

    with torch.no_grad():
        for plan, b, a, residual in updates:
            lora_a = plan.layer.lora_A[adapter_name].weight
            lora_b = plan.layer.lora_B[adapter_name].weight
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            plan.weight.copy_(residual.to(plan.weight.dtype))


def _save_adapter_flat(peft_model: nn.Module, folder: Path, adapter_name: str, **kwargs) -> None:
    """``save_pretrained`` of one adapter straight into ``folder`` (PEFT puts non-default ones in a subfolder)."""
    peft_model.save_pretrained(str(folder), selected_adapters=[adapter_name], **kwargs)
    if adapter_name != "default":
        for item in (folder / adapter_name).iterdir():
            shutil.move(str(item), folder / item.name)
        (folder / adapter_name).rmdir()


def save_fwsvd_adapter(
    peft_model: nn.Module,
    save_directory: str | os.PathLike,
    initial_adapter_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
) -> Path:
    """Save a trained FWSVD adapter as a plain rank-2r LoRA against the original base weights.

    ``initial_adapter_dir`` is where ``peft_model.save_pretrained`` wrote the adapter right after
    :func:`initialize_lora_fwsvd`, before training. ``save_directory`` receives ``adapter_config.json`` and
    ``adapter_model.safetensors`` that ``PeftModel.from_pretrained(original_base, save_directory)`` loads
    without hf_fisher, plus ``fwsvd_unconverted/`` (the trained adapter as trained, on the residual base) and
    ``fwsvd_initial/`` (the initial adapter), which :func:`load_fwsvd_for_training` uses to resume training.
    Its README.md is hf_fisher's card (:func:`hf_fisher.cards.adapter_card`, replacing PEFT's generic one) with
    ``metrics``, ``datasets`` and ``training`` (shown after the adapter's own settings); ``base_model`` defaults to
    the one PEFT recorded.
    """
    initial = Path(initial_adapter_dir)
    if not (initial / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter_config.json in {str(initial)!r}: save the adapter right after initialize_lora_fwsvd "
            "with peft_model.save_pretrained(initial_adapter_dir), before training."
        )
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(f"The model has no adapter {adapter_name!r}; pass the name of the trained FWSVD adapter.")
    # the card first: bad metrics raise before anything is written
    config = peft_model.peft_config[adapter_name]
    targets = config.target_modules
    settings = {
        "init": "FWSVD (Fisher-weighted SVD), then trained",
        "r (trained)": config.r,
        "r (saved, plain LoRA)": 2 * config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(targets) if isinstance(targets, set) else targets,
        **dict(training or {}),
    }
    card = adapter_card(method="fwsvd", base_model=base_model or config.base_model_name_or_path or "",
                        datasets=datasets, metrics=metrics, training=settings, vanilla_peft_loadable=True)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    # PEFT rewrites the initial folder's config, and needs its name as an adapter name: use a private copy.
    staging = out / INITIAL_DIR
    if staging.resolve() != initial.resolve():
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(initial, staging)
    _save_adapter_flat(peft_model, out, adapter_name, path_initial_model_for_weight_conversion=str(staging))
    _save_adapter_flat(peft_model, out / UNCONVERTED_DIR, adapter_name)
    write_card(card, out)
    return out


def load_fwsvd_for_training(base_model: nn.Module, save_directory: str | os.PathLike) -> nn.Module:
    """Rebuild the trainable FWSVD model from :func:`save_fwsvd_adapter`'s folder and the original base model.

    The base becomes the residual ``W − s·B₀A₀`` (from the saved initial adapter) and the LoRA weights are the
    trained ones, so training resumes exactly where it stopped.
    """
    from peft import PeftModel

    folder = Path(save_directory)
    model = PeftModel.from_pretrained(base_model, str(folder / INITIAL_DIR), is_trainable=True)
    with torch.no_grad():
        for layer in _lora_layers(model, "default").values():
            delta = layer.get_delta_weight("default")
            base = layer.get_base_layer()
            base.weight.sub_(delta.to(base.weight.dtype))
    model.load_adapter(str(folder / UNCONVERTED_DIR), adapter_name="trained", is_trainable=True)
    with torch.no_grad():
        for layer in _lora_layers(model, "default").values():
            for part in ("lora_A", "lora_B"):
                getattr(layer, part)["default"].weight.copy_(getattr(layer, part)["trained"].weight)
    model.delete_adapter("trained")
    model.set_adapter("default")
    return model
