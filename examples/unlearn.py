"""Unlearn the forget split of the fictitious-facts benchmark from a causal LM, on one or many processes.

Baselines (any of grad_ascent, grad_diff, npo, simnpo; add ``--projection gu`` for the GU projection):

    python examples/unlearn.py --model_name_or_path TARGET --output_dir out --unlearning_loss npo --num_train_epochs 10
    accelerate launch --multi_gpu --num_processes 2 examples/unlearn.py --model_name_or_path TARGET --output_dir out

K-FADE (a few KL-budgeted Gauss-Newton steps; one step covers the batch, so size batch x accumulation to the
forget set):

    python examples/unlearn.py --kfade --model_name_or_path TARGET --output_dir out --max_steps 3 \\
        --per_device_train_batch_size 16 --gradient_accumulation_steps 6 --kfade_epsilon 0.05

TARGET is a model fine-tuned on the facts, e.g. the cached target of
``python -m hf_fisher.trainers.unlearning.recipe`` (which prints its folder). Add ``--evaluate`` (and
``--retain_model_name_or_path``) for the full report. On CPU-only machines add ``--use_cpu`` (and note that
``accelerate launch --cpu --num_processes 2`` starts one process: use ``--multi_gpu`` as above).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import HfArgumentParser  # noqa: E402

from hf_fisher import build_fictitious_facts, evaluate_unlearning, load_model  # noqa: E402
from hf_fisher.trainers.unlearning import (  # noqa: E402
    KFADEArguments,
    KFADETrainer,
    UnlearningArguments,
    UnlearningTrainer,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "HF id or path; default model if unset"})
    kfade: bool = field(default=False, metadata={"help": "use K-FADE (KFADEArguments) instead of a loss"})
    n_people: int = field(default=100, metadata={"help": "fictitious people of the benchmark data"})
    facts_seed: int = field(default=0, metadata={"help": "seed of the generated people"})
    forget_percent: int = field(default=10, metadata={"help": "forget split: forgetNN with NN this percentage"})
    evaluate: bool = field(default=False, metadata={"help": "run evaluate_unlearning and write a report"})
    retain_model_name_or_path: str | None = field(default=None, metadata={"help": "gold retain model (for FQ)"})
    eval_attacks: str = field(default="relearning,quantization", metadata={"help": "comma-separated; '' for none"})
    eval_max_retain_rows: int = field(default=200, metadata={"help": "retain questions scored by --evaluate"})


def main() -> None:
    training_class = KFADEArguments if "--kfade" in sys.argv else UnlearningArguments
    script, args = HfArgumentParser((ScriptArguments, training_class)).parse_args_into_dataclasses()
    model, tokenizer = load_model(script.model_name_or_path)
    data = build_fictitious_facts(tokenizer, n_people=script.n_people, seed=script.facts_seed,
                                  forget_fractions=(script.forget_percent / 100,))
    forget, retain = f"forget{script.forget_percent:02d}", f"retain{100 - script.forget_percent:02d}"
    original = copy.deepcopy(model) if script.evaluate else None
    trainer_class = KFADETrainer if script.kfade else UnlearningTrainer
    trainer = trainer_class(model, args, forget_dataset=data[forget], retain_dataset=data[retain],
                            processing_class=tokenizer)
    assert trainer.args.world_size >= 1
    trainer.train()
    trainer.save_model(args.output_dir)
    if script.kfade:
        trainer.save_unlearning_update(os.path.join(args.output_dir, "unlearning_update"))
    if trainer.is_world_process_zero():
        print(f"unlearned with {trainer_class.__name__} on {trainer.args.world_size} process(es); "
              f"saved to {args.output_dir}")
        if script.evaluate:
            retain_model = load_model(script.retain_model_name_or_path)[0] if script.retain_model_name_or_path \
                else None
            report = evaluate_unlearning(model.eval(), data, tokenizer, retain_model=retain_model,
                                         original_model=original, forget_split=forget, retain_split=retain,
                                         attacks=tuple(a for a in script.eval_attacks.split(",") if a),
                                         max_retain_rows=script.eval_max_retain_rows,
                                         output_dir=os.path.join(args.output_dir, "report"), name="unlearned")
            print({k: round(v, 4) for k, v in report["summary"].items()})


if __name__ == "__main__":
    main()
