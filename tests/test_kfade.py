"""K-FADE: the step against a dense damped K-FAC solve, predicted vs measured retain KL, re-applicable updates,
backtracking, bad input, accumulation, resume and two processes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_fisher.data.facts import pad_collate
from hf_fisher.trainers.unlearning import (
    KFADEArguments,
    KFADETrainer,
    apply_unlearning_update,
    load_unlearning_update,
)
from hf_fisher.trainers.unlearning.losses import GradAscent, forward_logits, sequence_kl
from tests.helpers import ROOT, launch_two_processes, qa_rows, tiny_llama

FORGET, RETAIN = qa_rows(4, seed=1), qa_rows(24, seed=2)


def _args(tmp_path, **overrides) -> KFADEArguments:
    options = dict(output_dir=str(tmp_path), kfade_epsilon=0.01, per_device_train_batch_size=4, max_steps=1,
                   use_cpu=True, report_to="none", save_strategy="no", kfade_backtracking=False, logging_steps=1,
                   seed=5)
    return KFADEArguments(**{**options, **overrides})


def _train(tmp_path, model=None, resume=None, retain_curvature=None, **overrides):
    model = tiny_llama(seed=0) if model is None else model
    trainer = KFADETrainer(model, _args(tmp_path, **overrides), forget_dataset=FORGET, retain_dataset=RETAIN,
                           retain_curvature=retain_curvature)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _retain_kl(model, start, rows, all_tokens: bool = False) -> float:
    """Mean over rows of the summed KL(start ‖ model) over answer tokens (or over every token)."""
    if all_tokens:
        rows = [{**r, "labels": list(r["input_ids"])} for r in rows]
    batch = pad_collate(rows, 0)
    with torch.no_grad():
        kl = sequence_kl(forward_logits(model, batch), forward_logits(start, batch), batch["labels"])
    return float((kl * (batch["labels"][:, 1:] != -100).sum(1)).mean())


def _vec(m):
    return m.T.reshape(-1)


def test_step_equals_dense_damped_kfac_solve(tmp_path):
    start = tiny_llama(seed=0)
    trainer = _train(tmp_path)
    factors = trainer.retain_curvature
    update = trainer.unlearning_update()
    # the forget gradient by hand: GA loss on all four forget rows (one step covers them all)
    model = copy.deepcopy(start)
    batch = pad_collate(FORGET, 0)
    loss, _ = GradAscent()(model, {"forget": batch})
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if n in update}
    damping = trainer.kfade_optimizer().absolute_damping()
    directions, g_dot_d = {}, 0.0
    for name in factors:
        layer = factors[name]
        g = grads[f"{name}.weight"]
        dense = torch.kron(layer.A.double(), layer.G.double()) + damping * torch.eye(g.numel(), dtype=torch.float64)
        d = torch.linalg.solve(dense, _vec(g)).reshape(g.shape[1], g.shape[0]).T
        directions[name] = d
        g_dot_d += float((g * d).sum())
    answer_tokens = sum(sum(1 for label in r["labels"][1:] if label != -100) for r in RETAIN) / len(RETAIN)
    eta = math.sqrt(2 * 0.01 * answer_tokens / g_dot_d)  # ε is per answer token
    # atol ≈ 3e-5 of the largest |Δ|: what fp32 eigendecompositions of the factors leave
    for name, d in directions.items():
        torch.testing.assert_close(update[f"{name}.weight"].double(), -eta * d, rtol=2e-3, atol=1e-5)
    # the update is what moved the weights, and only the block linears moved
    for name, p in trainer.model.named_parameters():
        moved = p.detach() - dict(start.named_parameters())[name].detach()
        if name in update:
            torch.testing.assert_close(moved, update[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(moved, torch.zeros_like(moved)), name


@pytest.mark.parametrize("tokens", ["answer", "all"])
def test_predicted_retain_kl_matches_measured_to_first_order(tmp_path, tokens):
    """Along one layer (K-FAC is block-diagonal) and for small ε, the measured retain KL (over the tokens the
    curvature covers) is quadratic in the step and close to K-FAC's prediction ½ΔᵀG_RΔ."""
    start = tiny_llama(seed=0)
    retain = qa_rows(48, seed=2)
    results = []
    for eps in (3e-5, 1e-5):
        model = copy.deepcopy(start)
        args = _args(tmp_path, kfade_epsilon=eps, per_device_train_batch_size=8, kfade_curvature_tokens=tokens,
                     kfade_target_modules=r".*layers\.1\.mlp\.down_proj")
        trainer = KFADETrainer(model, args, forget_dataset=FORGET, retain_dataset=retain)
        trainer.train()
        measured = _retain_kl(model, start, retain, all_tokens=tokens == "all")
        results.append((trainer.kfade_optimizer().last_step["predicted_kl"], measured))
    (p1, m1), (p2, m2) = results
    assert p1 / p2 == pytest.approx(3.0, rel=1e-6)  # the prediction is linear in ε by construction
    assert m1 / m2 == pytest.approx(3.0, rel=0.1)  # the measured KL is in its quadratic regime
    assert 0.5 < m1 / p1 < 2.0  # and K-FAC predicts it (to its approximation error)


def test_update_reapplies_and_round_trips(tmp_path):
    trainer = _train(tmp_path, max_steps=2, kfade_backtracking=True)
    trainer.save_unlearning_update(tmp_path / "update")
    loaded = load_unlearning_update(tmp_path / "update")
    assert set(loaded) == set(trainer.unlearning_update())
    fresh = apply_unlearning_update(tiny_llama(seed=0), tmp_path / "update")
    for (name, p), q in zip(trainer.model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6, msg=name)
    # a mismatched update is refused before anything changes
    other = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    bad = dict(loaded)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        apply_unlearning_update(other, bad)
    with pytest.raises(ValueError, match="lacks"):
        apply_unlearning_update(other, {"model.layers.9.mlp.up_proj.weight": torch.zeros(48, 32)})
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key])


def test_backtracking_keeps_the_measured_kl_within_tolerance(tmp_path):
    start = tiny_llama(seed=0)
    # a tolerance far below the budget forces halvings (the probe is the whole retain set here)
    trainer = _train(tmp_path, kfade_epsilon=0.5, kfade_backtracking=True, kfade_backtrack_tolerance=0.005,
                     kfade_max_backtracks=12, kfade_probe_size=24)
    last = trainer.kfade_optimizer().last_step
    epsilon_seq = 0.5 * trainer.kfade_optimizer().tokens_per_sequence
    assert last["backtracks"] >= 1 and last["rejected"] == 0
    assert last["measured_kl"] <= 0.005 * epsilon_seq
    assert _retain_kl(trainer.model, start, RETAIN) == pytest.approx(last["measured_kl"], rel=1e-4)
    logged = [e for e in trainer.state.log_history if "kfade_measured_kl" in e]
    assert logged and logged[0]["kfade_backtracks"] == last["backtracks"]


def test_a_step_still_over_budget_after_backtracking_is_undone(tmp_path):
    start = tiny_llama(seed=0)
    trainer = _train(tmp_path, kfade_epsilon=0.5, kfade_backtracking=True, kfade_backtrack_tolerance=1e-9,
                     kfade_max_backtracks=1, kfade_probe_size=24)
    last = trainer.kfade_optimizer().last_step
    assert last["rejected"] == 1 and last["eta"] == 0 and last["backtracks"] == 1
    assert last["measured_kl"] == pytest.approx(0.0, abs=1e-6)
    for (name, p), q in zip(trainer.model.named_parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=name)
    assert all(float(u.abs().max()) == 0 for u in trainer.unlearning_update().values())


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="kfade_epsilon must be > 0"):
        _args(tmp_path, kfade_epsilon=0.0)
    with pytest.raises(ValueError, match="kfade_curvature_tokens must be"):
        _args(tmp_path, kfade_curvature_tokens="prompt")
    with pytest.raises(ValueError, match="retain data"):
        KFADETrainer(tiny_llama(), _args(tmp_path), forget_dataset=FORGET)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge the adapter"):
        KFADETrainer(peft_model, _args(tmp_path), forget_dataset=FORGET, retain_dataset=RETAIN)


def test_accumulation_and_resume(tmp_path):
    factors = _train(tmp_path / "f").retain_curvature  # shared factors: the runs differ only in how they cut
    whole = _train(tmp_path / "a", max_steps=2, retain_curvature=factors).model
    cut = _train(tmp_path / "b", max_steps=2, retain_curvature=factors, per_device_train_batch_size=2,
                 gradient_accumulation_steps=2).model
    for (name, p), q in zip(whole.named_parameters(), cut.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # resume: the checkpoint holds the retain curvature and the running update
    straight = _train(tmp_path / "c", max_steps=3, kfade_backtracking=True)
    _train(tmp_path / "d", max_steps=3, kfade_backtracking=True, save_strategy="steps", save_steps=1)
    resumed = _train(tmp_path / "d", max_steps=3, kfade_backtracking=True, resume=str(tmp_path / "d" / "checkpoint-1"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for name, delta in straight.unlearning_update().items():
        torch.testing.assert_close(resumed.unlearning_update()[name], delta, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    out = launch_two_processes(str(ROOT / "tests" / "scripts" / "distributed_kfade.py"), str(tmp_path / "ddp"))
    assert "world_size=2" in out
    state = torch.load(tmp_path / "ddp" / "weights.pt")
    factors = torch.load(tmp_path / "ddp" / "factors.pt")
    from hf_fisher.curvature import estimate_kfac

    single = _train(tmp_path / "single", max_steps=2, retain_curvature=estimate_kfac(
        tiny_llama(seed=0), [pad_collate(RETAIN[i : i + 4], 0) for i in range(0, len(RETAIN), 4)], seed=5))
    for name, p in single.model.named_parameters():
        # atol: the processes sum the factors in another order, which fp32 eigendecompositions turn into up to 2e-5
        torch.testing.assert_close(state[name], p.detach(), rtol=1e-4, atol=1e-4, msg=name)
    assert factors["n_sequences"] == len(RETAIN)  # the in-trainer estimate saw every retain row once
