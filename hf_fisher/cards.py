"""Hub model cards (``huggingface_hub.ModelCard``) for every artefact hf_fisher saves.

One place for cards: :func:`adapter_card` (PEFT adapters: FWSVD, RandLoRA, LQ-LoRA, LoRA), :func:`unlearning_card`
(unlearning updates or unlearned models), :func:`fisher_card` (curvature estimates) and :func:`write_card`. The
bodies are Jinja templates shipped in ``hf_fisher/templates``; the front matter is a ``ModelCardData`` in the form
the Hub expects (``library_name``, ``base_model`` only for Hub ids, ``tags``, ``datasets``, ``pipeline_tag``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from hf_fisher.curvature.store import CurvatureMetadata

HUB_TAG = "hf-fisher"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FRONT_MATTER_ORDER = ["library_name", "base_model", "tags", "datasets", "pipeline_tag"]
REPO_PLACEHOLDER = "your-name/your-repo"


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id (``owner/name``) rather than a local path."""
    return bool(name) and _HUB_ID.match(name) is not None and not name.startswith((".", "/"))


def _version() -> str:
    from hf_fisher import __version__

    return __version__


def _render(template: str, data: ModelCardData, **variables: Any) -> ModelCard:
    """Fill ``hf_fisher/templates/<template>`` with ``variables`` under the front matter ``data``."""
    data.to_yaml(original_order=_FRONT_MATTER_ORDER)  # reorders data's keys in place: library_name first
    text = resources.files("hf_fisher").joinpath("templates", template).read_text(encoding="utf-8")
    card = ModelCard.from_template(data, template_str=text, **variables)
    card.text = card.text if card.text.endswith("\n") else card.text + "\n"  # Jinja drops the final newline
    return card


def _cell(value: Any) -> str:
    """One Markdown table cell: JSON for containers, ``|`` escaped."""
    text = json.dumps(value) if isinstance(value, (Mapping, list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _settings_table(settings: Mapping[str, Any] | None) -> str:
    if not settings:
        return ""
    rows = [f"| {_cell(key)} | {_cell(value)} |" for key, value in settings.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def _number(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"metric {where} is {value!r} ({type(value).__name__}); metrics must be numbers.")
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return str(value) if math.isnan(value) or math.isinf(value) else f"{value:.4g}"


def _metrics_table(metrics: Mapping[str, Mapping[str, float]] | None) -> str:
    """``label -> {column: value}`` as a Markdown table; columns in order of first appearance, '–' where absent."""
    if not metrics:
        return ""
    columns: list[str] = []
    for label, row in metrics.items():
        if not isinstance(row, Mapping):
            raise TypeError(
                f"metrics[{label!r}] is a {type(row).__name__}; metrics map a row label to {{column: value}}, "
                "e.g. {'fwsvd r=8': {'perplexity': 12.3}}."
            )
        columns += [c for c in row if c not in columns]
    lines = ["| model | " + " | ".join(_cell(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in metrics.items():
        cells = [_number(row[c], f"{label!r}/{c!r}") if c in row else "–" for c in columns]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _base_model_text(base_model: str) -> str:
    if not base_model:
        return "not recorded"
    if is_hub_id(base_model):
        return f"[`{base_model}`](https://huggingface.co/{base_model})"
    return f"`{base_model}` (local)"


def _hub_datasets(datasets: Sequence[str]) -> list[str] | None:
    ids = [d for d in datasets if is_hub_id(d)]
    return ids or None


# ------------------------------------------------------------------------------------------------ adapters


@dataclass(frozen=True)
class _Method:
    title: str
    summary: str
    detail: str
    tags: tuple[str, ...]


ADAPTER_METHODS: dict[str, _Method] = {
    "fwsvd": _Method(
        "FWSVD LoRA adapter",
        "Fisher-weighted SVD initialisation of LoRA, after *Language Model Compression with Weighted Low-Rank "
        "Factorization* (Hsu et al., ICLR 2022).",
        "The adapter started on the top (or bottom) Fisher-weighted singular directions of each weight, so that "
        "training began on the directions the data cares about; it was saved as a plain rank-2r LoRA against the "
        "original weights (PiSSA-style conversion), so vanilla PEFT loads it.",
        ("fwsvd", "lora"),
    ),
    "randlora": _Method(
        "RandLoRA adapter",
        "*RandLoRA: Full-rank parameter-efficient fine-tuning of large models* (Albert et al., ICLR 2025).",
        "The update is a sum of fixed random low-rank bases (regenerated from a seed) scaled by small trained "
        "diagonal matrices, so it can reach full rank with few trained parameters; trained with hf_fisher's fast "
        "RandLoRA (same function as PEFT's).",
        ("randlora",),
    ),
    "lqlora": _Method(
        "LQ-LoRA model",
        "*LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning* "
        "(Guo et al., ICLR 2024).",
        "Each weight was decomposed into a quantized part (NF-k, bits per layer from a Fisher-weighted budget) "
        "plus a LoRA initialised with the low-rank remainder; the quantized base is saved in this folder next to "
        "the adapter.",
        ("lqlora", "lora", "quantization"),
    ),
    "lora": _Method(
        "LoRA adapter",
        "*LoRA: Low-Rank Adaptation of Large Language Models* (Hu et al., ICLR 2022).",
        "A trained low-rank update `B A` added to frozen weights.",
        ("lora",),
    ),
}


def _peft_loading(base: str, extra_import: str = "", comment: str = "") -> str:
    lines = [
        *([extra_import] if extra_import else []),
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}")',
        f'model = PeftModel.from_pretrained(base, "{REPO_PLACEHOLDER}"){comment}',
    ]
    return "\n".join(lines)


def _adapter_loading(method: str, base: str, vanilla: bool) -> tuple[str, str]:
    """(note, code) telling how to load an adapter of ``method``."""
    if method == "lqlora":
        return (
            "LQ-LoRA needs hf_fisher: the quantized base uses hf_fisher's NF-k layers, which vanilla transformers "
            "cannot build. (For vanilla PEFT users, export it with `hf_fisher.export_dequantized` or "
            "`export_bitsandbytes`.)",
            "\n".join([
                "from huggingface_hub import snapshot_download",
                "from hf_fisher import load_lqlora_model",
                "",
                f'model = load_lqlora_model(snapshot_download("{REPO_PLACEHOLDER}"))  # quantized base + adapter',
            ]),
        )
    if method == "randlora" and not vanilla:
        return (
            "This folder is hf_fisher's fast RandLoRA format: `import hf_fisher` registers it with PEFT. "
            "`hf_fisher.convert_to_peft_randlora(folder, out)` converts it to vanilla PEFT RandLoRA.",
            _peft_loading(base, "import hf_fisher  # registers the fast RandLoRA tuner with PEFT"),
        )
    if method == "randlora":
        return (
            "A vanilla PEFT RandLoRA adapter (converted with `hf_fisher.tuners.randlora.convert_to_peft_randlora`): "
            "PEFT regenerates the random bases from `projection_prng_key`; hf_fisher is not needed.",
            _peft_loading(base),
        )
    if method == "fwsvd" and not vanilla:
        return (
            "This is the unconverted FWSVD adapter (trained on the residual base): resume it with hf_fisher.",
            "\n".join([
                "from huggingface_hub import snapshot_download",
                "from transformers import AutoModelForCausalLM",
                "from hf_fisher import load_fwsvd_for_training",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}")',
                f'model = load_fwsvd_for_training(base, snapshot_download("{REPO_PLACEHOLDER}"))',
            ]),
        )
    note = "A plain LoRA adapter: vanilla PEFT and transformers load it, hf_fisher is not needed."
    if method == "fwsvd":
        note += (
            " The subfolders `fwsvd_unconverted/` and `fwsvd_initial/` are what "
            "`hf_fisher.load_fwsvd_for_training(base, folder)` needs to resume training."
        )
    return note, _peft_loading(base, comment="  # or base.load_adapter(...)")


def adapter_card(
    *,
    method: str,
    base_model: str,
    datasets: Sequence[str] = (),
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    vanilla_peft_loadable: bool = True,
) -> ModelCard:
    """The card of a PEFT adapter folder (``library_name: peft``).

    ``base_model`` is a Hub id or a local path (only a Hub id goes into the front matter); ``datasets`` likewise
    (Hub ids in the front matter, all of them in the body); ``metrics`` maps a row label to ``{column: value}``;
    ``training`` holds the hyper-parameters shown. ``vanilla_peft_loadable`` says whether this folder loads with
    vanilla PEFT (FWSVD converted / unconverted, RandLoRA PEFT / fast format); ``lora`` always does and
    ``lqlora`` never does, whatever it says.
    """
    if method not in ADAPTER_METHODS:
        raise ValueError(f"Unknown adapter method {method!r}; use one of {sorted(ADAPTER_METHODS)}.")
    if isinstance(datasets, str):
        datasets = [datasets]
    info = ADAPTER_METHODS[method]
    vanilla = method == "lora" or (vanilla_peft_loadable and method != "lqlora")
    tags = [HUB_TAG, *info.tags, "peft"]
    if is_hub_id(base_model):
        tags.append(f"base_model:adapter:{base_model}")
    data = ModelCardData(
        library_name="peft",
        base_model=base_model if is_hub_id(base_model) else None,
        tags=tags,
        datasets=_hub_datasets(datasets),
        pipeline_tag="text-generation",
    )
    note, code = _adapter_loading(method, base_model, vanilla)
    return _render(
        "adapter.md",
        data,
        title=f"{info.title} for {base_model or 'a causal language model'}",
        method_summary=info.summary,
        method_detail=info.detail,
        base_model_text=_base_model_text(base_model),
        dataset_list=", ".join(f"`{d}`" for d in datasets),
        hf_fisher_version=_version(),
        training_table=_settings_table(training),
        metrics_table=_metrics_table(metrics),
        loading_note=note,
        loading_code=code,
    )


# ---------------------------------------------------------------------------------------------- unlearning


UNLEARNING_METHODS: dict[str, tuple[str, str]] = {
    "k-fade": (
        "K-FADE",
        "K-FADE, after *Gauss-Newton Unlearning for the LLM Era*: a few uphill Gauss-Newton steps on the forget "
        "loss, preconditioned by the retain set's K-FAC and each sized to a retain-KL budget.",
    ),
    "grad-ascent": (
        "gradient ascent",
        "Gradient ascent on the forget set's likelihood, as in *Knowledge Unlearning for Mitigating Privacy Risks "
        "in Language Models* (Jang et al., ACL 2023).",
    ),
    "grad-diff": (
        "gradient difference",
        "Gradient difference: ascent on the forget set, descent on the retain set, as in *TOFU: A Task of "
        "Fictitious Unlearning for LLMs* (Maini et al., 2024).",
    ),
    "npo": (
        "NPO",
        "*Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning* (Zhang et al., "
        "2024): a bounded, preference-style loss on the forget set against a frozen reference.",
    ),
    "simnpo": (
        "SimNPO",
        "*Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning* (Fan et al., "
        "2024): NPO without the reference model, length-normalised.",
    ),
    "gu": (
        "GU projection",
        "GU projection (*Geometric-Disentanglement Unlearning*): each optimizer update is projected, in Adam's "
        "metric, orthogonal to recent retain gradients, so the retain loss is unchanged to first order.",
    ),
    "ssd": (
        "SSD",
        "*Fast Machine Unlearning Without Retraining Through Selective Synaptic Dampening* (Foster et al., AAAI "
        "2024): parameters far more important to the forget set than to the whole data are dampened.",
    ),
    "custom": (
        "a custom method",
        "An unlearning update made outside hf_fisher's trainers; its settings below say how.",
    ),
}
_UNLEARNING_ALIASES = {"kfade": "k-fade", "ga": "grad-ascent", "gradient-ascent": "grad-ascent",
                       "graddiff": "grad-diff", "gradient-difference": "grad-diff"}


def _unlearning_components(method: str) -> list[str]:
    """``"NPO+GU"`` → ``["npo", "gu"]``, aliases resolved; unknown names raise."""
    parts = [p.strip().lower().replace("_", "-") for p in method.split("+")]
    parts = [_UNLEARNING_ALIASES.get(p, p) for p in parts]
    unknown = [p for p in parts if p not in UNLEARNING_METHODS]
    if not method.strip() or unknown:
        raise ValueError(
            f"Unknown unlearning method {method!r} ({unknown or 'empty'}); use one of {sorted(UNLEARNING_METHODS)}, "
            "or several joined with '+' (e.g. 'npo+gu')."
        )
    return parts


def unlearning_card(
    *,
    method: str,
    base_model: str,
    forget_description: str,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    settings: Mapping[str, Any] | None = None,
    update_file: str | None = "unlearning_update.safetensors",
) -> ModelCard:
    """The card of an unlearning update (``update_file`` in the folder) or, with ``update_file=None``, of a full
    unlearned model saved with ``save_pretrained`` (then ``library_name: transformers``, which is what the Hub
    needs to load it).

    ``method`` is one name or several joined with ``+`` (``"k-fade"``, ``"npo+gu"``); ``forget_description`` says
    what was forgotten; ``settings`` holds the method's settings shown in the card.
    """
    parts = _unlearning_components(method)
    name = "+".join(parts)
    tags = [HUB_TAG, "unlearning", *dict.fromkeys([name, *parts])]
    data = ModelCardData(
        library_name="hf_fisher" if update_file else "transformers",
        base_model=base_model if is_hub_id(base_model) else None,
        tags=tags,
        pipeline_tag="text-generation",
    )
    what = " + ".join(UNLEARNING_METHODS[p][0] for p in parts)
    base = base_model or "<base model>"
    if update_file:
        target = f'snapshot_download("{REPO_PLACEHOLDER}")'
        if update_file != "unlearning_update.safetensors":
            target = f'f"{{{target}}}/{update_file}"'
        note = (
            f"`{update_file}` holds the total weight change Δ (parameter name → tensor) that unlearning applied to "
            "the base model; `apply_unlearning_update` checks every name and shape, then adds it in place "
            "(`scale=-1` undoes it). It is plain safetensors: without hf_fisher, add each tensor to the parameter "
            "of the same name."
        )
        code = "\n".join([
            "from huggingface_hub import snapshot_download",
            "from transformers import AutoModelForCausalLM",
            "from hf_fisher import apply_unlearning_update",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{base}")',
            f"apply_unlearning_update(model, {target})",
        ])
        title = f"Unlearning update ({what}) for {base_model or 'a causal language model'}"
    else:
        note = "The unlearned model's full weights: vanilla transformers loads it, hf_fisher is not needed."
        code = "\n".join([
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}")',
        ])
        title = f"{base_model or 'A causal language model'} after unlearning ({what})"
    return _render(
        "unlearning.md",
        data,
        title=title,
        method_summary=" ".join(UNLEARNING_METHODS[p][1] for p in parts[:1]),
        method_detail=" ".join(UNLEARNING_METHODS[p][1] for p in parts[1:]),
        base_model_text=_base_model_text(base_model),
        forget_description=forget_description or "not described",
        hf_fisher_version=_version(),
        settings_table=_settings_table(settings),
        metrics_table=_metrics_table(metrics),
        loading_note=note,
        loading_code=code,
    )


# ---------------------------------------------------------------------------------------------- curvature


_TITLES = {"diagonal_fisher": "Diagonal Fisher information", "kfac": "K-FAC curvature factors",
           "rank_one_fisher": "Rank-one Fisher information"}
_CLASSES = {"diagonal_fisher": "DiagonalFisher", "kfac": "KFACFactors", "rank_one_fisher": "RankOneFisher"}


def fisher_card(metadata: CurvatureMetadata, filename: str) -> ModelCard:
    """The card of a saved curvature estimate: what, of which model, on which data, how, and how to load it."""
    kind = metadata.curvature_type
    base = metadata.model_name_or_path
    data = ModelCardData(
        library_name="hf_fisher",
        base_model=base if is_hub_id(base) else None,
        tags=[HUB_TAG, "fisher-information", kind],
    )
    labels = "labels from the data" if metadata.kind == "empirical" else "labels sampled from the model"
    method = f"reduction `{metadata.reduction}`" if metadata.reduction else f"K-FAC type `{metadata.kfac_type}`"
    on_data = f" of {metadata.data_description}" if metadata.data_description else ""
    cls = _CLASSES.get(kind, "DiagonalFisher")
    module = "hf_fisher.curvature" if kind == "rank_one_fisher" else "hf_fisher"
    return _render(
        "fisher.md",
        data,
        title=f"{_TITLES.get(kind, kind)} of {base or 'a causal language model'}",
        estimate_description=(
            f"Estimated with hf_fisher {metadata.library_version}: `{metadata.kind}` Fisher ({labels}), {method}, "
            f"on {metadata.n_sequences} sequences / {metadata.n_tokens} supervised tokens{on_data}; model dtype "
            f"{metadata.model_dtype}, statistics in fp32."
        ),
        normalization=metadata.normalization,
        loading_code="\n".join([
            f"from {module} import {cls}",
            f"estimate = {cls}.from_pretrained(path, model=model)  # checks names and shapes against the model",
        ]),
        filename=filename,
    )


def write_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write ``card`` as ``folder/README.md`` (creating the folder) and return that path."""
    path = Path(folder) / "README.md"
    card.save(path)
    return path


__all__ = [
    "ADAPTER_METHODS",
    "HUB_TAG",
    "UNLEARNING_METHODS",
    "adapter_card",
    "fisher_card",
    "is_hub_id",
    "unlearning_card",
    "write_card",
]
