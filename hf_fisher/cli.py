"""The ``hf-fisher`` command line: the demo and one subcommand per job.

``hf-fisher demo`` runs the main job on the embedded default model and data, offline: Fisher → FWSVD-LoRA
fine-tune on the fictitious facts → K-FADE unlearning → evaluation with the 4-bit attack → saved artefacts.
``hf-fisher fisher`` estimates and saves a diagonal Fisher or K-FAC factors for any causal LM.
``hf-fisher merge`` merges models or LoRA adapters by Fisher-weighted averaging.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

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
    import shutil
    import tempfile

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    method = "FWSVD" if fisher is not None else "plain SVD"
    print(f"Compressed {len(ranks)} layers with {method}; saved to {out} (load with hf_fisher.load_compressed_model).")
    return 0


def _load_merge_inputs(paths: list[str], base_model: str | None):
    """The models to merge (full models, or PEFT adapters on one base), their kind, and a tokenizer."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fisher.models import DEFAULT_MODEL_NAME, load_default_model

    def load(path: str | None):
        if path in (None, DEFAULT_MODEL_NAME, "default"):
            return load_default_model()
        model = AutoModelForCausalLM.from_pretrained(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None  # only needed to estimate a missing Fisher
        return model.eval(), tokenizer

    adapters = [(Path(p) / "adapter_config.json").is_file() for p in paths]
    if any(adapters) and not all(adapters):
        raise ValueError("--models mixes adapter folders and full models; merge adapters or full models, not both.")
    if not all(adapters):
        loaded = [load(p) for p in paths]
        return [m for m, _ in loaded], False, loaded[0][1]
    import json

    from peft import PeftModel

    bases = {json.loads((Path(p) / "adapter_config.json").read_text()).get("base_model_name_or_path") for p in paths}
    if base_model is None:
        if len(bases) != 1:
            raise ValueError(f"The adapters name different base models {sorted(map(str, bases))}; pass --base-model.")
        base_model = bases.pop()
    base, tokenizer = load(base_model)
    return [PeftModel.from_pretrained(copy.deepcopy(base), p) for p in paths], True, tokenizer


def _merge_fisher(model, path: str, spec: str, is_adapter: bool, tokenizer, args: argparse.Namespace):
    """The Fisher of one model for merging: none, a given folder, the one saved next to it, or a fresh estimate."""
    from hf_fisher import DiagonalFisher, estimate_diagonal_fisher
    from hf_fisher.trainers.fisher import _fisher_key, _lora_layers

    if spec == "none":
        return None
    layers = _lora_layers(model) if is_adapter else {}

    def usable(fisher) -> bool:
        if is_adapter:
            return all(_fisher_key(n, fisher) is not None for n in layers)
        params = dict(model.named_parameters())
        return len(fisher) > 0 and all(k in params and params[k].shape == t.shape for k, t in fisher.items())

    if spec != "auto":
        fisher = DiagonalFisher.from_pretrained(spec)
        if not usable(fisher):
            raise ValueError(f"The Fisher in {spec} does not cover the tensors of {path} that are merged.")
        return fisher
    saved = Path(path) / "fisher"
    if (saved / "diagonal_fisher.safetensors").is_file():
        fisher = DiagonalFisher.from_pretrained(saved)
        if usable(fisher):
            print(f"  {path}: reusing the Fisher saved in {saved}")
            return fisher
    if tokenizer is None:
        raise ValueError(f"{path} has no saved Fisher that fits and no tokenizer to estimate one; pass --fishers.")
    print(f"  {path}: estimating the sampled-label Fisher on {args.max_sequences} x {args.seq_len} tokens of "
          f"{args.corpus}")
    loader = _text_dataloader(tokenizer, args.corpus, "train", args.seq_len, 8, args.max_sequences)
    targets = [f"{n}.base_layer" for n in layers] if is_adapter else None
    return estimate_diagonal_fisher(model, loader, kind="sampled", target_modules=targets, seed=args.seed,
                                    data_description=f"{args.corpus} train, sampled labels")


def run_merge(args: argparse.Namespace) -> int:
    """Merge full models or LoRA adapters by Fisher-weighted averaging and save the result atomically."""
    import shutil
    import tempfile

    from hf_fisher import fisher_merge

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
    models, is_adapter, tokenizer = _load_merge_inputs(args.models, args.base_model)
    fishers = [_merge_fisher(m, p, spec, is_adapter, tokenizer, args)
               for m, p, spec in zip(models, args.models, fisher_specs, strict=True)]
    start = time.perf_counter()
    merged = fisher_merge(models, fishers, weights=args.weights, eps=args.eps, normalize=args.normalize,
                          lora_output=args.lora_output, lora_rank=args.lora_rank)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = f"LoRA adapters ({args.lora_output})" if is_adapter else "models"
    print(f"Merged {len(models)} {what} in {seconds:.2f} s; saved to {out}.")
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
