"""fisher_merge: plain averaging for equal Fishers, a hand example, LoRA merges against the dense merge, the CLI,
and a merged adapter that loads in vanilla PEFT in a fresh process."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_fisher import DiagonalFisher, fisher_merge
from hf_fisher.cli import main
from hf_fisher.curvature import CurvatureMetadata
from tests.helpers import tiny_gpt2, tiny_llama


def _fisher(entries: dict[str, torch.Tensor]) -> DiagonalFisher:
    meta = CurvatureMetadata(curvature_type="diagonal_fisher", kind="sampled", n_sequences=1, n_tokens=1,
                             normalization="test")
    return DiagonalFisher(entries, meta)


def _random_fisher(model, names, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return _fisher({n: torch.rand(params[n].shape, generator=g) ** 4 for n in names})  # spread over magnitudes


def _linear_names(model):
    return [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "wte" not in n
            and "wpe" not in n and "lm_head" not in n]


def test_equal_fishers_give_the_plain_weighted_average():
    models = [tiny_llama(seed=s) for s in range(3)]
    names = _linear_names(models[0])
    shared = _random_fisher(models[0], names, seed=9)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    merged = fisher_merge(models, [shared] * 3, weights=[1.0, 2.0, 1.0], eps=0.0)
    for n, p in merged.named_parameters():  # Fisher-weighted where covered, plain elsewhere: all plain here
        expected = (models[0].state_dict()[n] + 2 * models[1].state_dict()[n] + models[2].state_dict()[n]) / 4
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
    for m, b in zip(models, before, strict=True):  # inputs untouched
        assert all(torch.equal(t, b[k]) for k, t in m.state_dict().items())


def test_hand_example_per_coordinate():
    def model(values):
        m = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([values]))
        return m

    a, b = model([1.0, 2.0, 5.0]), model([3.0, 6.0, -5.0])
    fa = _fisher({"weight": torch.tensor([[1.0, 0.0, 2.0]])})
    fb = _fisher({"weight": torch.tensor([[1.0, 3.0, 2.0]])})
    merged = fisher_merge([a, b], [fa, fb], eps=0.0)
    # coordinate 0: (1·1 + 1·3)/2 = 2; coordinate 1: (0·2 + 3·6)/3 = 6; coordinate 2: (2·5 − 2·5)/4 = 0
    assert merged.weight.tolist() == [[2.0, 6.0, 0.0]]
    weighted = fisher_merge([a, b], [fa, fb], weights=[3.0, 1.0], eps=0.0)
    # coordinate 0: (3·1 + 1·3)/4 = 1.5; coordinate 1: (0 + 3·6)/3 = 6; coordinate 2: (3·2·5 − 2·5)/8 = 2.5
    assert weighted.weight.tolist() == [[1.5, 6.0, 2.5]]
    zero = _fisher({"weight": torch.zeros(1, 3)})
    assert fisher_merge([a, b], [zero, zero]).weight.tolist() == [[2.0, 4.0, 0.0]]  # ε: plain average
    assert fisher_merge([a, b], [None, None], weights=[1, 3]).weight.tolist() == [[2.5, 5.0, -2.5]]


def _adapters(arch="llama", seeds=(1, 2), ranks=(2, 3)):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = ["q_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    models = []
    for seed, r in zip(seeds, ranks, strict=True):
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           fan_in_fan_out=arch == "gpt2"))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        models.append(m)
    names = [n for n, _ in base.named_parameters() if n.endswith(tuple(f"{t}.weight" for t in targets))]
    return base, models, names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_merge_equals_the_dense_merge(arch):
    base, models, names = _adapters(arch)
    fishers = [_random_fisher(base, names, seed=s) for s in (5, 6)]
    dense = fisher_merge([copy.deepcopy(m).merge_and_unload() for m in models], fishers, weights=[0.3, 0.7])
    merged = fisher_merge(models, fishers, weights=[0.3, 0.7], lora_output="merged")
    for n, p in merged.named_parameters():
        torch.testing.assert_close(p.detach(), dense.state_dict()[n], atol=1e-6, rtol=1e-5)
    # A full-rank SVD adapter reproduces the merged ΔW exactly; a rank-r one is its best rank-r approximation.
    full = fisher_merge(models, fishers, weights=[0.3, 0.7], lora_rank=64)
    low = fisher_merge(models, fishers, weights=[0.3, 0.7], lora_rank=2)
    layers_full = {n: m for n, m in full.named_modules() if hasattr(m, "lora_A")}
    layers_low = {n: m for n, m in low.named_modules() if hasattr(m, "lora_A")}
    for name in names:
        module = name.removesuffix(".weight")
        target = dense.state_dict()[name] - base.state_dict()[name]
        torch.testing.assert_close(layers_full[f"base_model.model.{module}"].get_delta_weight("default"), target,
                                   atol=1e-5, rtol=1e-4)
        approx = layers_low[f"base_model.model.{module}"].get_delta_weight("default").detach()
        s = torch.linalg.svdvals(target.double())
        assert float((approx - target).double().norm()) == pytest.approx(float(s[2:].norm()), rel=1e-4)


def test_concatenated_adapter_is_exact_for_the_layerwise_merge():
    base, models, names = _adapters(ranks=(2, 3))
    g = torch.Generator().manual_seed(0)
    # Fishers constant within a layer: the element-wise and the layer-wise merge coincide.
    constant = [_fisher({n: torch.full_like(base.state_dict()[n], float(torch.rand(1, generator=g)))
                         for n in names}) for _ in models]
    concat = fisher_merge(models, constant, lora_output="concat")
    merged = fisher_merge(models, constant, lora_output="merged")
    ranks = {m.lora_A["default"].weight.shape[0] for m in concat.modules() if hasattr(m, "lora_A")}
    assert ranks == {5}
    reference = merged.state_dict()
    for n, p in concat.merge_and_unload().named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], atol=1e-6, rtol=1e-5)
    # With element-wise Fishers, concat uses per-layer weights c_m ∝ mean F_m.
    fishers = [_random_fisher(base, names, seed=s) for s in (5, 6)]
    concat = fisher_merge(models, fishers, lora_output="concat").merge_and_unload()
    name = names[0]
    deltas = [copy.deepcopy(m).merge_and_unload().state_dict()[name] - base.state_dict()[name] for m in models]
    c = torch.tensor([float(f[name].double().mean()) + 1e-8 for f in fishers])
    c = c / c.sum()
    got = concat.state_dict()[name] - base.state_dict()[name]
    torch.testing.assert_close(got, c[0] * deltas[0] + c[1] * deltas[1], atol=1e-6, rtol=1e-5)


def test_bad_input_is_refused_with_the_fix():
    base, models, names = _adapters()
    fishers = [_random_fisher(base, names, seed=s) for s in (5, 6)]
    with pytest.raises(ValueError, match="at least two"):
        fisher_merge(models[:1], fishers[:1])
    with pytest.raises(ValueError, match="per model"):
        fisher_merge(models, fishers[:1])
    with pytest.raises(ValueError, match="non-negative"):
        fisher_merge(models, fishers, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="mix"):
        fisher_merge([models[0], tiny_llama()], fishers)
    with pytest.raises(ValueError, match="Only some models"):
        fisher_merge(models, [fishers[0], None], lora_output="merged")
    partial = _fisher({names[0]: fishers[0][names[0]]})
    with pytest.raises(ValueError, match="no entry for the base weight"):
        fisher_merge(models, [partial, fishers[1]])
    with pytest.raises(ValueError, match="same architecture|one architecture"):
        fisher_merge([tiny_llama(), tiny_gpt2()], [None, None])
    other_base = get_peft_model(tiny_llama(seed=5), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    with pytest.raises(ValueError, match="different base weights"):
        fisher_merge([models[0], other_base], [None, None])


def test_cli_merges_adapters_into_a_vanilla_peft_adapter(tmp_path, capsys):
    base, models, names = _adapters()
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i, (m, seed) in enumerate(zip(models, (5, 6), strict=True)):
        m.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        m.save_pretrained(tmp_path / f"adapter{i}")
        _random_fisher(base, names, seed=seed).save_pretrained(tmp_path / f"adapter{i}" / "fisher")
        paths.append(str(tmp_path / f"adapter{i}"))
    out = tmp_path / "merged"
    assert main(["merge", "--models", *paths, "--lora-rank", "4", "--output-dir", str(out)]) == 0
    assert "reusing the Fisher saved" in capsys.readouterr().out
    expected = fisher_merge(models, [DiagonalFisher.from_pretrained(f"{p}/fisher") for p in paths], lora_rank=4)
    assert expected.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    ids = [[1, 5, 9, 2, 7]]
    with torch.no_grad():
        reference = expected(input_ids=torch.tensor(ids)).logits
    code = textwrap.dedent(f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({ids})).logits.tolist()))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    # Errors exit with code 2 and write nothing.
    assert main(["merge", "--models", paths[0], "--output-dir", str(tmp_path / "x")]) == 2
    assert main(["merge", "--models", *paths, "--output-dir", str(out)]) == 2
    assert main(["merge", "--models", *paths, "--fishers", "none", "--output-dir", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _saved_full_models(tmp_path):
    """Two tiny Llamas and random Fishers, saved as tmp_path/m0, m1 and f0, f1."""
    models = [tiny_llama(seed=s) for s in (0, 1)]
    names = _linear_names(models[0])
    fishers = [_random_fisher(models[0], names, seed=s) for s in (3, 4)]
    for i, (m, f) in enumerate(zip(models, fishers, strict=True)):
        m.save_pretrained(tmp_path / f"m{i}")
        f.save_pretrained(tmp_path / f"f{i}")
    return models, fishers


def test_cli_merges_full_models(tmp_path):
    models, fishers = _saved_full_models(tmp_path)
    out = tmp_path / "merged"
    args = ["merge", "--models", str(tmp_path / "m0"), str(tmp_path / "m1"), "--fishers", str(tmp_path / "f0"),
            str(tmp_path / "f1"), "--weights", "1", "3", "--output-dir", str(out)]
    assert main(args) == 0
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = fisher_merge(models, fishers, weights=[1, 3])
    for n, p in expected.named_parameters():
        torch.testing.assert_close(loaded.state_dict()[n], p.detach())


def test_merge_example_script_matches_fisher_merge(tmp_path):
    """examples/merge.py (the same loaders as the CLI) on full models with given Fishers and weights."""
    from pathlib import Path

    models, fishers = _saved_full_models(tmp_path)
    out = tmp_path / "merged"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "examples/merge.py"), "--models", str(tmp_path / "m0"), str(tmp_path / "m1"),
           "--fishers", str(tmp_path / "f0"), str(tmp_path / "f1"), "--weights", "1", "3", "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merged 2 models" in result.stdout
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = fisher_merge(models, fishers, weights=[1, 3])
    for n, p in expected.named_parameters():
        torch.testing.assert_close(loaded.state_dict()[n], p.detach())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert again.returncode != 0 and "exists already" in again.stderr
