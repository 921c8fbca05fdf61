"""LQ-LoRA PEFT integration: exact init against a dense reference, budget, gradients, errors, save/load, export."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_fisher import (
    LQLoraConfig,
    estimate_diagonal_fisher,
    export_dequantized,
    load_lqlora_model,
    nf_dequantize,
    nf_quantize,
    prepare_lqlora_model,
    save_lqlora_model,
)
from hf_fisher.tuners.lqlora import NFQuantizedLinear, build_error_table, storage_report
from hf_fisher.tuners.lqlora.decomposition import lq_decompose
from hf_fisher.tuners.lqlora.model import quantized_layers
from hf_fisher.tuners.lqlora.quantizer import NFConfig
from tests.helpers import ROOT, make_batches, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
NF3 = NFConfig(3, 32, 8, 16).to_dict()


def _config(**kwargs) -> LQLoraConfig:
    defaults = dict(r=4, lora_alpha=16, target_modules=TARGETS, quant_grid=[NF3], max_iter=4)
    return LQLoraConfig(**{**defaults, **kwargs})


def _dense_reference(peft_model, original):
    """A plain copy of the original model whose target weights are Q + s·B·A, read from the LQ-LoRA layers."""
    import copy

    reference = copy.deepcopy(original)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in layers.items():
            s = layer.scaling["default"]
            dense = layer.get_base_layer().dequantized_weight() + s * layer.lora_B["default"].weight @ layer.lora_A[
                "default"].weight
            reference.get_submodule(name).weight.copy_(dense)
    return reference


@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_equals_dense_q_plus_low_rank(use_rslora):
    original = tiny_llama()
    model = tiny_llama()
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_model = prepare_lqlora_model(model, _config(use_rslora=use_rslora), progress=False)
    layers = quantized_layers(peft_model)
    assert len(layers) == 8 and all(isinstance(m, NFQuantizedLinear) for m in layers.values())
    # The LoRA product times its scaling is the decomposition's L1 L2 (alpha != r, so scaling matters).
    reference = _dense_reference(peft_model, original)
    torch.testing.assert_close(peft_model(x).logits, reference(x).logits, atol=1e-5, rtol=1e-5)
    # And Q + L1 L2 approximates the original weights better than Q alone would (the low-rank part is real).
    w = original.model.layers[0].mlp.up_proj.weight
    layer = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.up_proj"]
    q = layer.get_base_layer().dequantized_weight()
    approx = q + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert (w - approx).norm() < (w - nf_dequantize(nf_quantize(w, NFConfig(**NF3)))).norm()
    # Direct check against an independent decomposition of that matrix: Q and s·B·A are exactly Q and L1 L2.
    dec = lq_decompose(w, 4, NFConfig(**NF3), max_iter=4, tol=1e-3, svd_niter=2, seed=0)
    torch.testing.assert_close(q, nf_dequantize(dec.quantized), atol=0, rtol=0)
    torch.testing.assert_close(approx, q + dec.L1 @ dec.L2, atol=1e-6, rtol=1e-5)
    # Only the LoRA factors train; the packed codes are buffers.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_budget_allocation_is_respected_and_recorded(tmp_path):
    grid = [NFConfig(b, 16, 8, 16).to_dict() for b in (2, 3, 4)] + [NFConfig(4, 64, 8, 16).to_dict()]
    config = _config(quant_grid=grid, budget=3.0, table_cache_dir=str(tmp_path), table_max_iter=2)
    table = build_error_table(tiny_llama(), config, progress=False)
    assert table.errors.shape == (8, 4) and (table.errors > 0).all()
    # More bits, less error at equal block size.
    assert (table.errors[:, 0] > table.errors[:, 1]).all() and (table.errors[:, 1] > table.errors[:, 2]).all()
    peft_model = prepare_lqlora_model(tiny_llama(), config, progress=False)
    report = storage_report(peft_model)
    assert report["quantized_bits_per_parameter"] <= 3.0
    assert len(config.allocation) == 8
    chosen_bits = {NFConfig(**c).bits for c in config.allocation.values()}
    assert len(chosen_bits) > 1  # a mixed allocation at 3 bits with this grid
    assert (tmp_path / "lqlora_error_table.json").is_file()


def test_error_table_cache_is_used(tmp_path, monkeypatch):
    grid = [NFConfig(b, 16, 8, 16).to_dict() for b in (2, 3)]
    config = _config(quant_grid=grid, budget=2.9, table_cache_dir=str(tmp_path), table_max_iter=1)
    first = build_error_table(tiny_llama(), config, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("the cached table should not be recomputed")

    monkeypatch.setattr("hf_fisher.tuners.lqlora.model.lq_decompose", boom)
    second = build_error_table(tiny_llama(), config, progress=False)
    assert (first.errors == second.errors).all()
    with pytest.raises(AssertionError, match="recomputed"):  # another model's weights are not in the cache
        build_error_table(tiny_llama(seed=1), config, progress=False)


def test_fisher_weighted_preparation(batches):
    fisher = estimate_diagonal_fisher(tiny_llama(), batches)
    original = tiny_llama()
    peft_model = prepare_lqlora_model(tiny_llama(), _config(fisher_weighted=True), fisher=fisher, progress=False)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        peft_model(x).logits, _dense_reference(peft_model, original)(x).logits, atol=1e-5, rtol=1e-5
    )
    # The Fisher changed the decomposition.
    plain = prepare_lqlora_model(tiny_llama(), _config(), progress=False)
    assert not torch.allclose(peft_model(x).logits, plain(x).logits)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "fisher", "match"),
    [
        (dict(target_modules=["nothing_here"]), None, "No module of the model matches"),
        (dict(r=64), None, "exceeds min"),
        (dict(budget=1.5, quant_grid=[NF3, NFConfig(4, 32, 8, 16).to_dict()]), None, "at least 3"),
        (dict(quant_grid=[NF3, NF3]), None, "set a budget"),
        (dict(fisher_weighted=True), None, "needs a Fisher"),
        (dict(fisher_weighted=True), {"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32)}, "no entry"),
        (dict(target_modules=["q_proj", "embed_tokens"]), None, "not an nn.Linear"),
    ],
)
def test_bad_input_leaves_model_untouched(kwargs, fisher, match):
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        prepare_lqlora_model(model, _config(**kwargs), fisher=fisher, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, NFQuantizedLinear) for m in model.modules())


def test_gradients_match_dense_reference_after_an_eval_pass(batches):
    original = tiny_llama()
    peft_model = prepare_lqlora_model(tiny_llama(), _config(), progress=False)
    batch = batches[0]
    peft_model.eval()
    with torch.no_grad():
        peft_model(**batch)  # an eval-mode no-grad pass first (the bitsandbytes CPU trap); must not matter
    peft_model.train()
    peft_model(**batch).loss.backward()
    # Reference: the same LoRA on a dense base holding exactly Q, via PEFT's plain Linear.
    from peft import LoraConfig, get_peft_model

    dense = original
    with torch.no_grad():
        for name, module in quantized_layers(peft_model).items():
            dense.get_submodule(name).weight.copy_(module.dequantized_weight())
    ref = get_peft_model(dense, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    ref.load_state_dict({k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, strict=False)
    ref.train()
    ref(**batch).loss.backward()
    got = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-4)


def _saved_shapes(fn) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Shapes of every tensor autograd saves for backward while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


def test_quantized_layer_saves_no_dense_weight_and_has_exact_gradients():
    """The dense W is dequantized again in backward, not kept alive from forward (F.linear would keep it)."""
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1))
    layer = NFQuantizedLinear(nf_quantize(w, NFConfig(3, 32, 8, 16)), bias)
    layer.bias.requires_grad_(True)  # as with PEFT's bias="all"
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    shapes, out = _saved_shapes(lambda: layer(x))
    assert (48, 40) not in shapes and (40, 48) not in shapes
    dense = layer.dequantized_weight()
    ref_shapes, _ = _saved_shapes(lambda: torch.nn.functional.linear(x, dense, layer.bias))
    assert {(48, 40), (40, 48)} & set(ref_shapes)  # the check can fail: the plain path saves W (or Wᵀ)
    grad = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (x, layer.bias), grad)
    want = torch.autograd.grad(torch.nn.functional.linear(x, dense, layer.bias), (x, layer.bias), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, dense, layer.bias))


def test_merge_raises_clear_error():
    peft_model = prepare_lqlora_model(tiny_llama(), _config(), progress=False)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft_model.merge_and_unload()


LOAD_SCRIPT = """
import sys, torch
from hf_fisher import load_lqlora_model
model = load_lqlora_model(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(model(x).logits, sys.argv[3])
print("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))
"""

VANILLA_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
assert "hf_fisher" not in sys.modules
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[1] + "/adapter")
x = torch.load(sys.argv[2])
torch.save(model(x).logits, sys.argv[3])
assert "hf_fisher" not in sys.modules
"""


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_save_load_in_a_fresh_process_and_dequantized_export(tmp_path):
    grid = [NFConfig(2, 16, 8, 16).to_dict(), NFConfig(3, 32, 4, 16, "bf16").to_dict(),
            NFConfig(4, 64, 8, 16, "fp16").to_dict()]
    peft_model = prepare_lqlora_model(tiny_llama(), _config(quant_grid=grid, budget=3.2), progress=False)
    # Train a step so the adapter is not just its init.
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    batch = make_batches(4, 4, 10, 96, seed=3)[0]
    peft_model(**batch).loss.backward()
    opt.step()
    peft_model.eval()
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = peft_model(x).logits

    save_lqlora_model(peft_model, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "lqlora_base.json").read_text())
    assert {c["config"]["bits"] for c in meta["layers"].values()} <= {2, 3, 4}
    out = _run(LOAD_SCRIPT, str(tmp_path / "saved"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    assert "trainable 0" in out
    # identical up to float reduction order (the two processes may run with different thread counts)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, atol=1e-6, rtol=1e-5)
    # In process, trainable, and it still trains.
    again = load_lqlora_model(tmp_path / "saved", is_trainable=True)
    assert any(p.requires_grad for p in again.parameters())

    export_dequantized(peft_model, tmp_path / "plain", dtype=torch.float32)
    _run(VANILLA_SCRIPT, str(tmp_path / "plain"), str(tmp_path / "x.pt"), str(tmp_path / "z.pt"))
    torch.testing.assert_close(torch.load(tmp_path / "z.pt"), want, atol=1e-5, rtol=1e-5)


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by save_lqlora_model"):
        load_lqlora_model(tmp_path)


BNB_SCRIPT = """
import sys, torch
import bitsandbytes as bnb
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
model = PeftModel.from_pretrained(base, sys.argv[1] + "/adapter").eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x).logits, sys.argv[3])
assert "hf_fisher" not in sys.modules
print("linear4bit", n4)
"""


def test_bitsandbytes_export_loads_in_vanilla_transformers(tmp_path):
    from hf_fisher import export_bitsandbytes

    config = _config(quant_grid=[NFConfig(4, 64, 8, 16).to_dict()])
    peft_model = prepare_lqlora_model(tiny_llama(), config, progress=False).eval()
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = peft_model(x).logits
    export_bitsandbytes(peft_model, tmp_path / "bnb")
    out = _run(BNB_SCRIPT, str(tmp_path / "bnb"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    assert "linear4bit 8" in out  # exactly the 8 LQ-LoRA targets are 4-bit; k_proj, o_proj, ... stay fp32
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, atol=1e-4, rtol=1e-4)
    # Bitsandbytes reproduces Q: every block has a ±1 code, so its fp32 absmax is our block scale exactly, and the
    # values agree to float rounding (its NF4 table and ours differ in the last bit).
    import bitsandbytes.functional as bnbf

    for name, layer in quantized_layers(peft_model).items():
        q = layer.dequantized_weight()
        packed, state = bnbf.quantize_4bit(q, blocksize=64, compress_statistics=False, quant_type="nf4")
        blocks = q.reshape(-1, 64).abs().amax(1)
        torch.testing.assert_close(state.absmax, blocks, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(bnbf.dequantize_4bit(packed, state), q, atol=1e-8, rtol=1e-6, msg=name)
    # Gradients through the exported 4-bit model after an eval-mode no-grad pass (the AVX512-BF16 repacking trap),
    # with the guard on, match those through the LQ-LoRA layers (same Q to float rounding).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_fisher.tuners.lqlora import guard_bitsandbytes_cpu

    bnb_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bnb")),
                                          str(tmp_path / "bnb" / "adapter"), is_trainable=True)
    assert guard_bitsandbytes_cpu(bnb_model) == 8
    batch = make_batches(4, 4, 10, 96, seed=5)[0]
    for m in (bnb_model, peft_model):
        m.eval()
        with torch.no_grad():
            m(**batch)
        m.train()
        m(**batch).loss.backward()
    got = {n: p.grad for n, p in bnb_model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-3)

    mixed = prepare_lqlora_model(tiny_llama(), _config(), progress=False)
    with pytest.raises(ValueError, match="NF4 with blocks of 64"):
        export_bitsandbytes(mixed, tmp_path / "nope")


def test_trains_with_transformers_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    peft_model = prepare_lqlora_model(tiny_llama(), _config(), progress=False)
    buffers = {n: b.clone() for n, b in peft_model.named_buffers()}
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = make_batches(8, 8, 10, 96, seed=4)[0]
    data = Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    assert all(torch.equal(b, buffers[n]) for n, b in peft_model.named_buffers())  # Q is frozen
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert len(changed) == len(lora)


def test_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    peft_model = prepare_lqlora_model(model, _config(), progress=False)
    layer = next(iter(quantized_layers(peft_model).values()))
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    out = peft_model(x, labels=x)
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    out.loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    for cfg in (NFConfig(3, 32, 8, 16), NFConfig(4, 64, 8, 16, "bf16")):
        cpu, gpu = nf_quantize(w, cfg), nf_quantize(w.cuda(), cfg)
        assert torch.equal(cpu.codes, gpu.codes.cpu()) and torch.equal(cpu.scale_codes, gpu.scale_codes.cpu())
        torch.testing.assert_close(nf_dequantize(gpu).cpu(), nf_dequantize(cpu))
    peft_model = prepare_lqlora_model(tiny_llama(), _config(), progress=False).eval()
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(x).logits
        got = peft_model.to("cuda")(x.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
