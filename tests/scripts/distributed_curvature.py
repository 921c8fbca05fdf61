"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): curvature over a sharded loader.

Writes the diagonal Fisher and K-FAC factors of a tiny Llama, estimated with an Accelerator, plus the world
size, into the folder given as the first argument (main process only).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader

from hf_fisher import estimate_diagonal_fisher, estimate_kfac
from tests.helpers import make_batches, tiny_llama


def dataset() -> list[dict[str, torch.Tensor]]:
    """16 sequences as single rows (the DataLoader batches them)."""
    (batch,) = make_batches(n_sequences=16, batch_size=16, seq_len=12, vocab=96, seed=7)
    return [{k: v[i] for k, v in batch.items()} for i in range(16)]


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model = tiny_llama()
    loader = accelerator.prepare(DataLoader(dataset(), batch_size=2, shuffle=False))
    fisher = estimate_diagonal_fisher(model, loader, accelerator=accelerator)
    factors = estimate_kfac(model, loader, kind="empirical", accelerator=accelerator)
    # One batch only: the second process sees no data at all and must still take part correctly.
    one = accelerator.prepare(DataLoader(dataset()[:2], batch_size=2, shuffle=False))
    factors_one = estimate_kfac(model, one, kind="empirical", accelerator=accelerator)
    if accelerator.is_main_process:
        fisher.save_pretrained(out / "fisher")
        factors.save_pretrained(out / "kfac")
        factors_one.save_pretrained(out / "kfac_one")
        (out / "world.json").write_text(json.dumps({"world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
