"""Where fast RandLoRA adapters go, and the shared random bases they use (generated exactly as PEFT does)."""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils import TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_fisher.tuners.randlora.config import FastRandLoraConfig
from hf_fisher.tuners.randlora.layer import FastRandLoraLayer, Linear, _BasisRef


def _low_precision_dtype() -> torch.dtype:
    """The dtype PEFT draws its dense random bases in (bf16 where accelerate reports bf16 support, else fp16)."""
    from accelerate.utils.imports import is_bf16_available

    return torch.bfloat16 if is_bf16_available() else torch.float16


def generate_bases(config: FastRandLoraConfig, largest_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases ``A`` (r, 1, d) and ``B`` (D, ⌈d/r⌉, r) for the largest targeted (out, in), in fp32.

    Drawn from a CPU ``torch.Generator`` seeded with ``projection_prng_key`` in PEFT's order and dtype (dense: Kaiming
    uniform draws in bf16, one per basis of B; sparse: ternary ±1/0 from uniform draws), each divided by its std,
    so the values equal PEFT RandLoRA's bases bit for bit.
    """
    large, small = max(largest_shape), min(largest_shape)
    r = config.r
    n_bases = -(-small // r)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    if config.sparse or config.very_sparse:
        sparsity = math.sqrt(small) if config.very_sparse else 3.0
        draws = (torch.rand((r, 1, small), generator=generator), torch.rand((large, n_bases, r), generator=generator))
        ternary = []
        for u in draws:
            t = torch.zeros(u.shape)
            t[u < 1 / (2 * sparsity)] = -1
            t[u > 1 - 1 / (2 * sparsity)] = 1
            ternary.append(t / t.std())
        return ternary[0], ternary[1]
    dtype = _low_precision_dtype()

    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=math.sqrt(5), generator=generator)

    with torch.no_grad():
        basis_a = kaiming((r, 1, small))
        basis_b = torch.cat([kaiming((large, 1, r)) for _ in range(n_bases)], dim=1)
        return (basis_a / basis_a.std()).float(), (basis_b / basis_b.std()).float()


def _layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer fast RandLoRA can adapt, else None."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        shape = module.weight.ds_shape if hasattr(module.weight, "ds_shape") else module.weight.shape
        return int(shape[1]), int(shape[0])
    return None


class _BasisStore(nn.Module):
    """Holds one tensor per adapter as a buffer (persistent only when the bases are to be saved)."""

    def put(self, adapter: str, tensor: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(adapter, tensor, persistent=persistent)

    def drop(self, adapter: str) -> None:
        if adapter in self._buffers:
            del self._buffers[adapter]
            self._non_persistent_buffers_set.discard(adapter)


class FastRandLoraModel(BaseTuner):
    """PEFT tuner for :class:`FastRandLoraConfig`: PEFT RandLoRA's function, contracted in the cheaper order.

    The bases live once on this module (``randlora_A`` / ``randlora_B``, one entry per adapter, shared when two
    adapters would draw the same ones); layers keep a non-module reference, so nothing is duplicated per layer in
    memory or in saved files.
    """

    prefix: str = "randlora_"
    tuner_layer_cls = FastRandLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: FastRandLoraConfig, adapter_name: str) -> None:
        if not hasattr(self, "randlora_A"):
            self.randlora_A = _BasisStore()
            self.randlora_B = _BasisStore()
            self._basis_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _check_new_adapter_config(self, config: FastRandLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        for other in self.peft_config.values():
            if other is config:
                continue
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"All RandLoRA adapters of a model must share projection_prng_key (the bases are shared): "
                    f"got {config.projection_prng_key} but an existing adapter uses {other.projection_prng_key}. "
                    f"Set projection_prng_key={other.projection_prng_key}."
                )
            if other.save_projection != config.save_projection:
                raise ValueError(
                    "All RandLoRA adapters of a model must use the same save_projection; got "
                    f"{config.save_projection} and {other.save_projection}."
                )

    def _plan_targets(self, model: nn.Module, config: FastRandLoraConfig) -> tuple[int, int]:
        """Check every target (type, r ≤ min dim) and return the largest (out, in); raises before any change."""
        prepared = self._prepare_adapter_config(config, self.get_model_config(model))
        prepared = _maybe_include_all_linear_layers(prepared, model)
        largest, unsupported, too_small = None, [], []
        for key, module in model.named_modules():
            if not key or key.endswith("base_layer") or not self._check_target_module_exists(prepared, key):
                continue
            shape = _layer_shape(module)
            if shape is None:
                unsupported.append(f"{key} ({type(module).__name__})")
                continue
            if config.r > min(shape):
                too_small.append(f"{key} {shape}")
            largest = shape if largest is None else (max(largest[0], shape[0]), max(largest[1], shape[1]))
        if unsupported:
            raise ValueError(
                "FastRandLoRA adapts nn.Linear and transformers' Conv1D layers only; target_modules also matches "
                f"{unsupported}. Narrow target_modules to the linear projections."
            )
        if too_small:
            raise ValueError(
                f"r={config.r} exceeds min(out_features, in_features) of {too_small}: RandLoRA needs r ≤ the smaller "
                "dimension of every targeted layer. Lower r or exclude those layers."
            )
        if largest is None:
            raise ValueError(
                f"No layer of the model matches target_modules={config.target_modules!r}. Check the module names."
            )
        return largest

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        largest = self._plan_targets(model, config)
        key = (config.projection_prng_key, config.r, largest, config.sparse, config.very_sparse)
        if key not in self._basis_cache:
            self._basis_cache[key] = generate_bases(config, largest)
        basis_a, basis_b = self._basis_cache[key]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.randlora_A.put(adapter_name, basis_a.to(device), persistent=config.save_projection)
        self.randlora_B.put(adapter_name, basis_b.to(device), persistent=config.save_projection)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            self.randlora_A.drop(adapter_name)
            self.randlora_B.drop(adapter_name)
            raise

    def _create_and_replace(
        self, config: FastRandLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, **optional_kwargs,
    ) -> None:
        bases = _BasisRef(self.randlora_A, self.randlora_B)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, bases, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D) and not config.fan_in_fan_out:
            warnings.warn("The target is a Conv1D (weights stored in × out): fan_in_fan_out=True.", stacklevel=2)
            config.fan_in_fan_out = True
        elif isinstance(base, nn.Linear) and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the target is an nn.Linear: setting it to False.", stacklevel=2)
            config.fan_in_fan_out = False
        new_module = Linear(target, adapter_name, bases, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.randlora_A.drop(adapter_name)
        self.randlora_B.drop(adapter_name)

    # ---- saving: the bases, when saved, are saved once (PEFT's own shared keys), never per layer -------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "save_projection", False):
            for name in ("randlora_A", "randlora_B"):
                key = f"base_model.{name}.{adapter_name}"
                if key in state_dict:
                    out[key] = state_dict[key]
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for name in ("randlora_A", "randlora_B"):
            key = f"base_model.{name}"
            if key in remapped:
                remapped[f"{key}.{adapter_name}"] = remapped.pop(key)
        return remapped
