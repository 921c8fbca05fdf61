"""FWSVD compression benchmark: Fisher-weighted vs plain SVD at equal parameter budgets, on the default model.

Every block linear of SmolLM2-135M-Instruct (210 layers) is replaced by a low-rank factorization with 25 % and
50 % fewer parameters per layer (``compress_fwsvd(ratio=...)``), by plain SVD (``fisher=None``) and by FWSVD
with the diagonal Fisher estimated on the lee_background training split (row weighting, the paper's form,
and two-sided weighting). Perplexity is measured on

* the Fisher data itself (the "task" the Fisher describes),
* held-out lee_background articles (same domain, unseen text),
* held-out Shakespeare (another domain).

Run: ``python benchmarks/fwsvd.py``; writes benchmarks/results/fwsvd.md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fisher-sequences", type=int, default=32)
    parser.add_argument("--eval-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    model, tokenizer = load_default_model()
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
            compress_fwsvd(compressed, f, ratio=ratio, side=side)
            seconds = time.perf_counter() - start
            params[ratio] = sum(p.numel() for p in compressed.parameters())
            rows.append((method, f"{ratio:.0%}", *(perplexity(compressed, d) for d in evals.values()), seconds))
            print(rows[-1], flush=True)
            del compressed

    lines = [
        "# FWSVD compression benchmark",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32, {n_dense / 1e6:.1f} M parameters); all 210 block linears "
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
                + ", ".join(f"{k} {p / q:.2f}×" for k, p, q in zip(evals, ppl, ref, strict=True))
            )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
