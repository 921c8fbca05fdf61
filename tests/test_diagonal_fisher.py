"""Diagonal Fisher against per-sequence autograd gradients, and the sampled Fisher against its formula."""

import pytest
import torch
from torch import nn

from hf_fisher import DiagonalFisher, estimate_diagonal_fisher
from hf_fisher.curvature import find_target_layers
from tests.helpers import relative_error as _rel_err
from tests.helpers import sequence_nll


def _reference_fisher(model, batches, reduction: str) -> dict[str, torch.Tensor]:
    """Squared gradients from a plain autograd loop: one sequence (or one batch) at a time."""
    names = []
    for layer in find_target_layers(model).values():
        names.append(layer.weight_name)
        if layer.has_bias:
            names.append(layer.bias_name)
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    n_seq = 0
    for batch in batches:
        units = (
            [{k: v[i : i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
            if reduction == "sample"
            else [batch]
        )
        for unit in units:
            loss = sequence_nll(model, unit["input_ids"], unit["attention_mask"], unit["labels"])
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads, strict=True):
                sums[n] += g.square()
        n_seq += int(((batch["labels"][:, 1:] != -100).sum(1) > 0).sum())
    return {n: s / n_seq for n, s in sums.items()}


@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_empirical_fisher_matches_autograd_loop(tiny_model, batches, reduction):
    fisher = estimate_diagonal_fisher(tiny_model, batches, kind="empirical", reduction=reduction)
    reference = _reference_fisher(tiny_model, batches, reduction)
    assert set(fisher) == set(reference)
    for name, ref in reference.items():
        assert fisher[name].shape == ref.shape
        assert _rel_err(fisher[name], ref) <= 1e-5, name
    assert fisher.metadata.n_sequences == 6
    assert fisher.metadata.n_tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_default_targets_skip_lm_head_and_embeddings(llama, gpt2):
    llama_layers = find_target_layers(llama)
    assert "lm_head" not in llama_layers and len(llama_layers) == 2 * 7
    gpt2_layers = find_target_layers(gpt2)
    assert "lm_head" not in gpt2_layers and len(gpt2_layers) == 2 * 4
    assert all(layer.transposed for layer in gpt2_layers.values())


def test_target_modules_by_suffix_and_regex(llama, batches):
    fisher = estimate_diagonal_fisher(llama, batches, target_modules=["q_proj", "down_proj"])
    assert sorted(fisher) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    by_regex = estimate_diagonal_fisher(llama, batches, target_modules=r".*layers\.1\.mlp\..*")
    assert len(by_regex) == 3
    assert torch.equal(by_regex["model.layers.1.mlp.down_proj.weight"], fisher["model.layers.1.mlp.down_proj.weight"])


def test_model_state_is_restored(llama, batches):
    llama.train()
    llama.model.layers[0].eval()
    llama.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    modes = {n: m.training for n, m in llama.named_modules()}
    estimate_diagonal_fisher(llama, batches, kind="sampled")
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert {n: m.training for n, m in llama.named_modules()} == modes
    assert all(torch.equal(p, before[n]) for n, p in llama.named_parameters())
    assert all(p.grad is None for p in llama.parameters())
    assert not any(m._forward_hooks for m in llama.modules())


def test_max_batches_and_chunking(llama, batches):
    full = estimate_diagonal_fisher(llama, batches[:1])
    chunked = estimate_diagonal_fisher(llama, batches, max_batches=1, max_chunk_elements=1)
    assert chunked.metadata.n_sequences == 3
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-6, atol=0)


class _SoftmaxRegression(nn.Module):
    """A 'language model' whose logits at each position are W e(x_t): softmax regression per token."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.head(self.embed(input_ids))})()


def test_sampled_fisher_is_unbiased():
    torch.manual_seed(0)
    vocab, dim = 5, 3
    model = _SoftmaxRegression(vocab, dim)
    input_ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    batch = [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}]
    # Analytic Fisher of the per-sequence summed log-likelihood: Σ_t p_i(1 - p_i) x_j², averaged over sequences.
    with torch.no_grad():
        x = model.embed(input_ids[:, :-1]).double()
        p = torch.softmax(model.head(model.embed(input_ids[:, :-1])).double(), dim=-1)
        analytic = torch.einsum("bti,btj->ij", p * (1 - p), x.square()) / input_ids.shape[0]
    seeds = 600
    mean = sum(
        estimate_diagonal_fisher(model, batch, kind="sampled", target_modules=["head"], seed=s)["head.weight"].double()
        for s in range(seeds)
    ) / seeds
    error = float((mean - analytic).norm() / analytic.norm())
    assert error < 0.06, error
    # A single draw is far noisier: the average really converges rather than matching by construction.
    single = estimate_diagonal_fisher(model, batch, kind="sampled", target_modules=["head"], seed=0)["head.weight"]
    assert float((single.double() - analytic).norm() / analytic.norm()) > 2 * error


def test_sampled_labels_are_seeded(llama, batches):
    a = estimate_diagonal_fisher(llama, batches, kind="sampled", seed=3)
    b = estimate_diagonal_fisher(llama, batches, kind="sampled", seed=3)
    c = estimate_diagonal_fisher(llama, batches, kind="sampled", seed=4)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_mapping_interface_and_summary(llama, batches):
    fisher = estimate_diagonal_fisher(llama, batches)
    assert isinstance(fisher, DiagonalFisher)
    assert len(fisher) == len(dict(fisher.items())) == 14
    rows = fisher.summary()
    assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-9
    with pytest.raises(KeyError, match="No Fisher for .model.embed_tokens.weight"):
        fisher["model.embed_tokens.weight"]


def test_bf16_model_accumulates_in_fp32(batches):
    from hf_fisher import estimate_kfac
    from tests.helpers import tiny_llama

    fp32 = tiny_llama()
    bf16 = tiny_llama().to(torch.bfloat16)
    ref = estimate_diagonal_fisher(fp32, batches)
    low = estimate_diagonal_fisher(bf16, batches)
    name = "model.layers.1.mlp.down_proj.weight"
    assert low[name].dtype == torch.float32 and low.metadata.model_dtype == "bfloat16"
    assert _rel_err(low[name], ref[name]) < 0.1  # bf16 activations, fp32 statistics
    factors = estimate_kfac(bf16, batches, kind="empirical")
    assert factors["model.layers.1.mlp.down_proj"].A.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
