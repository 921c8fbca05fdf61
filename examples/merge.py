"""Merge fine-tuned models, or LoRA adapters of one base model, by Fisher-weighted averaging.

    python examples/merge.py --models adapter_a adapter_b --output_dir merged/

Each input's Fisher is the one ``FisherTrainer`` saved next to it (``<folder>/fisher``), a folder given with
``--fishers``, or a fresh sampled-label estimate on a text corpus. Adapters merge into a LoRA adapter that vanilla
PEFT loads (``--lora_output svd``, the default, re-factorizes the merged ΔW at ``--lora_rank``; ``concat`` keeps
it exact at the summed rank; ``merged`` returns a full model); full models merge into a full model. Merging is a
single-process job: it has no per-example work to shard.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import HfArgumentParser  # noqa: E402

from hf_fisher import fisher_merge  # noqa: E402
from hf_fisher.files import staged_folder  # noqa: E402
from hf_fisher.merging import fisher_for_merging, load_models_to_merge  # noqa: E402


@dataclass
class MergeArguments:
    models: list[str] = field(metadata={"help": "two or more model or adapter folders"})
    output_dir: str = field(metadata={"help": "new folder for the merge (an existing one is refused)"})
    fishers: list[str] | None = field(default=None, metadata={"help": "per model: a Fisher folder, auto or none"})
    weights: list[float] | None = field(default=None, metadata={"help": "per-model weights (default: equal)"})
    normalize: bool = field(default=False, metadata={"help": "divide each Fisher by its global L2 norm first"})
    eps: float = field(default=1e-8, metadata={"help": "added to every Fisher entry"})
    lora_output: str = field(default="svd", metadata={"help": "adapters: svd, concat or merged"})
    lora_rank: int | None = field(default=None, metadata={"help": "rank of the svd output (default: largest)"})
    base_model: str | None = field(default=None, metadata={"help": "adapters: base model (default: their config)"})
    corpus: str = field(default="lee_background", metadata={"help": "text for a Fisher estimate"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence of a Fisher estimate"})
    max_sequences: int = field(default=32, metadata={"help": "sequences of a Fisher estimate"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled labels"})

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"--models needs at least two folders, got {len(self.models)}")
        if self.fishers is not None and len(self.fishers) != len(self.models):
            raise ValueError(f"--fishers has {len(self.fishers)} entries for {len(self.models)} models")
        if os.path.exists(self.output_dir):
            raise ValueError(f"--output_dir {self.output_dir} exists already; choose a new folder")


def main() -> None:
    (args,) = HfArgumentParser(MergeArguments).parse_args_into_dataclasses()
    models, is_adapter, tokenizer = load_models_to_merge(args.models, args.base_model)
    fishers = [fisher_for_merging(m, p, spec, is_adapter=is_adapter, tokenizer=tokenizer, corpus=args.corpus,
                                  seq_len=args.seq_len, max_sequences=args.max_sequences, seed=args.seed)
               for m, p, spec in zip(models, args.models, args.fishers or ["auto"] * len(models), strict=True)]
    start = time.perf_counter()
    merged = fisher_merge(models, fishers, weights=args.weights, eps=args.eps, normalize=args.normalize,
                          lora_output=args.lora_output, lora_rank=args.lora_rank)
    seconds = time.perf_counter() - start
    with staged_folder(args.output_dir) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    what = f"LoRA adapters ({args.lora_output})" if is_adapter else "models"
    print(f"merged {len(models)} {what} in {seconds:.2f} s; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
