"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): FisherTrainer with DDP.

Estimates the reference Fisher on a sharded reference set, trains two steps with the penalty and an online Fisher,
and writes the final model (with its Fisher), the world size, whether the ranks hold identical weights and the
logged penalties into the folder given as the first argument (main process only).
"""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from hf_fisher import FisherTrainer, FisherTrainingArguments
from tests.helpers import make_batches, tiny_llama


def rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    (batch,) = make_batches(n_sequences=n, batch_size=n, seq_len=10, vocab=96, seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def build(output_dir: Path, per_device_batch: int, lora: bool = False) -> FisherTrainer:
    """The same training job for one process (batch 4) and two processes (batch 2 each).

    ``lora=True``: a LoRA adapter, whose online Fisher (of the adapted weights) is built from hooks and
    all-reduced by FisherTrainer itself rather than by DDP.
    """
    args = FisherTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch, max_steps=2, learning_rate=0.05, optim="sgd", max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        fisher_penalty="diagonal", fisher_lambda=50.0, online_fisher="mean", ddp_find_unused_parameters=False,
    )
    model = tiny_llama()
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    return FisherTrainer(model=model, args=args, train_dataset=rows(8, 11), fisher_dataset=rows(8, 3))


def main(out: Path) -> None:
    trainer = build(out / "run", per_device_batch=2)
    trainer.train()
    world = trainer.accelerator.num_processes
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    if world > 1:
        torch.distributed.all_gather(gathered, flat)
    else:
        gathered = [flat]
    trainer.save_model(str(out / "final"))
    if trainer.accelerator.is_main_process:
        penalty = [e["fisher_penalty"] for e in trainer.state.log_history if "loss" in e]
        ranks_agree = all(torch.equal(g, gathered[0]) for g in gathered)
        (out / "world.json").write_text(json.dumps({"world_size": world, "ranks_agree": ranks_agree,
                                                    "penalty": penalty}))
    lora = build(out / "lora_run", per_device_batch=2, lora=True)
    lora.train()
    lora.save_model(str(out / "lora_final"))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
