"""Merging models and LoRA adapters by Fisher-weighted averaging."""

from hf_fisher.merging.fisher_merge import fisher_merge

__all__ = ["fisher_merge"]
