"""K-FAC factors against explicit per-token outer products; preconditioning against dense inverses."""

import pytest
import torch

from hf_fisher import KFACFactors, estimate_kfac
from hf_fisher.curvature import CurvatureMetadata, KFACLayer, find_target_layers
from tests.helpers import relative_error as _rel_err
from tests.helpers import sequence_nll


def _hooked_activations(model, batches):
    """Per batch: inputs and output gradients of every target layer, from plain hooks and autograd."""
    layers = find_target_layers(model)
    records = []
    for batch in batches:
        store: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
        handles = []
        for name, layer in layers.items():
            def fwd(module, args, output, entry=store[name]):
                entry["a"] = args[0].detach()
                output.register_hook(lambda g, entry=entry: entry.__setitem__("g", g.detach()))
            handles.append(layer.module.register_forward_hook(fwd))
        model.zero_grad()
        loss = sequence_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        for h in handles:
            h.remove()
        model.zero_grad()
        records.append((batch, store))
    return layers, records


def _reference_factors(model, batches, kfac_type):
    """A and G as explicit loops over sequences and supervised tokens."""
    layers, records = _hooked_activations(model, batches)
    A = {n: 0.0 for n in layers}
    G = {n: 0.0 for n in layers}
    n_tokens = n_seq = 0
    for batch, store in records:
        labels = batch["labels"]
        for b in range(labels.shape[0]):
            positions = [t for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
            if not positions:
                continue
            n_seq += 1
            n_tokens += len(positions)
            for name, layer in layers.items():
                a = store[name]["a"][b].double()
                g = store[name]["g"][b].double()
                if layer.has_bias:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
                if kfac_type == "expand":
                    for t in positions:
                        A[name] = A[name] + torch.outer(a[t], a[t])
                        G[name] = G[name] + torch.outer(g[t], g[t])
                else:
                    a_bar = sum(a[t] for t in positions) / len(positions)
                    g_sum = sum(g[t] for t in positions)
                    A[name] = A[name] + torch.outer(a_bar, a_bar)
                    G[name] = G[name] + torch.outer(g_sum, g_sum)
    a_norm = n_tokens if kfac_type == "expand" else n_seq
    return {n: A[n] / a_norm for n in layers}, {n: G[n] / n_seq for n in layers}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
def test_factors_match_explicit_outer_products(tiny_model, batches, kfac_type, packed):
    if packed:  # every token supervised, no padding: few excluded positions (another code path)
        batches = [{**b, "labels": b["input_ids"].clone(), "attention_mask": torch.ones_like(b["input_ids"])}
                   for b in batches]
    factors = estimate_kfac(tiny_model, batches, kind="empirical", kfac_type=kfac_type)
    ref_A, ref_G = _reference_factors(tiny_model, batches, kfac_type)
    assert set(factors) == set(ref_A)
    for name in ref_A:
        assert _rel_err(factors[name].A, ref_A[name]) <= 1e-5, name
        assert _rel_err(factors[name].G, ref_G[name]) <= 1e-5, name
    # GPT-2's layers have biases: A carries the ones column.
    layer = next(iter(factors.values()))
    assert layer.A.shape[0] == layer.in_features + int(layer.has_bias)


def test_layers_sharing_an_input_get_identical_A(llama, batches):
    factors = estimate_kfac(llama, batches, kind="empirical")
    q, k, v = (factors[f"model.layers.0.self_attn.{p}_proj"].A for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v)
    assert q.data_ptr() != k.data_ptr()  # separate tensors: in-place edits of one do not leak


def _random_layer(out_f, in_f, has_bias, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    d = in_f + int(has_bias)
    xa = torch.randn(d, 2 * d, generator=g)
    xg = torch.randn(out_f, 2 * out_f, generator=g)
    return KFACLayer(A=xa @ xa.T / d, G=xg @ xg.T / out_f, has_bias=has_bias, transposed=transposed)


def _factors(layers):
    meta = CurvatureMetadata(curvature_type="kfac", kind="sampled", n_sequences=1, n_tokens=1, normalization="test")
    return KFACFactors(layers, meta)


def _grads(name, layer, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (layer.in_features, layer.out_features) if layer.transposed else (layer.out_features, layer.in_features)
    grads = {f"{name}.weight": torch.randn(shape, generator=g)}
    if layer.has_bias:
        grads[f"{name}.bias"] = torch.randn(layer.out_features, generator=g)
    return grads


def _as_matrix(layer, grads, name):
    w = grads[f"{name}.weight"].double()
    w = w.T if layer.transposed else w
    if layer.has_bias:
        w = torch.cat([w, grads[f"{name}.bias"].double()[:, None]], dim=1)
    return w


def _vec(m):  # column-major vec, matching kron(A, G) acting on vec(∇W)
    return m.T.reshape(-1)


def _unvec(v, rows, cols):
    return v.reshape(cols, rows).T


@pytest.mark.parametrize("has_bias,transposed", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("method", ["eigenbasis", "per_factor"])
def test_precondition_equals_dense_inverse(method, has_bias, transposed):
    layer = _random_layer(4, 5, has_bias, transposed, seed=0)
    factors = _factors({"layer": layer})
    grads = _grads("layer", layer, seed=1)
    damping = 0.3
    out = factors.precondition(grads, damping=damping, method=method)
    A, G = layer.A.double(), layer.G.double()
    if method == "per_factor":
        eye_a, eye_g = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(4, dtype=A.dtype)
        dense = torch.kron(A + damping * eye_a, G + damping * eye_g)
    else:
        dense = torch.kron(A, G) + damping * torch.eye(A.shape[0] * 4, dtype=A.dtype)
    m = _as_matrix(layer, grads, "layer")
    expected = _unvec(torch.linalg.solve(dense, _vec(m)), *m.shape)
    got = _as_matrix(layer, out, "layer")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert out["layer.weight"].shape == grads["layer.weight"].shape


@pytest.mark.parametrize("has_bias,transposed", [(False, False), (True, True)])
def test_multiply_equals_dense_kronecker_product(has_bias, transposed):
    layer = _random_layer(4, 5, has_bias, transposed, seed=5)
    factors = _factors({"layer": layer})
    grads = _grads("layer", layer, seed=6)
    m = _as_matrix(layer, grads, "layer")
    expected = _unvec(torch.kron(layer.A.double(), layer.G.double()) @ _vec(m), *m.shape)
    product = factors.multiply(grads)
    torch.testing.assert_close(_as_matrix(layer, product, "layer"), expected, rtol=1e-4, atol=1e-5)
    # the damped inverse undoes it
    back = factors.precondition({k: v.double() for k, v in product.items()}, damping=0.0)
    torch.testing.assert_close(_as_matrix(layer, back, "layer"), m, rtol=1e-3, atol=1e-3)


def test_ekfac_precondition_equals_dense_inverse_in_eigenbasis():
    layer = _random_layer(3, 4, False, False, seed=2)
    factors = _factors({"layer": layer}).eigendecompose()
    corr = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) + 0.1
    layer.eigenvalue_correction = corr
    grads = _grads("layer", layer, seed=4)
    damping = 0.05
    out = factors.precondition(grads, damping=damping)
    basis = torch.kron(layer.eigenvectors_A.double(), layer.eigenvectors_G.double())
    dense = basis @ torch.diag(_vec(corr.double())) @ basis.T + damping * torch.eye(12, dtype=torch.float64)
    m = grads["layer.weight"].double()
    expected = _unvec(torch.linalg.solve(dense, _vec(m)), 3, 4)
    torch.testing.assert_close(out["layer.weight"].double(), expected, rtol=1e-4, atol=1e-5)
    plain = factors.precondition(grads, damping=damping, use_eigenvalue_correction=False)
    assert not torch.allclose(plain["layer.weight"], out["layer.weight"])
    product = factors.multiply(grads)
    torch.testing.assert_close(product["layer.weight"].double(), _unvec((dense - damping * torch.eye(
        12, dtype=torch.float64)) @ _vec(m), 3, 4), rtol=1e-4, atol=1e-5)


def test_eigenvalue_correction_is_diagonal_of_fisher_in_eigenbasis(llama, batches):
    """EK-FAC (expand): corrected eigenvalues = (1/N) Σ_tokens (Q_Gᵀ g)² (Q_Aᵀ a)²ᵀ, from raw hooks."""
    factors = estimate_kfac(llama, batches, kind="empirical", eigenvalue_correction=True)
    assert factors.has_eigenvalue_correction and factors.metadata.extra["eigenvalue_correction"]
    layers, records = _hooked_activations(llama, batches)
    name = "model.layers.1.mlp.down_proj"
    qa = factors[name].eigenvectors_A.double()
    qg = factors[name].eigenvectors_G.double()
    total = 0.0
    n_seq = 0
    for batch, store in records:
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100
        a = store[name]["a"][mask].double() @ qa
        g = store[name]["g"][mask].double() @ qg
        total = total + g.square().T @ a.square()
        n_seq += int((mask.sum(1) > 0).sum())
    assert _rel_err(factors[name].eigenvalue_correction, total / n_seq) <= 1e-5
    # Without correction, the same quantity is approximated by the product of factor eigenvalues.
    approx = torch.outer(factors[name].eigenvalues_G, factors[name].eigenvalues_A)
    assert approx.shape == factors[name].eigenvalue_correction.shape


def test_precondition_reads_model_grads(llama, batches):
    factors = estimate_kfac(llama, batches, kind="empirical", target_modules=["down_proj"])
    loss = sequence_nll(llama, batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"])
    loss.backward()
    from_model = factors.precondition(llama, damping=0.1)
    explicit = factors.precondition(
        {n: p.grad for n, p in llama.named_parameters() if p.grad is not None}, damping=0.1
    )
    assert sorted(from_model) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    for n in from_model:
        torch.testing.assert_close(from_model[n], explicit[n])


@pytest.mark.parametrize("width", [5, 300, 1100, 1537])
@pytest.mark.parametrize("with_bias", [False, True])
def test_blocked_gram_accumulation_equals_full_products(width, with_bias):
    from hf_fisher.curvature.kfac import accumulate_gram, mirror_upper_blocks

    g = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, dtype=torch.float64, generator=g)
    y = torch.randn(5, width, dtype=torch.float64, generator=g)
    if with_bias:
        xo, yo = (torch.cat([t, torch.ones(t.shape[0], 1, dtype=t.dtype)], dim=1) for t in (x, y))
    else:
        xo, yo = x, y
    expected = xo.T @ xo - yo.T @ yo
    buffer = torch.zeros(expected.shape, dtype=torch.float32)
    accumulate_gram(buffer, x, with_bias)
    accumulate_gram(buffer, y, with_bias, alpha=-1.0)
    got = mirror_upper_blocks(buffer, with_bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_estimate_under_no_grad_equals_estimate(llama, batches):
    """Callers inside torch.no_grad() (an optimizer step) still get the real curvature, not silent zeros."""
    reference = estimate_kfac(llama, batches, kind="sampled", target_modules=["down_proj"], seed=3)
    with torch.no_grad():
        inside = estimate_kfac(llama, batches, kind="sampled", target_modules=["down_proj"], seed=3)
    for name in reference:
        torch.testing.assert_close(inside[name].G, reference[name].G)
        assert float(inside[name].G.abs().max()) > 0
