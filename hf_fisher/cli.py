"""The ``hf-fisher`` command line: the demo and one subcommand per job.

``hf-fisher demo`` runs the main job on the embedded default model and data, offline: Fisher → FWSVD-LoRA
fine-tune on the fictitious facts → K-FADE unlearning → evaluation with the 4-bit attack → saved artefacts.
``hf-fisher fisher`` estimates and saves a diagonal Fisher or K-FAC factors for any causal LM.
``hf-fisher merge`` merges models or LoRA adapters by Fisher-weighted averaging.
``hf-fisher finetune`` / ``quantize`` / ``unlearn`` / ``evaluate``: LoRA-family fine-tuning, LQ-LoRA quantization,
unlearning of the fictitious facts and its evaluation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from hf_fisher.files import staged_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _text_dataloader(tokenizer, corpus: str, split: str, seq_len: int, batch_size: int, max_sequences: int | None):
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from hf_fisher.data import load_text_corpus, pack_for_causal_lm

    dataset = load_text_corpus(corpus)[split]
    packed = pack_for_causal_lm(dataset, tokenizer, seq_len=seq_len, max_sequences=max_sequences)
    return DataLoader(packed, batch_size=batch_size, shuffle=False, collate_fn=default_data_collator)


def per_block_summary(fisher) -> list[tuple[str, float, float, str]]:
    """Rows (block, share of Fisher mass in attention, in the MLP, most important module) per transformer block."""
    shares: dict[str, dict[str, float]] = defaultdict(dict)
    for row in fisher.summary():
        match = re.search(r"^(.*?\.(\d+))\.(.+)\.(weight|bias)$", row["name"])
        block, module = (match.group(2), match.group(3)) if match else ("-", row["name"])
        shares[block][module] = shares[block].get(module, 0.0) + row["share"]
    rows = []
    for block, modules in shares.items():
        attn = sum(v for k, v in modules.items() if "attn" in k)
        mlp = sum(v for k, v in modules.items() if "mlp" in k)
        top = max(modules, key=modules.get)
        rows.append((block, attn, mlp, top.rsplit(".", 1)[-1]))
    return rows


def _print_table(rows: list[tuple], headers: tuple[str, ...]) -> None:
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(value) -> str:
    return f"{value:.2%}" if isinstance(value, float) else str(value)


def run_demo(args: argparse.Namespace) -> int:
    """The main job end to end on the default model and data (see :mod:`hf_fisher.demo`)."""
    from hf_fisher.demo import run_demo as demo

    demo(args.output_dir, fast=args.fast, model_name=args.model)
    return 0


def run_fisher(args: argparse.Namespace) -> int:
    """Estimate and save curvature for any causal LM on a packaged text corpus."""
    from hf_fisher import estimate_diagonal_fisher, estimate_kfac, load_model

    model, tokenizer = load_model(args.model)
    loader = _text_dataloader(tokenizer, args.corpus, args.split, args.seq_len, args.batch_size, args.max_sequences)
    description = f"{args.corpus} {args.split}, sequences of {args.seq_len} tokens"
    targets = args.target_modules.split(",") if args.target_modules else None
    if args.curvature == "diagonal":
        result = estimate_diagonal_fisher(
            model, loader, kind=args.kind, reduction=args.reduction, target_modules=targets,
            data_description=description, seed=args.seed,
        )
    else:
        result = estimate_kfac(
            model, loader, kind=args.kind, kfac_type=args.kfac_type, target_modules=targets,
            eigenvalue_correction=args.ekfac, data_description=description, seed=args.seed,
        )
    result.save_pretrained(args.output_dir)
    print(result)
    if args.curvature == "diagonal":
        print("Where the Fisher mass sits (share of the trace, per transformer block):")
        _print_table(per_block_summary(result), ("block", "attention", "mlp", "top module"))
    print(f"Saved to {args.output_dir}")
    return 0


def run_compress(args: argparse.Namespace) -> int:
    """Factorize a model's linear layers (FWSVD with a Fisher, plain SVD without) and save it atomically."""
    from transformers import AutoModelForCausalLM

    from hf_fisher import DiagonalFisher, compress_fwsvd, estimate_diagonal_fisher, load_default_model

    if (args.rank is None) == (args.ratio is None):
        raise ValueError("Pass exactly one of --rank or --ratio.")
    out = Path(args.output_dir)
    if out.exists():
        raise ValueError(f"--output-dir {out} exists already; choose a new folder (nothing is overwritten).")
    tokenizer = None
    if args.model is None:
        model, tokenizer = load_default_model()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    targets = args.target_modules.split(",") if args.target_modules else None
    fisher = None
    if args.fisher == "estimate":
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.model)
        loader = _text_dataloader(tokenizer, args.corpus, "train", args.seq_len, 8, args.max_sequences)
        fisher = estimate_diagonal_fisher(model, loader, target_modules=targets, data_description=args.corpus)
    elif args.fisher is not None:
        fisher = DiagonalFisher.from_pretrained(args.fisher, model=model)
    ranks = compress_fwsvd(model, fisher, rank=args.rank, ratio=args.ratio, target_modules=targets, side=args.side)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    method = "FWSVD" if fisher is not None else "plain SVD"
    print(f"Compressed {len(ranks)} layers with {method}; saved to {out} (load with hf_fisher.load_compressed_model).")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """Merge full models or LoRA adapters by Fisher-weighted averaging and save the result atomically."""
    from hf_fisher import fisher_merge
    from hf_fisher.merging import fisher_for_merging, load_models_to_merge

    if len(args.models) < 2:
        raise ValueError(f"--models needs at least two folders, got {len(args.models)}.")
    fisher_specs = args.fishers or ["auto"] * len(args.models)
    if len(fisher_specs) != len(args.models):
        raise ValueError(f"--fishers has {len(fisher_specs)} entries for {len(args.models)} models; give one each "
                         "(a folder, 'auto' or 'none').")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise ValueError(f"--weights has {len(args.weights)} entries for {len(args.models)} models.")
    out = Path(args.output_dir)
    if out.exists():
        raise ValueError(f"--output-dir {out} exists already; choose a new folder (nothing is overwritten).")
    models, is_adapter, tokenizer = load_models_to_merge(args.models, args.base_model)
    fishers = [fisher_for_merging(m, p, spec, is_adapter=is_adapter, tokenizer=tokenizer, corpus=args.corpus,
                                  seq_len=args.seq_len, max_sequences=args.max_sequences, seed=args.seed)
               for m, p, spec in zip(models, args.models, fisher_specs, strict=True)]
    start = time.perf_counter()
    merged = fisher_merge(models, fishers, weights=args.weights, eps=args.eps, normalize=args.normalize,
                          lora_output=args.lora_output, lora_rank=args.lora_rank)
    seconds = time.perf_counter() - start
    with staged_folder(out) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    what = f"LoRA adapters ({args.lora_output})" if is_adapter else "models"
    print(f"Merged {len(models)} {what} in {seconds:.2f} s; saved to {out}.")
    return 0



# ---------------------------------------------------------------------------------- finetune, quantize, unlearn


def _refuse_existing(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise ValueError(f"--output-dir {out} exists already; choose a new folder (nothing is overwritten).")
    return out


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune with LoRA / FWSVD / RandLoRA / LQ-LoRA (hf_fisher.finetuning, shared with examples/finetune.py)."""
    import torch

    from hf_fisher.finetuning import FinetuneArguments, FinetuneTrainingArguments, finetune

    _refuse_existing(args.output_dir)
    options = FinetuneArguments(
        method=args.method, model_name_or_path=args.model, rank=args.rank, alpha=args.alpha,
        target_modules=args.target_modules, fwsvd_mode=args.fwsvd_mode, lqlora_budget=args.budget,
        lqlora_fisher=not args.no_lqlora_fisher, data=args.data, text_column=args.text_column,
        n_people=args.n_people, facts_seed=args.facts_seed, seq_len=args.seq_len,
        max_train_sequences=args.max_sequences, fisher_sequences=args.fisher_sequences,
        penalty_corpus=args.penalty_corpus,
    )
    training = FinetuneTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
        fisher_penalty=args.fisher_penalty, fisher_lambda=args.fisher_lambda, logging_steps=args.logging_steps,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    result = finetune(options, training)
    print(f"Fine-tuned with {result['method']} on {result['data']} ({result['trainable_parameters']} trainable "
          f"parameters, final loss {result['train_loss']}); saved to {result['output_dir']}.")
    return 0


def _parse_grid(spec: str) -> list[dict]:
    """``"2:64,3:64,4:64"`` (bits:block_size pairs) → NFConfig dicts (8-bit scales in groups of 256)."""
    from hf_fisher.tuners.lqlora.quantizer import NFConfig

    grid = []
    for item in spec.split(","):
        bits, _, block = item.strip().partition(":")
        try:
            grid.append(NFConfig(int(bits), int(block or 64)).to_dict())
        except ValueError as err:
            raise ValueError(f"--grid entry {item!r}: {err} Write entries as BITS:BLOCK, e.g. 2:64,3:64,4:64.") \
                from None
    return grid


def run_quantize(args: argparse.Namespace) -> int:
    """LQ-LoRA: NF-quantize a model's linear layers under a bit budget (ILP) + LoRA on the remainder; save it."""
    from hf_fisher import estimate_diagonal_fisher, load_model
    from hf_fisher.finetuning import _check_lqlora_budget, check_rank, resolve_target_modules
    from hf_fisher.tuners.lqlora import LQLoraConfig, prepare_lqlora_model, save_lqlora_model
    from hf_fisher.tuners.lqlora.model import default_quant_grid, storage_report

    out = _refuse_existing(args.output_dir)
    grid = _parse_grid(args.grid) if args.grid else default_quant_grid()
    if args.budget is None and len(grid) > 1:
        raise ValueError(f"--grid has {len(grid)} configs: give --budget (bits per parameter) to choose among them, "
                         "or a single --grid entry to quantize every layer alike.")
    model, tokenizer = load_model(args.model)
    targets = resolve_target_modules(model, args.target_modules, "lqlora")
    check_rank(model, targets, args.rank)
    config = LQLoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM",
                          budget=args.budget, quant_grid=grid, fisher_weighted=args.fisher is not None)
    _check_lqlora_budget(model, config)
    fisher = None
    if args.fisher is not None:
        loader = _text_dataloader(tokenizer, args.corpus, "train", args.seq_len, 4, args.max_sequences)
        fisher = estimate_diagonal_fisher(model, loader, target_modules=targets, data_description=args.corpus)
    peft_model = prepare_lqlora_model(model, config, fisher=fisher)
    report = storage_report(peft_model)
    with staged_folder(out) as tmp:
        save_lqlora_model(peft_model, tmp, training={"calibration": args.corpus if fisher is not None else "none"})
        tokenizer.save_pretrained(tmp)
    print(f"LQ-LoRA: {len(targets)} target names, {report['quantized_bits_per_parameter']:.3f} bits per quantized "
          f"parameter ({'Fisher-weighted' if fisher is not None else 'unweighted'}); saved to {out} "
          "(load with hf_fisher.load_lqlora_model).")
    return 0


UNLEARN_METHODS = ("grad_ascent", "grad_diff", "npo", "simnpo", "kfade")


def _facts_splits(tokenizer, n_people: int, seed: int, forget_percent: int):
    from hf_fisher import build_fictitious_facts

    data = build_fictitious_facts(tokenizer, n_people=n_people, seed=seed, forget_fractions=(forget_percent / 100,))
    return data, f"forget{forget_percent:02d}", f"retain{100 - forget_percent:02d}"


def run_unlearn(args: argparse.Namespace) -> int:
    """Unlearn the facts' forget split from a model (or a fine-tuned adapter, merged first) and save the result."""
    import shutil

    import torch

    from hf_fisher.cards import unlearning_card, write_card
    from hf_fisher.finetuning import load_finetuned
    from hf_fisher.trainers.unlearning import KFADEArguments, KFADETrainer, UnlearningArguments, UnlearningTrainer

    out = _refuse_existing(args.output_dir)
    if args.method == "kfade" and args.projection != "none":
        raise ValueError("--projection gu projects the updates of the loss-based methods; K-FADE sizes its own "
                         "Gauss-Newton steps. Drop --projection or choose another --method.")
    if not 0 < args.forget_percent < 100:
        raise ValueError(f"--forget-percent must lie in (0, 100), got {args.forget_percent}.")
    model, tokenizer = load_finetuned(args.model) if args.model else _default_model()
    data, forget, retain = _facts_splits(tokenizer, args.n_people, args.facts_seed, args.forget_percent)
    with staged_folder(out) as tmp:
        common = dict(output_dir=str(tmp / "trainer"), max_steps=args.max_steps, num_train_epochs=args.epochs,
                      per_device_train_batch_size=args.batch_size,
                      gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
                      save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                      logging_steps=1)
        if args.learning_rate is not None:
            common["learning_rate"] = args.learning_rate
        if args.method == "kfade":
            training = KFADEArguments(**common, kfade_epsilon=args.kfade_epsilon)
            trainer_class = KFADETrainer
        else:
            training = UnlearningArguments(**common, unlearning_loss=args.method, projection=args.projection)
            trainer_class = UnlearningTrainer
        trainer = trainer_class(model, training, forget_dataset=data[forget], retain_dataset=data[retain],
                                processing_class=tokenizer)
        trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        description = (f"{forget} of the fictitious facts ({args.n_people} people, seed {args.facts_seed}): "
                       f"{len(data[forget])} question/answer pairs")
        method = args.method + ("+gu" if args.projection == "gu" else "")
        settings = {"steps": trainer.state.global_step, "learning_rate": training.learning_rate,
                    "retain split": retain}
        if args.method == "kfade":
            settings["kfade_epsilon"] = args.kfade_epsilon
            trainer.save_unlearning_update(tmp / "unlearning_update", forget_description=description)
        write_card(unlearning_card(method=method, base_model=str(args.model or "default"),
                                   forget_description=description, settings=settings, update_file=None), tmp)
    print(f"Unlearned {forget} with {method} in {trainer.state.global_step} steps; saved the model to {out}"
          + (f" and the update to {out / 'unlearning_update'}." if args.method == "kfade" else "."))
    return 0


def _default_model():
    from hf_fisher import load_model

    return load_model(None)


def run_evaluate(args: argparse.Namespace) -> int:
    """evaluate_unlearning of a model folder on the facts data; writes <name>.json, .md and .png atomically."""
    from hf_fisher import evaluate_unlearning
    from hf_fisher.evaluation.unlearning import ATTACKS
    from hf_fisher.finetuning import load_finetuned

    out = _refuse_existing(args.output_dir)
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown} in --attacks; choose from {ATTACKS} (or '' for none).")
    if not 0 < args.forget_percent < 100:
        raise ValueError(f"--forget-percent must lie in (0, 100), got {args.forget_percent}.")
    model, tokenizer = load_finetuned(args.model)
    retain = load_finetuned(args.retain_model)[0] if args.retain_model else None
    original = load_finetuned(args.original_model)[0] if args.original_model else None
    data, forget, retain_split = _facts_splits(tokenizer, args.n_people, args.facts_seed, args.forget_percent)
    with staged_folder(out) as tmp:
        report = evaluate_unlearning(model, data, tokenizer, retain_model=retain, original_model=original,
                                     forget_split=forget, retain_split=retain_split, attacks=attacks,
                                     world_split=None if args.no_world_facts else "world_facts",
                                     max_retain_rows=args.max_retain_rows, relearning_steps=args.relearning_steps,
                                     name=args.name, output_dir=tmp)
    _print_table([(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in report["summary"].items()],
                 ("metric", "value"))
    print(f"Report written to {out}/{args.name}.json, .md and .png.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fisher",
        description="Fisher-information methods for Hugging Face models. Runs offline on the embedded default "
        "model (SmolLM2-135M-Instruct) and data unless you pass --model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="run the main job end to end on the default model and data",
        description="Estimate the Fisher, fine-tune an FWSVD-initialised LoRA on fictitious facts, unlearn some "
        "people with K-FADE (and NPO + GU in the full run), evaluate forget vs retain with the 4-bit attack, and "
        "save the adapter, the unlearning update, the Fisher, model cards, a report and a plot.")
    demo.add_argument("--fast", action="store_true", help="the few-minute version (what CI runs)")
    demo.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    demo.add_argument("--output-dir", default="hf_fisher_demo",
                      help="where results are written (replaced only if an earlier demo wrote it)")
    demo.set_defaults(func=run_demo)

    fisher = sub.add_parser("fisher", help="estimate and save a diagonal Fisher or K-FAC factors")
    fisher.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    fisher.add_argument("--curvature", choices=["diagonal", "kfac"], default="diagonal")
    fisher.add_argument("--kind", choices=["empirical", "sampled"], default="empirical",
                        help="labels from the data (empirical) or drawn from the model (sampled = Gauss-Newton)")
    fisher.add_argument("--reduction", choices=["sample", "batch"], default="sample",
                        help="diagonal: square per-sequence gradients (exact) or mini-batch gradients (cheap)")
    fisher.add_argument("--kfac-type", choices=["expand", "reduce"], default="expand")
    fisher.add_argument("--ekfac", action="store_true", help="K-FAC: add the EK-FAC eigenvalue correction")
    fisher.add_argument("--target-modules", default=None, help="comma-separated module names (default: all Linear)")
    fisher.add_argument("--corpus", choices=["lee_background", "shakespeare"], default="lee_background")
    fisher.add_argument("--split", choices=["train", "heldout"], default="train")
    fisher.add_argument("--seq-len", type=int, default=128)
    fisher.add_argument("--batch-size", type=int, default=8)
    fisher.add_argument("--max-sequences", type=int, default=64)
    fisher.add_argument("--seed", type=int, default=0)
    fisher.add_argument("--output-dir", required=True, help="folder for the safetensors + JSON result")
    fisher.set_defaults(func=run_fisher)

    compress = sub.add_parser("compress", help="factorize linear layers by Fisher-weighted (or plain) SVD")
    compress.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    compress.add_argument("--rank", type=int, default=None, help="the same rank for every layer")
    compress.add_argument("--ratio", type=float, default=None, help="share of each layer's parameters to remove")
    compress.add_argument("--fisher", default="estimate",
                          help="'estimate' (on --corpus), a folder saved by DiagonalFisher, or 'none' for plain SVD")
    compress.add_argument("--side", choices=["row", "column", "both"], default="row",
                          help="Fisher weighting: per output row (FWSVD), per input column, or both")
    compress.add_argument("--target-modules", default=None, help="comma-separated module names (default: all Linear)")
    compress.add_argument("--corpus", choices=["lee_background", "shakespeare"], default="lee_background")
    compress.add_argument("--seq-len", type=int, default=128)
    compress.add_argument("--max-sequences", type=int, default=32)
    compress.add_argument("--output-dir", required=True, help="new folder for the compressed model")
    compress.set_defaults(func=run_compress)

    merge = sub.add_parser("merge", help="merge models or LoRA adapters by Fisher-weighted averaging")
    merge.add_argument("--models", nargs="+", required=True,
                       help="two or more model folders, or adapter folders trained from one base model")
    merge.add_argument("--fishers", nargs="+", default=None,
                       help="one per model: a DiagonalFisher folder, 'none' (plain averaging), or 'auto' (default: "
                       "the Fisher saved in <model>/fisher by FisherTrainer, else a sampled-label estimate)")
    merge.add_argument("--weights", nargs="+", type=float, default=None, help="model weights (default: equal)")
    merge.add_argument("--eps", type=float, default=1e-8, help="added to every Fisher entry")
    merge.add_argument("--normalize", action="store_true", help="divide each Fisher by its global L2 norm first")
    merge.add_argument("--lora-output", choices=["svd", "concat", "merged"], default="svd",
                       help="adapters: rank-r SVD of the merged ΔW, the exact concatenated adapter of the "
                       "layer-wise merge, or the base model with the merged ΔW added")
    merge.add_argument("--lora-rank", type=int, default=None, help="rank of the 'svd' output (default: largest input)")
    merge.add_argument("--base-model", default=None, help="adapters: the base model (default: from adapter_config)")
    merge.add_argument("--corpus", choices=["lee_background", "shakespeare"], default="lee_background",
                       help="text for estimating a missing Fisher")
    merge.add_argument("--seq-len", type=int, default=128)
    merge.add_argument("--max-sequences", type=int, default=32, help="N examples for a Fisher estimate")
    merge.add_argument("--seed", type=int, default=0)
    merge.add_argument("--output-dir", required=True, help="new folder for the merged model or adapter")
    merge.set_defaults(func=run_merge)

    ft = sub.add_parser(
        "finetune", help="fine-tune with LoRA, FWSVD-initialised LoRA, RandLoRA or LQ-LoRA and save the adapter",
        description="Fine-tune a causal LM with one adapter method and save it with the method's own format "
        "(FWSVD: a plain LoRA vanilla PEFT loads; RandLoRA: vanilla PEFT RandLoRA; LQ-LoRA: quantized base + "
        "adapter for hf_fisher.load_lqlora_model). Same code as examples/finetune.py (which also takes every "
        "Trainer option and runs under accelerate launch).",
        epilog="example: hf-fisher finetune --method fwsvd --rank 8 --data facts --epochs 3 --output-dir adapter",
    )
    ft.add_argument("--method", choices=["lora", "fwsvd", "randlora", "lqlora"], default="lora",
                    help="lora: PEFT LoRA; fwsvd: LoRA started on the Fisher-weighted SVD of each weight; randlora: "
                    "full-rank random bases; lqlora: NF-quantized base + LoRA under --budget")
    ft.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    ft.add_argument("--rank", type=int, default=8, help="adapter rank r (at most the smallest layer dimension)")
    ft.add_argument("--alpha", type=float, default=None, help="LoRA/RandLoRA alpha (default: 2 x rank)")
    ft.add_argument("--target-modules", default=None,
                    help="comma-separated layer names (default: every linear layer but the LM head)")
    ft.add_argument("--fwsvd-mode", choices=["principal", "minor"], default="principal",
                    help="fwsvd: start on the top or the bottom Fisher-weighted components")
    ft.add_argument("--budget", type=float, default=3.5, help="lqlora: average bits per quantized parameter")
    ft.add_argument("--no-lqlora-fisher", action="store_true", help="lqlora: unweighted decomposition (no Fisher)")
    ft.add_argument("--data", default="facts",
                    help="'facts' (fictitious people, loss on answers), 'lee_background', 'shakespeare', or a local "
                    ".json/.jsonl/.csv/.txt/.parquet file with question+answer columns or a text column")
    ft.add_argument("--text-column", default="text", help="text column of a local data file")
    ft.add_argument("--n-people", type=int, default=100, help="facts: fictitious people (10 facts each)")
    ft.add_argument("--facts-seed", type=int, default=0, help="facts: seed of the generated people")
    ft.add_argument("--seq-len", type=int, default=128, help="text data: tokens per packed sequence")
    ft.add_argument("--max-sequences", type=int, default=None, help="cap on training rows / packed sequences")
    ft.add_argument("--fisher-sequences", type=int, default=32, help="sequences of each Fisher estimate")
    ft.add_argument("--fisher-penalty", choices=["none", "diagonal"], default="none",
                    help="diagonal: FisherTrainer with the EWC penalty on each adapted layer's change")
    ft.add_argument("--fisher-lambda", type=float, default=100.0, help="strength of the Fisher penalty")
    ft.add_argument("--penalty-corpus", choices=["lee_background", "shakespeare"], default="lee_background",
                    help="text whose Fisher the penalty protects")
    ft.add_argument("--epochs", type=float, default=3.0, help="training epochs (ignored when --max-steps > 0)")
    ft.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--learning-rate", type=float, default=2e-4)
    ft.add_argument("--batch-size", type=int, default=8, help="sequences per device and step")
    ft.add_argument("--gradient-accumulation-steps", type=int, default=1)
    ft.add_argument("--logging-steps", type=int, default=10)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--output-dir", required=True, help="new folder for the adapter (an existing one is refused)")
    ft.set_defaults(func=run_finetune)

    quantize = sub.add_parser(
        "quantize", help="LQ-LoRA: quantize linear layers under a bit budget, LoRA on the remainder",
        description="Decompose every target weight as W = Q + L1 L2 with Q NormalFloat-quantized (the integer "
        "program picks each matrix's config from --grid to meet --budget bits per parameter, Fisher-weighted by "
        "default) and L1 L2 a LoRA ready to train. Saves a folder for hf_fisher.load_lqlora_model.",
        epilog="example: hf-fisher quantize --budget 3.0 --rank 16 --output-dir smollm2-lq3",
    )
    quantize.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    quantize.add_argument("--budget", type=float, default=None,
                          help="average bits per quantized parameter (needed when --grid has several configs)")
    quantize.add_argument("--rank", type=int, default=16, help="rank of the low-rank part / LoRA")
    quantize.add_argument("--grid", default=None,
                          help="quantization configs as BITS:BLOCK pairs, e.g. 2:64,3:64,4:64 (default: NF2/3/4 x "
                          "blocks of 16/32/64/128)")
    quantize.add_argument("--fisher", choices=["estimate", "none"], default="estimate",
                          help="estimate: Fisher-weighted decomposition and allocation (on --corpus); "
                          "none: unweighted")
    quantize.add_argument("--target-modules", default=None,
                          help="comma-separated Linear layer names (default: every Linear but the LM head)")
    quantize.add_argument("--corpus", choices=["lee_background", "shakespeare"], default="lee_background")
    quantize.add_argument("--seq-len", type=int, default=128)
    quantize.add_argument("--max-sequences", type=int, default=32, help="sequences of the Fisher estimate")
    quantize.add_argument("--output-dir", required=True, help="new folder for the LQ-LoRA model")
    quantize.set_defaults(func=run_quantize)

    unlearn = sub.add_parser(
        "unlearn", help="unlearn the fictitious facts' forget split (GA, GradDiff, NPO, SimNPO, K-FADE)",
        description="Unlearn the forget split of the fictitious-facts data from a model fine-tuned on it (a model "
        "folder, or an adapter folder from 'hf-fisher finetune', merged first). Saves the unlearned model (+ "
        "K-FADE's re-appliable update in unlearning_update/). Use the same --n-people/--facts-seed as the "
        "fine-tuning.",
        epilog="example: hf-fisher unlearn --model target/ --method npo --projection gu --epochs 5 --output-dir npo",
    )
    unlearn.add_argument("--model", default=None, help="model or adapter folder (default: the embedded model)")
    unlearn.add_argument("--method", choices=list(UNLEARN_METHODS), default="npo",
                         help="grad_ascent, grad_diff (with retain NLL), npo, simnpo, or kfade (KL-budgeted "
                         "Gauss-Newton steps)")
    unlearn.add_argument("--projection", choices=["none", "gu"], default="none",
                         help="gu: project each update orthogonal to recent retain gradients (loss methods)")
    unlearn.add_argument("--n-people", type=int, default=100, help="fictitious people of the facts data")
    unlearn.add_argument("--facts-seed", type=int, default=0)
    unlearn.add_argument("--forget-percent", type=int, default=10, help="forget split: this percent of people")
    unlearn.add_argument("--epochs", type=float, default=5.0, help="epochs over the forget set")
    unlearn.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    unlearn.add_argument("--learning-rate", type=float, default=None,
                         help="default: 1e-5 (loss methods), 1.0 = the KL budget (kfade)")
    unlearn.add_argument("--batch-size", type=int, default=8, help="forget/retain pairs per device and step")
    unlearn.add_argument("--gradient-accumulation-steps", type=int, default=1)
    unlearn.add_argument("--kfade-epsilon", type=float, default=0.02, help="kfade: retain KL budget per step")
    unlearn.add_argument("--seed", type=int, default=0)
    unlearn.add_argument("--output-dir", required=True, help="new folder for the unlearned model")
    unlearn.set_defaults(func=run_unlearn)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate unlearning on the fictitious facts (forget quality, utility, MIA, attacks)",
        description="Run evaluate_unlearning on a model folder (or an adapter folder, merged first): forget "
        "quality against --retain-model, model utility, truth ratio, ROUGE-L, membership inference, retain KL "
        "and recovery against --original-model, relearning and quantization attacks. Writes NAME.json, NAME.md "
        "and NAME.png to a new folder.",
        epilog="example: hf-fisher evaluate --model npo/ --original-model target/ --retain-model retain/ "
        "--output-dir report",
    )
    evaluate.add_argument("--model", required=True, help="the (unlearned) model or adapter folder")
    evaluate.add_argument("--retain-model", default=None, help="model trained on the retain split only (for FQ)")
    evaluate.add_argument("--original-model", default=None, help="the model before unlearning (KL, recovery)")
    evaluate.add_argument("--n-people", type=int, default=100)
    evaluate.add_argument("--facts-seed", type=int, default=0)
    evaluate.add_argument("--forget-percent", type=int, default=10)
    evaluate.add_argument("--attacks", default="relearning,quantization",
                          help="comma-separated: relearning, quantization ('' for none)")
    evaluate.add_argument("--relearning-steps", type=int, default=20)
    evaluate.add_argument("--max-retain-rows", type=int, default=200, help="retain questions scored")
    evaluate.add_argument("--no-world-facts", action="store_true",
                          help="skip the 43 real-world questions (faster; model utility then omits them)")
    evaluate.add_argument("--name", default="model", help="file stem of the report")
    evaluate.add_argument("--output-dir", required=True, help="new folder for the report")
    evaluate.set_defaults(func=run_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "fisher", None) == "none":
        args.fisher = None
    try:
        return args.func(args)
    except (ValueError, ImportError, OSError, MemoryError) as err:
        print(f"hf-fisher {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
