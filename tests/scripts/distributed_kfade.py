"""Two-process K-FADE (launched by tests/test_kfade.py): one run with shared precomputed factors (compared with
one process), one that estimates the retain curvature over both processes' shards."""

import sys
from pathlib import Path

import torch

from hf_fisher.curvature import estimate_kfac
from hf_fisher.data.facts import pad_collate
from hf_fisher.trainers.unlearning import KFADEArguments, KFADETrainer
from tests.helpers import qa_rows, tiny_llama

FORGET, RETAIN = qa_rows(4, seed=1), qa_rows(24, seed=2)


def args(out: str) -> KFADEArguments:
    return KFADEArguments(
        output_dir=out, kfade_epsilon=0.01, per_device_train_batch_size=2, max_steps=2, use_cpu=True,
        report_to="none", save_strategy="no", kfade_backtracking=False, seed=5, ddp_find_unused_parameters=False,
    )


def main(out: str) -> None:
    factors = estimate_kfac(tiny_llama(seed=0), [pad_collate(RETAIN[i : i + 4], 0) for i in range(0, 24, 4)], seed=5)
    trainer = KFADETrainer(tiny_llama(seed=0), args(out), forget_dataset=FORGET, retain_dataset=RETAIN,
                           retain_curvature=factors)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.train()
    estimating = KFADETrainer(tiny_llama(seed=0), args(out), forget_dataset=FORGET, retain_dataset=RETAIN)
    estimating.train()
    if trainer.is_world_process_zero():
        print(f"world_size={trainer.args.world_size}")
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in trainer.model.named_parameters()}, Path(out) / "weights.pt")
        torch.save({"n_sequences": estimating.retain_curvature.metadata.n_sequences}, Path(out) / "factors.pt")


if __name__ == "__main__":
    main(sys.argv[1])
