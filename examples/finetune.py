"""Fine-tune a causal LM with LoRA, FWSVD-initialised LoRA, RandLoRA or LQ-LoRA, on one or many processes.

    python examples/finetune.py --method fwsvd --rank 8 --data facts --output_dir adapter --num_train_epochs 3
    python examples/finetune.py --method lqlora --lqlora_budget 3.0 --data shakespeare --max_steps 100 --output_dir lq
    python examples/finetune.py --method lora --fisher_penalty diagonal --fisher_lambda 100 --output_dir ewc
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --method lora --output_dir adapter

Every Trainer option works (``--learning_rate``, ``--per_device_train_batch_size``, ``--bf16`` ...). The adapter
is saved with the method's own function (FWSVD: a plain LoRA that vanilla PEFT loads; LQ-LoRA: quantized base +
adapter for ``hf_fisher.load_lqlora_model``) and its folder is printed. The same code runs as
``hf-fisher finetune``. On CPU-only machines add ``--use_cpu`` (and note that ``accelerate launch --cpu
--num_processes 2`` starts one process: use ``--multi_gpu`` as above). With no ``--model_name_or_path`` the
embedded default model (SmolLM2-135M-Instruct) is used; see examples/accelerate_configs/ for FSDP and DeepSpeed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import HfArgumentParser  # noqa: E402

from hf_fisher.finetuning import FinetuneArguments, FinetuneTrainingArguments, finetune  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((FinetuneArguments, FinetuneTrainingArguments))
    args, training = parser.parse_args_into_dataclasses(args=argv)
    result = finetune(args, training)
    if training.process_index == 0:
        print(f"fine-tuned with {result['method']} on {result['world_size']} process(es) "
              f"({result['trainable_parameters']} trainable parameters, final loss {result['train_loss']}); "
              f"saved to {result['output_dir']}")
    return result


if __name__ == "__main__":
    main()
