"""The two reference models of the fictitious-facts unlearning benchmark, made by one recipe and cached.

* the **target** model: the base model fine-tuned on every trainable person (split ``"full"``) — what an
  unlearning method starts from;
* the **retain** model: the same base, same recipe, fine-tuned on the retain split only — the gold standard an
  unlearned model should be indistinguishable from (forget quality compares against it).

Both are full fine-tunes with ``transformers.Trainer`` (AdamW, linear decay, loss on answer tokens only) and
are saved under ``$HF_FISHER_CACHE/unlearning/<recipe hash>/{target,retain}``, keyed by every field of the
recipe and the base model's name, so later runs (benchmarks, the demo, tests of other methods) reuse them.
Run it from the shell with ``python -m hf_fisher.trainers.unlearning.recipe --n_people 100 ...``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

from hf_fisher.data.facts import build_fictitious_facts, pad_collate
from hf_fisher.files import staged_folder
from hf_fisher.models import cache_dir, load_model

logger = logging.getLogger(__name__)


@dataclass
class FactsRecipe:
    """Everything that determines the target and retain models (the cache key hashes all of it)."""

    base_model: str = field(default="default", metadata={"help": "Base model id/path ('default': SmolLM2-135M)."})
    n_people: int = field(default=100, metadata={"help": "Fictitious people (10 facts each)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated people."})
    forget_percent: int = field(default=10, metadata={"help": "Forget split size in percent of trainable people."})
    holdout_fraction: float = field(default=0.1, metadata={"help": "People never trained on (for MIA)."})
    epochs: float = field(default=5.0, metadata={"help": "Fine-tuning epochs."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (linear decay)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warm-up share of the steps."})
    seed: int = field(default=0, metadata={"help": "Training seed (data order)."})

    @property
    def forget_split(self) -> str:
        return f"forget{self.forget_percent:02d}"

    @property
    def retain_split(self) -> str:
        return f"retain{100 - self.forget_percent:02d}"

    def key(self) -> str:
        """Short hash of every field: the cache folder name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def build_data(self, tokenizer: Any):
        """The benchmark data of this recipe (tokenized with ``tokenizer``)."""
        return build_fictitious_facts(
            tokenizer, n_people=self.n_people, seed=self.data_seed, forget_fractions=(self.forget_percent / 100,),
            holdout_fraction=self.holdout_fraction,
        )


def reference_model_dir(recipe: FactsRecipe) -> Path:
    """Folder holding ``target/`` and ``retain/`` for ``recipe``."""
    return cache_dir() / "unlearning" / recipe.key()


def finetune_on_facts(model: torch.nn.Module, tokenizer: Any, dataset: Any, recipe: FactsRecipe,
                      output_dir: str | os.PathLike) -> torch.nn.Module:
    """Full fine-tune of ``model`` on a tokenized facts split with the recipe's hyper-parameters (in place)."""
    if len(dataset) == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=recipe.batch_size,
        num_train_epochs=recipe.epochs, learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_ratio, lr_scheduler_type="linear", seed=recipe.seed, save_strategy="no",
        report_to="none", logging_steps=10, use_cpu=not torch.cuda.is_available(), remove_unused_columns=True,
        disable_tqdm=False,
    )
    columns = [c for c in dataset.column_names if c not in ("input_ids", "attention_mask", "labels")]
    trainer = Trainer(model=model, args=args, train_dataset=dataset.remove_columns(columns),
                      data_collator=functools.partial(pad_collate, pad_token_id=pad))
    model.train()
    trainer.train()
    return model.eval()


def _save_atomically(model: torch.nn.Module, tokenizer: Any, target: Path, metadata: dict[str, Any]) -> None:
    with staged_folder(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hf_fisher_recipe.json").write_text(json.dumps(metadata, indent=1))


def make_reference_models(recipe: FactsRecipe | None = None, *, force: bool = False) -> dict[str, Path]:
    """Train (or find in the cache) the target and retain models of ``recipe``; returns their folders.

    A folder is reused when it holds a finished save of the same recipe (``hf_fisher_recipe.json`` matching);
    ``force=True`` retrains. Load them with ``transformers.AutoModelForCausalLM.from_pretrained(folder)``.
    """
    recipe = recipe or FactsRecipe()
    root = reference_model_dir(recipe)
    folders = {"target": root / "target", "retain": root / "retain"}
    splits = {"target": "full", "retain": recipe.retain_split}
    for name, folder in folders.items():
        marker = folder / "hf_fisher_recipe.json"
        if not force and marker.is_file() and json.loads(marker.read_text()).get("recipe") == dataclasses.asdict(
                recipe):
            logger.info("Reusing the cached %s model in %s", name, folder)
            continue
        model, tokenizer = load_model(recipe.base_model)
        data = recipe.build_data(tokenizer)
        with tempfile.TemporaryDirectory(prefix="hf_fisher_recipe_") as scratch:
            finetune_on_facts(model, tokenizer, data[splits[name]], recipe, scratch)
        _save_atomically(model, tokenizer, folder, {"recipe": dataclasses.asdict(recipe), "model": name,
                                                    "trained_on": splits[name], "rows": len(data[splits[name]])})
    return folders


def load_reference_models(recipe: FactsRecipe | None = None, dtype: torch.dtype = torch.float32):
    """``(target, retain, tokenizer)`` of ``recipe``, training them first if they are not cached."""
    folders = make_reference_models(recipe)
    target = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=dtype).eval()
    retain = AutoModelForCausalLM.from_pretrained(folders["retain"], dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    return target, retain, tokenizer


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_fisher.trainers.unlearning.recipe [--n_people N ...] [--force]``: print the folders."""
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--force", action="store_true", help="retrain even if cached")
    known, rest = extra.parse_known_args(argv)
    (recipe,) = HfArgumentParser(FactsRecipe).parse_args_into_dataclasses(args=rest)
    logging.basicConfig(level=logging.INFO)
    for name, folder in make_reference_models(recipe, force=known.force).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
