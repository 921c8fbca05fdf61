"""FisherTrainer and fisher_merge on the default model (SmolLM2-135M-Instruct), LoRA r=8 on all 7 projections.

Part 1 (forgetting). The model "knows" general English text (task A: lee_background). It is fine-tuned on
task B, new facts about fictitious people (chat-formatted QA, loss on the answers), with FisherTrainer:
plain (λ = 0), the diagonal EWC penalty on ΔW and the rank-1 penalty, each at 3 values of λ. The reference
Fisher is estimated on lee_background train. λ is calibrated from the plain run: with P₁ the penalty at
λ = 1 of the plain run's final adapter and ΔL its drop of the task-B loss, λ = c · ΔL / P₁ for c ∈ {0.1, 1, 10}
(the penalty would have cost c times the task-B gain). Reported: task-B loss (training facts, answers
only), general perplexity on held-out lee_background, and a trade-off plot.

Part 2 (merging). Two adapters: the plain task-B adapter of part 1 and one fine-tuned on Shakespeare (LM).
Each model's sampled-label Fisher (the paper's estimator) over its own task's data, N sequences, on the
base weights of the adapted layers. Merged by plain averaging and by Fisher merging (element-wise, exact
ΔW; with and without normalising each Fisher by its L2 norm), and as a rank-16 SVD and the exact
concatenated (layer-wise) adapter. Loss on both tasks and general perplexity; merge times measured
interleaved (plain, Fisher, plain, Fisher, ...).

Run: ``python benchmarks/fisher_trainer.py [--steps N] [--smoke]``; writes benchmarks/results/fisher_trainer.md
and fisher_trainer.png.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import gc
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_fisher import (  # noqa: E402
    FisherTrainer,
    FisherTrainingArguments,
    estimate_diagonal_fisher,
    fisher_merge,
    load_default_model,
)
from hf_fisher.curvature import estimate_rank_one_fisher  # noqa: E402
from hf_fisher.data import build_fictitious_facts, load_text_corpus, pack_for_causal_lm  # noqa: E402
from hf_fisher.data.facts import pad_collate  # noqa: E402
from hf_fisher.trainers import FisherPenalty  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TMP = Path(tempfile.gettempdir()) / "hf_fisher_bench_fisher_trainer"
LOADS: list[float] = []
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(model), config)


def base_layers(peft_model) -> list[str]:
    modules = peft_model.named_modules()
    return [n + ".base_layer" for n, m in modules if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@torch.no_grad()
def mean_loss(model, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / count


def rows(dataset) -> list[dict]:
    return [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in dataset]


def train(model, train_rows, collate, steps, lr, out, batch_size, fisher=None, penalty="none", lam=0.0):
    args = FisherTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 4),
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, fisher_penalty=penalty,
        fisher_lambda=lam, remove_unused_columns=False,
    )
    trainer = FisherTrainer(model=model, args=args, train_dataset=train_rows, data_collator=collate, fisher=fisher)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--smoke", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--part1-from-log", default=None,
                        help="take part 1's FisherTrainer rows from the log of an earlier run instead of rerunning")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    LOADS.append(os.getloadavg()[0])
    smoke = cli.smoke
    steps = 2 if smoke else cli.steps
    n_ref, n_eval, n_facts = (4, 4, 8) if smoke else (12, 8, 32)
    notes = []
    t0 = time.perf_counter()
    model, tokenizer = load_default_model()
    collate = functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id)
    lee = load_text_corpus("lee_background")
    shakespeare = load_text_corpus("shakespeare")

    def packed(ds, n):
        return pack_for_causal_lm(ds, tokenizer, seq_len=128, max_sequences=n)

    def loader(data, collate_fn=default_data_collator, batch_size=8):
        return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)

    lee_ref, lee_eval = packed(lee["train"], n_ref), loader(packed(lee["heldout"], n_eval))
    facts = build_fictitious_facts(tokenizer, n_people=20, seed=0, forget_fractions=(0.1,))["full"]
    facts_rows = rows(facts.select(range(n_facts)))
    facts_eval = loader(facts_rows, collate)
    shk_train = rows(packed(shakespeare["train"], 4 * steps))
    shk_eval = loader(packed(shakespeare["heldout"], n_eval))

    # ---------------------------------------------------------------- part 1: forgetting
    start_model = lora(model)
    before = {"task_b": mean_loss(start_model, facts_eval), "general": math.exp(mean_loss(start_model, lee_eval))}
    plain = lora(model)
    if cli.part1_from_log is None:
        t = time.perf_counter()
        diag = estimate_diagonal_fisher(start_model, loader(lee_ref), target_modules=base_layers(start_model),
                                        data_description="lee_background train")
        t_diag = time.perf_counter() - t
        t = time.perf_counter()
        rank1 = estimate_rank_one_fisher(start_model, loader(lee_ref), target_modules=base_layers(start_model),
                                         data_description="lee_background train")
        t_rank1 = time.perf_counter() - t
        notes.append(f"Reference Fisher on {n_ref} x 128 tokens of lee_background train: diagonal {t_diag:.0f} s, "
                     f"rank-1 {t_rank1:.0f} s (rank-1 scale = tr F = {rank1.scale:.3g}).")
        probes = {"diagonal": FisherPenalty(plain, diag, 1.0), "rank1": FisherPenalty(plain, rank1, 1.0)}
    del start_model
    trainer, seconds = train(plain, facts_rows, collate, steps, cli.lr, TMP / "plain", cli.batch_size)
    results = [("plain Trainer (λ = 0)", "-", "-", mean_loss(plain, facts_eval),
                math.exp(mean_loss(plain, lee_eval)), seconds / steps)]
    print(before, results[0], flush=True)
    gain = max(before["task_b"] - results[0][3], 1e-6)
    if cli.part1_from_log is None:
        p1 = {k: p.value() for k, p in probes.items()}
        notes.append(f"Calibration: task-B loss drop of the plain run ΔL = {gain:.3f}; penalty at λ = 1 of its "
                     f"adapter P₁ = {p1['diagonal']:.3g} (diagonal), {p1['rank1']:.3g} (rank-1).")
        for c in (0.1, 1.0, 10.0):
            for kind, fisher in (("diagonal", diag), ("rank1", rank1)):
                lam = c * gain / max(p1[kind], 1e-30)
                m = lora(model)
                trainer, seconds = train(m, facts_rows, collate, steps, cli.lr, TMP / "run", cli.batch_size, fisher,
                                         kind, lam)
                results.append((f"FisherTrainer {kind}", f"{c:g}", f"{lam:.3g}", mean_loss(m, facts_eval),
                                math.exp(mean_loss(m, lee_eval)), seconds / steps))
                print(results[-1], flush=True)
                del m, trainer
        del diag, rank1, probes
    else:  # the FisherTrainer rows of an earlier run of this script (same code and seeds), from its log
        logged = [ast.literal_eval(line) for line in Path(cli.part1_from_log).read_text().splitlines()
                  if line.startswith("('FisherTrainer")]
        results += logged
        notes.append(f"The six FisherTrainer rows come from a first full run of this script ({cli.part1_from_log}, "
                     "same code path, seeds and settings), which the OOM killer stopped in part 2 (the merge kept "
                     "too many model copies; fixed). This second run repeated the plain run (deterministic: same data "
                     "order and seeds) and part 2. λ = c · ΔL / P₁ as logged there.")
    gc.collect()
    facts_adapter = plain

    # ---------------------------------------------------------------- part 2: merging
    shk_adapter = lora(model)
    train(shk_adapter, shk_train, default_data_collator, steps, cli.lr, TMP / "shakespeare", 4)
    t = time.perf_counter()
    f_facts = estimate_diagonal_fisher(facts_adapter, loader(facts_rows, collate), kind="sampled",
                                       target_modules=base_layers(facts_adapter), seed=0)
    f_shk = estimate_diagonal_fisher(shk_adapter, loader(packed(shakespeare["train"], n_ref)), kind="sampled",
                                     target_modules=base_layers(shk_adapter), seed=0)
    t_merge_fisher = time.perf_counter() - t
    notes.append(f"Merging Fishers (sampled labels): task B on its {n_facts} training rows, Shakespeare on {n_ref} "
                 f"x 128 tokens; {t_merge_fisher:.0f} s for both.")
    adapters = [facts_adapter, shk_adapter]
    merges = {
        "plain average (ΔW)": dict(fishers=[None, None], lora_output="merged"),
        "Fisher merge (ΔW)": dict(fishers=[f_facts, f_shk], lora_output="merged"),
        "Fisher merge, normalised Fishers (ΔW)": dict(fishers=[f_facts, f_shk], lora_output="merged", normalize=True),
        "Fisher merge, SVD rank 16": dict(fishers=[f_facts, f_shk], lora_output="svd", lora_rank=16),
        "Fisher merge, concat rank 16 (layer-wise)": dict(fishers=[f_facts, f_shk], lora_output="concat"),
    }
    merge_rows = []
    for name, m in [("task-B adapter alone", facts_adapter), ("Shakespeare adapter alone", shk_adapter)]:
        merge_rows.append((name, mean_loss(m, facts_eval), mean_loss(m, shk_eval), math.exp(mean_loss(m, lee_eval)),
                           None))
    times: dict[str, list[float]] = {k: [] for k in merges}
    for _ in range(1 if smoke else 2):  # interleaved timing: plain, Fisher, ... repeated; results dropped at once
        for name, kwargs in merges.items():
            kwargs = dict(kwargs)
            fishers = kwargs.pop("fishers")
            t = time.perf_counter()
            merged = fisher_merge(adapters, fishers, **kwargs)
            times[name].append(time.perf_counter() - t)
            del merged
            gc.collect()
    for name, kwargs in merges.items():  # one model alive at a time for the evaluation
        kwargs = dict(kwargs)
        m = fisher_merge(adapters, kwargs.pop("fishers"), **kwargs)
        merge_rows.append((name, mean_loss(m, facts_eval), mean_loss(m, shk_eval), math.exp(mean_loss(m, lee_eval)),
                           min(times[name])))
        print(merge_rows[-1], flush=True)
        del m
        gc.collect()

    total = time.perf_counter() - t0
    write_results(cli, steps, n_ref, n_eval, n_facts, before, results, merge_rows, notes, total, smoke)


def write_results(cli, steps, n_ref, n_eval, n_facts, before, results, merge_rows, notes, total, smoke) -> None:
    out = (TMP / "fisher_trainer_smoke.md") if smoke else (RESULTS / "fisher_trainer.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# FisherTrainer and Fisher merging",
        "",
        f"Default model (SmolLM2-135M-Instruct, fp32), LoRA r=8 / alpha 16 on all 7 projections of every block, AdamW "
        f"lr {cli.lr:g} constant, batch {cli.batch_size}, {steps} steps per run (scaled down from a real fine-tune to "
        f"fit ~25 min of wall time on a 2-core machine shared with 3 other engineers; torch threads = 1; 1-min load "
        f"average {LOADS[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). "
        f"Task B: {n_facts} fictitious-facts QA rows (loss on answers, evaluated on the same rows). "
        f"General text: perplexity on {n_eval} x 128 held-out lee_background tokens. Whole run: {total / 60:.1f} min.",
        "",
        "## Part 1: forgetting (task B learned, general text kept)",
        "",
        f"Before fine-tuning: task-B loss {before['task_b']:.3f}, general perplexity {before['general']:.2f}.",
        "",
        "| trainer | c | λ | task-B loss ↓ | general ppl ↓ | s / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {c} | {lam} | {b:.3f} | {g:.2f} | {s:.2f} |" for n, c, lam, b, g, s in results]
    lines += ["", *[f"- {n}" for n in notes], "", "![trade-off](fisher_trainer.png)", "",
              "## Part 2: merging two LoRA adapters (task B facts + Shakespeare)", "",
              "| model | task-B loss ↓ | Shakespeare loss ↓ | general ppl ↓ | merge s (best of 2) |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {b:.3f} | {s:.3f} | {g:.2f} | {'-' if t is None else f'{t:.2f}'} |"
              for n, b, s, g, t in merge_rows]
    lines.append("")
    out.write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("plain", "o"), ("diagonal", "s"), ("rank1", "^")):
            pts = [(g, b) for n, _, _, b, g, _ in results if kind in n or (kind == "plain" and "plain" in n)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if kind != "plain" else "",
                    label=kind)
        ax.scatter([before["general"]], [before["task_b"]], marker="x", color="k", label="before fine-tuning")
        ax.set_xlabel("general perplexity (held-out lee_background) ↓")
        ax.set_ylabel("task-B loss ↓")
        ax.legend()
        ax.set_title("Forgetting trade-off (λ = c·ΔL/P₁, c ∈ {0.1, 1, 10})")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.read_text())


if __name__ == "__main__":
    main()
