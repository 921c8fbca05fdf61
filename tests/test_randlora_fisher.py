"""basis="fisher": the update diag(u) ΔW diag(v) with square-root row/column Fisher weights, checked against a dense
autograd reference, both contraction paths, save/load, and its refusal to pose as vanilla PEFT RandLoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_fisher import FastRandLoraConfig, convert_to_peft_randlora, estimate_diagonal_fisher, initialize_fisher_basis
from hf_fisher.tuners.randlora import FastRandLoraLayer
from hf_fisher.tuners.randlora.layer import dense_update
from tests.helpers import make_batches, relative_error, tiny_llama
from tests.test_randlora import IDS, _loss_and_grads, _randomise, _set_contraction

TARGETS = ["q_proj", "k_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def fisher():
    batches = make_batches(n_sequences=4, batch_size=2, seq_len=12, vocab=96, seed=2)
    return estimate_diagonal_fisher(tiny_llama(), batches, target_modules=TARGETS)


def _models(dtype=torch.float64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rand = get_peft_model(tiny_llama().to(dtype), FastRandLoraConfig(r=8, target_modules=TARGETS))
        fish = get_peft_model(tiny_llama().to(dtype), FastRandLoraConfig(r=8, target_modules=TARGETS, basis="fisher"))
    values = _randomise(rand)
    with torch.no_grad():
        for name, p in fish.named_parameters():
            if name in values:
                p.copy_(values[name])
    return rand, fish


def test_fisher_scales_are_the_row_column_weights_and_shape_the_update(fisher):
    rand, fish = _models()
    with torch.no_grad():  # before initialisation the scales are 1: same function as random bases
        assert torch.equal(fish(input_ids=IDS).logits, rand(input_ids=IDS).logits)
    initialize_fisher_basis(fish, fisher)
    rand_layers = {n: m for n, m in rand.named_modules() if isinstance(m, FastRandLoraLayer)}
    for name, layer in fish.named_modules():
        if not isinstance(layer, FastRandLoraLayer):
            continue
        f = fisher[name.removeprefix("base_model.model.") + ".weight"].double()
        u = (f.mean(1) + 1e-6 * f.mean(1).mean()).sqrt()
        v = (f.mean(0) + 1e-6 * f.mean(0).mean()).sqrt()
        u, v = u / u.mean(), v / v.mean()
        assert torch.allclose(layer.randlora_row_scale["default"].double(), u, rtol=1e-5)
        assert torch.allclose(layer.randlora_col_scale["default"].double(), v, rtol=1e-5)
        reference = u[:, None] * rand_layers[name].get_delta_weight("default") * v[None, :]
        assert relative_error(layer.get_delta_weight("default"), reference) < 1e-6
        assert int(torch.linalg.matrix_rank(layer.get_delta_weight("default"))) == min(layer.in_features,
                                                                                     layer.out_features)


@pytest.mark.parametrize("path", ["per_token", "merged"])
def test_fisher_paths_equal_dense_autograd_reference(fisher, path):
    _, fish = _models()
    initialize_fisher_basis(fish, fisher)
    _set_contraction(fish, path)
    loss, grads = _loss_and_grads(fish)

    # reference: every adapted layer replaced by plain autograd through x (W + ΔW(λ, γ))ᵀ
    def dense_forward(layer):
        def forward(x, *args, **kwargs):
            a, b = layer._layer_bases("default", x.device)
            delta = dense_update(a, b, layer.randlora_lambda["default"], layer.randlora_gamma["default"],
                                 layer.scaling["default"], layer._input_is_small, *layer._scales("default"))
            return layer.get_base_layer()(x) + x @ delta.T
        return forward

    for module in fish.modules():
        if isinstance(module, FastRandLoraLayer):
            module.forward = dense_forward(module)
    ref_loss, ref_grads = _loss_and_grads(fish)
    assert abs(float(loss - ref_loss)) < 1e-12
    for name, g in ref_grads.items():
        assert relative_error(grads[name], g) < 1e-10, name


def test_fisher_adapter_saves_loads_and_refuses_vanilla(fisher, tmp_path):
    _, fish = _models(torch.float32)
    initialize_fisher_basis(fish, fisher)
    fish.eval()
    with torch.no_grad():
        expected = fish(input_ids=IDS).logits
    fish.save_pretrained(tmp_path / "f")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "f").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, expected, atol=1e-6)
    with pytest.raises(ValueError, match="not PEFT RandLoRA's function"):
        convert_to_peft_randlora(tmp_path / "f", tmp_path / "v")


def test_fisher_basis_bad_input(fisher):
    rand, fish = _models()
    with pytest.raises(ValueError, match="was created with basis='random'"):
        initialize_fisher_basis(rand, fisher)
    partial = {k: v for k, v in fisher.items() if "down_proj" not in k}
    before = {n: b.clone() for n, b in fish.named_buffers() if "scale" in n}
    with pytest.raises(ValueError, match="The Fisher has no entry for"):
        initialize_fisher_basis(fish, partial)
    assert all(torch.equal(b, before[n]) for n, b in fish.named_buffers() if "scale" in n)
    with pytest.raises(ValueError, match="basis must be one of"):
        FastRandLoraConfig(basis="orthogonal")
