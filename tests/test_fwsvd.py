"""FWSVD LoRA init: outputs unchanged, factors = weighted SVD, conversion loadable by vanilla PEFT, clean errors."""

import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_fisher import estimate_diagonal_fisher
from hf_fisher.lowrank import fisher_weights, weighted_low_rank
from hf_fisher.tuners.fwsvd import initialize_lora_fwsvd, load_fwsvd_for_training, save_fwsvd_adapter
from tests.helpers import make_batches, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _inputs():
    return make_batches(n_sequences=3, batch_size=3, seq_len=10, vocab=96, seed=5)[0]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _lora_model(base, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": True, **config}
    return get_peft_model(base, LoraConfig(**config))


@pytest.fixture
def fisher(batches):
    return estimate_diagonal_fisher(tiny_llama(), batches)


@pytest.mark.parametrize("mode", ["principal", "minor"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_keeps_outputs_and_holds_the_weighted_components(fisher, mode, use_rslora):
    batch = _inputs()
    reference = _logits(tiny_llama(), batch)
    model = _lora_model(tiny_llama(), use_rslora=use_rslora, lora_alpha=16)
    initialize_lora_fwsvd(model, fisher, mode=mode)
    torch.testing.assert_close(_logits(model, batch), reference, atol=1e-5, rtol=1e-5)
    original = tiny_llama().model.layers[1].mlp.down_proj.weight
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    delta = layer.get_delta_weight("default")  # s · B A
    d_r, _ = fisher_weights(fisher["model.layers.1.mlp.down_proj.weight"])
    expected = weighted_low_rank(original, 4, row_weights=d_r, components=mode).product()
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight + delta, original, atol=1e-6, rtol=1e-5)
    # The scaling is honoured: the factors are divided by √s, whatever alpha and rsLoRA give.
    s = layer.scaling["default"]
    assert s == (16 / 2 if use_rslora else 16 / 4)
    torch.testing.assert_close(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight, delta)


def test_randomized_svd_init_keeps_outputs_and_nearly_optimal_factors(fisher):
    """niter: a randomized SVD; the model stays exact at init and the weighted error is within 1 % of the optimum."""
    batch = _inputs()
    reference = _logits(tiny_llama(), batch)
    model = _lora_model(tiny_llama())
    initialize_lora_fwsvd(model, fisher, niter=4)
    torch.testing.assert_close(_logits(model, batch), reference, atol=1e-5, rtol=1e-5)
    original = tiny_llama().model.layers[1].mlp.down_proj.weight
    d_r, _ = fisher_weights(fisher["model.layers.1.mlp.down_proj.weight"])
    delta = model.base_model.model.model.layers[1].mlp.down_proj.get_delta_weight("default")
    exact = weighted_low_rank(original, 4, row_weights=d_r).product()
    err = float((d_r[:, None] * (original - delta)).norm())
    best = float((d_r[:, None] * (original - exact)).norm())
    assert best <= err <= 1.01 * best
    with pytest.raises(ValueError, match="niter"):
        initialize_lora_fwsvd(_lora_model(tiny_llama()), fisher, mode="minor", niter=2)


def test_init_on_gpt2_conv1d_layers(batches):
    fisher = estimate_diagonal_fisher(tiny_gpt2(), batches)
    batch = _inputs()
    reference = _logits(tiny_gpt2(), batch)
    model = _lora_model(tiny_gpt2(), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    initialize_lora_fwsvd(model, fisher, side="both")
    torch.testing.assert_close(_logits(model, batch), reference, atol=1e-5, rtol=1e-5)


def _train_a_little(model, batches, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        for b in batches:
            optimizer.zero_grad()
            model(**b).loss.backward()
            optimizer.step()
    model.eval()


def test_converted_adapter_loads_in_vanilla_peft_and_transformers(tmp_path, fisher, batches):
    model = _lora_model(tiny_llama(), lora_alpha=6)
    initialize_lora_fwsvd(model, fisher)
    model.save_pretrained(tmp_path / "initial")
    _train_a_little(model, batches)
    batch = _inputs()
    trained = _logits(model, batch)
    assert (trained - _logits(tiny_llama(), batch)).abs().max() > 1e-3  # training changed something
    save_fwsvd_adapter(model, tmp_path / "adapter", tmp_path / "initial")
    torch.save({"batch": batch, "logits": trained}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import json, sys, torch
        from peft import PeftModel
        from tests.helpers import tiny_llama
        path = {str(tmp_path / "adapter")!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        b = expected["batch"]
        def logits(m):
            with torch.no_grad():
                return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        config = json.load(open(path + "/adapter_config.json"))
        assert config["r"] == 8 and config["lora_alpha"] == 12 and config["init_lora_weights"] is True
        peft_model = PeftModel.from_pretrained(tiny_llama(), path)
        torch.testing.assert_close(logits(peft_model), expected["logits"], atol=1e-4, rtol=1e-4)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(logits(merged), expected["logits"], atol=1e-4, rtol=1e-4)
        base = tiny_llama()
        base.load_adapter(path)
        torch.testing.assert_close(logits(base), expected["logits"], atol=1e-4, rtol=1e-4)
        assert not any(name.startswith("hf_fisher") for name in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_resume_from_the_unconverted_adapter(tmp_path, fisher, batches):
    model = _lora_model(tiny_llama())
    initialize_lora_fwsvd(model, fisher, mode="minor")
    model.save_pretrained(tmp_path / "initial")
    _train_a_little(model, batches, steps=1)
    save_fwsvd_adapter(model, tmp_path / "adapter", tmp_path / "initial")
    resumed = load_fwsvd_for_training(tiny_llama(), tmp_path / "adapter")
    batch = _inputs()
    torch.testing.assert_close(_logits(resumed, batch), _logits(model, batch), atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_bad_input_raises_and_leaves_model_untouched(fisher, batches):
    model = _lora_model(tiny_llama())
    snap = _snapshot(model)
    gpt2_fisher = estimate_diagonal_fisher(tiny_gpt2(), batches)
    with pytest.raises(ValueError, match="no entry for LoRA layer"):
        initialize_lora_fwsvd(model, gpt2_fisher)
    wrong_shape = {k: v[:, :-1] for k, v in fisher.items()}
    with pytest.raises(ValueError, match="belongs to another model"):
        initialize_lora_fwsvd(model, wrong_shape)
    broken = dict(fisher.items())
    broken["model.layers.1.mlp.down_proj.weight"] = broken["model.layers.1.mlp.down_proj.weight"].clone()
    broken["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="down_proj.*NaN/Inf"):
        initialize_lora_fwsvd(model, broken)
    with pytest.raises(ValueError, match='mode must be "principal" or "minor"'):
        initialize_lora_fwsvd(model, fisher, mode="largest")
    assert _unchanged(model, snap)
    big = _lora_model(tiny_llama(), r=40)
    snap = _snapshot(big)
    with pytest.raises(ValueError, match="LoRA rank 40 .* exceeds min"):
        initialize_lora_fwsvd(big, fisher)
    assert _unchanged(big, snap)
    with pytest.raises(ValueError, match="has no LoRA layer"):
        initialize_lora_fwsvd(tiny_llama(), fisher)


def test_quantized_base_is_refused(fisher):
    bnb = pytest.importorskip("bitsandbytes")
    model = _lora_model(tiny_llama())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    dense = layer.base_layer
    quantized = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.base_layer = quantized
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="quantized base weight"):
        initialize_lora_fwsvd(model, fisher)
    assert _unchanged(model, snap)


def test_bf16_model_is_factorised_in_fp32(fisher):
    batch = _inputs()
    base = tiny_llama().to(torch.bfloat16)
    reference = _logits(base, batch).float()
    model = _lora_model(tiny_llama().to(torch.bfloat16))
    initialize_lora_fwsvd(model, fisher)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    # The residual is stored in bf16: outputs agree to bf16 precision, not fp32.
    got = _logits(model, batch).float()
    assert float((got - reference).norm() / reference.norm()) < 2e-2
