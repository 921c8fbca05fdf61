"""Model cards (README.md with Hub front matter) for the artefacts hf_fisher saves."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_fisher.curvature.store import CurvatureMetadata

_TITLES = {"diagonal_fisher": "Diagonal Fisher information", "kfac": "K-FAC curvature factors"}
_CLASSES = {"diagonal_fisher": "DiagonalFisher", "kfac": "KFACFactors"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id (``owner/name``) rather than a local path."""
    return bool(name) and _HUB_ID.match(name) is not None and not name.startswith((".", "/"))


def curvature_card(metadata: CurvatureMetadata, filename: str) -> str:
    """A Hub model card describing a saved curvature estimate: what, of which model, on which data, how."""
    kind = metadata.curvature_type
    base = metadata.model_name_or_path
    front = ["---", "library_name: hf_fisher", "tags:", "- hf_fisher", "- fisher-information", f"- {kind}"]
    if is_hub_id(base):
        front.append(f"base_model: {base}")
    front += ["---", ""]
    labels = "labels from the data" if metadata.kind == "empirical" else "labels sampled from the model"
    method = f"reduction `{metadata.reduction}`" if metadata.reduction else f"K-FAC type `{metadata.kfac_type}`"
    data = f" of {metadata.data_description}" if metadata.data_description else ""
    cls = _CLASSES.get(kind, "DiagonalFisher")
    body = [
        f"# {_TITLES.get(kind, kind)} of {base or 'a causal language model'}",
        "",
        f"Estimated with hf_fisher {metadata.library_version}: `{metadata.kind}` Fisher ({labels}), {method}, on "
        f"{metadata.n_sequences} sequences / {metadata.n_tokens} supervised tokens{data}; model dtype "
        f"{metadata.model_dtype}, statistics in fp32.",
        "",
        f"Normalisation: {metadata.normalization}.",
        "",
        "## Use",
        "",
        "```python",
        f"from hf_fisher import {cls}",
        f"estimate = {cls}.from_pretrained(path, model=model)  # checks names and shapes against the model",
        "```",
        "",
        f"Files: `{filename}` (safetensors), `curvature_config.json` (metadata), this card.",
        "",
    ]
    return "\n".join(front + body)
