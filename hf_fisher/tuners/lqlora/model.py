"""LQ-LoRA as a PEFT model: NF-quantized frozen base layers with LoRA adapters initialised from the decomposition.

:func:`prepare_lqlora_model` computes, for every target ``nn.Linear``, the decomposition ``W ≈ Q + L₁L₂``
(choosing each matrix's quantization config with the integer program when a bit budget is given), replaces the
Linear by an :class:`NFQuantizedLinear` holding ``Q`` bit-packed, and wraps the model with a PEFT LoRA whose
factors are ``L₁/√s`` and ``L₂/√s`` (``s`` the LoRA scaling), so the model equals ``Q + L₁L₂`` at init.
:func:`save_lqlora_model` writes the quantized base (safetensors + JSON) next to the PEFT adapter, and
:func:`load_lqlora_model` rebuilds the whole model from that folder in one call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from tqdm.auto import tqdm

from hf_fisher.tuners.lqlora.allocation import BitAllocation, solve_bit_allocation
from hf_fisher.tuners.lqlora.decomposition import LQDecomposition, lq_decompose
from hf_fisher.tuners.lqlora.quantizer import NFConfig, QuantizedTensor, nf_dequantize

logger = logging.getLogger(__name__)

BASE_WEIGHTS_NAME = "lqlora_base.safetensors"
BASE_META_NAME = "lqlora_base.json"
FORMAT_VERSION = 1


def default_quant_grid() -> list[dict]:
    """12 configs, 2.06–4.50 bits/parameter: NF2/NF3/NF4 × blocks of 16/32/64/128 (8-bit scales, groups of 256)."""
    return [
        NFConfig(bits, block, 8, 256, "fp32").to_dict() for bits in (2, 3, 4) for block in (16, 32, 64, 128)
    ]


@dataclass
class LQLoraConfig(LoraConfig):
    """PEFT ``LoraConfig`` plus LQ-LoRA's knobs: the bit budget, the config grid, Fisher weighting, iterations."""

    budget: float | None = field(
        default=None,
        metadata={
            "help": "Average bits per parameter over the target matrices (exact storage, overheads included). "
            "None: every matrix uses the single config of quant_grid."
        },
    )
    quant_grid: list[dict] = field(
        default_factory=default_quant_grid,
        metadata={"help": "Quantization configs (NFConfig fields as dicts) the bit allocation chooses from."},
    )
    fisher_weighted: bool = field(
        default=False,
        metadata={"help": "Weight the decomposition by a diagonal Fisher (pass it to prepare_lqlora_model)."},
    )
    max_iter: int = field(default=20, metadata={"help": "Iteration cap of the final decomposition."})
    table_max_iter: int = field(
        default=2, metadata={"help": "Iteration cap when building the error table for the bit allocation."}
    )
    tol: float = field(default=1e-3, metadata={"help": "Stop when the relative improvement falls below this."})
    svd_niter: int | None = field(
        default=2, metadata={"help": "Subspace iterations of the randomized SVD (None: exact SVD)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the randomized SVDs."})
    table_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder caching the error table (keyed by weight, Fisher and settings)."}
    )
    allocation: dict[str, dict] | None = field(
        default=None, metadata={"help": "Filled in by prepare_lqlora_model: the config chosen for each matrix."}
    )

    def grid(self) -> list[NFConfig]:
        return [NFConfig.from_dict(dict(c)) for c in self.quant_grid]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LQLoraConfig:
        """Read ``adapter_config.json`` as an LQLoraConfig (PEFT's own loader would return a plain LoraConfig)."""
        import dataclasses

        data = json.loads((Path(folder) / "adapter_config.json").read_text())
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names and k != "peft_type"})


class _DequantizedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` dequantized from the packed codes, dequantized again in backward instead of saved.

    ``F.linear`` would keep the dense ``W`` from forward to backward for the input gradient: a full-precision copy
    of every quantized matrix alive during training, the very memory the quantization is there to save.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NFQuantizedLinear, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return F.linear(x, layer.dequantized_weight(x.dtype), bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.layer.dequantized_weight(ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class NFQuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored NF-quantized (bit-packed buffers) and dequantized at each forward."""

    def __init__(
        self, quantized: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        self.quant_config = quantized.config
        self.compute_dtype = compute_dtype
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes; PEFT reads this name to find a quantized layer's device."""
        return self.codes

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(
            (self.out_features, self.in_features), self.quant_config,
            self.codes, self.scale_codes, self.group_scales, self.offset,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf_dequantize(self.quantized(), dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            x = x.to(self.compute_dtype)
        return _DequantizedLinear.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_config.name}"


class LoraNFLinear(LoraLinear):
    """PEFT's LoRA Linear on an :class:`NFQuantizedLinear` base; merging into the packed base is not possible."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "An LQ-LoRA adapter cannot be merged into its NF-quantized base (the sum is not on the quantization "
            "grid). Use export_dequantized to get a full-precision base with the adapter merged or alongside."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("LQ-LoRA layers are never merged, so there is nothing to unmerge.")


def _register(config: LoraConfig) -> None:
    config._register_custom_module({NFQuantizedLinear: LoraNFLinear})


@contextlib.contextmanager
def _quiet_peft():
    """PEFT warns about any custom base layer type; ours is registered on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        yield


def _target_linears(model: nn.Module, config: LQLoraConfig) -> dict[str, nn.Linear]:
    """The modules PEFT would target, which must all be plain ``nn.Linear``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LQ-LoRA target {name!r} is a {type(module).__name__}, not an nn.Linear: narrow target_modules "
                "to Linear layers (GPT-2's Conv1D is not supported)."
            )
        found[name] = module
    if not found:
        raise ValueError(
            f"No module of the model matches target_modules={config.target_modules!r}; "
            "name Linear layers of this model (e.g. ['q_proj', 'v_proj'])."
        )
    return found


def _fisher_for(fisher, name: str) -> torch.Tensor:
    keys = [f"{name}.weight", f"base_model.model.{name}.base_layer.weight", f"base_model.model.{name}.weight"]
    for key in keys:
        if key in fisher:
            return fisher[key]
    raise ValueError(
        f"The Fisher has no entry for target {name!r} (looked for {keys}). Estimate it on the same model with "
        "target_modules covering every LQ-LoRA target."
    )


def _table_key(weight: torch.Tensor, fisher: torch.Tensor | None, rank: int, cfg: NFConfig, config) -> str:
    h = hashlib.sha256()
    h.update(weight.detach().float().contiguous().cpu().numpy().tobytes())
    if fisher is not None:
        h.update(fisher.detach().float().contiguous().cpu().numpy().tobytes())
    settings = (rank, cfg.name, config.table_max_iter, config.tol, config.svd_niter, config.seed, FORMAT_VERSION)
    h.update(repr(settings).encode())
    return h.hexdigest()


def _load_table_cache(folder: str | None) -> dict[str, float]:
    if folder is None:
        return {}
    path = Path(folder) / "lqlora_error_table.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_table_cache(folder: str | None, table: dict[str, float]) -> None:
    if folder is None:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    merged = {**_load_table_cache(folder), **table}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".lqlora_error_table.", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(merged, handle)
    os.replace(tmp, path / "lqlora_error_table.json")


@dataclass
class ErrorTable:
    """Squared (weighted) decomposition error of every target matrix under every config, and storage bits."""

    names: list[str]
    configs: list[NFConfig]
    errors: np.ndarray  # (n_matrices, n_configs)
    storage_bits: np.ndarray  # (n_matrices, n_configs)
    sizes: np.ndarray  # (n_matrices,)
    seconds: float


def build_error_table(
    model: nn.Module, config: LQLoraConfig, fisher=None, *, progress: bool = True
) -> ErrorTable:
    """Decompose every target matrix under every grid config (``table_max_iter`` iterations); cached on disk."""
    import time

    targets = _target_linears(model, config)
    grid = config.grid()
    cache = _load_table_cache(config.table_cache_dir)
    new: dict[str, float] = {}
    start = time.perf_counter()
    errors = np.zeros((len(targets), len(grid)))
    bits = np.zeros((len(targets), len(grid)))
    sizes = np.zeros(len(targets))
    jobs = [(i, name, j, cfg) for i, name in enumerate(targets) for j, cfg in enumerate(grid)]
    for i, name, j, cfg in tqdm(jobs, desc="LQ-LoRA error table", disable=not progress):
        weight = targets[name].weight
        f = _fisher_for(fisher, name) if config.fisher_weighted else None
        key = _table_key(weight, f, config.r, cfg, config)
        if key not in cache and key not in new:
            dec = lq_decompose(
                weight, config.r, cfg, fisher=f, max_iter=config.table_max_iter, tol=config.tol,
                svd_niter=config.svd_niter, seed=config.seed,
            )
            new[key] = dec.error**2
        errors[i, j] = cache.get(key, new.get(key))
        bits[i, j] = cfg.storage_bits(weight.numel())
        sizes[i] = weight.numel()
    _save_table_cache(config.table_cache_dir, new)
    return ErrorTable(list(targets), grid, errors, bits, sizes, time.perf_counter() - start)


def _validate(model: nn.Module, config: LQLoraConfig, fisher) -> dict[str, nn.Linear]:
    if not isinstance(config, LQLoraConfig):
        raise ValueError(f"prepare_lqlora_model needs an LQLoraConfig, got {type(config).__name__}.")
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("LQ-LoRA does not support rank_pattern/alpha_pattern yet; use one r and lora_alpha.")
    if config.use_dora:
        raise ValueError("LQ-LoRA does not support DoRA; set use_dora=False.")
    if not config.quant_grid:
        raise ValueError("quant_grid is empty; give at least one NFConfig (as a dict).")
    grid = config.grid()
    if config.budget is None and len(grid) != 1:
        raise ValueError(
            f"quant_grid has {len(grid)} configs but budget is None: set a budget (bits per parameter) for the "
            "bit allocation, or give a single config to quantize every matrix the same way."
        )
    if config.fisher_weighted and fisher is None:
        raise ValueError("fisher_weighted=True needs a Fisher: pass fisher=estimate_diagonal_fisher(model, ...).")
    if fisher is not None and not config.fisher_weighted:
        raise ValueError("A Fisher was passed but fisher_weighted=False: set fisher_weighted=True to use it.")
    targets = _target_linears(model, config)
    for name, module in targets.items():
        if config.r > min(module.weight.shape):
            raise ValueError(f"r={config.r} exceeds min(out, in) = {min(module.weight.shape)} of {name!r}; lower r.")
        if fisher is not None:
            f = _fisher_for(fisher, name)
            if tuple(f.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"The Fisher of {name!r} has shape {tuple(f.shape)} but its weight has "
                    f"{tuple(module.weight.shape)}: this Fisher belongs to another model."
                )
    if config.budget is not None:
        sizes = np.array([m.weight.numel() for m in targets.values()], dtype=np.float64)
        bits = np.array([[c.storage_bits(int(n)) for c in grid] for n in sizes])
        lowest = float(bits.min(axis=1).sum() / sizes.sum())
        if config.budget < lowest:
            raise ValueError(
                f"A budget of {config.budget:g} bits per parameter is infeasible: the cheapest config of quant_grid "
                f"needs {lowest:.4f}. Raise the budget to at least {lowest:.4f} or add cheaper configs."
            )
    return targets


def allocate_bits(table: ErrorTable, budget: float) -> BitAllocation:
    """Solve the bit-allocation program on an error table."""
    return solve_bit_allocation(table.errors, table.storage_bits, table.sizes, budget)


def prepare_lqlora_model(model: nn.Module, config: LQLoraConfig, fisher=None, *, progress: bool = True):
    """Turn ``model`` into an LQ-LoRA PEFT model (in place for the base): quantized targets + LoRA on top.

    ``fisher`` (a :class:`~hf_fisher.DiagonalFisher` or a name → tensor dict, with ``config.fisher_weighted``)
    weights the decompositions and the error table. With ``config.budget`` the per-matrix configs come from the
    integer program over ``config.quant_grid``; the choice is recorded in ``config.allocation``. Every check and
    every decomposition runs before the model is modified.
    """
    from peft import get_peft_model

    targets = _validate(model, config, fisher)
    grid = config.grid()
    if config.budget is not None and len(grid) > 1:
        table = build_error_table(model, config, fisher, progress=progress)
        allocation = allocate_bits(table, config.budget)
        chosen = {name: grid[c] for name, c in zip(table.names, allocation.choice, strict=True)}
        logger.info(
            "LQ-LoRA bit allocation: %.4f bits/parameter (budget %.4f), solved in %.2fs",
            allocation.bits_per_parameter, config.budget, allocation.solve_seconds,
        )
    else:
        chosen = dict.fromkeys(targets, grid[0])

    decompositions: dict[str, LQDecomposition] = {}
    for name, module in tqdm(targets.items(), desc="LQ-LoRA decomposition", disable=not progress):
        f = _fisher_for(fisher, name) if config.fisher_weighted else None
        decompositions[name] = lq_decompose(
            module.weight, config.r, chosen[name], fisher=f, max_iter=config.max_iter, tol=config.tol,
            svd_niter=config.svd_niter, seed=config.seed,
        )
    config.allocation = {name: cfg.to_dict() for name, cfg in chosen.items()}

    # Only now modify the model: swap in the quantized layers, then wrap with PEFT.
    for name, module in targets.items():
        dec = decompositions[name]
        quantized = dec.quantized.to(module.weight.device)
        new = NFQuantizedLinear(quantized, module.bias, compute_dtype=module.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    _register(config)
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    _set_lora_factors(peft_model, decompositions)
    return peft_model


def _lora_layers(peft_model: nn.Module) -> dict[str, LoraNFLinear]:
    prefix = "base_model.model."
    return {
        name[len(prefix) :] if name.startswith(prefix) else name: m
        for name, m in peft_model.named_modules()
        if isinstance(m, LoraNFLinear)
    }


def _set_lora_factors(peft_model: nn.Module, decompositions: dict[str, LQDecomposition], adapter: str = "default"):
    layers = _lora_layers(peft_model)
    with torch.no_grad():
        for name, dec in decompositions.items():
            layer = layers[name]
            root = math.sqrt(float(layer.scaling[adapter]))
            a = layer.lora_A[adapter].weight
            b = layer.lora_B[adapter].weight
            a.copy_((dec.L2 / root).to(a.dtype))
            b.copy_((dec.L1 / root).to(b.dtype))


def quantized_layers(model: nn.Module) -> dict[str, NFQuantizedLinear]:
    """Every :class:`NFQuantizedLinear` of a (PEFT-wrapped or bare) model, by its bare-model name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, NFQuantizedLinear):
            bare = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[bare] = module
    return out


def storage_report(model: nn.Module) -> dict[str, float]:
    """Bits per parameter of the quantized matrices (exact storage) and of the LoRA factors counted in fp16/fp32."""
    layers = quantized_layers(model)
    params = sum(m.in_features * m.out_features for m in layers.values())
    bits = sum(m.quantized().storage_bits() for m in layers.values())
    lora = sum(p.numel() * p.element_size() * 8 for n, p in model.named_parameters() if "lora_" in n)
    return {
        "quantized_bits_per_parameter": bits / params,
        "with_lora_bits_per_parameter": (bits + lora) / params,
        "quantized_parameters": float(params),
    }


# ----------------------------------------------------------------------------------------------- save / load


def _base_state_dict(base: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The base model's tensors without LoRA weights and PEFT's ``.base_layer`` names; shared tensors once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in base.state_dict(keep_vars=False).items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def _lqlora_card(peft_model, layers: dict[str, nn.Module], metrics, training, datasets, base_model):
    """hf_fisher's card for an LQ-LoRA folder: the adapter's settings and the bits each quantized layer got."""
    from collections import Counter

    from hf_fisher.cards import adapter_card

    config = peft_model.peft_config[peft_model.active_adapter]
    bits = Counter(f"{m.quant_config.bits}-bit, blocks of {m.quant_config.block_size}" for m in layers.values())
    targets = config.target_modules
    settings = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, set) else targets,
        "bit budget": getattr(config, "budget", None),
        "Fisher-weighted": getattr(config, "fisher_weighted", None),
        "quantized layers": ", ".join(f"{n} × {k}" for k, n in sorted(bits.items())),
        **dict(training or {}),
    }
    return adapter_card(method="lqlora", base_model=base_model or config.base_model_name_or_path or "",
                        datasets=datasets, metrics=metrics, training=settings, vanilla_peft_loadable=False)


def save_lqlora_model(
    peft_model,
    save_directory: str | os.PathLike,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
) -> Path:
    """Save an LQ-LoRA model: the PEFT adapter, the quantized base (packed codes, scales) and the base config.

    The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT), ``config.json`` (the
    transformers config), ``lqlora_base.safetensors`` (every base tensor; quantized layers as packed codes),
    ``lqlora_base.json`` (per-layer shapes and configs) and hf_fisher's card as README.md (with ``metrics``,
    ``datasets`` and ``training``; ``base_model`` defaults to PEFT's record). :func:`load_lqlora_model` restores
    it in one call.
    """
    from safetensors.torch import save_file

    from hf_fisher.cards import write_card

    base = peft_model.get_base_model()
    layers = quantized_layers(peft_model)
    if not layers:
        raise ValueError("This model has no NF-quantized layer: make it with prepare_lqlora_model first.")
    card = _lqlora_card(peft_model, layers, metrics, training, datasets, base_model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _base_state_dict(base)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(base).__name__,
        "aliases": aliases,
        "layers": {
            name: {
                "shape": [m.out_features, m.in_features],
                "config": m.quant_config.to_dict(),
                "bias": m.bias is not None,
                "compute_dtype": str(m.compute_dtype).removeprefix("torch."),
            }
            for name, m in layers.items()
        },
    }
    save_file(tensors, str(out / BASE_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / BASE_META_NAME).write_text(json.dumps(meta, indent=1))
    base.config.save_pretrained(str(out))
    peft_model.save_pretrained(str(out))
    write_card(card, out)  # over PEFT's generic card
    return out


def load_lqlora_model(
    save_directory: str | os.PathLike, *, is_trainable: bool = False, device: str | torch.device | None = None
):
    """Rebuild a model saved by :func:`save_lqlora_model` (base, quantized layers, LoRA adapter) in one call."""
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(save_directory)
    for needed in (BASE_WEIGHTS_NAME, BASE_META_NAME, "config.json", "adapter_config.json"):
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"{folder} has no {needed}: it is not a folder written by save_lqlora_model."
            )
    meta = json.loads((folder / BASE_META_NAME).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"Unsupported LQ-LoRA format version {meta.get('format_version')} in {folder}.")
    model_cls = getattr(transformers, meta["model_class"])
    model_config = AutoConfig.from_pretrained(str(folder))
    tensors = load_file(str(folder / BASE_WEIGHTS_NAME))
    model = model_cls(model_config)
    for name, info in meta["layers"].items():
        quantized = QuantizedTensor.from_tensors(
            tensors, tuple(info["shape"]), NFConfig.from_dict(info["config"]), prefix=f"{name}."
        )
        bias = tensors.get(f"{name}.bias") if info["bias"] else None
        module = NFQuantizedLinear(quantized, bias, compute_dtype=getattr(torch, info["compute_dtype"]))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    for alias, source in meta["aliases"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{folder}: base weights do not match the model (missing={missing}, unexpected={unexpected})."
        )
    if device is not None:
        model.to(device)
    model.eval()
    lora_config = LQLoraConfig.load(folder)
    _register(lora_config)
    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(folder), config=lora_config, is_trainable=is_trainable)


def export_dequantized(
    peft_model, save_directory: str | os.PathLike, *, dtype: torch.dtype = torch.float16
) -> tuple[Path, Path]:
    """Export for vanilla transformers + PEFT users: the base with ``Q`` dequantized to ``dtype`` and a plain LoRA.

    Writes an ordinary transformers model to ``save_directory`` and the adapter (as a plain ``LoraConfig``) to
    ``save_directory/adapter``; ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dir), dir +
    "/adapter")`` loads them without hf_fisher. The base is no longer compressed (``dtype`` bits per parameter);
    its values are exactly ``Q`` rounded to ``dtype``, so in fp32 the outputs match the LQ-LoRA model.
    """
    import dataclasses

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    layers = quantized_layers(peft_model)
    if not layers:
        raise ValueError("This model has no NF-quantized layer: make it with prepare_lqlora_model first.")
    tensors, aliases = _base_state_dict(base)
    for name, module in layers.items():
        for buffer in ("codes", "scale_codes", "group_scales", "offset"):
            tensors.pop(f"{name}.{buffer}")
        tensors[f"{name}.weight"] = module.dequantized_weight(torch.float32).cpu()
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    plain = type(base)(base.config)
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Dequantized export mismatch: missing={missing}, unexpected={unexpected}.")
    plain.to(dtype).save_pretrained(str(out))
    adapter_dir = out / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    config_path = adapter_dir / "adapter_config.json"
    data = json.loads(config_path.read_text())
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    data = {k: v for k, v in data.items() if k in lora_fields}
    data["base_model_name_or_path"] = str(out)
    config_path.write_text(json.dumps(data, indent=2))
    return out, adapter_dir


def guard_bitsandbytes_cpu(model: nn.Module) -> int:
    """Keep bitsandbytes' portable CPU kernel on every ``Linear4bit`` of ``model``; returns how many were set.

    On AVX512-BF16 CPUs an eval-mode no-grad forward makes ``Linear4bit`` repack its weight, after which gradients
    through it are silently wrong. Call this before training a bitsandbytes 4-bit model on CPU.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def export_bitsandbytes(peft_model, save_directory: str | os.PathLike, *, double_quant: bool = False) -> Path:
    """Export an all-NF4 LQ-LoRA model as a bitsandbytes 4-bit transformers model plus a plain LoRA adapter.

    Needs every quantized layer on bitsandbytes' NF4 grid with blocks of 64 (``NFConfig(bits=4, block_size=64)``).
    Each block of ``Q`` holds a ±1 code, so bitsandbytes re-quantizing ``Q`` (fp32 absmax, ``double_quant=False``,
    4.5 bits/parameter) recovers ``Q`` exactly; ``double_quant=True`` (≈4.127 bits) re-quantizes the block scales
    with bitsandbytes' own 8-bit code, a small change to ``Q``. Vanilla users load it with
    ``AutoModelForCausalLM.from_pretrained(dir)`` and ``PeftModel.from_pretrained(model, dir + "/adapter")``.
    To train it on a CPU, call :func:`guard_bitsandbytes_cpu` first (the AVX512-BF16 repacking trap).
    """
    import shutil

    import transformers
    from transformers import BitsAndBytesConfig

    layers = quantized_layers(peft_model)
    wrong = [n for n, m in layers.items() if m.quant_config.bits != 4 or m.quant_config.block_size != 64]
    if not layers or wrong:
        raise ValueError(
            "export_bitsandbytes needs every quantized layer in NF4 with blocks of 64 (bitsandbytes' format); "
            f"these are not: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}. Use a quant_grid of "
            "[NFConfig(4, 64, ...)] for this export, or export_dequantized for mixed-bit models."
        )
    out = Path(save_directory)
    base = peft_model.get_base_model()
    skip = [
        name for name, module in base.named_modules()
        if isinstance(module, nn.Linear) and name not in layers and ".lora_" not in name
    ]
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as staging:
        _, adapter_dir = export_dequantized(peft_model, staging, dtype=torch.float32)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip or None,
        )
        model_cls = getattr(transformers, type(base).__name__)
        quantized = model_cls.from_pretrained(staging, quantization_config=quantization, dtype=torch.float32)
        out.mkdir(parents=True, exist_ok=True)
        quantized.save_pretrained(str(out))
        shutil.rmtree(out / "adapter", ignore_errors=True)
        shutil.copytree(adapter_dir, out / "adapter")
        config_path = out / "adapter" / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = str(out)
        config_path.write_text(json.dumps(data, indent=2))
    return out
