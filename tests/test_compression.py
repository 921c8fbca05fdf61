"""FWSVD compression: the replaced layers hold the weighted SVD, save/reload in a fresh process, clean errors."""

import subprocess
import sys
import textwrap

import pytest
import torch

from hf_fisher import estimate_diagonal_fisher
from hf_fisher.compression import LowRankLinear, compress_fwsvd, rank_for_ratio
from hf_fisher.lowrank import fisher_weights, weighted_low_rank
from tests.helpers import tiny_llama


def test_compressed_layers_hold_the_weighted_factors(batches):
    model = tiny_llama()
    fisher = estimate_diagonal_fisher(model, batches)
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ranks = compress_fwsvd(model, fisher, rank=5)
    assert len(ranks) == 14 and set(ranks.values()) == {5}
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear)
    d_r, _ = fisher_weights(fisher["model.layers.0.mlp.up_proj.weight"])
    expected = weighted_low_rank(original, 5, row_weights=d_r).product()
    torch.testing.assert_close(layer.lowrank_B.weight @ layer.lowrank_A.weight, expected, atol=1e-6, rtol=1e-5)
    assert model.config.fwsvd_compression["fisher_weighted"] is True


def test_plain_svd_without_fisher_and_full_rank_is_exact(batches):
    model = tiny_llama()
    x = batches[0]
    with torch.no_grad():
        before = model(input_ids=x["input_ids"]).logits
    # rank 15 on 32 x 32 / 32 x 48 layers: fewer parameters, inexact; ratio picks the rank per layer.
    assert rank_for_ratio(48, 32, 0.5) == int(0.5 * 48 * 32 / 80)
    compressed = tiny_llama()
    compress_fwsvd(compressed, ratio=0.25)
    with torch.no_grad():
        after = compressed(input_ids=x["input_ids"]).logits
    assert (after - before).abs().max() > 1e-4  # lossy at 25 % fewer parameters
    assert compressed.config.fwsvd_compression["fisher_weighted"] is False
    n_before = sum(p.numel() for p in tiny_llama().parameters())
    assert sum(p.numel() for p in compressed.parameters()) < n_before


def test_compressed_model_round_trips_in_fresh_process(tmp_path, batches):
    model = tiny_llama()
    fisher = estimate_diagonal_fisher(model, batches)
    compress_fwsvd(model, fisher, ratio=0.5, target_modules=["gate_proj", "up_proj", "down_proj"])
    model.save_pretrained(tmp_path / "compressed")
    x = batches[0]["input_ids"]
    with torch.no_grad():
        torch.save({"x": x, "logits": model(input_ids=x).logits}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import torch
        from hf_fisher.compression import LowRankLinear, load_compressed_model
        model = load_compressed_model({str(tmp_path / "compressed")!r})
        assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
        assert not isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(input_ids=expected["x"]).logits, expected["logits"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_bad_input_leaves_model_untouched(batches):
    model = tiny_llama()
    fisher = estimate_diagonal_fisher(tiny_llama(), batches, target_modules=["q_proj"])
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exactly one of rank"):
        compress_fwsvd(model, rank=4, ratio=0.5)
    with pytest.raises(ValueError, match="has no entry"):
        compress_fwsvd(model, fisher, rank=4)
    with pytest.raises(ValueError, match="rank 40 exceeds"):
        compress_fwsvd(model, rank=40)
    nan = {k: torch.full_like(v, float("nan")) for k, v in fisher.items()}
    with pytest.raises(ValueError, match="q_proj.*NaN/Inf"):
        compress_fwsvd(model, nan, rank=4, target_modules=["q_proj"])
    assert model.state_dict().keys() == snap.keys()
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
