"""UnlearningTrainer: each objective against a hand computation, data checks, accumulation, resume, PEFT, DDP."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from hf_fisher.trainers.unlearning import (
    NPO,
    ForgetRetainCollator,
    ForgetRetainDataset,
    GradAscent,
    GradDiff,
    SimNPO,
    UnlearningArguments,
    UnlearningTrainer,
)
from tests.helpers import ROOT, launch_two_processes, qa_rows, tiny_llama


def hand_log_probs(model, row) -> list[float]:
    """log p of each answer token, one sequence at a time, in fp64 from the logits (no batching, no masks)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
    out = []
    for t in range(len(row["labels"]) - 1):
        target = row["labels"][t + 1]
        if target != -100:
            out.append(float(torch.log_softmax(logits[t], -1)[target]))
    return out


def hand_kl(model, reference, row) -> float:
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double(), -1)
        q = torch.log_softmax(reference(input_ids=torch.tensor([row["input_ids"]])).logits[0].double(), -1)
    values = [
        float((q[t].exp() * (q[t] - p[t])).sum())
        for t in range(len(row["labels"]) - 1)
        if row["labels"][t + 1] != -100
    ]
    return sum(values) / len(values)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.fixture
def forget_retain():
    forget, retain = qa_rows(3, seed=1), qa_rows(3, seed=2)
    batch = ForgetRetainCollator(0)([{"forget": f, "retain": r} for f, r in zip(forget, retain, strict=True)])
    return forget, retain, batch


def test_losses_match_hand_computation(forget_retain):
    forget, retain, batch = forget_retain
    model, reference = tiny_llama(seed=0), tiny_llama(seed=1)

    def reference_forward(part):
        with torch.no_grad():
            return reference(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits

    nll_f = [-sum(lp) / len(lp) for lp in (hand_log_probs(model, r) for r in forget)]
    nll_r = [-sum(lp) / len(lp) for lp in (hand_log_probs(model, r) for r in retain)]
    kl_r = [hand_kl(model, reference, r) for r in retain]
    ratio = [sum(hand_log_probs(model, r)) - sum(hand_log_probs(reference, r)) for r in forget]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    expected = {
        "ga": -mean(nll_f),
        "graddiff": -2.0 * mean(nll_f) + 0.5 * mean(nll_r),
        "graddiff_kl": -mean(nll_f) + mean(kl_r),
        "npo": mean([-log_sigmoid(-0.1 * x) for x in ratio]) * 2 / 0.1 + mean(nll_r),
        "simnpo": 0.125 * mean([-log_sigmoid(4.5 * (x - 0.2)) for x in nll_f]) * 2 / 4.5 + mean(nll_r),
    }
    losses = {
        "ga": GradAscent(),
        "graddiff": GradDiff(forget_weight=2.0, retain_weight=0.5),
        "graddiff_kl": GradDiff(retain_loss="kl"),
        "npo": NPO(),
        "simnpo": SimNPO(delta=0.2),
    }
    for name, loss in losses.items():
        value, parts = loss(model, batch, reference_forward if loss.needs_reference else None)
        assert value.item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
        assert "forget_loss" in parts
    # NPO at the reference itself: log σ(0) = -log 2, so the forget term is (2/β)·log 2
    value, _ = NPO(retain_weight=0.0)(model, batch, lambda part: model(input_ids=part["input_ids"],
                                                                       attention_mask=part["attention_mask"]).logits)
    assert value.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)


def test_data_errors_name_the_problem():
    rows = qa_rows(4, seed=3)
    with pytest.raises(ValueError, match="forget set is empty"):
        ForgetRetainDataset([], rows)
    with pytest.raises(ValueError, match="also appear in the retain set"):
        ForgetRetainDataset(rows[:2], rows[1:])
    unlabeled = [{**rows[0], "labels": [-100] * len(rows[0]["labels"])}]
    with pytest.raises(ValueError, match="no answer tokens"):
        ForgetRetainDataset(unlabeled, rows[1:])
    with pytest.raises(ValueError, match="no \\['labels'\\] column"):
        ForgetRetainDataset(Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]}), rows)
    model = tiny_llama()
    args = UnlearningArguments(output_dir="unused", unlearning_loss="grad_diff", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="pass retain_dataset"):
        UnlearningTrainer(model, args, forget_dataset=rows)
    with pytest.raises(ValueError, match="unknown unlearning_loss"):
        UnlearningArguments(output_dir="unused", unlearning_loss="npo2")
    # a merged PEFT model comes back frozen: say so instead of failing inside autograd
    merged = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).merge_and_unload()
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad_"):
        UnlearningTrainer(merged, args, forget_dataset=rows[:2], retain_dataset=rows[2:])
    # the pairing is a function of (seed, index) only
    ds = ForgetRetainDataset(rows[:2], rows[2:], seed=5)
    assert [ds.retain_index(i) for i in range(2)] == [ForgetRetainDataset(rows[:2], rows[2:], seed=5).retain_index(i)
                                                       for i in range(2)]


def _train(tmp_path, *, batch: int, accumulation: int, max_steps: int, loss: str = "npo", resume=None,
           save_steps: int | None = None, model=None, projection: str = "none"):
    model = tiny_llama(seed=0) if model is None else model
    args = UnlearningArguments(
        output_dir=str(tmp_path), unlearning_loss=loss, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=max_steps, optim="sgd", learning_rate=0.5,
        weight_decay=0.0, lr_scheduler_type="constant", use_cpu=True, report_to="none", logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=3,
        dataloader_drop_last=False, projection=projection,
    )
    trainer = UnlearningTrainer(model, args, forget_dataset=qa_rows(4, seed=1), retain_dataset=qa_rows(6, seed=2))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # 4 forget rows: one optimizer step sees all of them, cut 1 x 4 or 2 x 2 — the update must not depend on the cut
    big = _train(tmp_path / "a", batch=4, accumulation=1, max_steps=2).model
    cut = _train(tmp_path / "b", batch=2, accumulation=2, max_steps=2).model
    start = tiny_llama(seed=0)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(big.parameters(), start.parameters(), strict=True))
    assert moved > 1e-3
    for (name, p), q in zip(big.named_parameters(), cut.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_checkpoint_reproduces_the_run(tmp_path):
    straight = _train(tmp_path / "straight", batch=2, accumulation=1, max_steps=4, loss="simnpo").model
    _train(tmp_path / "cut", batch=2, accumulation=1, max_steps=4, loss="simnpo", save_steps=2)
    resumed = _train(tmp_path / "cut", batch=2, accumulation=1, max_steps=4, loss="simnpo",
                     resume=str(tmp_path / "cut" / "checkpoint-2")).model
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_peft_reference_is_the_disabled_adapter(tmp_path):
    base = tiny_llama(seed=0)
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor([qa_rows(1, seed=1)[0]["input_ids"]])).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = _train(tmp_path, batch=2, accumulation=1, max_steps=3, loss="npo", model=model)
    assert trainer.reference_model is None  # no second copy in memory
    batch = {"input_ids": torch.tensor([qa_rows(1, seed=1)[0]["input_ids"]])}
    trainer.model.train()
    torch.testing.assert_close(trainer.reference_logits(batch), base_logits)
    assert trainer.model.training  # the reference pass restored train mode
    logged = [entry for entry in trainer.state.log_history if "forget_loss" in entry]
    assert len(logged) == 3 and all("retain_loss" in entry for entry in logged)
    # only the adapter moved
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad, name


def test_gradient_ascent_raises_forget_nll(tmp_path):
    forget = qa_rows(4, seed=1)
    collated = ForgetRetainCollator(0)([{"forget": r} for r in forget])
    before, _ = GradAscent()(tiny_llama(seed=0), collated)
    trainer = _train(tmp_path, batch=2, accumulation=1, max_steps=4, loss="grad_ascent")
    after, _ = GradAscent()(trainer.model, collated)
    assert after.item() < before.item() - 0.05  # -NLL fell: the forget answers became less likely


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    out = launch_two_processes(str(ROOT / "tests" / "scripts" / "distributed_unlearning.py"), str(tmp_path / "ddp"))
    assert "world_size=2" in out
    for projection, file in (("none", "weights.pt"), ("gu", "weights_gu.pt")):
        single = _train(tmp_path / f"single-{projection}", batch=4, accumulation=1, max_steps=2, loss="npo",
                        projection=projection).model
        state = torch.load(tmp_path / "ddp" / file)
        for name, p in single.named_parameters():
            torch.testing.assert_close(state[name], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{projection} {name}")
