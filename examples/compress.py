"""Compress a causal LM's linear layers by a Fisher-weighted SVD (FWSVD), on one or many processes.

    python examples/compress.py --ratio 0.25 --output_dir compressed/
    accelerate launch --multi_gpu --num_processes 2 examples/compress.py --ratio 0.25 --output_dir compressed/

The diagonal Fisher is estimated on a text corpus with the data sharded over the processes (every process keeps the
whole model); the factorization runs on every process from the same all-reduced Fisher, and the main process saves
the model. ``--fisher none`` gives the plain truncated SVD for comparison. Reload with
``hf_fisher.load_compressed_model(output_dir)``. On CPU-only machines add ``--use_cpu``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import HfArgumentParser, default_data_collator  # noqa: E402

from hf_fisher import compress_fwsvd, estimate_diagonal_fisher, load_model  # noqa: E402
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402
from hf_fisher.files import staged_folder  # noqa: E402


@dataclass
class CompressArguments:
    output_dir: str = field(metadata={"help": "new folder for the compressed model (an existing one is refused)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "HF id or path; default model if unset"})
    ratio: float | None = field(default=None, metadata={"help": "kept fraction of each layer's parameters"})
    rank: int | None = field(default=None, metadata={"help": "the same rank for every layer (instead of --ratio)"})
    fisher: str = field(default="estimate", metadata={"help": "estimate (FWSVD) or none (plain SVD)"})
    side: str = field(default="row", metadata={"help": "Fisher weights per row, column or both (see compress_fwsvd)"})
    target_modules: str | None = field(default=None, metadata={"help": "comma-separated names; default all block "
                                                                       "linears"})
    corpus: str = field(default="lee_background", metadata={"help": "lee_background or shakespeare"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    per_device_batch_size: int = field(default=4, metadata={"help": "sequences per batch and process"})
    max_sequences: int = field(default=32, metadata={"help": "Fisher sequences in total (over all processes)"})
    use_cpu: bool = field(default=False, metadata={"help": "run on CPU even if an accelerator is present"})

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.ratio is None):
            raise ValueError("pass exactly one of --rank or --ratio")
        if self.fisher not in ("estimate", "none"):
            raise ValueError(f"--fisher must be 'estimate' or 'none', got {self.fisher!r}")
        if os.path.exists(self.output_dir):
            raise ValueError(f"--output_dir {self.output_dir} exists already; choose a new folder")


def main() -> None:
    (args,) = HfArgumentParser(CompressArguments).parse_args_into_dataclasses()
    accelerator = Accelerator(cpu=args.use_cpu, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model, tokenizer = load_model(args.model_name_or_path)
    model.to(accelerator.device)
    targets = args.target_modules.split(",") if args.target_modules else None
    fisher = None
    if args.fisher == "estimate":
        data = pack_for_causal_lm(load_text_corpus(args.corpus)["train"], tokenizer, args.seq_len,
                                  args.max_sequences)
        loader = accelerator.prepare(DataLoader(data, batch_size=args.per_device_batch_size,
                                                collate_fn=default_data_collator))
        fisher = estimate_diagonal_fisher(model, loader, target_modules=targets, accelerator=accelerator,
                                          data_description=f"{args.corpus} train, {len(data)} x {args.seq_len} tokens")
    ranks = compress_fwsvd(model, fisher, rank=args.rank, ratio=args.ratio, target_modules=targets,
                           side=args.side)
    if accelerator.is_main_process:
        with staged_folder(args.output_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        kept = sum(ranks.values())
        print(f"{'FWSVD' if fisher is not None else 'plain SVD'}: {len(ranks)} layers, total rank {kept}, Fisher on "
              f"{accelerator.num_processes} process(es); saved to {args.output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
