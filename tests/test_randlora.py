"""Fast RandLoRA against PEFT's own RandLoRA: same bases, same outputs and gradients on both contraction paths,
merging, adapters, save/load both ways with vanilla PEFT (fresh process), small files, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, RandLoraConfig, get_peft_model

from hf_fisher import FastRandLoraConfig, convert_from_peft_randlora, convert_to_peft_randlora
from hf_fisher.tuners.randlora import FastRandLoraLayer, contraction_costs
from tests.helpers import ROOT, relative_error, tiny_gpt2, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise(peft_model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give every λ, γ random non-zero values (λ starts at 0, which would hide most of the function)."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "randlora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
                values[name] = p.detach().clone()
    return values


def _copy_adapter(src, dst) -> None:
    src_params = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if "randlora_" in name:
                p.copy_(src_params[name])


def _set_contraction(peft_model, path: str) -> None:
    for module in peft_model.modules():
        if isinstance(module, FastRandLoraLayer):
            for adapter in module.contraction:
                module.contraction[adapter] = path


def _paths(peft_model) -> set[str]:
    return {m.last_contraction for m in peft_model.modules() if isinstance(m, FastRandLoraLayer)}


def _pair(make=tiny_llama, dtype=torch.float32, **kwargs):
    kwargs.setdefault("target_modules", ALL_LINEAR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(make().to(dtype), RandLoraConfig(r=8, **kwargs))
        ours = get_peft_model(make().to(dtype), FastRandLoraConfig(r=8, **kwargs))
    _randomise(ref)
    _copy_adapter(ref, ours)
    return ref, ours


IDS = torch.randint(1, 96, (3, 20), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model, ids=IDS):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_equal_peft_bit_for_bit(kind):
    flags = {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse"}
    ref, ours = _pair(projection_prng_key=7, **flags)
    assert torch.equal(ref.base_model.randlora_A["default"], ours.base_model.randlora_A.default)
    assert torch.equal(ref.base_model.randlora_B["default"], ours.base_model.randlora_B.default)


@pytest.mark.parametrize("path", ["per_token", "merged"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_forward_backward_equal_peft(path, make):
    targets = ALL_LINEAR if make is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    ref, ours = _pair(make, target_modules=targets)
    _set_contraction(ours, path)
    ref.train(), ours.train()
    ref_loss, ref_grads = _loss_and_grads(ref)
    loss, grads = _loss_and_grads(ours)
    assert _paths(ours) == {path}
    n_layers = sum(isinstance(m, FastRandLoraLayer) for m in ours.modules())
    assert set(grads) == set(ref_grads) and len(grads) == 2 * n_layers
    assert abs(float(loss - ref_loss)) < 1e-5 * float(ref_loss)
    for name, g in ref_grads.items():
        assert relative_error(grads[name], g) < 1e-4, name
        assert "lambda" in name or "gamma" in name  # the bases never get a gradient


def test_path_choice_never_changes_result_and_auto_picks_the_cheaper():
    ref, ours = _pair(dtype=torch.float64)
    out = {}
    for path in ("per_token", "merged"):
        _set_contraction(ours, path)
        out[path] = _loss_and_grads(ours)
    assert abs(float(out["per_token"][0] - out["merged"][0])) < 1e-12
    for name, g in out["per_token"][1].items():
        assert relative_error(out["merged"][1][name], g) < 1e-10, name
    # auto follows the FLOP count: per token for a few tokens, merged for many
    _set_contraction(ours, "auto")
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    for tokens in (2, 400):
        costs = contraction_costs(tokens, 32, 32, 8 * q.num_bases["default"], grad=True, fold=True)
        expected = "merged" if costs["merged"] < costs["per_token"] else "per_token"
        ids = torch.randint(1, 96, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        _loss_and_grads(ours, ids[:, :64] if tokens <= 64 else ids.reshape(-1, 50))
        assert q.last_contraction == expected
    assert {"per_token", "merged"} == {
        "merged" if (c := contraction_costs(t, 32, 32, 32, grad=True, fold=True))["merged"] < c["per_token"]
        else "per_token" for t in (2, 400)
    }


def test_delta_is_full_rank_and_merge_roundtrips():
    ref, ours = _pair(dtype=torch.float64)
    for module in ours.modules():
        if isinstance(module, FastRandLoraLayer):
            delta = module.get_delta_weight("default")
            assert delta.shape == module.get_base_layer().weight.shape
            assert int(torch.linalg.matrix_rank(delta)) == min(module.in_features, module.out_features)
    ours.eval()
    with torch.no_grad():
        unmerged = ours(input_ids=IDS).logits
        with ours.disable_adapter():
            base = ours(input_ids=IDS).logits
        bare = tiny_llama().double()(input_ids=IDS).logits
        assert torch.allclose(base, bare, atol=1e-12)
        ours.merge_adapter()
        assert torch.allclose(ours(input_ids=IDS).logits, unmerged, atol=1e-10)
        ours.unmerge_adapter()
        assert torch.allclose(ours(input_ids=IDS).logits, unmerged, atol=1e-10)
        assert torch.allclose(ours.get_base_model()(input_ids=IDS).logits, unmerged, atol=1e-10)
        merged = ours.merge_and_unload()
        assert not any(isinstance(m, FastRandLoraLayer) for m in merged.modules())
        assert torch.allclose(merged(input_ids=IDS).logits, unmerged, atol=1e-10)


def test_training_changes_only_lambda_gamma():
    _, ours = _pair()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    bases = ours.base_model.randlora_A.default.clone()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    ours.train()
    for _ in range(2):
        _loss_and_grads(ours)
        opt.step()
    for n, p in ours.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("randlora_lambda" in n or "randlora_gamma" in n), n
    assert torch.equal(bases, ours.base_model.randlora_A.default)


def test_multiple_adapters_match_peft_and_switch():
    ref, ours = _pair(target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_adapter("other", RandLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        ours.add_adapter("other", FastRandLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _randomise(ref, seed=5)
    _copy_adapter(ref, ours)
    ref.eval(), ours.eval()
    with torch.no_grad():
        for adapter in ("default", "other", "default"):
            ref.set_adapter(adapter), ours.set_adapter(adapter)
            assert relative_error(ours(input_ids=IDS).logits, ref(input_ids=IDS).logits) < 1e-6
        first = ours(input_ids=IDS).logits
        ours.set_adapter("other")
        assert relative_error(ours(input_ids=IDS).logits, first) > 1e-4  # the adapters differ
        ours.delete_adapter("other")
        assert "other" not in ours.base_model.randlora_A._buffers
        ours.set_adapter("default")
        assert torch.equal(ours(input_ids=IDS).logits, first)


def _file_mb(path) -> int:
    return (path / "adapter_model.safetensors").stat().st_size


def _trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_save_load_ours_and_to_vanilla_in_fresh_process(tmp_path):
    _, ours = _pair()
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=torch.arange(24).reshape(2, 12) % 96).logits
    ours.save_pretrained(tmp_path / "fast")
    saved = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FAST_RANDLORA"
    # small: λ and γ only (no bases), within 1.1× the trainable parameters plus the safetensors header
    assert _file_mb(tmp_path / "fast") <= 1.1 * _trainable_bytes(ours) + 8192
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fast").eval()
    assert type(reloaded.base_model).__name__ == "FastRandLoraModel"
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=torch.arange(24).reshape(2, 12) % 96).logits, expected, atol=1e-6)

    convert_to_peft_randlora(tmp_path / "fast", tmp_path / "vanilla")
    assert json.loads((tmp_path / "vanilla" / "adapter_config.json").read_text())["peft_type"] == "RANDLORA"
    # fresh processes: vanilla PEFT (hf_fisher never imported) on the converted folder, hf_fisher on ours
    for folder, extra in ((tmp_path / "vanilla", []), (tmp_path / "fast", ["--hf-fisher"])):
        out = tmp_path / f"logits_{folder.name}.pt"
        result = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "scripts" / "load_vanilla_randlora.py"), str(folder), str(out),
             *extra], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                     "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Found missing adapter keys" not in result.stderr and "unexpected" not in result.stderr.lower()
        got = torch.load(out)
        assert torch.allclose(got["logits"], expected, atol=1e-5)
        assert torch.allclose(got["merged"], expected, atol=1e-5)


def test_peft_adapter_loads_into_ours(tmp_path):
    ref, _ = _pair(save_projection=True)
    ref.eval()
    with torch.no_grad():
        expected = ref(input_ids=IDS).logits
    ref.save_pretrained(tmp_path / "peft")
    big = _file_mb(tmp_path / "peft")
    convert_from_peft_randlora(tmp_path / "peft", tmp_path / "fast")
    small = _file_mb(tmp_path / "fast")
    assert small < big / 5 and small <= 1.1 * _trainable_bytes(ref) + 8192
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fast").eval()
    assert type(ours.base_model).__name__ == "FastRandLoraModel"
    with torch.no_grad():
        assert relative_error(ours(input_ids=IDS).logits, expected) < 1e-5
    with pytest.raises(ValueError, match="holds a 'RANDLORA' adapter; this converter expects 'FAST_RANDLORA'"):
        convert_to_peft_randlora(tmp_path / "peft", tmp_path / "wrong")
    with pytest.raises(FileNotFoundError, match="is not a saved adapter folder"):
        convert_from_peft_randlora(tmp_path / "missing", tmp_path / "wrong")
    # a basis that the seed does not regenerate cannot be dropped silently
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    tensors["base_model.randlora_A"] = tensors["base_model.randlora_A"] * 2
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="differs from the one projection_prng_key"):
        convert_from_peft_randlora(tmp_path / "peft", tmp_path / "bad")


def test_save_projection_saves_bases_once(tmp_path):
    _, ours = _pair(save_projection=True)
    ours.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert sum(k.endswith("randlora_A") for k in keys) == 1 and "base_model.randlora_A" in keys
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert torch.equal(reloaded.base_model.randlora_B.default, ours.base_model.randlora_B.default)


def test_safe_merge_refuses_non_finite_update():
    _, ours = _pair(target_modules=["q_proj"])
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.randlora_lambda["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(r=40, target_modules=["q_proj", "gate_proj"]), "exceeds min"),
        (dict(r=8, target_modules=["q_proj", "embed_tokens"]), "nn.Linear and transformers' Conv1D layers only"),
        (dict(r=8, target_modules=["nonexistent"]), "No layer of the model matches"),
    ],
)
def test_bad_config_raises_before_modifying(config, match):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, FastRandLoraConfig(**config))
    assert not any(isinstance(m, FastRandLoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_second_adapter_and_config_values():
    _, ours = _pair(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="must share projection_prng_key"):
        ours.add_adapter("other", FastRandLoraConfig(r=8, target_modules=["q_proj"], projection_prng_key=3))
    with pytest.raises(ValueError, match="exceeds min"):
        ours.add_adapter("big", FastRandLoraConfig(r=64, target_modules=["q_proj"]))
    assert set(ours.peft_config) == {"default"}
    assert set(ours.base_model.randlora_A._buffers) == {"default"}
    with pytest.raises(ValueError, match="contraction must be one of"):
        FastRandLoraConfig(contraction="fast")
    with pytest.raises(ValueError, match="cannot apply randlora_dropout"):
        FastRandLoraConfig(contraction="merged", randlora_dropout=0.1)


@pytest.mark.parametrize("path", ["per_token", "merged"])
def test_bf16_matches_peft(path):
    ref, ours = _pair(dtype=torch.bfloat16)
    _set_contraction(ours, path)
    ref.eval(), ours.eval()
    with torch.no_grad():
        got, want = ours(input_ids=IDS).logits, ref(input_ids=IDS).logits
    assert got.dtype == torch.bfloat16 and _paths(ours) == {path}
    assert relative_error(got.float(), want.float()) < 2e-2
    ours.train()
    _loss_and_grads(ours)  # gradients flow in bf16 models too


def _tiny_llama_4bit(folder):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    for module in model.modules():  # the AVX512-BF16 repacking trap (DESIGN.md): keep gradients exact
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("path", ["per_token", "merged"])
def test_bnb_4bit_matches_peft_and_merges(tmp_path, path):
    tiny_llama().save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(_tiny_llama_4bit(tmp_path / "base"), RandLoraConfig(r=8, target_modules=targets))
        ours = get_peft_model(_tiny_llama_4bit(tmp_path / "base"), FastRandLoraConfig(r=8, target_modules=targets))
    assert type(ref.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb layer
    _randomise(ref)
    _copy_adapter(ref, ours)
    _set_contraction(ours, path)
    ref_loss, ref_grads = _loss_and_grads(ref)
    loss, grads = _loss_and_grads(ours)
    assert _paths(ours) == {path}
    assert abs(float(loss - ref_loss)) < 1e-5 * float(ref_loss)
    for name, g in ref_grads.items():
        assert relative_error(grads[name], g) < 1e-4, name
    # merge into the 4-bit weight = dequantize, add ΔW, re-quantize with the same settings: compared with bitsandbytes'
    # own quantize/dequantize of the dense sum (4-bit rounding is the only loss; small ΔW entries round away)
    import bitsandbytes as bnb

    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.get_base_layer().weight

    def requantized(dense):
        packed, state = bnb.functional.quantize_4bit(
            dense, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
        )
        return bnb.functional.dequantize_4bit(packed, state)

    original = layer._dense_base_weight().clone()
    delta = layer.get_delta_weight("default")
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.merge()
        merged_weight = layer._dense_base_weight()
        assert type(layer.get_base_layer().weight).__name__ == "Params4bit"
        assert torch.equal(merged_weight, requantized(original + delta))
        assert relative_error(merged_weight, original + delta) < 0.15
        assert torch.allclose(layer(x), x @ merged_weight.T, atol=1e-5)  # the layer really uses the new weight
        layer.unmerge()
        assert torch.equal(layer._dense_base_weight(), requantized(merged_weight - delta))


def test_other_load_paths(tmp_path):
    """low_cpu_mem_usage loading, transformers' own load_adapter, and a second adapter loaded from disk."""
    _, ours = _pair(target_modules=["q_proj", "down_proj"])
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "a")
    lazy = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", low_cpu_mem_usage=True).eval()
    plain = tiny_llama()
    plain.load_adapter(str(tmp_path / "a"))
    lazy.load_adapter(tmp_path / "a", adapter_name="second")
    lazy.set_adapter("second")
    with torch.no_grad():
        assert torch.allclose(lazy(input_ids=IDS).logits, expected, atol=1e-6)
        assert isinstance(plain.model.layers[0].self_attn.q_proj, FastRandLoraLayer)
        assert torch.allclose(plain.eval()(input_ids=IDS).logits, expected, atol=1e-6)


class _TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(12, 20), torch.nn.Linear(20, 12)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("path", ["per_token", "merged"])
def test_biased_linear_input_and_bias_gradients_equal_peft(path):
    """The folded path computes x (W + ΔW)ᵀ + b itself: input, bias (bias='all') and λ, γ gradients as PEFT's."""
    torch.manual_seed(0)
    base = _TwoLinear()
    ref = get_peft_model(_copy(base), RandLoraConfig(r=4, target_modules=["a", "b"], bias="all"))
    config = FastRandLoraConfig(r=4, target_modules=["a", "b"], bias="all", contraction=path)
    ours = get_peft_model(_copy(base), config)
    _randomise(ref)
    _copy_adapter(ref, ours)
    x = torch.randn(7, 12, requires_grad=True, generator=torch.Generator().manual_seed(4))
    results = []
    for model in (ref, ours):
        x.grad = None
        y = model(x)
        y.pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), x.grad.clone(), grads))
    assert ours.base_model.model.a.last_contraction == path
    assert relative_error(results[1][0], results[0][0]) < 1e-6
    assert relative_error(results[1][1], results[0][1]) < 1e-5
    assert any("bias" in n for n in results[0][2]) and set(results[0][2]) == set(results[1][2])
    for name, g in results[0][2].items():
        assert relative_error(results[1][2][name], g) < 1e-5, name


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_dropout_forces_per_token_while_training():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(tiny_llama(), FastRandLoraConfig(r=8, target_modules=["q_proj"], randlora_dropout=0.1,
                                                               contraction="auto"))
    ids = torch.randint(1, 96, (8, 50), generator=torch.Generator().manual_seed(2))  # many tokens: merged is cheaper
    ours.train()
    _loss_and_grads(ours, ids)
    assert _paths(ours) == {"per_token"}
    ours.eval()
    with torch.no_grad():
        ours(input_ids=ids)
    assert _paths(ours) == {"merged"}


def test_config_conversion_in_memory():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config = RandLoraConfig(r=4, target_modules=["q_proj"], projection_prng_key=3, randlora_alpha=64,
                                     sparse=True)
    fast = FastRandLoraConfig.from_randlora(peft_config, contraction="per_token")
    assert fast.peft_type == "FAST_RANDLORA" and fast.contraction == "per_token"
    assert (fast.r, fast.projection_prng_key, fast.randlora_alpha, fast.sparse) == (4, 3, 64, True)
    back = fast.to_randlora()
    assert type(back) is RandLoraConfig and back.peft_type == "RANDLORA"
    assert (back.r, back.projection_prng_key, back.randlora_alpha, back.sparse) == (4, 3, 64, True)
    with pytest.raises(TypeError, match="Expected a peft.RandLoraConfig"):
        FastRandLoraConfig.from_randlora({"r": 4})
