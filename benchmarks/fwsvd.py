"""FWSVD benchmarks on the default model: compression (part 1) and LoRA initialisation (part 2).

Part 1. Every block linear of SmolLM2-135M-Instruct (210 layers) is replaced by a low-rank factorization with 25 % and
50 % fewer parameters per layer (``compress_fwsvd(ratio=...)``), by plain SVD (``fisher=None``) and by FWSVD
with the diagonal Fisher estimated on the lee_background training split (row weighting, the paper's form,
and two-sided weighting). Perplexity is measured on

* the Fisher data itself (the "task" the Fisher describes),
* held-out lee_background articles (same domain, unseen text),
* held-out Shakespeare (another domain).

Part 2. Fine-tune SmolLM2 on Shakespeare (domain adaptation) with LoRA r=8 on all 7 projections of every
block, initialised four ways: PEFT's default (B = 0), PEFT's PiSSA (plain SVD, full), FWSVD-principal and
FWSVD-minor (diagonal Fisher on the Shakespeare training data). Each runs the same steps at 3 learning rates;
the best (lowest final held-out Shakespeare loss) is reported with the loss after 10 % of the steps and the
held-out lee_background perplexity after training (forgetting of general text). Init time excludes the
Fisher pass, which is reported separately.

Run: ``python benchmarks/fwsvd.py [--part compression|init|all]``; writes benchmarks/results/fwsvd.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_fisher import estimate_diagonal_fisher, load_default_model  # noqa: E402
from hf_fisher.compression import compress_fwsvd  # noqa: E402
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fwsvd.md"


def loader(tokenizer, corpus: str, split: str, n: int, seq_len: int) -> DataLoader:
    data = pack_for_causal_lm(load_text_corpus(corpus)[split], tokenizer, seq_len=seq_len, max_sequences=n)
    return DataLoader(data, batch_size=8, collate_fn=default_data_collator)


@torch.no_grad()
def perplexity(model, data: DataLoader) -> float:
    total, count = 0.0, 0
    for batch in data:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def mean_loss(model, data: DataLoader) -> float:
    return math.log(perplexity(model, data))


def finetune(model, train: list[dict], evaluate: DataLoader, steps: int, lr: float) -> tuple[float, float]:
    """AdamW on the trainable (LoRA) weights; returns held-out loss after 10 % of the steps and at the end."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    early = None
    for step in range(steps):
        model.train()
        batch = train[step % len(train)]
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if step + 1 == max(1, steps // 10):
            model.eval()
            early = mean_loss(model, evaluate)
    model.eval()
    return early, mean_loss(model, evaluate)


def init_part(args, model, tokenizer) -> list[str]:
    from peft import LoraConfig, get_peft_model

    from hf_fisher import initialize_lora_fwsvd

    train_loader = loader(tokenizer, "shakespeare", "train", args.train_sequences, args.seq_len)
    train = [dict(b) for b in DataLoader(train_loader.dataset, batch_size=args.train_batch,
                                         collate_fn=default_data_collator)]
    task_eval = loader(tokenizer, "shakespeare", "heldout", args.eval_sequences, args.seq_len)
    general_eval = loader(tokenizer, "lee_background", "heldout", args.eval_sequences, args.seq_len)
    start = time.perf_counter()
    fisher = estimate_diagonal_fisher(model, train_loader, data_description="shakespeare train")
    fisher_s = time.perf_counter() - start
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base_task, base_general = mean_loss(model, task_eval), perplexity(model, general_eval)
    results = []
    for method in ("LoRA (default init)", "PiSSA (PEFT)", "FWSVD principal", "FWSVD minor"):
        best = None
        for lr in (float(x) for x in args.lrs.split(",")):
            base = copy.deepcopy(model)
            init = "pissa" if method.startswith("PiSSA") else True
            config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=init)
            start = time.perf_counter()
            peft_model = get_peft_model(base, config)
            if method.startswith("FWSVD"):
                initialize_lora_fwsvd(peft_model, fisher, mode=method.split()[-1])
            init_s = time.perf_counter() - start
            early, final = finetune(peft_model, train, task_eval, args.steps, lr)
            general = perplexity(peft_model, general_eval)
            row = (method, lr, init_s, early, final, general)
            print(row, flush=True)
            if best is None or final < best[4]:
                best = row
            del base, peft_model
        results.append(best)
    lines = [
        "## Part 2: LoRA initialisation (fine-tuning on Shakespeare)",
        "",
        f"LoRA r={args.rank}, alpha={2 * args.rank}, all 7 projections of the 30 blocks; AdamW, {args.steps} steps of "
        f"{args.train_batch} x {args.seq_len} tokens from {args.train_sequences} Shakespeare training sequences; "
        f"best of learning rates {args.lrs} by final held-out loss. Held-out: {args.eval_sequences} x {args.seq_len} "
        f"tokens each. Before training: Shakespeare loss {base_task:.3f}, lee_background perplexity "
        f"{base_general:.1f}. "
        f"Fisher pass for FWSVD (diagonal, per-sequence, {args.train_sequences} sequences): {fisher_s:.1f} s.",
        "",
        "| init | best lr | init s | Shakespeare loss at 10 % | final Shakespeare loss | lee ppl after (forgetting) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, lr, init_s, early, final, general in results:
        lines.append(f"| {method} | {lr:g} | {init_s:.1f} | {early:.3f} | {final:.3f} | {general:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fisher-sequences", type=int, default=32)
    parser.add_argument("--eval-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--part", choices=["compression", "init", "all"], default="all")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lrs", default="5e-5,2e-4,8e-4")
    parser.add_argument("--train-sequences", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--target-regex", default=None,
                        help="compress only the linears whose full name matches (default: all block linears)")
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    sections = {}
    if args.part in ("compression", "all"):
        sections["compression"] = compression_part(args, model, tokenizer)
    if args.part in ("init", "all"):
        sections["init"] = init_part(args, model, tokenizer)
    output = Path(args.output)
    kept = _sections(output.read_text()) if output.exists() else {}
    for lines in sections.values():  # replace sections with the same heading, keep the others
        kept[lines[0]] = "\n".join(lines)
    text = "# FWSVD benchmarks\n\n" + "\n\n".join(kept[k].strip() for k in sorted(kept)) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)


def _sections(text: str) -> dict[str, str]:
    """Split a results file into its "## " sections, keyed by heading line."""
    parts = {}
    for chunk in text.split("\n## ")[1:]:
        heading = "## " + chunk.splitlines()[0]
        parts[heading] = "## " + chunk
    return parts


def compression_part(args, model, tokenizer) -> list[str]:
    fisher_data = loader(tokenizer, "lee_background", "train", args.fisher_sequences, args.seq_len)
    evals = {
        "Fisher data (lee train)": fisher_data,
        "lee held-out": loader(tokenizer, "lee_background", "heldout", args.eval_sequences, args.seq_len),
        "Shakespeare held-out": loader(tokenizer, "shakespeare", "heldout", args.eval_sequences, args.seq_len),
    }
    start = time.perf_counter()
    fisher = estimate_diagonal_fisher(model, fisher_data, data_description="lee_background train")
    fisher_s = time.perf_counter() - start
    print(f"Fisher: {fisher_s:.1f} s", flush=True)

    rows = [("original", "-", *(perplexity(model, d) for d in evals.values()), 0.0)]
    print(rows[-1], flush=True)
    n_dense = sum(p.numel() for p in model.parameters())
    params = {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        variants = (("SVD", None, "row"), ("FWSVD (row)", fisher, "row"), ("FWSVD (both)", fisher, "both"))
        for method, f, side in variants:
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            compress_fwsvd(compressed, f, ratio=ratio, side=side, target_modules=args.target_regex)
            seconds = time.perf_counter() - start
            params[ratio] = sum(p.numel() for p in compressed.parameters())
            rows.append((method, f"{ratio:.0%}", *(perplexity(compressed, d) for d in evals.values()), seconds))
            print(rows[-1], flush=True)
            del compressed

    scope = f"the block linears matching `{args.target_regex}`" if args.target_regex else "all 210 block linears"
    lines = [
        "## Part 1"
        + (f"b: compression of {args.target_regex}" if args.target_regex else ": compression of all block linears")
        + " (Fisher-weighted vs plain SVD)",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32, {n_dense / 1e6:.1f} M parameters); {scope} "
        "factorized with the given share of each layer's parameters removed (embeddings untouched: "
        + ", ".join(f"{r:.0%} → {p / 1e6:.1f} M parameters in all" for r, p in params.items())
        + f"). Diagonal Fisher (empirical, per-sequence) on {args.fisher_sequences} x {args.seq_len} tokens of "
        f"lee_background train ({fisher_s:.0f} s). Perplexity on {args.eval_sequences} x {args.seq_len} tokens "
        "per held-out set. Compression time is the factorization of all layers.",
        "",
        "| method | params removed | " + " | ".join(f"ppl {k}" for k in evals) + " | compress s |",
        "|---|---|" + "---:|" * (len(evals) + 1),
    ]
    for method, ratio, *ppl, seconds in rows:
        lines.append(f"| {method} | {ratio} | " + " | ".join(f"{p:.1f}" for p in ppl) + f" | {seconds:.1f} |")
    base = {r[1]: r for r in rows if r[0] == "SVD"}
    lines += ["", "Perplexity relative to plain SVD at the same budget (lower is better):", ""]
    for method, ratio, *ppl, _ in rows:
        if method.startswith("FWSVD"):
            ref = base[ratio][2:-1]
            lines.append(
                f"- {method}, {ratio} removed: "
                + ", ".join(f"{k} {p / q:.3g}×" for k, p, q in zip(evals, ppl, ref, strict=True))
            )
    return lines


if __name__ == "__main__":
    main()
