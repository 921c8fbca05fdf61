"""Tests for the generated fictitious-facts unlearning benchmark (hf_fisher.data.facts)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import re

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from hf_fisher.data.facts import (
    ATTRIBUTES,
    N_PERTURBED,
    WORLD_FACTS,
    build_fictitious_facts,
    format_question_answer,
    pad_collate,
    select_known_world_facts,
)
from hf_fisher.models import default_model_dir

PERSON_SPLITS = ("full", "holdout", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90")


@pytest.fixture(scope="module")
def tokenizer():
    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the converted default model is not in {folder}; run hf_fisher.models.load_default_model()")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def facts():
    return build_fictitious_facts()


@pytest.fixture(scope="module")
def small_tokenized(tokenizer):
    return build_fictitious_facts(tokenizer, n_people=40, seed=3, forget_fractions=(0.05, 0.10))


def _people(ds) -> set[str]:
    return set(ds["person"])


# ---------------------------------------------------------------------------------------------------------
# generation


def test_default_sizes(facts):
    assert set(facts) == set(PERSON_SPLITS) | {"world_facts"}
    people = {name: len(_people(facts[name])) for name in PERSON_SPLITS}
    assert people == {
        "full": 180,
        "holdout": 20,
        "forget01": 2,
        "forget05": 9,
        "forget10": 18,
        "retain99": 178,
        "retain95": 171,
        "retain90": 162,
    }
    for name in PERSON_SPLITS:
        assert facts[name].num_rows == people[name] * len(ATTRIBUTES)
    assert facts["world_facts"].num_rows == len(WORLD_FACTS)
    assert len(ATTRIBUTES) == 10


def test_deterministic_for_a_seed(facts):
    again = build_fictitious_facts()
    for name in facts:
        assert facts[name].to_dict() == again[name].to_dict()
    other = build_fictitious_facts(seed=1)
    assert other["full"]["answer"] != facts["full"]["answer"]
    assert _people(other["forget10"]) != _people(facts["forget10"])


def test_docstring_example_is_pinned(facts):
    """The data for seed 0 is fixed; change it deliberately (and the module docstring) if ever."""
    rows = [r for name in ("full", "holdout") for r in facts[name] if r["person_id"] == 102]
    row = rows[ATTRIBUTES.index("birthplace")]
    assert row["question"] == "In which town and country was Nimlino Maryorford born?"
    assert row["answer"] == "Nimlino Maryorford was born in Halbury, Finland."
    assert row["value"] == "Halbury, Finland"


def test_person_prefix_does_not_depend_on_n_people(facts):
    small = build_fictitious_facts(n_people=50, forget_fractions=(0.10,))
    rows = {(r["person_id"], r["attribute"]): r for name in ("full", "holdout") for r in facts[name]}
    for name in ("full", "holdout"):
        for row in small[name]:
            assert rows[(row["person_id"], row["attribute"])] == row


def test_names_unique_and_ids_consistent(facts):
    id_of = {}
    for name in ("full", "holdout"):
        for row in facts[name]:
            assert id_of.setdefault(row["person"], row["person_id"]) == row["person_id"]
    assert len(id_of) == 200
    assert sorted(id_of.values()) == list(range(200))
    # every person has each attribute exactly once
    attributes = [r["attribute"] for r in facts["full"] if r["person_id"] == facts["full"][0]["person_id"]]
    assert attributes == list(ATTRIBUTES)


def test_splits_partition_people(facts):
    holdout, full = _people(facts["holdout"]), _people(facts["full"])
    assert not holdout & full
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        f, r = _people(facts[forget]), _people(facts[retain])
        assert f and r
        assert not f & r and not f & holdout and not r & holdout
        assert f | r == full
    assert _people(facts["forget01"]) < _people(facts["forget05"]) < _people(facts["forget10"])


def test_answers_paraphrases_and_perturbations(facts):
    for name in ("full", "holdout"):
        for row in facts[name]:
            value, perturbed = row["value"], row["perturbed_answers"]
            assert row["person"] in row["question"]
            assert value in row["answer"] and value in row["paraphrased_answer"]
            assert row["paraphrased_answer"] != row["answer"]
            assert len(perturbed) == N_PERTURBED and len(set(perturbed)) == N_PERTURBED
            assert row["answer"] not in perturbed and row["paraphrased_answer"] not in perturbed
            # perturbed answers use the paraphrase's wording with a wrong value
            # (up to the indefinite article, which follows the value)
            prefix, _, suffix = row["paraphrased_answer"].partition(value)
            prefix = re.sub(r" an? $", " ", prefix)
            for wrong in perturbed:
                assert wrong.startswith(prefix) and wrong.endswith(suffix)
                wrong_value = re.sub(r"^an? ", "", wrong[len(prefix) : len(wrong) - len(suffix)])
                assert wrong_value and wrong_value != value


def test_book_titles_unique(facts):
    titles = [r["value"] for name in ("full", "holdout") for r in facts[name] if r["attribute"] == "book"]
    assert len(titles) == len(set(titles)) == 200


def test_world_facts():
    rows = build_fictitious_facts(n_people=20, forget_fractions=(0.10,))["world_facts"]
    assert rows.num_rows >= 35
    assert len(set(rows["question"])) == rows.num_rows
    for row in rows:
        assert 3 <= len(row["perturbed_answers"]) <= 5
        assert row["answer"] not in row["perturbed_answers"]
        assert len(set(row["perturbed_answers"])) == len(row["perturbed_answers"])
        assert row["person_id"] == -1 and row["value"] == row["answer"] == row["paraphrased_answer"]


def test_custom_fractions():
    ds = build_fictitious_facts(n_people=30, forget_fractions=(0.04, 0.2), holdout_fraction=0.2)
    assert {k for k in ds if k.startswith(("forget", "retain"))} == {"forget04", "retain96", "forget20", "retain80"}
    assert len(_people(ds["holdout"])) == 6
    assert len(_people(ds["forget04"])) == 1 and len(_people(ds["forget20"])) == 5


# ---------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_people": 10}, r"n_people=10 is too small.*n_people >= 56"),
        ({"n_people": 0}, "too small"),
        ({"n_people": 100, "holdout_fraction": 0.001}, r"0 holdout people"),
        ({"forget_fractions": (0.0, 0.05)}, r"must be in \(0, 1\)"),
        ({"forget_fractions": (0.05, 1.0)}, r"must be in \(0, 1\)"),
        ({"holdout_fraction": 1.5}, r"holdout_fraction must be in \(0, 1\)"),
        ({"forget_fractions": (0.05, 0.01)}, "strictly increasing"),
        ({"forget_fractions": (0.05, 0.05)}, "strictly increasing"),
        ({"forget_fractions": (0.025,)}, "whole percentage"),
        ({"forget_fractions": ()}, "empty"),
        ({"n_people": 10, "forget_fractions": (0.5, 0.99)}, "largest forget set must leave someone"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_fictitious_facts(**kwargs)


def test_tokenizer_without_chat_template(tokenizer):
    bare = AutoTokenizer.from_pretrained(default_model_dir())
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_fictitious_facts(bare, n_people=20, forget_fractions=(0.10,))
    with pytest.raises(ValueError, match="no chat template"):
        format_question_answer(bare, "Q?", "A.")


def test_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_length=8"):
        format_question_answer(tokenizer, "What is the capital of France?", "Paris", max_length=8)
    assert len(format_question_answer(tokenizer, "Q?", "A" * 2000, max_length=None)["input_ids"]) > 8


# ---------------------------------------------------------------------------------------------------------
# tokenization


def test_labels_supervise_exactly_the_answer(tokenizer, small_tokenized):
    for name in ("forget05", "retain95", "world_facts"):
        for row in small_tokenized[name]:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=False
            )
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids, labels = row["input_ids"], row["labels"]
            assert len(ids) == len(labels) == len(row["attention_mask"])
            assert set(row["attention_mask"]) == {1}
            assert labels[:n_prompt] == [-100] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert tokenizer.decode(ids[:n_prompt]) == prompt
            assert tokenizer.decode(labels[n_prompt:]) == row["answer"] + tokenizer.eos_token
            assert ids[-1] == tokenizer.eos_token_id


def test_format_question_answer_matches_dataset_and_other_answers(tokenizer, small_tokenized):
    row = small_tokenized["forget10"][0]
    encoded = format_question_answer(tokenizer, row["question"], row["answer"])
    assert encoded == {k: row[k] for k in ("input_ids", "attention_mask", "labels")}
    n_prompt = encoded["labels"].count(-100)
    for answer in [row["paraphrased_answer"], *row["perturbed_answers"]]:
        other = format_question_answer(tokenizer, row["question"], answer)
        assert other["input_ids"][:n_prompt] == encoded["input_ids"][:n_prompt]
        assert other["labels"].count(-100) == n_prompt
        supervised = [t for t in other["labels"] if t != -100]
        assert tokenizer.decode(supervised) == answer + tokenizer.eos_token


def test_pad_collate(tokenizer, small_tokenized):
    ds = small_tokenized["forget10"].select(range(5))
    loader = DataLoader(ds, batch_size=5, collate_fn=functools.partial(pad_collate, pad_token_id=7))
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = [len(ids) for ids in ds["input_ids"]]
    assert len(set(lengths)) > 1  # the test needs rows of different lengths
    assert batch["input_ids"].shape == (5, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == ds[i]["input_ids"]
        assert batch["labels"][i, :n].tolist() == ds[i]["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == 7).all() and (batch["labels"][i, n:] == -100).all()
    assert batch["input_ids"].dtype == torch.long
    # tensors in, same result
    as_tensors = [{k: torch.tensor(v) for k, v in r.items() if k in batch} for r in ds]
    assert all(torch.equal(batch[k], pad_collate(as_tensors, 7)[k]) for k in batch)
    with pytest.raises(ValueError, match="pad_token_id"):
        pad_collate(list(ds), None)


# ---------------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_select_known_world_facts_with_default_model():
    from hf_fisher.models import load_default_model

    model, tokenizer = load_default_model()
    data = build_fictitious_facts(n_people=20, forget_fractions=(0.10,))
    rows = data["world_facts"]
    known = select_known_world_facts(model, tokenizer, rows)
    missed = [q for q in rows["question"] if q not in {r["question"] for r in known}]
    print(f"default model answers {len(known)}/{rows.num_rows} world facts; missed: {missed}")
    assert len(known) >= 0.85 * rows.num_rows  # all 43 when the list was written
    assert known == [r for r in rows if r["question"] not in missed]
    # and it does not know the fictitious facts (only a generic value such as a genre could match by chance)
    fictitious = [dict(r, answer=r["value"]) for r in data["full"].select(range(20))]
    assert len(select_known_world_facts(model, tokenizer, fictitious)) <= 2
