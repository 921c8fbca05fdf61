"""Fisher penalty (diagonal, rank-1; full model and LoRA ΔW) and the rank-1 / online Fisher primitives,
each against a hand or dense computation."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_fisher.curvature import (
    CurvatureMetadata,
    DiagonalFisher,
    OnlineDiagonalFisher,
    RankOneFisher,
    estimate_diagonal_fisher,
    estimate_rank_one_fisher,
)
from hf_fisher.trainers import FisherPenalty
from tests.helpers import sequence_nll, tiny_gpt2, tiny_llama

LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def _metadata(curvature_type="diagonal_fisher", **extra):
    return CurvatureMetadata(curvature_type=curvature_type, kind="empirical", n_sequences=1, n_tokens=1,
                             normalization="test", extra=extra)


def _random_fisher(model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return DiagonalFisher({n: torch.rand(params[n].shape, generator=g) + 0.1 for n in names}, _metadata())


def _perturb(params, seed=1, size=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=g))


def test_rank_one_fisher_matches_per_sequence_gradients(batches):
    model = tiny_llama()
    targets = ["q_proj", "down_proj"]
    fisher = estimate_rank_one_fisher(model, batches, target_modules=targets)
    names = [n for n in dict(model.named_parameters()) if n.endswith(("q_proj.weight", "down_proj.weight"))]
    per_seq = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            model.zero_grad()
            sequence_nll(model, *(batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels"))).backward()
            per_seq.append({n: p.grad.clone() for n, p in model.named_parameters() if n in names})
    mean = {n: torch.stack([g[n] for g in per_seq]).mean(0) for n in names}
    norm = torch.sqrt(sum(m.double().square().sum() for m in mean.values()))
    trace = sum(float(torch.stack([g[n] for g in per_seq]).double().square().sum()) for n in names) / len(per_seq)
    assert set(fisher) == set(names)
    for n in names:
        torch.testing.assert_close(fisher[n], (mean[n] / norm).float(), atol=1e-6, rtol=1e-4)
    assert fisher.scale == pytest.approx(trace, rel=1e-5)
    assert fisher.metadata.n_sequences == len(per_seq)


def test_rank_one_fisher_round_trips(tmp_path, batches):
    fisher = estimate_rank_one_fisher(tiny_llama(), batches, target_modules=["v_proj"])
    fisher.save_pretrained(tmp_path)
    loaded = RankOneFisher.from_pretrained(tmp_path, model=tiny_llama())
    assert loaded.scale == fisher.scale
    for n, t in fisher.items():
        assert torch.equal(loaded[n], t)


def test_diagonal_penalty_value_and_gradient_match_hand_computation():
    model = tiny_llama()
    fisher = _random_fisher(model, LAYERS)
    penalty = FisherPenalty(model, fisher, strength=3.0)
    params = dict(model.named_parameters())
    start = {n: params[n].detach().clone() for n in LAYERS}
    assert penalty.value() == 0.0  # zero at θ = θ*
    assert penalty.add_gradients() == 0.0 and all(torch.count_nonzero(params[n].grad) == 0 for n in LAYERS)
    model.zero_grad(set_to_none=True)
    _perturb([params[n] for n in LAYERS])
    d = {n: params[n].detach() - start[n] for n in LAYERS}
    expected = 0.5 * 3.0 * sum(float((fisher[n].double() * d[n].double() ** 2).sum()) for n in LAYERS)
    assert penalty.value() == pytest.approx(expected, rel=1e-5)
    assert penalty.add_gradients(grad_scale=2.0) == pytest.approx(expected, rel=1e-5)
    for n in LAYERS:  # ∇ = λ F ⊙ (θ − θ*), times the loss scale
        torch.testing.assert_close(params[n].grad, 2.0 * 3.0 * fisher[n] * d[n], atol=1e-7, rtol=1e-5)
    assert params["model.layers.0.self_attn.k_proj.weight"].grad is None  # no Fisher entry, no penalty


def test_rank_one_penalty_value_and_gradient_match_hand_computation():
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    raw = {n: torch.randn(params[n].shape, generator=g) for n in LAYERS}
    norm = torch.sqrt(sum(r.square().sum() for r in raw.values()))
    fisher = RankOneFisher({n: r / norm for n, r in raw.items()}, _metadata("rank_one_fisher", scale=7.0))
    penalty = FisherPenalty(model, fisher, strength=0.5)
    start = {n: params[n].detach().clone() for n in LAYERS}
    assert penalty.value() == 0.0
    _perturb([params[n] for n in LAYERS])
    d = {n: params[n].detach() - start[n] for n in LAYERS}
    c = sum(float((fisher[n].double() * d[n].double()).sum()) for n in LAYERS)
    assert penalty.value() == pytest.approx(0.5 * 0.5 * 7.0 * c * c, rel=1e-5)
    assert float(fisher.quadratic_form(d)) == pytest.approx(7.0 * c * c, rel=1e-5)
    penalty.add_gradients()
    for n in LAYERS:  # ∇ = λ · scale · (u·d) · u
        torch.testing.assert_close(params[n].grad, 0.5 * 7.0 * c * fisher[n], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rank_one", [False, True])
def test_lora_delta_w_penalty_equals_the_dense_computation(arch, rank_one):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = ["q_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    dense_names = [n for n, _ in base.named_parameters() if n.endswith(tuple(f"{t}.weight" for t in targets))]
    fisher = _random_fisher(base, dense_names, seed=4)  # keyed by the plain model's names
    if rank_one:
        norm = torch.sqrt(sum(fisher[n].square().sum() for n in dense_names))
        fisher = RankOneFisher({n: fisher[n] / norm for n in dense_names}, _metadata("rank_one_fisher", scale=2.5))
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                            fan_in_fan_out=arch == "gpt2"))
    penalty = FisherPenalty(model, fisher, strength=1.5)
    assert sorted(penalty.keys) == sorted(dense_names)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    _perturb(lora_b, size=0.3)
    assert penalty.value() > 0
    # Dense reference: ΔW from PEFT's own merge, penalty on the merged weights against the originals.
    merged = copy.deepcopy(model).merge_and_unload()
    dw = {n: merged.state_dict()[n] - original[n] for n in dense_names}
    if rank_one:
        c = sum(float((fisher[n].double() * dw[n].double()).sum()) for n in dense_names)
        expected = 0.5 * 1.5 * 2.5 * c * c
    else:
        expected = 0.5 * 1.5 * sum(float((fisher[n].double() * dw[n].double() ** 2).sum()) for n in dense_names)
    assert penalty.value() == pytest.approx(expected, rel=1e-4)
    # Gradient reference: autograd through PEFT's get_delta_weight, all layers at once.
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    deltas = {n: layers[n.removesuffix(".weight")].get_delta_weight("default") for n in dense_names}
    if arch == "gpt2":  # Conv1D weights are (in, out); get_delta_weight returns the weight's own layout
        assert all(deltas[n].shape == fisher[n].shape for n in dense_names)
    if rank_one:
        c_t = sum((fisher[n] * deltas[n]).sum() for n in dense_names)
        reference_value = 0.5 * 1.5 * 2.5 * c_t**2
    else:
        reference_value = 0.5 * 1.5 * sum((fisher[n] * deltas[n] ** 2).sum() for n in dense_names)
    reference_grads = torch.autograd.grad(reference_value, lora_params)
    model.zero_grad(set_to_none=True)
    penalty.add_gradients()
    for p, ref in zip(lora_params, reference_grads, strict=True):
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-4)


def test_lora_penalty_is_measured_from_the_adapter_at_construction():
    base = tiny_llama()
    fisher = _random_fisher(base, ["model.layers.0.self_attn.q_proj.weight"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]))
    _perturb([p for n, p in model.named_parameters() if "lora_B" in n], size=0.3)  # a non-zero ΔW₀ (e.g. FWSVD init)
    penalty = FisherPenalty(model, fisher, strength=1.0)
    assert penalty.value() == 0.0


def test_penalty_uses_a_fisher_estimated_on_the_peft_model(batches):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]))
    fisher = estimate_diagonal_fisher(model, batches, target_modules=r".*v_proj\.base_layer")
    penalty = FisherPenalty(model, fisher, strength=1.0)
    assert all(k.endswith("v_proj.base_layer.weight") for k in penalty.keys) and len(penalty.keys) == 2


def test_penalty_errors_name_the_problem():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    partial = _random_fisher(tiny_llama(), ["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="no entry for the base weight of adapted layers"):
        FisherPenalty(model, partial, 1.0)
    plain = tiny_llama()
    for p in plain.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable weight"):
        FisherPenalty(plain, _random_fisher(plain, LAYERS), 1.0)
    wrong = DiagonalFisher({LAYERS[0]: torch.ones(3, 3)}, _metadata())
    with pytest.raises(ValueError, match="does not fit the model.*shape mismatch"):
        FisherPenalty(tiny_llama(), wrong, 1.0)
    renamed = DiagonalFisher({"transformer.h.0.attn.c_attn.weight": torch.ones(3, 3)}, _metadata())
    with pytest.raises(ValueError, match="not parameters of the model"):
        FisherPenalty(tiny_llama(), renamed, 1.0)
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        FisherPenalty(dora, _random_fisher(tiny_llama(), ["model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.1.self_attn.q_proj.weight"]), 1.0)


@pytest.mark.parametrize("mode", ["mean", "ema"])
def test_online_fisher_matches_the_formula_and_round_trips(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    grads = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(5)]
    online = OnlineDiagonalFisher({"a": (3, 2), "b": (4,)}, mode=mode, decay=0.9)
    for step in grads:
        online.update(step)
    squares = torch.stack([s["a"] ** 2 for s in grads]).double()
    if mode == "mean":
        expected = squares.mean(0)
    else:
        weights = torch.tensor([0.1 * 0.9 ** (4 - t) for t in range(5)], dtype=torch.float64)
        expected = (weights[:, None, None] * squares).sum(0) / (1 - 0.9**5)
    torch.testing.assert_close(online.to_diagonal_fisher()["a"].double(), expected, rtol=1e-5, atol=1e-7)
    online.save_pretrained(tmp_path)
    restored = OnlineDiagonalFisher({"a": (3, 2), "b": (4,)}, mode=mode, decay=0.9)
    restored.load_state(tmp_path)
    assert restored.steps == 5 and all(torch.equal(restored.state[k], online.state[k]) for k in online.state)
    loaded = DiagonalFisher.from_pretrained(tmp_path)  # the estimate is a plain DiagonalFisher folder
    assert torch.equal(loaded["a"], online.to_diagonal_fisher()["a"])
    with pytest.raises(ValueError, match="same online_fisher settings"):
        OnlineDiagonalFisher({"a": (3, 2), "b": (4,)}, mode=mode, decay=0.5).load_state(tmp_path)
    with pytest.raises(ValueError, match="decay"):
        OnlineDiagonalFisher({"a": (3, 2)}, decay=1.0)
