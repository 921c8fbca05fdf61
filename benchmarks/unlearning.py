"""Unlearning ground-truth benchmark on the default model and the generated fictitious-facts data.

1. The two reference models of one recipe (:mod:`hf_fisher.trainers.unlearning.recipe`): the target, fine-tuned
   on every trainable person, and the retain model, fine-tuned on the retain people only (cached on disk).
2. GradAscent, GradDiff, NPO and SimNPO (open-unlearning's defaults: lr 1e-5, AdamW, weight decay 0.01, effective
   batch 32, 10 epochs over the forget set) from the target, on the forget split, for several seeds.
3. ``evaluate_unlearning`` of every model against the retain model (forget quality, model utility, truth ratio,
   probability, ROUGE-L, extraction strength, MIA / PrivLeak, retain KL to the target); the relearning and the
   NF4 / FP4 / int8 quantization attacks on the first seed of each method (and on the target and retain models).

Writes benchmarks/results/unlearning.md (mean ± std over seeds), unlearning.png (forget quality vs model utility)
and unlearning.json (summaries). Run: ``python benchmarks/unlearning.py [--seeds 3] [--n_people 100]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_fisher.evaluation.unlearning import (  # noqa: E402
    SUMMARY_COLUMNS,
    attack_table,
    evaluate_unlearning,
    plot_forget_quality_vs_utility,
)
from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer  # noqa: E402
from hf_fisher.trainers.unlearning.recipe import FactsRecipe, make_reference_models  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("grad_ascent", "grad_diff", "npo", "simnpo")


def unlearn(method: str, target_dir: Path, data, recipe: FactsRecipe, seed: int, epochs: float) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="hf_fisher_unlearn_") as scratch:
        args = UnlearningArguments(
            output_dir=scratch, unlearning_loss=method, per_device_train_batch_size=8, gradient_accumulation_steps=4,
            num_train_epochs=epochs, learning_rate=1e-5, weight_decay=0.01, warmup_steps=0.1 if epochs >= 1 else 0,
            seed=seed, save_strategy="no", report_to="none", logging_steps=1, use_cpu=True, disable_tqdm=True,
        )
        trainer = UnlearningTrainer(model, args, forget_dataset=data[recipe.forget_split],
                                    retain_dataset=data[recipe.retain_split])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return model.eval(), seconds, trainer.state.global_step


def strip(result: dict) -> dict:
    """The summary, attacks and timing of a result (per-row scores dropped to keep the JSON small)."""
    return {k: result[k] for k in ("name", "summary", "attacks", "seconds") if k in result}


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    mean = float(np.mean(values))
    text = f"{mean:.3g}" if abs(mean) >= 1e-3 or mean == 0 else f"{mean:.2e}"
    if len(values) > 1:
        std = float(np.std(values))
        text += f" ± {std:.2g}" if abs(std) >= 1e-3 or std == 0 else f" ± {std:.1e}"
    return text


def table(rows: dict[str, list[dict]], walls: dict[str, list[float]]) -> str:
    head = "| model | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " | unlearning time (s) |"
    lines = [head, "|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for name, results in rows.items():
        cells = [fmt([r["summary"].get(key) for r in results]) for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {name} (n={len(results)}) | " + " | ".join(cells) + f" | {fmt(walls.get(name, []))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_people", type=int, default=100)
    parser.add_argument("--recipe_epochs", type=float, default=5.0)
    parser.add_argument("--recipe_lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=10.0, help="unlearning epochs over the forget set")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--max_retain_rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    recipe = FactsRecipe(n_people=args.n_people, epochs=args.recipe_epochs, learning_rate=args.recipe_lr)
    t0 = time.perf_counter()
    folders = make_reference_models(recipe)
    recipe_seconds = time.perf_counter() - t0
    target = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=torch.float32).eval()
    retain = AutoModelForCausalLM.from_pretrained(folders["retain"], dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    data = recipe.build_data(tokenizer)
    common = dict(forget_split=recipe.forget_split, retain_split=recipe.retain_split,
                  max_retain_rows=args.max_retain_rows)

    # the retain model against itself: forget quality 1 and PrivLeak 0 by definition; its attacks are the baseline
    retain_result = evaluate_unlearning(retain, data, tokenizer, original_model=target, name="retain", **common)
    retain_reference = {"summary": dict(retain_result["summary"]), "splits": retain_result["splits"]}
    retain_result["summary"]["forget_quality"] = 1.0
    target_result = evaluate_unlearning(target, data, tokenizer, retain_model=retain_reference,
                                        original_model=target, attacks=("quantization",), name="target", **common)
    rows: dict[str, list[dict]] = {"target": [target_result], "retain": [retain_result]}
    walls: dict[str, list[float]] = {}
    steps: dict[str, int] = {}
    print(table(rows, walls), flush=True)
    for method in args.methods:
        for seed in range(args.seeds):
            model, seconds, n_steps = unlearn(method, folders["target"], data, recipe, seed, args.epochs)
            attacks = ("relearning", "quantization") if seed == 0 else ()
            result = evaluate_unlearning(model, data, tokenizer, retain_model=retain_reference, original_model=target,
                                         attacks=attacks, name=f"{method}-seed{seed}", seed=seed, **common)
            rows.setdefault(method, []).append(result)
            walls.setdefault(method, []).append(seconds)
            steps[method] = n_steps
            print(f"{method} seed {seed}: {seconds:.0f} s unlearning, {result['seconds']:.0f} s evaluation",
                  flush=True)
            del model
        write(out, args, recipe, folders, recipe_seconds, rows, walls, steps)
    write(out, args, recipe, folders, recipe_seconds, rows, walls, steps)


def write(out: Path, args, recipe, folders, recipe_seconds, rows, walls, steps) -> None:
    first = {name: results[0] for name, results in rows.items()}
    plot_forget_quality_vs_utility(
        {f"{name}-{i}": r for name, results in rows.items() for i, r in enumerate(results)}, out / "unlearning.png")
    (out / "unlearning.json").write_text(json.dumps(
        {name: [strip(r) for r in results] for name, results in rows.items()}, indent=1, default=str))
    text = f"""# Unlearning benchmark (ground truth: baselines on the fictitious-facts data)

Default model SmolLM2-135M-Instruct; data `build_fictitious_facts(n_people={recipe.n_people})`: forget split
`{recipe.forget_split}` ({len(rows['target'][0]['splits']['forget']['per_row']['probability'])} questions),
retain `{recipe.retain_split}` (first {args.max_retain_rows} scored), holdout people for MIA, world facts for
utility. Reference models (one recipe, cached): full fine-tune, {recipe.epochs:g} epochs, lr {recipe.learning_rate:g},
batch {recipe.batch_size} — target on all trainable people, retain on the retain people only
({recipe_seconds:.0f} s to make or load both). Unlearning: open-unlearning defaults (lr 1e-5, AdamW, weight decay
0.01, effective batch 32 = 8 x 4 accumulation, {args.epochs:g} epochs over the forget set = {max(steps.values(),
default=0)} steps), {args.seeds} seed(s) each; retain term = retain NLL (GradDiff, NPO: α = 1; SimNPO: γ = 0.125).
Machine: 2 CPU cores, torch threads {args.threads}; shared with other jobs while it ran, so times are indicative.

FQ = forget quality (KS p-value vs the retain model, higher is better, 1 = retain model); MU = model utility
(harmonic mean of probability, ROUGE-L recall and truth-ratio score on retain and world facts); forget TR =
mean min(R, 1/R); ES = extraction strength; PrivLeak on Min-K%++ (0 = like the retain model); retain KL =
KL(target ‖ model) per answer token on retain questions. Mean ± std over seeds.

{table(rows, walls)}

## Attacks (first seed of each method)

Recovery = (m_attacked − m_unlearned) / (m_target − m_unlearned) on the forget set: 0 = nothing comes back,
1 = back to the target. Relearning: {first.get('npo', first['target']).get('attacks', {}).get('relearning', {})
.get('steps', '—')} AdamW steps (lr 1e-5, batch 8) on half of the forget people, scored on the other half.

{attack_table(first)}

![forget quality vs model utility](unlearning.png)
"""
    (out / "unlearning.md").write_text(text)


if __name__ == "__main__":
    main()
