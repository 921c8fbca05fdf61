"""One fine-tuning entry point shared by ``examples/finetune.py`` and ``hf-fisher finetune``.

``finetune(FinetuneArguments(...), FinetuneTrainingArguments(...))`` loads a causal LM, wraps it with one of four
adapters — plain LoRA, FWSVD-initialised LoRA, (fast) RandLoRA or LQ-LoRA — trains it with ``transformers.Trainer``
(or :class:`~hf_fisher.FisherTrainer` when a Fisher penalty is asked for) on the fictitious facts (loss on the
answers only), a packaged text corpus or a local file, and saves the adapter with the method's own save function:

* ``lora``: ``save_pretrained`` + hf_fisher's card;
* ``fwsvd``: :func:`~hf_fisher.save_fwsvd_adapter` (a plain rank-2r LoRA against the original weights, loadable by
  vanilla PEFT, plus what resuming needs);
* ``randlora``: the fast adapter converted by :func:`~hf_fisher.convert_to_peft_randlora` (vanilla PEFT RandLoRA);
* ``lqlora``: :func:`~hf_fisher.save_lqlora_model` (quantized base + adapter, reload with ``load_lqlora_model``).

Every argument is checked (method, data columns, rank against every target layer, penalty support) before the
model is modified, and the result is written atomically: into a hidden ``.NAME.partial`` folder (the Trainer's
output_dir), renamed to ``output_dir`` at the end; an existing ``output_dir`` is refused. Runs unchanged under
``accelerate launch``. Checkpoints (``save_strategy="steps"``) end up in ``output_dir/checkpoint-*``; a failed
run's staging folder is removed, so resuming a crashed run is not supported by this entry point.
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_fisher.trainers.fisher import FisherTrainingArguments

METHODS = ("lora", "fwsvd", "randlora", "lqlora")
CORPORA = ("lee_background", "shakespeare")
PENALTIES = ("diagonal", "none")
LOCAL_DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


@dataclass
class FinetuneArguments:
    """What to fine-tune, with which adapter, on which data (the script/CLI arguments besides the Trainer's)."""

    method: str = field(default="lora", metadata={"help": f"Adapter: one of {METHODS}.", "choices": list(METHODS)})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "HF id or local folder of a causal LM (default: the embedded SmolLM2-135M)."}
    )
    rank: int = field(default=8, metadata={"help": "Adapter rank r (RandLoRA: rank of each random basis)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA/RandLoRA alpha (default: 2 × rank)."})
    target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt (default: every linear layer but the LM head)."},
    )
    fwsvd_mode: str = field(
        default="principal",
        metadata={"help": "FWSVD: start on the top ('principal') or bottom ('minor') Fisher-weighted components.",
                  "choices": ["principal", "minor"]},
    )
    lqlora_budget: float = field(
        default=3.5, metadata={"help": "LQ-LoRA: average bits per quantized parameter (the ILP's budget)."}
    )
    lqlora_fisher: bool = field(
        default=True, metadata={"help": "LQ-LoRA: weight the decomposition and the bit allocation by a Fisher."}
    )
    data: str = field(
        default="facts",
        metadata={"help": "'facts' (fictitious people, loss on the answers), 'lee_background' or 'shakespeare' "
                  "(packed text), or a local .json/.jsonl/.csv/.txt/.parquet file (columns question+answer, or "
                  "--text_column)."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a local data file."})
    n_people: int = field(default=100, metadata={"help": "facts: fictitious people (10 facts each)."})
    facts_seed: int = field(default=0, metadata={"help": "facts: seed of the generated people."})
    seq_len: int = field(default=128, metadata={"help": "Text data: tokens per packed sequence."})
    max_train_sequences: int | None = field(
        default=None, metadata={"help": "Cap on training rows (facts) or packed sequences (text)."}
    )
    fisher_sequences: int = field(
        default=32, metadata={"help": "Sequences of the Fisher estimates (FWSVD / LQ-LoRA init, the penalty)."}
    )
    penalty_corpus: str = field(
        default="lee_background",
        metadata={"help": "Text on which the penalty's Fisher is estimated (what the model should not forget).",
                  "choices": list(CORPORA)},
    )


@dataclass
class FinetuneTrainingArguments(FisherTrainingArguments):
    """``FisherTrainingArguments`` with fine-tuning defaults: no penalty, LoRA learning rate, no checkpoints."""

    fisher_penalty: str = field(
        default="none",
        metadata={"help": "'none' (plain Trainer) or 'diagonal' (FisherTrainer: EWC penalty λ/2 Σ F ΔW² on each "
                  "adapted layer, F estimated on --penalty_corpus).", "choices": list(PENALTIES)},
    )
    fisher_lambda: float = field(default=100.0, metadata={"help": "Strength λ of the Fisher penalty."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints: 'no', 'steps' or 'epoch'."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Kept False: every adapter parameter gets a gradient."}
    )

    def __post_init__(self) -> None:
        if self.fisher_penalty not in PENALTIES:
            raise ValueError(f"fisher_penalty must be one of {PENALTIES} for fine-tuning, got "
                             f"{self.fisher_penalty!r}.")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------- checks


def check_arguments(args: FinetuneArguments, training: FinetuneTrainingArguments) -> None:
    """Refuse bad settings before anything is loaded or written."""
    if args.method not in METHODS:
        raise ValueError(f"Unknown method {args.method!r}; choose one of {METHODS}.")
    if args.rank < 1:
        raise ValueError(f"rank must be a positive integer, got {args.rank}.")
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"alpha must be > 0, got {args.alpha}.")
    if args.fwsvd_mode not in ("principal", "minor"):
        raise ValueError(f"fwsvd_mode must be 'principal' or 'minor', got {args.fwsvd_mode!r}.")
    if args.penalty_corpus not in CORPORA:
        raise ValueError(f"penalty_corpus must be one of {CORPORA}, got {args.penalty_corpus!r}.")
    if args.fisher_sequences < 1:
        raise ValueError(f"fisher_sequences must be >= 1, got {args.fisher_sequences}.")
    if args.max_train_sequences is not None and args.max_train_sequences < 1:
        raise ValueError(f"max_train_sequences must be >= 1, got {args.max_train_sequences}.")
    if args.data not in ("facts", *CORPORA):
        path = Path(args.data)
        if path.suffix not in LOCAL_DATA_SUFFIXES:
            raise ValueError(f"--data {args.data!r} is neither 'facts', a corpus {CORPORA}, nor a local file "
                             f"ending in {sorted(LOCAL_DATA_SUFFIXES)}.")
        if not path.is_file():
            raise ValueError(f"--data {args.data!r}: no such file.")
    if training.fisher_penalty == "diagonal" and args.method == "randlora":
        raise ValueError("The Fisher penalty is defined on a LoRA layer's ΔW = s·BA with its base weight's Fisher; "
                         "RandLoRA has no such ΔW. Use --method lora, fwsvd or lqlora, or --fisher_penalty none.")
    out = Path(training.output_dir)
    if out.exists():
        raise ValueError(f"output_dir {str(out)!r} exists already; choose a new folder (nothing is overwritten).")


def resolve_target_modules(model: nn.Module, spec: str | None, method: str) -> list[str]:
    """Leaf names of the adapted layers: ``spec`` (comma-separated) or every linear layer but the output head."""
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (nn.Linear,) if method == "lqlora" else (nn.Linear, Conv1D)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and m is not head}
    if spec:
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in layers)]
        if missing:
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            kind = "Linear" if method == "lqlora" else "linear (Linear or Conv1D)"
            raise ValueError(f"target_modules {missing} match no {kind} layer of the model; its layers are {names}.")
        return wanted
    names = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if not names:
        raise ValueError("The model has no linear layer to adapt besides its output head; pass --target_modules.")
    return names


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if type(module).__name__ == "Conv1D" else tuple(weight.shape)


def check_rank(model: nn.Module, targets: list[str], rank: int) -> None:
    """Refuse a rank larger than a target layer's smaller dimension (a rank-r update would not fit)."""
    for name, module in model.named_modules():
        if hasattr(module, "weight") and any(name == t or name.endswith("." + t) for t in targets):
            shape = _layer_shape(module)
            if rank > min(shape):
                raise ValueError(f"rank {rank} exceeds min(out, in) = {min(shape)} of layer {name!r} {shape}; "
                                 f"lower --rank to at most {min(shape)} or leave that layer out of target_modules.")


# --------------------------------------------------------------------------------------------------- data


def load_finetune_data(args: FinetuneArguments, tokenizer: Any):
    """The tokenized training rows (``input_ids``, ``attention_mask``, ``labels``) and a one-line description."""
    from hf_fisher.data import build_fictitious_facts, load_text_corpus, pack_for_causal_lm

    if args.data == "facts":
        # The "full" split (every trainable person) does not depend on the forget fractions; 0.5 is valid for any
        # n_people >= 3, so the forget/retain pair built alongside is never a constraint here.
        data = build_fictitious_facts(tokenizer, n_people=args.n_people, seed=args.facts_seed,
                                      forget_fractions=(0.5,))["full"]
        rows = data.select_columns(["input_ids", "attention_mask", "labels"])
        description = f"fictitious facts ({args.n_people} people, seed {args.facts_seed}), loss on answers"
    elif args.data in CORPORA:
        rows = pack_for_causal_lm(load_text_corpus(args.data)["train"], tokenizer, args.seq_len,
                                  args.max_train_sequences)
        description = f"{args.data} train, packed into {args.seq_len}-token sequences"
    else:
        rows, description = _local_data(args, tokenizer)
    if args.max_train_sequences is not None and len(rows) > args.max_train_sequences:
        rows = rows.select(range(args.max_train_sequences))
    if len(rows) == 0:
        raise ValueError(f"The training data {args.data!r} gave no rows (text shorter than seq_len={args.seq_len}?).")
    return rows, description


def _local_data(args: FinetuneArguments, tokenizer: Any):
    from datasets import Dataset, load_dataset

    from hf_fisher.data import pack_for_causal_lm
    from hf_fisher.data.facts import format_question_answer

    path = Path(args.data)
    raw = load_dataset(LOCAL_DATA_SUFFIXES[path.suffix], data_files=str(path), split="train")
    columns = raw.column_names
    if {"question", "answer"} <= set(columns):
        encoded = [format_question_answer(tokenizer, q, a) for q, a in zip(raw["question"], raw["answer"],
                                                                           strict=True)]
        rows = Dataset.from_dict({k: [e[k] for e in encoded] for k in ("input_ids", "attention_mask", "labels")})
        return rows, f"{path.name}: question/answer pairs, loss on answers"
    if args.text_column not in columns:
        raise ValueError(f"{path} has columns {columns}: it needs a {args.text_column!r} column (choose another "
                         "with --text_column) or 'question' and 'answer' columns.")
    rows = pack_for_causal_lm(raw, tokenizer, args.seq_len, args.max_train_sequences, text_column=args.text_column)
    return rows, f"{path.name}: column {args.text_column!r}, packed into {args.seq_len}-token sequences"


def _loader(rows, tokenizer: Any, batch_size: int, max_sequences: int):
    from torch.utils.data import DataLoader

    from hf_fisher.data.facts import pad_collate

    rows = rows.select(range(min(len(rows), max_sequences)))
    return DataLoader(rows.with_format(None), batch_size=batch_size, shuffle=False,
                      collate_fn=functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id))


# ------------------------------------------------------------------------------------------------- models


def _peft_config(args: FinetuneArguments, targets: list[str]):
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    if args.method in ("lora", "fwsvd"):
        from peft import LoraConfig

        return LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
    if args.method == "randlora":
        from hf_fisher.tuners.randlora import FastRandLoraConfig

        return FastRandLoraConfig(r=args.rank, randlora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
    from hf_fisher.tuners.lqlora import LQLoraConfig

    return LQLoraConfig(r=args.rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM",
                        budget=args.lqlora_budget, fisher_weighted=args.lqlora_fisher)


def _check_lqlora_budget(model: nn.Module, config) -> None:
    """The budget check of LQ-LoRA, run before any Fisher pass (so a bad budget fails in a second)."""
    from hf_fisher.tuners.lqlora.model import _validate

    weighted = config.fisher_weighted
    config.fisher_weighted = False  # the Fisher does not exist yet; its checks run in prepare_lqlora_model
    try:
        _validate(model, config, None)
    finally:
        config.fisher_weighted = weighted


def _estimate_fisher(model: nn.Module, rows, tokenizer: Any, targets: list[str], n: int, description: str):
    from hf_fisher import estimate_diagonal_fisher

    return estimate_diagonal_fisher(model, _loader(rows, tokenizer, 4, n), kind="empirical", target_modules=targets,
                                    data_description=description)


def _train_loss(trainer) -> float | None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        return float(losses[-1])
    train = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    return float(train[-1]) if train else None


def finetune(args: FinetuneArguments, training: FinetuneTrainingArguments) -> dict[str, Any]:
    """Fine-tune with ``args.method`` and save the adapter atomically to ``training.output_dir``.

    Returns ``{"output_dir", "method", "world_size", "train_loss", "trainable_parameters", "data"}``. Under
    ``accelerate launch`` every process trains; the main one writes the folder.
    """
    from hf_fisher import load_model

    check_arguments(args, training)
    out = Path(training.output_dir)
    partial = out.parent / f".{out.name}.partial"
    model, tokenizer = load_model(args.model_name_or_path)
    base_name = args.model_name_or_path or model.config._name_or_path
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = resolve_target_modules(model, args.target_modules, args.method)
    check_rank(model, targets, args.rank)
    config = _peft_config(args, targets)
    if args.method == "lqlora":
        _check_lqlora_budget(model, config)
    rows, description = load_finetune_data(args, tokenizer)

    # Fisher estimates on the unmodified model: FWSVD / LQ-LoRA on the task data, the penalty on general text.
    init_fisher = None
    if args.method == "fwsvd" or (args.method == "lqlora" and args.lqlora_fisher):
        init_fisher = _estimate_fisher(model, rows, tokenizer, targets, args.fisher_sequences, description)
    penalty_fisher = None
    if training.fisher_penalty == "diagonal":
        from hf_fisher.data import load_text_corpus, pack_for_causal_lm

        general = pack_for_causal_lm(load_text_corpus(args.penalty_corpus)["train"], tokenizer,
                                     min(args.seq_len, 128), args.fisher_sequences)
        penalty_fisher = _estimate_fisher(model, general, tokenizer, targets, args.fisher_sequences,
                                          f"{args.penalty_corpus} train")

    with training.main_process_first(desc="clearing a stale partial output"):
        if training.process_index == 0 and partial.exists():
            shutil.rmtree(partial)
    training.output_dir = str(partial)
    try:
        return _train_and_save(args, training, model, tokenizer, config, rows, description, init_fisher,
                               penalty_fisher, out, partial, base_name)
    except BaseException:
        if training.process_index == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        training.output_dir = str(out)


def _train_and_save(args: FinetuneArguments, training: FinetuneTrainingArguments, model: nn.Module, tokenizer: Any,
                    config: Any, rows: Any, description: str, init_fisher: Any, penalty_fisher: Any, out: Path,
                    partial: Path, base_name: str) -> dict[str, Any]:
    """Wrap, train and save (the second half of :func:`finetune`, after every check and Fisher estimate)."""
    from transformers import Trainer

    from hf_fisher import FisherTrainer
    from hf_fisher.data.facts import pad_collate

    if args.method == "lqlora":
        from hf_fisher.tuners.lqlora import prepare_lqlora_model

        peft_model = prepare_lqlora_model(model, config, fisher=init_fisher, progress=False)
    else:
        from peft import get_peft_model

        peft_model = get_peft_model(model, config)
    if args.method == "fwsvd":
        from hf_fisher.tuners.fwsvd import INITIAL_DIR, initialize_lora_fwsvd

        initialize_lora_fwsvd(peft_model, init_fisher, mode=args.fwsvd_mode)
        if training.process_index == 0:
            peft_model.save_pretrained(str(partial / INITIAL_DIR))
    peft_model.train()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    common = dict(model=peft_model, args=training, train_dataset=rows,
                  data_collator=functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id))
    if penalty_fisher is not None or training.online_fisher != "none":
        trainer = FisherTrainer(**common, fisher=penalty_fisher)
    else:
        trainer = Trainer(**common)
    trainer.train()
    loss = _train_loss(trainer)
    world = trainer.args.world_size

    with _full_parameters(trainer):  # every process enters (FSDP gathers collectively); the main one saves
        if trainer.is_world_process_zero():
            settings = {"data": description, "learning_rate": training.learning_rate,
                        "steps": trainer.state.global_step, "fisher_penalty": training.fisher_penalty}
            if training.fisher_penalty != "none":
                settings["fisher_lambda"] = training.fisher_lambda
            metrics = {"fine-tuning": {"final train loss": loss}} if loss is not None and math.isfinite(loss) else None
            _save(args, peft_model, partial, base_name, settings, metrics)
            tokenizer.save_pretrained(str(partial))
            if getattr(trainer, "online_fisher", None) is not None:  # what `hf-fisher merge` reuses
                from hf_fisher.trainers.fisher import FISHER_SUBFOLDER

                trainer.online_fisher.save_pretrained(
                    partial / FISHER_SUBFOLDER, model_name_or_path=base_name,
                    data_description=f"online ({training.online_fisher}), training gradients on {description}",
                )
            partial.rename(out)
    trainer.accelerator.wait_for_everyone()
    return {"output_dir": str(out), "method": args.method, "world_size": world, "train_loss": loss,
            "trainable_parameters": trainable, "data": description}


def _full_parameters(trainer):
    """Under FSDP the parameters are shards: gather them (a collective on every process) while the main one saves.

    DDP and DeepSpeed ZeRO-2 keep whole parameters on every process, so nothing is needed there.
    """
    import contextlib

    if getattr(trainer, "is_fsdp_enabled", False):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.model_wrapped, writeback=False)
    return contextlib.nullcontext()


def _save(args: FinetuneArguments, peft_model, folder: Path, base_name: str, settings: dict, metrics) -> None:
    """Save with the method's own function (see the module docstring)."""
    from hf_fisher.cards import adapter_card, write_card

    if args.method == "lora":
        peft_model.save_pretrained(str(folder))
        config = peft_model.peft_config["default"]
        card = adapter_card(method="lora", base_model=base_name, metrics=metrics,
                            training={"r": config.r, "lora_alpha": config.lora_alpha, **settings})
        write_card(card, folder)
    elif args.method == "fwsvd":
        from hf_fisher.tuners.fwsvd import INITIAL_DIR, save_fwsvd_adapter

        save_fwsvd_adapter(peft_model, folder, folder / INITIAL_DIR, metrics=metrics, training=settings,
                           base_model=base_name)
    elif args.method == "randlora":
        import tempfile

        from hf_fisher.tuners.randlora import convert_to_peft_randlora

        with tempfile.TemporaryDirectory(prefix="hf_fisher_randlora_") as fast:
            peft_model.save_pretrained(fast)
            convert_to_peft_randlora(fast, folder, metrics=metrics, training=settings, base_model=base_name)
    else:
        from hf_fisher.tuners.lqlora import save_lqlora_model

        save_lqlora_model(peft_model, folder, metrics=metrics, training=settings, base_model=base_name)


def load_finetuned(folder: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a :func:`finetune` folder, the adapter merged into a plain transformers model.

    LoRA, FWSVD and RandLoRA adapters are loaded on the base model recorded in ``adapter_config.json`` and merged;
    an LQ-LoRA folder cannot be merged into its quantized base and is refused. Anything else (a full model folder,
    a Hub id, ``"default"``) goes to :func:`~hf_fisher.load_model`. Used by ``hf-fisher unlearn`` / ``evaluate``
    so that a fine-tuned adapter can be unlearned and evaluated directly.
    """
    import json

    from transformers import AutoTokenizer

    from hf_fisher import load_model

    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():  # a full model: a folder, a Hub id or "default"
        return load_model(str(folder), dtype=dtype)
    if (folder / "lqlora_base.json").is_file():
        raise ValueError(f"{folder} is an LQ-LoRA model (quantized base); it cannot be merged into a plain model. "
                         "Export it first with hf_fisher.export_dequantized, or fine-tune with another method.")
    from peft import PeftModel

    import hf_fisher.tuners.randlora  # noqa: F401  (registers the fast RandLoRA type, if ever saved that way)

    base_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{config_file} names no base model; load the base yourself and PeftModel.from_pretrained.")
    from hf_fisher.models import DEFAULT_MODEL_NAME

    base, tokenizer = load_model(None if base_name == DEFAULT_MODEL_NAME else base_name, dtype=dtype)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    model.requires_grad_(True)  # PEFT froze the base weights; the merged model is an ordinary full model again
    return model.eval(), tokenizer
