"""GU projection: the projector against an explicit orthogonal projector, and the update the optimizer really
applied in UnlearningTrainer is orthogonal to the stored retain gradients; resume keeps the history."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer
from hf_fisher.trainers.unlearning.gu import project_update
from tests.helpers import qa_rows, tiny_llama


def test_projection_equals_explicit_projector():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    grads.append(grads[0] + 2 * grads[1])  # dependent: must not change the span
    metric = torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.1
    s = torch.diag(metric.flatten())
    g_tilde = torch.stack([(x * metric).flatten() for x in grads[:3]], dim=1)
    projector = torch.eye(30, dtype=torch.float64) - g_tilde @ torch.linalg.solve(g_tilde.T @ g_tilde, g_tilde.T)
    expected = (s @ projector @ torch.linalg.solve(s, delta.flatten())).reshape(6, 5)
    got = project_update(delta, grads, metric)
    torch.testing.assert_close(got, expected)
    for x in grads:  # no first-order change of any retain loss
        assert abs(float((x * got).sum())) < 1e-10 * float(x.norm() * delta.norm())
    torch.testing.assert_close(project_update(got, grads, metric), got)  # already orthogonal: unchanged
    torch.testing.assert_close(project_update(delta, [], metric), delta)


class AppliedUpdates(TrainerCallback):
    """Weights at the start and end of every optimizer step: the update the optimizer really applied."""

    def __init__(self, model):
        self.model, self.updates = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, **kwargs):
        self.updates.append({n: p.detach() - self._before[n] for n, p in self.model.named_parameters()
                             if p.requires_grad})


def _trainer(tmp_path, projection: str, loss: str = "grad_diff", **overrides):
    model = tiny_llama(seed=0)
    options = dict(output_dir=str(tmp_path), unlearning_loss=loss, projection=projection, gu_history_size=3,
                   per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3, use_cpu=True, report_to="none",
                   save_strategy="no", seed=3, logging_steps=1)
    args = UnlearningArguments(**{**options, **overrides})
    trainer = UnlearningTrainer(model, args, forget_dataset=qa_rows(4, seed=1), retain_dataset=qa_rows(6, seed=2))
    recorder = AppliedUpdates(model)
    trainer.add_callback(recorder)
    return trainer, recorder


def _violations(history, updates, weights) -> list[str]:
    """Tensors whose last applied update has a retain component beyond fp32 storage rounding."""
    bad = []
    for name, grads in history.items():
        delta = updates[name].double()
        for g in grads:
            g = g.double()
            inner = abs(float((g * delta).sum()))
            # exact up to storing θ + Δ' in fp32: each weight is rounded by at most one ulp (2⁻²³ relative)
            storage = 2.0**-23 * float(g.abs().mul(weights[name].detach().double().abs()).sum())
            if inner > 1e-6 * float(g.norm() * delta.norm()) + storage:
                bad.append(name)
    return bad


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_applied_update_is_orthogonal_to_retain_gradients(tmp_path, optim):
    trainer, recorder = _trainer(tmp_path / "gu", "gu", optim=optim, learning_rate=1e-2)
    trainer.train()
    assert len(recorder.updates) == 4
    assert all(len(h) == 3 for h in trainer.gu.history.values())  # FIFO of gu_history_size
    assert all(float(d.norm()) > 0 for d in recorder.updates[-1].values())
    weights = dict(trainer.model.named_parameters())
    assert _violations(trainer.gu.history, recorder.updates[-1], weights) == []
    # the same check fails without the projection: it can fail
    plain, plain_recorder = _trainer(tmp_path / "plain", "none", optim=optim, learning_rate=1e-2)
    plain.train()
    assert plain.gu is None
    bad = _violations(trainer.gu.history, plain_recorder.updates[-1], dict(plain.model.named_parameters()))
    assert len(bad) > len(trainer.gu.history) // 2


def test_gu_with_npo_resumes_exactly(tmp_path):
    straight, _ = _trainer(tmp_path / "a", "gu", loss="npo", gu_retain_loss="kl")
    straight.train()
    cut, _ = _trainer(tmp_path / "b", "gu", loss="npo", gu_retain_loss="kl", save_strategy="steps", save_steps=2)
    cut.train()
    resumed, _ = _trainer(tmp_path / "b", "gu", loss="npo", gu_retain_loss="kl")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_gu_needs_retain_data(tmp_path):
    args = UnlearningArguments(output_dir=str(tmp_path), unlearning_loss="grad_ascent", projection="gu",
                               use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="pass retain_dataset"):
        UnlearningTrainer(tiny_llama(), args, forget_dataset=qa_rows(2, seed=1))
    with pytest.raises(ValueError, match="projection must be one of"):
        UnlearningArguments(output_dir=str(tmp_path), projection="orthogonal")


def test_gu_accumulation_equals_one_big_batch(tmp_path):
    big, _ = _trainer(tmp_path / "a", "gu", optim="sgd", per_device_train_batch_size=4, max_steps=3)
    big.train()
    cut, _ = _trainer(tmp_path / "b", "gu", optim="sgd", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      max_steps=3)
    cut.train()
    for (name, p), q in zip(big.model.named_parameters(), cut.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
