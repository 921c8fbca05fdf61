"""Curvature benchmark: cost of the engine's estimates relative to one plain training step.

On the default model (SmolLM2-135M-Instruct), one batch of 8 x 128 tokens of the lee_background corpus:

* plain            one forward + backward with every weight trainable (a fine-tuning step, no optimizer)
* diag_sample      estimate_diagonal_fisher(reduction="sample"): exact per-sequence squared gradients
* diag_batch       estimate_diagonal_fisher(reduction="batch"): squared mini-batch gradient
* naive_loop       per-sequence diagonal Fisher the straightforward way: 8 backward passes of batch 1
* kfac_mc          estimate_kfac(kind="sampled", kfac_type="expand") over all 210 block linears
* kfac_empirical   the same with the data's labels
* curvlinops_mc / curvlinops_empirical   curvlinops' KFACLinearOperator(...).compute_kronecker_factors()

Timings are measured side by side in one process, interleaved round by round (medians over rounds, after
one warm-up round), so machine noise hits every method alike. Peak memory is measured per method in a fresh
subprocess (peak RSS of the process, and its increase over the RSS just before the method runs).

Run: ``python benchmarks/curvature.py`` (``make bench``); writes benchmarks/results/curvature.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_fisher import estimate_diagonal_fisher, estimate_kfac, load_default_model  # noqa: E402
from hf_fisher.curvature import find_target_layers  # noqa: E402
from hf_fisher.data import load_text_corpus, pack_for_causal_lm  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "curvature.md"
METHODS = [
    "plain",
    "diag_sample",
    "diag_batch",
    "naive_loop",
    "kfac_mc",
    "kfac_empirical",
    "curvlinops_mc",
    "curvlinops_empirical",
]


def make_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    data = pack_for_causal_lm(load_text_corpus()["train"], tokenizer, seq_len=seq_len, max_sequences=batch_size)
    return {k: data[:][k] for k in ("input_ids", "attention_mask", "labels")}


def plain_step(model: nn.Module, batch: dict) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def naive_loop(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sequence gradients by one backward pass per sequence (the reference way), squared and averaged."""
    weights = [layer.module.weight for layer in find_target_layers(model).values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    n = batch["input_ids"].shape[0]
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        out = model(**one)
        count = int((one["labels"][:, 1:] != -100).sum())
        grads = torch.autograd.grad(out.loss * count, weights)
        for s, g in zip(sums, grads, strict=True):
            s.add_(g.square())
    for p in model.parameters():
        p.requires_grad_(True)
    return {str(i): s / n for i, s in enumerate(sums)}


class _LogitsOnly(nn.Module):
    """curvlinops wants model(X) -> outputs and a loss on (outputs, y): shifted logits and next tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits[:, :-1].reshape(-1, self.model.config.vocab_size)


def curvlinops_kfac(model: nn.Module, batch: dict, fisher_type: str) -> None:
    from curvlinops import KFACLinearOperator

    weights = [layer.module.weight for layer in find_target_layers(model).values()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    data = [(batch["input_ids"], batch["input_ids"][:, 1:].reshape(-1))]
    op = KFACLinearOperator(
        _LogitsOnly(model), nn.CrossEntropyLoss(reduction="sum"), weights, data,
        fisher_type=fisher_type, kfac_approx="expand", check_deterministic=False,
        num_data=batch["input_ids"].shape[0], num_per_example_loss_terms=batch["input_ids"].shape[1] - 1,
    )
    op.compute_kronecker_factors()
    for p in model.parameters():
        p.requires_grad_(True)


def runner(name: str, model: nn.Module, batch: dict) -> Callable[[], object]:
    return {
        "plain": lambda: plain_step(model, batch),
        "diag_sample": lambda: estimate_diagonal_fisher(model, [batch], reduction="sample"),
        "diag_batch": lambda: estimate_diagonal_fisher(model, [batch], reduction="batch"),
        "naive_loop": lambda: naive_loop(model, batch),
        "kfac_mc": lambda: estimate_kfac(model, [batch], kind="sampled"),
        "kfac_empirical": lambda: estimate_kfac(model, [batch], kind="empirical"),
        "curvlinops_mc": lambda: curvlinops_kfac(model, batch, "mc"),
        "curvlinops_empirical": lambda: curvlinops_kfac(model, batch, "empirical"),
    }[name]


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_memory(name: str, batch_size: int, seq_len: int) -> None:
    """In a fresh process: peak RSS while running the method once (the peak of loading is reset first)."""
    model, tokenizer = load_default_model()
    batch = make_batch(tokenizer, batch_size, seq_len)
    before = rss_gb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark (Linux)
    runner(name, model, batch)()
    print(json.dumps({"method": name, "peak_gb": peak_rss_gb(), "before_gb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        measure_memory(args.measure_memory, args.batch_size, args.seq_len)
        return
    methods = args.methods.split(",")
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        print("curvlinops is not installed (make bench installs it); skipping its rows")
        methods = [m for m in methods if not m.startswith("curvlinops")]

    model, tokenizer = load_default_model()
    batch = make_batch(tokenizer, args.batch_size, args.seq_len)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for m in methods:
            fn = runner(m, model, batch)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ > 0:
                times[m].append(elapsed)
            print(f"round {round_} {m:22s} {elapsed:7.2f} s", flush=True)
    del model

    memory = {}
    for m in methods:
        cmd = [sys.executable, __file__, "--measure-memory", m, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[m] = json.loads(out)
        print(f"memory {m:22s} peak {memory[m]['peak_gb']:.2f} GB", flush=True)

    base = statistics.median(times["plain"])
    lines = [
        "# Curvature engine benchmark",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32), one batch of {args.batch_size} x {args.seq_len} tokens, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, {platform.machine()}. "
        f"Medians over {args.rounds} interleaved rounds after a warm-up round; ratios to the plain step. Peak memory: "
        "peak RSS of a fresh process while it runs the method once (model and batch included; the load's own peak "
        "is reset first), and its rise over the RSS just before the method.",
        "",
        "| method | what | median s | × plain | peak RSS GB | rise GB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    what = {
        "plain": "forward + backward, all weights trainable",
        "diag_sample": "hf_fisher diagonal Fisher, exact per-sequence",
        "diag_batch": "hf_fisher diagonal Fisher, squared batch gradient",
        "naive_loop": "per-sequence loop of 8 backward passes",
        "kfac_mc": "hf_fisher K-FAC expand, sampled labels",
        "kfac_empirical": "hf_fisher K-FAC expand, data labels",
        "curvlinops_mc": "curvlinops KFACLinearOperator, MC",
        "curvlinops_empirical": "curvlinops KFACLinearOperator, empirical",
    }
    for m in methods:
        med = statistics.median(times[m])
        mem = memory[m]
        lines.append(
            f"| {m} | {what[m]} | {med:.2f} | {med / base:.2f} | {mem['peak_gb']:.2f} | "
            f"{mem['peak_gb'] - mem['before_gb']:.2f} |"
        )
    lines += ["", "Raw timings (s): " + "; ".join(f"{m}: {', '.join(f'{t:.2f}' for t in times[m])}" for m in methods)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
