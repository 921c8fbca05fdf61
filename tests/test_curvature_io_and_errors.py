"""Saving/loading curvature estimates, and clear errors that leave the model untouched."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_fisher import DiagonalFisher, KFACFactors, estimate_diagonal_fisher, estimate_kfac
from tests.helpers import make_batches, tiny_gpt2, tiny_llama


def _run_fresh(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_diagonal_fisher_round_trips_in_fresh_process(tmp_path, gpt2, batches):
    fisher = estimate_diagonal_fisher(gpt2, batches, data_description="random tokens")
    fisher.save_pretrained(tmp_path / "fisher")
    torch.save(dict(fisher.items()), tmp_path / "reference.pt")
    _run_fresh(f"""
        import torch
        from hf_fisher import DiagonalFisher
        from tests.helpers import tiny_gpt2
        loaded = DiagonalFisher.from_pretrained({str(tmp_path / "fisher")!r}, model=tiny_gpt2())
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        assert set(loaded) == set(ref)
        assert all(torch.equal(loaded[k], ref[k]) for k in ref)
        m = loaded.metadata
        assert (m.kind, m.reduction, m.n_sequences, m.data_description) == ("empirical", "sample", 6, "random tokens")
        assert m.library_version and "per sequence" in m.normalization
    """)


def test_kfac_round_trips_in_fresh_process(tmp_path, gpt2, batches):
    factors = estimate_kfac(gpt2, batches, kfac_type="reduce", eigenvalue_correction=True)
    factors.save_pretrained(tmp_path / "kfac")
    torch.save(
        {n: (f.A, f.G, f.eigenvalue_correction, f.has_bias, f.transposed) for n, f in factors.items()},
        tmp_path / "reference.pt",
    )
    _run_fresh(f"""
        import torch
        from hf_fisher import KFACFactors
        from tests.helpers import tiny_gpt2
        loaded = KFACFactors.from_pretrained({str(tmp_path / "kfac")!r}, model=tiny_gpt2())
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        assert set(loaded) == set(ref)
        for n, (A, G, S, has_bias, transposed) in ref.items():
            f = loaded[n]
            assert torch.equal(f.A, A) and torch.equal(f.G, G) and torch.equal(f.eigenvalue_correction, S)
            assert (f.has_bias, f.transposed) == (has_bias, transposed)
        assert loaded.metadata.kfac_type == "reduce" and loaded.metadata.kind == "sampled"
    """)


def test_saved_estimate_has_a_model_card(tmp_path, batches):
    from hf_fisher.cards import is_hub_id

    model = tiny_llama()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    estimate_kfac(model, batches, data_description="random tokens").save_pretrained(tmp_path / "kfac")
    card = (tmp_path / "kfac" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: hf_fisher")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "KFACFactors.from_pretrained" in card
    assert "6 sequences" in card and "random tokens" in card
    assert is_hub_id("gpt2") and not is_hub_id("/tmp/model") and not is_hub_id("./x") and not is_hub_id(None)


def test_loading_against_another_model_raises(tmp_path, batches):
    fisher = estimate_diagonal_fisher(tiny_llama(), batches)
    fisher.save_pretrained(tmp_path / "fisher")
    with pytest.raises(ValueError, match="does not fit the model"):
        DiagonalFisher.from_pretrained(tmp_path / "fisher", model=tiny_gpt2())
    factors = estimate_kfac(tiny_llama(), batches)
    factors.save_pretrained(tmp_path / "kfac")
    with pytest.raises(ValueError, match="do not fit the model"):
        KFACFactors.from_pretrained(tmp_path / "kfac", model=tiny_gpt2())
    with pytest.raises(ValueError, match="holds a 'kfac' estimate"):
        DiagonalFisher.from_pretrained(tmp_path / "kfac")
    with pytest.raises(FileNotFoundError, match="not a saved curvature estimate"):
        KFACFactors.from_pretrained(tmp_path)


def _state(model):
    return (
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.detach().clone() for n, p in model.named_parameters()},
    )


def _assert_untouched(model, before):
    flags, modes, values = before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("estimator", [estimate_diagonal_fisher, estimate_kfac])
def test_bad_input_raises_clearly_and_changes_nothing(estimator, llama, batches):
    llama.train()
    before = _state(llama)
    with pytest.raises(ValueError, match="No linear layer of the model matches"):
        estimator(llama, batches, target_modules=["not_a_layer"])
    _assert_untouched(llama, before)
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match='needs labels.*kind="sampled"'):
        estimator(llama, unlabeled, kind="empirical")
    _assert_untouched(llama, before)
    with pytest.raises(ValueError, match="no batches"):
        estimator(llama, [])
    _assert_untouched(llama, before)
    all_ignored = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(ValueError, match="No supervised token"):
        estimator(llama, all_ignored)
    _assert_untouched(llama, before)
    with pytest.raises(ValueError, match="kind must be"):
        estimator(llama, batches, kind="true")
    _assert_untouched(llama, before)


@pytest.mark.parametrize("estimator", [estimate_diagonal_fisher, estimate_kfac])
def test_non_finite_values_name_the_layer(estimator, batches):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="layers\\.1\\.mlp\\.down_proj.weight"):
        estimator(model, batches, kind="sampled")
    # Finite fp16 weights whose activations overflow: the statistic itself is non-finite and named.
    model = tiny_llama().half()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(60)
        model.model.layers[1].mlp.gate_proj.weight.fill_(60)
    before = _state(model)
    with pytest.raises(FloatingPointError, match="Non-finite values in the curvature of 'model.layers.1"):
        estimator(model, batches, kind="empirical", target_modules=r"model\.layers\.1\..*")
    flags, modes, values = before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m._forward_hooks for m in model.modules())


def test_unlabeled_batches_work_with_sampled_kind(llama, batches):
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    fisher = estimate_diagonal_fisher(llama, unlabeled, kind="sampled")
    n_expected = sum(int((b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).sum()) for b in batches)
    assert fisher.metadata.n_tokens == n_expected


def test_dense_factor_too_large_is_refused(llama, batches):
    before = _state(llama)
    with pytest.raises(MemoryError, match="lm_head.*diagonal Fisher"):
        estimate_kfac(llama, batches, target_modules=["lm_head"], max_factor_bytes=96 * 96 * 4 - 1)
    _assert_untouched(llama, before)
    # The diagonal Fisher of the same layer is fine (same size as its weight).
    fisher = estimate_diagonal_fisher(llama, batches, target_modules=["lm_head"])
    assert fisher["lm_head.weight"].shape == (96, 32)


def test_errors_inside_the_pass_restore_the_model(llama):
    bad = make_batches(n_sequences=2, batch_size=2, seq_len=6, vocab=96, seed=0)
    bad[0]["input_ids"][0, 0] = 10_000  # out of the vocabulary: the forward fails mid-pass
    before = _state(llama)
    with pytest.raises(IndexError):
        estimate_kfac(llama, bad)
    _assert_untouched(llama, before)
