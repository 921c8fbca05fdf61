"""Merging models and LoRA adapters by Fisher-weighted averaging."""

from hf_fisher.merging.fisher_merge import fisher_merge
from hf_fisher.merging.inputs import fisher_for_merging, load_models_to_merge

__all__ = ["fisher_for_merging", "fisher_merge", "load_models_to_merge"]
