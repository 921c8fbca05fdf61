"""Offline data: packaged general-text corpora, packing for causal-LM training, fictitious-facts QA."""

from hf_fisher.data.facts import (
    build_fictitious_facts,
    format_question_answer,
    pad_collate,
    select_known_world_facts,
)
from hf_fisher.data.text import TEXT_CORPORA, load_text_corpus, pack_for_causal_lm

__all__ = [
    "TEXT_CORPORA",
    "build_fictitious_facts",
    "format_question_answer",
    "load_text_corpus",
    "pack_for_causal_lm",
    "pad_collate",
    "select_known_world_facts",
]
