"""Two-process NPO unlearning runs, plain and with the GU projection (launched by tests/test_unlearning_trainer.py);
rank 0 saves the weights."""

import sys
from pathlib import Path

import torch

from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer
from tests.helpers import qa_rows, tiny_llama


def run(out: str, projection: str, file: str) -> None:
    args = UnlearningArguments(
        output_dir=out, unlearning_loss="npo", per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=2, optim="sgd", learning_rate=0.5, weight_decay=0.0, lr_scheduler_type="constant", use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", seed=3, ddp_find_unused_parameters=False,
        projection=projection,
    )
    trainer = UnlearningTrainer(tiny_llama(seed=0), args, forget_dataset=qa_rows(4, seed=1),
                                retain_dataset=qa_rows(6, seed=2))
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"world_size={trainer.args.world_size}")
        state = {k: v.detach().cpu() for k, v in trainer.model.named_parameters()}
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(out) / file)


def main(out: str) -> None:
    run(out, "none", "weights.pt")
    run(out, "gu", "weights_gu.pt")


if __name__ == "__main__":
    main(sys.argv[1])
