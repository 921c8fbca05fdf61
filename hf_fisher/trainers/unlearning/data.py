"""Forget/retain batches for unlearning: one forget row paired with one retain row, and their collator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from hf_fisher.data.facts import pad_collate

TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")


def _rows(data: Any, name: str) -> list[dict[str, Any]]:
    """Token columns of every row of a ``datasets.Dataset`` or a sequence of dicts, checked."""
    if data is None:
        raise ValueError(f"the {name} set is missing; pass a dataset with input_ids and labels")
    columns = getattr(data, "column_names", None)
    if columns is not None:
        missing = [c for c in ("input_ids", "labels") if c not in columns]
        if missing:
            raise ValueError(
                f"the {name} set has no {missing} column(s); tokenize it first, e.g. "
                "build_fictitious_facts(tokenizer) or hf_fisher.data.format_question_answer"
            )
        keep = [c for c in TOKEN_COLUMNS if c in columns]
        table = data.select_columns(keep)[:]
        rows = [dict(zip(keep, values, strict=True)) for values in zip(*(table[c] for c in keep), strict=True)]
    else:
        rows = [dict(row) for row in data]
    if not rows:
        raise ValueError(f"the {name} set is empty; unlearning needs at least one {name} example")
    for i, row in enumerate(rows):
        if "input_ids" not in row or "labels" not in row:
            raise ValueError(f"row {i} of the {name} set has no input_ids/labels; tokenize it first")
        if all(label == -100 for label in list(row["labels"])[1:]):
            raise ValueError(
                f"row {i} of the {name} set has no answer tokens (every label is -100); unlearning losses are "
                "computed on answers — label the answer tokens"
            )
        row.setdefault("attention_mask", [1] * len(row["input_ids"]))
    return rows


def _keys(data: Any, rows: list[dict[str, Any]]) -> set:
    """Identity of each row for the overlap check: the question/answer text when present, else the tokens."""
    columns = getattr(data, "column_names", None) or []
    if "question" in columns and "answer" in columns:
        table = data.select_columns(["question", "answer"])[:]
        return set(zip(table["question"], table["answer"], strict=True))
    return {tuple(row["input_ids"]) for row in rows}


class ForgetRetainDataset(Dataset):
    """Index ``i`` gives ``{"forget": forget[i], "retain": retain[j]}`` with ``j`` drawn from ``seed`` and ``i``.

    The epoch runs over the forget set (as in open-unlearning); the retain partner of each forget row is a
    deterministic function of ``(seed, i)``, so every process and a resumed run see the same pairs. Raises
    ``ValueError`` for an empty set, rows without answer labels, or forget rows that also appear in the retain
    set (same question and answer, or the same tokens) — unlearning what is also retained is ill-posed.
    """

    def __init__(self, forget: Any, retain: Any | None = None, *, seed: int = 0):
        self.forget = _rows(forget, "forget")
        self.retain = _rows(retain, "retain") if retain is not None else None
        self.seed = int(seed)
        if self.retain is not None:
            overlap = _keys(forget, self.forget) & _keys(retain, self.retain)
            if overlap:
                example = next(iter(overlap))
                raise ValueError(
                    f"{len(overlap)} forget example(s) also appear in the retain set (e.g. {str(example)[:120]!r}); "
                    "remove them from one of the two sets"
                )

    def __len__(self) -> int:
        return len(self.forget)

    def retain_index(self, index: int) -> int:
        """The retain row paired with forget row ``index``."""
        assert self.retain is not None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return int(torch.randint(len(self.retain), (1,), generator=generator))

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            item["retain"] = self.retain[self.retain_index(index)]
        return item


class ForgetRetainCollator:
    """Pads the forget and retain parts of a list of :class:`ForgetRetainDataset` items separately."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("ForgetRetainCollator needs a pad_token_id (e.g. the tokenizer's EOS id)")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {part: pad_collate([item[part] for item in items], self.pad_token_id) for part in items[0]}
