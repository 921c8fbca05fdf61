"""evaluate_unlearning end to end on tiny models (real tokenizer, generated facts), its errors, and the attacks."""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fisher import build_fictitious_facts
from hf_fisher.evaluation import evaluate_unlearning, quantization_attack, relearning_attack
from hf_fisher.models import default_model_dir, load_default_model
from hf_fisher.trainers.unlearning.losses import forward_logits, sequence_nll
from tests.helpers import pad_rows, qa_rows, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    if not (default_model_dir() / "tokenizer.json").is_file():
        load_default_model()  # converts the packaged default model once (its tokenizer has the chat template)
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def facts():
    # 10 people: 2 holdout, 8 trainable of which 2 are forgotten, 6 retained; 3 facts per forget/holdout person
    data = build_fictitious_facts(n_people=10, seed=2, forget_fractions=(0.25,), holdout_fraction=0.2)
    few = [0, 1, 2, 10, 11, 12]
    data["forget25"] = data["forget25"].select(few)
    data["holdout"] = data["holdout"].select(few)
    return data


def _evaluate(model, facts, tokenizer, **kwargs):
    options = dict(forget_split="forget25", retain_split="retain75", world_split=None, max_retain_rows=4,
                   max_new_tokens=6, attacks=(), batch_size=20)
    return evaluate_unlearning(model, facts, tokenizer, **{**options, **kwargs})


def test_report_and_reference_identities(tokenizer, facts, tmp_path):
    vocab = len(tokenizer)
    model, other = tiny_llama(seed=0, vocab=vocab), tiny_llama(seed=1, vocab=vocab)
    result = _evaluate(model, facts, tokenizer, retain_model=model, original_model=copy.deepcopy(model),
                       attacks=("quantization", "relearning"), quantization_modes=("nf4",), relearning_steps=2,
                       output_dir=tmp_path, name="tiny")
    s = result["summary"]
    # the model compared with itself: indistinguishable truth ratios, no privacy leak, no retain drift
    assert s["forget_quality"] == pytest.approx(1.0)
    assert all(s[f"privleak_{a}"] == pytest.approx(0.0) for a in ("loss", "zlib", "min_k", "min_k_plus_plus"))
    assert s["retain_kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= s["forget_truth_ratio"] <= 1 and 0 <= s["forget_probability"] <= 1
    assert len(result["splits"]["forget"]["per_row"]["truth_ratio"]) == 6
    assert len(result["splits"]["retain"]["per_row"]["probability"]) == 4
    quant = result["attacks"]["quantization_nf4"]
    assert set(quant["forget"]) == {"probability", "rougeL_recall", "extraction_strength"}
    relearn = result["attacks"]["relearning"]
    assert relearn["n_train_rows"] == 3 and relearn["n_test_rows"] == 3  # one forget person each
    assert relearn["retain_model"]["forget"]["probability"] > 0
    people = facts["forget25"]["person_id"]
    held_out = [i for i, p in enumerate(people) if p != min(people)]  # the person the attack does not train on
    per_row = result["splits"]["forget"]["per_row"]
    for key in ("probability", "rougeL_recall", "extraction_strength"):  # "before" = the model's own scores
        assert relearn["forget_before"][key] == pytest.approx(np.mean([per_row[key][i] for i in held_out]))

    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["summary"]["forget_quality"] == pytest.approx(1.0)
    markdown = (tmp_path / "tiny.md").read_text()
    assert "| FQ | MU |" in markdown and "quantization_nf4" in markdown
    assert (tmp_path / "tiny.png").stat().st_size > 1000

    # another retain model: forget quality from the model itself and from its saved result agree
    with_model = _evaluate(model, facts, tokenizer, retain_model=other)
    saved = tmp_path / "retain.json"
    saved.write_text(json.dumps(with_model["retain_model"]))
    with_result = _evaluate(model, facts, tokenizer, retain_model=str(saved))
    assert with_result["summary"]["forget_quality"] == pytest.approx(with_model["summary"]["forget_quality"])
    assert with_model["summary"]["forget_quality"] < 1.0


def test_bad_input_is_named(tokenizer, facts):
    model = tiny_llama(vocab=len(tokenizer))
    with pytest.raises(ValueError, match="no split 'forget10'"):
        evaluate_unlearning(model, facts, tokenizer)
    with pytest.raises(ValueError, match="perturbed_answers"):
        _evaluate(model, facts.remove_columns("perturbed_answers"), tokenizer)
    overlapping = copy.copy(facts)
    overlapping["retain75"] = facts["forget25"]
    with pytest.raises(ValueError, match="6 question\\(s\\) are in both 'forget25' and 'retain75'"):
        _evaluate(model, overlapping, tokenizer)
    empty = copy.copy(facts)
    empty["forget25"] = facts["forget25"].select([])
    with pytest.raises(ValueError, match="is empty"):
        _evaluate(model, empty, tokenizer)
    with pytest.raises(ValueError, match="unknown attack"):
        _evaluate(model, facts, tokenizer, attacks=("pruning",))
    with pytest.raises(ValueError, match="unknown quantization mode"):
        _evaluate(model, facts, tokenizer, quantization_modes=("int4",))


def test_quantization_attack_quantizes_every_decoder_linear():
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    for mode, layer_type in (("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        quantized = quantization_attack(model, mode)
        modules = dict(quantized.named_modules())
        for name, weight in linears.items():
            layer = modules[name]
            assert isinstance(layer, layer_type), (mode, name)
            if mode == "int8":
                restored = layer.weight.data.float() * layer.weight.SCB[:, None].float() / 127
            else:
                restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            error = float((restored - weight).norm() / weight.norm())
            assert 1e-4 < error < (0.02 if mode == "int8" else 0.2), (mode, name, error)  # changed, but close
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # the attacked model is untouched


def test_relearning_attack_fits_its_rows_and_leaves_the_model():
    model = tiny_llama(seed=0)
    rows = qa_rows(6, seed=7)
    batch = pad_rows(rows)
    before = sequence_nll(forward_logits(model, batch), batch["labels"]).mean().item()
    attacked = relearning_attack(model, rows, pad_token_id=0, steps=5, learning_rate=1e-2, batch_size=6)
    with torch.no_grad():
        after = sequence_nll(forward_logits(attacked, batch), batch["labels"]).mean().item()
        unchanged = sequence_nll(forward_logits(model, batch), batch["labels"]).mean().item()
    assert after < before - 0.1
    assert unchanged == pytest.approx(before)
    with pytest.raises(ValueError, match="at least one row"):
        relearning_attack(model, [], pad_token_id=0)


def test_reference_model_recipe_is_cached(tokenizer, tmp_path, monkeypatch):
    from hf_fisher.trainers.unlearning.recipe import FactsRecipe, make_reference_models, reference_model_dir

    monkeypatch.setenv("HF_FISHER_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "tiny-base"
    tiny_llama(seed=0, vocab=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = FactsRecipe(base_model=str(base), n_people=10, forget_percent=25, holdout_fraction=0.2, epochs=1,
                         batch_size=16, learning_rate=1e-3)
    folders = make_reference_models(recipe)
    assert set(folders) == {"target", "retain"}
    marker = json.loads((folders["retain"] / "hf_fisher_recipe.json").read_text())
    assert marker["trained_on"] == "retain75" and marker["rows"] == 60
    trained = {name: AutoModelForCausalLM.from_pretrained(folder) for name, folder in folders.items()}
    base_model = AutoModelForCausalLM.from_pretrained(base)
    for model in trained.values():  # both moved away from the base, to different weights
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base_model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(trained["target"].lm_head.weight, trained["retain"].lm_head.weight)
    stamp = (folders["target"] / "model.safetensors").stat().st_mtime_ns
    assert make_reference_models(recipe) == folders  # cached: nothing retrained
    assert (folders["target"] / "model.safetensors").stat().st_mtime_ns == stamp
    # every field is part of the cache key
    assert reference_model_dir(FactsRecipe(**{**recipe.__dict__, "seed": 1})) != reference_model_dir(recipe)
    assert reference_model_dir(FactsRecipe(**recipe.__dict__)) == folders["target"].parent
