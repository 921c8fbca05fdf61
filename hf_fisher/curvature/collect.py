"""The pass over a DataLoader that every curvature estimate shares.

One forward and one backward per batch, with hooks on the target layers. The model's weights are
frozen for the pass and gradients flow only through activations: the hooks build exactly the
weight statistics they need (per-sequence gradients, Kronecker factors) from layer inputs ``a`` and
output gradients ``g``, so the pass never pays for weight gradients it would throw away.

Conventions (shared by the diagonal Fisher and K-FAC):

* Causal LM: the logits at position ``t`` predict token ``t + 1``. A position is *supervised* when
  the label of the next token is not ``-100`` (or, with no labels, when both tokens are attended).
* ``kind="empirical"`` uses the data's labels; ``kind="sampled"`` draws a label at every supervised
  position from the model's own predictive distribution (Monte-Carlo Fisher = Gauss-Newton for the
  softmax cross-entropy), with a seeded CPU ``torch.Generator`` so results do not depend on device.
* The loss of one sequence is its summed negative log-likelihood over supervised positions.
* Statistics are accumulated as fp32 sums together with the number of sequences and supervised
  tokens; with several processes the sums and counts are all-reduced before normalising, so the
  result equals one process over the union of the data (weighted by tokens, not by process).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

FisherKind = Literal["empirical", "sampled"]

try:  # GPT-2 style models use a transposed linear layer.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


@dataclass
class TargetLayer:
    """A linear-like layer whose curvature is estimated: ``y = x Wᵀ + b`` (``W`` stored as in torch)."""

    name: str
    module: nn.Module
    transposed: bool  # True for transformers' Conv1D, whose weight is stored (in, out)
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"


def _is_adapter_module(name: str) -> bool:
    """Modules that belong to a PEFT adapter rather than the model (``lora_A``, ``lora_B``, ...)."""
    return any(part.startswith("lora_") for part in name.split("."))


def _describe(module: nn.Module) -> tuple[bool, int, int, bool] | None:
    if isinstance(module, nn.Linear):
        return False, module.in_features, module.out_features, module.bias is not None
    if Conv1D and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return True, in_f, out_f, module.bias is not None
    return None


def find_target_layers(
    model: nn.Module, target_modules: str | Iterable[str] | None = None
) -> dict[str, TargetLayer]:
    """Resolve ``target_modules`` to the linear layers of ``model`` whose curvature is estimated.

    ``None`` selects every ``nn.Linear`` (and transformers' ``Conv1D``) of the model except the
    output embeddings (``lm_head``) and PEFT adapter weights. A string is a regular expression
    matched against full module names; a list matches a module whose full name equals an entry or
    ends with ``"." + entry`` (PEFT's convention, e.g. ``["q_proj", "v_proj"]``).
    """
    output_embeddings = None
    if target_modules is None and hasattr(model, "get_output_embeddings"):
        output_embeddings = model.get_output_embeddings()

    def selected(name: str) -> bool:
        if target_modules is None:
            return not _is_adapter_module(name)
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == key or name.endswith("." + key) for key in target_modules)

    layers: dict[str, TargetLayer] = {}
    candidates: list[str] = []
    for name, module in model.named_modules():
        info = _describe(module)
        if info is None:
            continue
        candidates.append(name)
        if module is output_embeddings or not selected(name):
            continue
        transposed, in_f, out_f, has_bias = info
        layers[name] = TargetLayer(name, module, transposed, in_f, out_f, has_bias)
    if not layers:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"No linear layer of the model matches target_modules={target_modules!r}. "
            f"Its linear layers end in {suffixes[:20]}; pass some of these names, a regular expression "
            "over full module names, or None for every linear layer except the output embeddings."
        )
    return layers


@dataclass
class BatchView:
    """What the hooks need to know about the batch in flight."""

    mask: torch.Tensor  # (B, T) bool: positions whose prediction is supervised
    counts: torch.Tensor  # (B,) number of supervised positions per sequence
    n_excluded: int = 0  # number of unsupervised positions in the batch


@dataclass
class PassTotals:
    """Global counts of a curvature pass, after all-reduce."""

    n_sequences: int = 0
    n_tokens: int = 0
    n_batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _supervision(batch: Mapping[str, torch.Tensor], kind: FisherKind) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T-1) for the shifted logits and the (B, T) mask of supervised positions."""
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        if kind == "empirical":
            raise ValueError(
                'kind="empirical" needs labels, but the batch has no "labels" column. Add labels '
                '(e.g. labels = input_ids with -100 on tokens to ignore) or use kind="sampled", which '
                "draws labels from the model itself."
            )
        attention = batch.get("attention_mask")
        if attention is None:
            attention = torch.ones_like(input_ids)
        attended = attention.bool()
        sup = attended[:, 1:] & attended[:, :-1]
        targets = torch.where(sup, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
    else:
        targets = labels[:, 1:]
        sup = targets != -100
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :-1] = sup
    return targets, mask


def _sample_targets(
    logits: torch.Tensor, sup: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw one label per position from softmax(logits) by inverse-CDF sampling.

    The uniforms come from a CPU generator (tiny: one per position), so the draw is reproducible
    across devices up to floating-point rounding of the cumulative sum.
    """
    u = torch.rand(logits.shape[:-1], generator=generator, dtype=torch.float32).to(logits.device)
    draws = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    with torch.no_grad():
        for i in range(logits.shape[0]):  # one sequence at a time bounds the (T, vocab) temporaries
            cdf = torch.softmax(logits[i].float(), dim=-1).cumsum_(dim=-1)
            draws[i] = torch.searchsorted(cdf, (u[i] * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
        draws.clamp_(max=logits.shape[-1] - 1)
    return torch.where(sup, draws, torch.full_like(draws, -100))


@contextmanager
def curvature_pass_mode(model: nn.Module):
    """Eval mode and frozen weights for the pass; restores every flag afterwards, even on errors."""
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield handles
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def _input_embeddings(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(
            "The model has no input embeddings (get_input_embeddings() returned nothing); the curvature "
            "engine supports Hugging Face language models whose forward takes input_ids."
        )
    return model.get_input_embeddings()


class CurvatureCollector:
    """Base class of a curvature statistic: gets layer inputs and output gradients of each batch.

    Subclasses implement :meth:`on_input` (called in the forward pass with the layer input,
    shape (B, T, in)) and :meth:`on_output_grad` (called in the backward pass with the gradient of
    the summed loss w.r.t. the layer output, shape (B, T, out)), and :meth:`buffers` (the fp32 sums
    to all-reduce).
    """

    def __init__(self, layers: dict[str, TargetLayer]):
        self.layers = layers
        self.batch: BatchView | None = None

    def on_input(self, layer: TargetLayer, a: torch.Tensor) -> None:
        raise NotImplementedError

    def on_output_grad(self, layer: TargetLayer, g: torch.Tensor) -> None:
        raise NotImplementedError

    def buffers(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def end_batch(self) -> None:
        """Drop per-batch caches."""

    def synchronize(self, accelerator: Any) -> None:
        """Agree across processes on anything decided from the data (before the sums are all-reduced)."""


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _all_reduce_sum(tensors: Iterable[torch.Tensor], accelerator: Any, op: str = "sum") -> None:
    if accelerator is None or accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for t in tensors:
        dist.all_reduce(t, op=reduce_op)


def run_curvature_pass(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    collector: CurvatureCollector,
    *,
    kind: FisherKind,
    max_batches: int | None,
    accelerator: Any,
    seed: int,
    description: str,
) -> PassTotals:
    """Run the hooked forward/backward pass over ``dataloader`` and all-reduce the collector's sums."""
    if kind not in ("empirical", "sampled"):
        raise ValueError(f'kind must be "empirical" or "sampled", got {kind!r}.')
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches}.")
    for name, param in model.named_parameters():
        if not all_finite(param):
            raise FloatingPointError(
                f"Parameter {name!r} has NaN/Inf values, so every curvature downstream of it would too. "
                "Reload or repair the model's weights before estimating curvature."
            )
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator.is_main_process if accelerator is not None else True
    generator = torch.Generator().manual_seed(int(seed) + 1_000_003 * rank)
    device = _model_device(model)
    embeddings = _input_embeddings(model)
    layers = collector.layers
    seen_this_batch: set[str] = set()

    def make_forward_hook(layer: TargetLayer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if layer.name in seen_this_batch:
                raise RuntimeError(
                    f"Layer {layer.name!r} ran twice in one forward pass (shared or re-entrant module); "
                    "its per-call statistics are ambiguous. Exclude it with target_modules."
                )
            seen_this_batch.add(layer.name)
            collector.on_input(layer, args[0].detach())
            if output.requires_grad:
                output.register_hook(lambda g: collector.on_output_grad(layer, g.detach()))

        return hook

    def require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.requires_grad_(True)

    n_sequences = torch.zeros((), dtype=torch.float64)
    n_tokens = torch.zeros((), dtype=torch.float64)
    n_batches = torch.zeros((), dtype=torch.float64)
    total = None
    if hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
        if max_batches is not None:
            total = min(total, max_batches)

    # the pass needs autograd even when called under torch.no_grad() (e.g. from an optimizer's step)
    with curvature_pass_mode(model) as handles, torch.enable_grad():
        handles.append(embeddings.register_forward_hook(require_grad))
        for layer in layers.values():
            handles.append(layer.module.register_forward_hook(make_forward_hook(layer)))
        progress = tqdm(dataloader, total=total, desc=description, disable=not is_main, leave=False)
        for step, batch in enumerate(progress):
            if max_batches is not None and step >= max_batches:
                break
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            if "input_ids" not in batch:
                raise ValueError(
                    f"Each batch must contain 'input_ids'; got keys {sorted(batch)}. Tokenize the data and "
                    "collate it with e.g. transformers.default_data_collator."
                )
            targets, mask = _supervision(batch, kind)
            counts = mask.sum(dim=1)
            collector.batch = BatchView(mask=mask, counts=counts, n_excluded=int(mask.numel() - counts.sum()))
            seen_this_batch.clear()
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            logits = outputs.logits[:, :-1]
            if kind == "sampled":
                targets = _sample_targets(logits.detach(), targets != -100, generator)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            if loss.requires_grad and int(counts.sum()) > 0:
                loss.backward()
            collector.end_batch()
            n_sequences += int((counts > 0).sum())
            n_tokens += int(counts.sum())
            n_batches += 1
        collector.batch = None

    if accelerator is not None and accelerator.num_processes > 1:
        collector.synchronize(accelerator)
    sums = list(collector.buffers().values())
    counts_t = torch.stack([n_sequences, n_tokens, n_batches])
    if accelerator is not None and accelerator.num_processes > 1:
        counts_t = counts_t.to(device)
        _all_reduce_sum([counts_t], accelerator)
        counts_t = counts_t.cpu()
        _all_reduce_sum(sums, accelerator)
    totals = PassTotals(int(counts_t[0]), int(counts_t[1]), int(counts_t[2]))
    if totals.n_batches == 0:
        raise ValueError("The dataloader yielded no batches; pass a non-empty dataloader.")
    if totals.n_tokens == 0:
        raise ValueError(
            "No supervised token in the data: every label is -100 (or every sequence has one token). "
            "Check the labels column and the padding."
        )
    return totals


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` has no NaN/Inf: one reduction, with an exact check only if the sum is NaN/Inf.

    A NaN or Inf entry always makes the sum non-finite; a finite sum therefore proves the tensor finite,
    and an overflowing sum of finite values merely triggers the exact (slower) check.
    """
    if not t.dtype.is_floating_point:
        return True
    if bool(torch.isfinite(t.detach().sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(statistics: Mapping[str, torch.Tensor]) -> None:
    """Raise naming the first layer whose statistic has NaN or Inf."""
    for name, t in statistics.items():
        if not all_finite(t):
            raise FloatingPointError(
                f"Non-finite values in the curvature of {name!r}. The model produced NaN/Inf gradients "
                "there: check the model's dtype (fp16 overflow), its weights, and the input data."
            )
