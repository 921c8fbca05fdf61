"""Offline data: packaged general-text corpora and packing for causal-LM training."""

from hf_fisher.data.text import TEXT_CORPORA, load_text_corpus, pack_for_causal_lm

__all__ = ["TEXT_CORPORA", "load_text_corpus", "pack_for_causal_lm"]
