"""Estimate a diagonal Fisher or K-FAC factors of a causal LM and save them, on one or many processes.

    python examples/estimate_fisher.py --output_dir fisher/
    accelerate launch --multi_gpu --num_processes 2 examples/estimate_fisher.py --output_dir fisher/

On CPU-only machines add ``--use_cpu`` (and note that ``accelerate launch --cpu --num_processes 2`` starts one
process: use ``--multi_gpu`` as above). With no ``--model_name_or_path`` the embedded default model is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import HfArgumentParser, default_data_collator  # noqa: E402

from hf_fisher import estimate_diagonal_fisher, estimate_kfac, load_model  # noqa: E402
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402


@dataclass
class FisherArguments:
    output_dir: str = field(metadata={"help": "folder for the saved estimate (safetensors + JSON)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "HF id or path; default model if unset"})
    curvature: str = field(default="diagonal", metadata={"help": "diagonal or kfac"})
    kind: str = field(default="empirical", metadata={"help": "empirical (data labels) or sampled (model labels)"})
    kfac_type: str = field(default="expand", metadata={"help": "K-FAC: expand or reduce"})
    corpus: str = field(default="lee_background", metadata={"help": "lee_background or shakespeare"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    per_device_batch_size: int = field(default=4, metadata={"help": "sequences per batch and process"})
    max_sequences: int = field(default=64, metadata={"help": "sequences in total (over all processes)"})
    use_cpu: bool = field(default=False, metadata={"help": "run on CPU even if an accelerator is present"})
    seed: int = field(default=0, metadata={"help": "seed for sampled labels"})


def main() -> None:
    (args,) = HfArgumentParser(FisherArguments).parse_args_into_dataclasses()
    # even_batches=False: no sample is repeated to even out the shards, so the estimate covers the data exactly.
    accelerator = Accelerator(cpu=args.use_cpu, dataloader_config=DataLoaderConfiguration(even_batches=False))
    model, tokenizer = load_model(args.model_name_or_path)
    model.to(accelerator.device)
    data = pack_for_causal_lm(load_text_corpus(args.corpus)["train"], tokenizer, args.seq_len, args.max_sequences)
    loader = accelerator.prepare(
        DataLoader(data, batch_size=args.per_device_batch_size, collate_fn=default_data_collator)
    )
    description = f"{args.corpus} train, {len(data)} x {args.seq_len} tokens"
    if args.curvature == "diagonal":
        estimate = estimate_diagonal_fisher(
            model, loader, kind=args.kind, accelerator=accelerator, seed=args.seed, data_description=description
        )
    else:
        estimate = estimate_kfac(
            model, loader, kind=args.kind, kfac_type=args.kfac_type, accelerator=accelerator, seed=args.seed,
            data_description=description,
        )
    if accelerator.is_main_process:
        estimate.save_pretrained(args.output_dir)
        print(f"{estimate} on {accelerator.num_processes} process(es); saved to {args.output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
