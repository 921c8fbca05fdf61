"""FisherTrainer end to end: SGD steps against a hand computation, gradient accumulation, resume (exact online
Fisher), PEFT + bf16, two processes, saved artefacts in a fresh process, and clean errors."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_fisher import FisherTrainer, FisherTrainingArguments
from hf_fisher.curvature import CurvatureMetadata, DiagonalFisher, OnlineDiagonalFisher
from hf_fisher.trainers import FisherPenalty
from tests.helpers import launch_two_processes, make_batches, tiny_llama

LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def rows(n: int = 8, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    """n training rows (prompt tokens labelled -100, the first one always), as a list dataset."""
    (batch,) = make_batches(n_sequences=n, batch_size=n, seq_len=10, vocab=96, seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def training_args(tmp_path, **overrides) -> FisherTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, fisher_penalty="diagonal", fisher_lambda=1.0,
        ddp_find_unused_parameters=False,
    )
    settings.update(overrides)
    return FisherTrainingArguments(**settings)


def random_fisher(model, names=LAYERS, seed=0) -> DiagonalFisher:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    meta = CurvatureMetadata(curvature_type="diagonal_fisher", kind="empirical", n_sequences=1, n_tokens=1,
                             normalization="test")
    return DiagonalFisher({n: torch.rand(params[n].shape, generator=g) + 0.5 for n in names}, meta)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_two_sgd_steps_match_a_hand_computation(tmp_path):
    data = rows(4)
    fisher = random_fisher(tiny_llama())
    lam, lr = 40.0, 0.05
    model = tiny_llama()
    trainer = FisherTrainer(model=model, args=training_args(tmp_path, optim="sgd", fisher_lambda=lam),
                            train_dataset=data, fisher=fisher)
    trainer.train()
    # Reference: plain autograd SGD on the task loss, plus λ F (θ − θ0) on the Fisher's tensors.
    ref = tiny_llama().train()
    start = weights(ref)
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    penalties, task_losses = [], []
    for _ in range(2):
        with torch.no_grad():
            penalties.append(0.5 * lam * sum(float((fisher[n] * (p - start[n]) ** 2).sum())
                                             for n, p in ref.named_parameters() if n in fisher))
        ref.zero_grad()
        loss = ref(**batch).loss
        task_losses.append(float(loss))
        loss.backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                grad = p.grad + (lam * fisher[n] * (p - start[n]) if n in fisher else 0.0)
                p.sub_(lr * grad)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.state_dict()[n], atol=2e-6, rtol=1e-5)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["fisher_penalty"] == 0.0 and penalties[0] == 0.0  # zero at θ = θ*
    assert logs[1]["fisher_penalty"] == pytest.approx(penalties[1], rel=1e-4) and penalties[1] > 0
    assert [e["loss"] for e in logs] == pytest.approx(task_losses, rel=1e-4)  # "loss" is the task loss alone


def test_gradient_accumulation_gives_the_same_training_and_online_fisher(tmp_path):
    results = []
    for batch_size, accumulation in [(4, 1), (2, 2)]:
        model = tiny_llama()
        args = training_args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, online_fisher="mean", fisher_lambda=5.0,
                             optim="sgd")
        trainer = FisherTrainer(model=model, args=args, train_dataset=rows(8), fisher=random_fisher(tiny_llama()))
        trainer.train()
        results.append((weights(model), trainer.online_fisher.to_diagonal_fisher()))
    (w1, f1), (w2, f2) = results
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(f1[n], f2[n], atol=1e-8, rtol=1e-4)


def test_resume_restores_the_online_fisher_exactly(tmp_path):
    def make(folder):
        args = training_args(folder, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                             online_fisher="ema", online_fisher_decay=0.5, fisher_lambda=5.0)
        return FisherTrainer(model=tiny_llama(), args=args, train_dataset=rows(8), fisher=random_fisher(tiny_llama()))

    full = make(tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = OnlineDiagonalFisher({n: tuple(t.shape) for n, t in full.online_fisher.state.items()}, mode="ema",
                                 decay=0.5)
    saved.load_state(checkpoint / "fisher")
    assert saved.steps == 2 and not torch.equal(saved.state[LAYERS[0]], full.online_fisher.state[LAYERS[0]])
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.online_fisher.steps == 4
    for n, acc in full.online_fisher.state.items():
        assert torch.equal(resumed.online_fisher.state[n], acc), n
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, full.model.state_dict()[n]), n
    # The final save holds the model and the Fisher, and both load in a fresh process without hf_fisher's trainer.
    resumed.save_model(str(tmp_path / "final"))
    expected = resumed.online_fisher.to_diagonal_fisher()
    code = textwrap.dedent(f"""
        import json, torch
        from hf_fisher.curvature import DiagonalFisher
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "final")!r})
        fisher = DiagonalFisher.from_pretrained({str(tmp_path / "final" / "fisher")!r}, model=model)
        print(json.dumps({{n: float(t.double().sum()) for n, t in fisher.items()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = json.loads(out.stdout.strip().splitlines()[-1])
    assert sums == {n: float(t.double().sum()) for n, t in expected.items()}


def test_peft_lora_with_bf16_and_a_fisher_estimated_at_start(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = training_args(tmp_path, bf16=True, max_steps=3, learning_rate=0.01, optim="adamw_torch",
                         online_fisher="ema", fisher_lambda=100.0, per_device_eval_batch_size=4)
    trainer = FisherTrainer(model=model, args=args, train_dataset=rows(8), fisher_dataset=rows(8, seed=3))
    assert sorted(trainer.fisher_penalty.keys)[0].endswith("q_proj.base_layer.weight")
    assert len(trainer.fisher_penalty.keys) == 4
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor([e["loss"], e["fisher_penalty"]])).all() for e in logs)
    assert logs[-1]["fisher_penalty"] > 0
    adapted = {n.replace("lora_A.default.weight", "base_layer.weight") for n, _ in model.named_parameters()
               if "lora_A" in n}
    assert set(trainer.online_fisher.state) == adapted  # under LoRA: the Fisher of ΔW (the base weights)
    assert all(t.dtype == torch.float32 for t in trainer.online_fisher.state.values())
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "fisher" / "diagonal_fisher.safetensors").is_file()


def test_lora_online_fisher_is_the_squared_gradient_of_the_adapted_weights(tmp_path):
    data = rows(4)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    reference = copy.deepcopy(model)
    args = training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                         optim="sgd", fisher_penalty="none", online_fisher="mean")
    trainer = FisherTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    # Dense reference: unfreeze the base weights and take the full-batch gradient by autograd.
    base = {n: p for n, p in reference.named_parameters() if n.endswith("base_layer.weight")}
    for p in base.values():
        p.requires_grad_(True)
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    reference.train()
    reference(**batch).loss.backward()
    assert set(trainer.online_fisher.state) == set(base) and len(base) == 4
    for n, p in base.items():
        torch.testing.assert_close(trainer.online_fisher.state[n], p.grad.square(), atol=1e-10, rtol=1e-4)
    # The saved Fisher is ready for the next FisherTrainer's penalty on a fresh adapter.
    trainer.save_model(str(tmp_path / "adapter"))
    saved = DiagonalFisher.from_pretrained(tmp_path / "adapter" / "fisher")
    fresh = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert len(FisherPenalty(fresh, saved, 1.0).units) == 4


def test_rank_one_penalty_trains_and_parses_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(FisherTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fisher_penalty", "rank1", "--fisher_lambda", "10", "--max_steps", "2",
         "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--logging_steps", "1"]
    )
    assert args.fisher_penalty == "rank1" and args.fisher_lambda == 10.0
    trainer = FisherTrainer(model=tiny_llama(), args=args, train_dataset=rows(8), fisher_dataset=rows(4, seed=5))
    trainer.train()
    assert trainer.fisher_penalty.rank_one
    assert [e["fisher_penalty"] for e in trainer.state.log_history if "loss" in e][-1] > 0


def test_bad_input_raises_before_the_model_changes(tmp_path):
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(TypeError, match="FisherTrainingArguments"):
        FisherTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                      train_dataset=rows(4), fisher=random_fisher(model))
    with pytest.raises(ValueError, match="exactly one Fisher source"):
        FisherTrainer(model=model, args=training_args(tmp_path), train_dataset=rows(4))
    with pytest.raises(ValueError, match="exactly one Fisher source"):
        FisherTrainer(model=model, args=training_args(tmp_path), train_dataset=rows(4), fisher=random_fisher(model),
                      fisher_dataset=rows(4))
    with pytest.raises(TypeError, match="RankOneFisher"):
        FisherTrainer(model=model, args=training_args(tmp_path, fisher_penalty="rank1"), train_dataset=rows(4),
                      fisher=random_fisher(model))
    with pytest.raises(ValueError, match="fisher_penalty='none'"):
        FisherTrainer(model=model, args=training_args(tmp_path, fisher_penalty="none"), train_dataset=rows(4),
                      fisher=random_fisher(model))
    with pytest.raises(ValueError, match="fisher_lambda"):
        training_args(tmp_path, fisher_lambda=-1.0)
    with pytest.raises(ValueError, match="rank1"):
        training_args(tmp_path, fisher_penalty="rank1", fisher_kind="sampled")
    with pytest.raises(FileNotFoundError, match="not a saved curvature estimate"):
        FisherTrainer(model=model, args=training_args(tmp_path, fisher_path=str(tmp_path / "nope")),
                      train_dataset=rows(4))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # With no penalty it is a plain Trainer: identical weights after training.
    plain, fisher_free = tiny_llama(), tiny_llama()
    Trainer(model=plain, args=TrainingArguments(**{k: v for k, v in training_args(tmp_path).to_dict().items()
                                                   if not k.startswith(("fisher_", "online_"))} |
                                                {"output_dir": str(tmp_path)}), train_dataset=rows(8)).train()
    no_penalty = training_args(tmp_path, fisher_penalty="none")
    FisherTrainer(model=fisher_free, args=no_penalty, train_dataset=rows(8)).train()
    assert all(torch.equal(p, plain.state_dict()[n]) for n, p in fisher_free.named_parameters())


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes("tests/scripts/distributed_fisher_trainer.py", str(out))
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2
    assert world["ranks_agree"]
    # One process over the same global batches (2 processes × 2 = 4 rows per step).
    from tests.scripts.distributed_fisher_trainer import build

    trainer = build(tmp_path / "single", per_device_batch=4)
    trainer.train()
    ddp_fisher = DiagonalFisher.from_pretrained(out / "final" / "fisher")
    single = trainer.online_fisher.to_diagonal_fisher()
    for n, t in single.items():
        torch.testing.assert_close(ddp_fisher[n], t, atol=1e-9, rtol=1e-4)
    from transformers import AutoModelForCausalLM

    ddp_model = AutoModelForCausalLM.from_pretrained(out / "final")
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(ddp_model.state_dict()[n], p.detach(), atol=1e-6, rtol=1e-5)
    lora = build(tmp_path / "single_lora", per_device_batch=4, lora=True)
    lora.train()
    ddp_lora_fisher = DiagonalFisher.from_pretrained(out / "lora_final" / "fisher")
    for n, t in lora.online_fisher.to_diagonal_fisher().items():
        assert n.endswith("base_layer.weight")
        torch.testing.assert_close(ddp_lora_fisher[n], t, atol=1e-9, rtol=1e-4)
    from safetensors.torch import load_file

    ddp_adapter = load_file(str(out / "lora_final" / "adapter_model.safetensors"))
    trained = {n.replace(".default", ""): p for n, p in lora.model.named_parameters() if "lora_" in n}
    assert set(ddp_adapter) == set(trained)
    for n, p in trained.items():  # the penalty (on ΔW) and the task gradients agree across the two set-ups
        torch.testing.assert_close(ddp_adapter[n], p.detach(), atol=1e-6, rtol=1e-5)
    assert world["penalty"] == pytest.approx(
        [e["fisher_penalty"] for e in trainer.state.log_history if "loss" in e], rel=1e-4, abs=1e-12)
