"""Unlearning ground-truth benchmark on the default model and the generated fictitious-facts data.

1. The two reference models of one recipe (:mod:`hf_fisher.trainers.unlearning.recipe`): the target, fine-tuned
   on every trainable person, and the retain model, fine-tuned on the retain people only (cached on disk).
2. GradAscent, GradDiff, NPO and SimNPO (open-unlearning's defaults: lr 1e-5, AdamW, weight decay 0.01, effective
   batch 32, 10 epochs over the forget set) from the target, on the forget split, for several seeds; the Fisher
   methods: K-FADE (K-FAC and EK-FAC retain curvature, a few KL-budgeted steps), GradDiff / NPO / SimNPO with the GU
   projection, and SSD (retrain-free).
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_fisher.curvature import estimate_diagonal_fisher  # noqa: E402
from hf_fisher.data.facts import pad_collate  # noqa: E402
from hf_fisher.evaluation.unlearning import (  # noqa: E402
    SUMMARY_COLUMNS,
    attack_table,
    evaluate_unlearning,
    plot_forget_quality_vs_utility,
)
from hf_fisher.trainers.unlearning import (  # noqa: E402
    KFADEArguments,
    KFADETrainer,
    UnlearningArguments,
    UnlearningTrainer,
    apply_unlearning_update,
    selective_synaptic_dampening,
)
from hf_fisher.trainers.unlearning.recipe import FactsRecipe, make_reference_models  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BASELINES = ("grad_ascent", "grad_diff", "npo", "simnpo")
FISHER_METHODS = ("kfade", "kfade_ekfac", "grad_diff+gu", "npo+gu", "simnpo+gu", "ssd")


class TokenPassCounter:
    """Counts the compute of every model pass as token-pass equivalents, independent of machine load.

    A global forward hook on the token embeddings counts the (padded) tokens of each forward: 1 unit per token
    without autograd, 3 with it (forward + a backward of about twice its cost). The count covers every model in
    the process (the target copy, a reference model), so it compares methods' compute on one scale.
    """

    def __init__(self) -> None:
        self.units = 0
        self._handle = None

    def _hook(self, module, args, output) -> None:
        if isinstance(module, torch.nn.Embedding) and args and torch.is_tensor(args[0]):
            self.units += args[0].numel() * (3 if torch.is_grad_enabled() else 1)

    def __enter__(self) -> TokenPassCounter:
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def unlearn(method: str, target_dir: Path, data, recipe: FactsRecipe, seed: int, cli) -> tuple:
    """Unlearn the forget split from a fresh copy of the target.

    Returns (model, seconds, optimizer steps, token-pass units, K-FADE update or None).
    """
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    with TokenPassCounter() as counter:
        start = time.perf_counter()
        steps, update = _unlearn(model, method, data, recipe, seed, cli)
        seconds = time.perf_counter() - start
    return model.eval(), seconds, steps, counter.units, update


def _unlearn(model, method: str, data, recipe: FactsRecipe, seed: int, cli) -> tuple[int, dict | None]:
    forget, retain = data[recipe.forget_split], data[recipe.retain_split]
    if method == "ssd":
        fishers = [estimate_diagonal_fisher(model, loader_of(split, cli.batch_size), kind="empirical",
                                            reduction="batch") for split in (forget, retain)]
        selective_synaptic_dampening(model, fishers[0], fishers[1], alpha=cli.ssd_alpha, lam=cli.ssd_lam)
        return 0, None
    with tempfile.TemporaryDirectory(prefix="hf_fisher_unlearn_") as scratch:
        common = dict(output_dir=scratch, seed=seed, save_strategy="no", report_to="none", logging_steps=1,
                      use_cpu=True, disable_tqdm=True)
        if method.startswith("kfade"):
            # one step = the whole forget set (batch × accumulation ≥ forget rows)
            accumulation = math.ceil(len(forget) / cli.batch_size)
            args = KFADEArguments(**common, per_device_train_batch_size=cli.batch_size,
                                  gradient_accumulation_steps=accumulation, max_steps=cli.kfade_steps,
                                  kfade_epsilon=cli.kfade_epsilon, kfade_curvature_batches=cli.kfade_curvature_batches,
                                  kfade_curvature="ekfac" if method == "kfade_ekfac" else "kfac")
            trainer = KFADETrainer(model, args, forget_dataset=forget, retain_dataset=retain)
        else:
            loss, _, projection = method.partition("+")
            args = UnlearningArguments(
                **common, unlearning_loss=loss, projection=projection or "none", per_device_train_batch_size=8,
                gradient_accumulation_steps=4, num_train_epochs=cli.epochs, learning_rate=1e-5, weight_decay=0.01,
                warmup_steps=0.1)
            trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain)
        trainer.train()
        update = trainer.unlearning_update() if method.startswith("kfade") else None
        return trainer.state.global_step, update


def loader_of(split, batch_size: int) -> list:
    rows = [{k: split[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(split))]
    return [pad_collate(rows[i : i + batch_size], 0) for i in range(0, len(rows), batch_size)]


def strip(result: dict) -> dict:
    """The summary, attacks and timing of a result (per-row scores dropped to keep the JSON small)."""
    keep = ("name", "summary", "attacks", "seconds", "unlearning_seconds", "compute_units", "steps")
    return {k: result[k] for k in keep if k in result}


def _plain(value: Any) -> Any:
    """JSON fallback: numpy scalars and arrays as Python numbers and lists."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def load_previous(path: Path) -> dict[str, list[dict]]:
    """Results of an earlier run with the same --name (for --resume): {method: [stripped result per seed]}."""
    return json.loads(path.read_text()) if path.exists() else {}


def further_finetune(model, split, steps: int, learning_rate: float, batch_size: int, seed: int) -> None:
    """A few AdamW steps of plain fine-tuning (the model moves on after unlearning, before Δ is re-applied)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    for step in range(steps):
        idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        batch = pad_collate([{k: split[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in idx], 0)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def reapply_test(update: dict, unlearned, folders, data, recipe, tokenizer, evaluate, cli) -> dict:
    """K-FADE's re-apply test: Δ on the target reproduces the unlearned model; Δ after further fine-tuning."""
    model = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=torch.float32)
    apply_unlearning_update(model, update)
    unlearned_params = dict(unlearned.named_parameters())
    max_diff = max(float((p - unlearned_params[n]).abs().max()) for n, p in model.named_parameters())
    model = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=torch.float32)
    further_finetune(model, data[recipe.retain_split], cli.reapply_steps, cli.reapply_lr, 16, seed=0)
    finetuned = evaluate(model, "target+finetune")
    apply_unlearning_update(model, update)
    reapplied = evaluate(model, "target+finetune+Δ")
    return {"max_abs_diff_target_plus_update": max_diff, "finetuned": strip(finetuned),
            "reapplied": strip(reapplied)}


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    mean = float(np.mean(values))
    text = f"{mean:.3g}" if abs(mean) >= 1e-3 or mean == 0 else f"{mean:.2e}"
    if len(values) > 1:
        std = float(np.std(values))
        if std < 1e-9 * max(abs(mean), 1.0):  # equal up to float rounding
            std = 0.0
        text += f" ± {std:.2g}" if abs(std) >= 1e-3 or std == 0 else f" ± {std:.1e}"
    return text


def table(rows: dict[str, list[dict]]) -> str:
    """Mean ± std over seeds of every summary column, with unlearning wall time and compute."""
    head = ("| model | " + " | ".join(label for _, label in SUMMARY_COLUMNS)
            + " | unlearning time (s) | compute (M token-passes) |")
    lines = [head, "|" + "---|" * (len(SUMMARY_COLUMNS) + 3)]
    for name, results in rows.items():
        cells = [fmt([r["summary"].get(key) for r in results]) for key, _ in SUMMARY_COLUMNS]
        wall = fmt([r["unlearning_seconds"] for r in results if "unlearning_seconds" in r])
        units = fmt([r["compute_units"] / 1e6 for r in results if "compute_units" in r])
        lines.append(f"| {name} (n={len(results)}) | " + " | ".join(cells) + f" | {wall} | {units} |")
    return "\n".join(lines)


def reapply_section(extra: dict) -> str:
    """The K-FADE re-apply test as markdown (empty when it did not run)."""
    test = extra.get("reapply")
    if not test:
        return ""
    keys = ("forget_probability", "forget_rougeL_recall", "forget_truth_ratio", "forget_quality", "model_utility",
            "retain_kl")
    rows = {"target + fine-tuning": test["finetuned"], "target + fine-tuning + Δ (re-applied)": test["reapplied"]}
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, result in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt([result["summary"].get(k)]) for k in keys) + " |")
    return (f"""
## K-FADE re-apply test (seed 0)

Target + Δ (the saved unlearning update) against the unlearned model: max |difference| over all weights
{test['max_abs_diff_target_plus_update']:.2e}. Then the target was fine-tuned further ({test.get('steps', '')}
AdamW steps on retain questions) and the same Δ re-applied, without recomputing anything:

""" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_people", type=int, default=20,
                        help="fictitious people; 20 gives the target a forget quality of 2.7e-4 (< 1e-3)")
    parser.add_argument("--base_model", default="default", help="base model id/path (a tiny one for a smoke run)")
    parser.add_argument("--recipe_epochs", type=float, default=5.0)
    parser.add_argument("--recipe_lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=10.0, help="unlearning epochs over the forget set")
    parser.add_argument("--methods", nargs="*", default=list(BASELINES + FISHER_METHODS))
    parser.add_argument("--batch_size", type=int, default=16, help="K-FADE / SSD batch size")
    parser.add_argument("--kfade_steps", type=int, default=5)
    parser.add_argument("--kfade_epsilon", type=float, default=0.05, help="retain KL budget per step and token")
    parser.add_argument("--kfade_curvature_batches", type=int, default=None,
                        help="retain batches (of --batch_size rows) for K-FADE's curvature (default: all)")
    parser.add_argument("--sweep_epsilons", type=float, nargs="*", default=[],
                        help="also run K-FADE (seed 0, no attacks) at each of these budgets: the forget/retain-KL "
                             "frontier, compared with the baselines at equal forgetting")
    parser.add_argument("--ssd_alpha", type=float, default=10.0)
    parser.add_argument("--ssd_lam", type=float, default=1.0)
    parser.add_argument("--max_retain_rows", type=int, default=32, help="retain questions scored per model")
    parser.add_argument("--max_new_tokens", type=int, default=24,
                        help="greedy tokens generated for ROUGE-L (the longest answer has 19)")
    parser.add_argument("--reapply_steps", type=int, default=10,
                        help="fine-tuning steps before K-FADE's update is re-applied (0: skip the test)")
    parser.add_argument("--reapply_lr", type=float, default=5e-5)
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds already in <name>.json and run only the missing ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="unlearning", help="stem of the result files (<name>.md/.png/.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    recipe = FactsRecipe(base_model=args.base_model, n_people=args.n_people, epochs=args.recipe_epochs,
                         learning_rate=args.recipe_lr)
    t0 = time.perf_counter()
    folders = make_reference_models(recipe)
    recipe_seconds = time.perf_counter() - t0
    target = AutoModelForCausalLM.from_pretrained(folders["target"], dtype=torch.float32).eval()
    retain = AutoModelForCausalLM.from_pretrained(folders["retain"], dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["target"])
    data = recipe.build_data(tokenizer)
    common = dict(forget_split=recipe.forget_split, retain_split=recipe.retain_split,
                  max_retain_rows=args.max_retain_rows, max_new_tokens=args.max_new_tokens)

    previous = load_previous(out / f"{args.name}.json") if args.resume else {}
    extra: dict[str, Any] = dict(previous.get("_extra", [{}])[0]) if previous else {}
    if "retain_reference" in extra and "target" in previous and "retain" in previous:
        retain_reference = extra["retain_reference"]
        rows: dict[str, list[dict]] = {"target": previous["target"], "retain": previous["retain"]}
        print("target, retain: kept from the previous run", flush=True)
        for name, results in previous.items():  # methods not asked for this time stay in the tables as they were
            if name not in ("_extra", "target", "retain") and name not in args.methods:
                rows[name] = results
    else:
        # the retain model against itself: FQ 1 and PrivLeak 0 by definition; its attacks are the baseline
        retain_result = evaluate_unlearning(retain, data, tokenizer, original_model=target, name="retain", **common)
        retain_reference = {"summary": dict(retain_result["summary"]), "splits": retain_result["splits"]}
        extra["retain_reference"] = json.loads(json.dumps(retain_reference, default=_plain))
        retain_result["summary"]["forget_quality"] = 1.0
        target_result = evaluate_unlearning(target, data, tokenizer, retain_model=retain_reference,
                                            original_model=target, attacks=("quantization",), name="target",
                                            **common)
        rows = {"target": [target_result], "retain": [retain_result]}
    print(table(rows), flush=True)
    write(out, args, recipe, recipe_seconds, rows, extra)

    def evaluate(model, name: str, seed: int = 0, attacks=()) -> dict:
        return evaluate_unlearning(model, data, tokenizer, retain_model=retain_reference, original_model=target,
                                   attacks=attacks, name=name, seed=seed, **common)

    for method in args.methods:
        n_seeds = 1 if method == "ssd" else args.seeds  # SSD is deterministic
        kept = previous.get(method, [])[:n_seeds]
        if kept:
            rows[method] = list(kept)
            print(f"{method}: kept {len(kept)} seed(s) from the previous run", flush=True)
        for seed in range(len(kept), n_seeds):
            model, seconds, n_steps, units, update = unlearn(method, folders["target"], data, recipe, seed, args)
            if method.startswith("kfade"):  # the table's K-FADE rows were made with these settings
                extra["kfade_settings"] = {"steps": args.kfade_steps, "epsilon": args.kfade_epsilon,
                                           "curvature_batches": args.kfade_curvature_batches,
                                           "batch_size": args.batch_size}
            attacks = ("relearning", "quantization") if seed == 0 else ()
            result = evaluate(model, f"{method}-seed{seed}", seed, attacks)
            result.update(unlearning_seconds=seconds, compute_units=units, steps=n_steps)
            rows.setdefault(method, []).append(result)
            print(f"{method} seed {seed}: {seconds:.0f} s unlearning ({units / 1e6:.2f} M token-passes), "
                  f"{result['seconds']:.0f} s evaluation", flush=True)
            if method == "kfade" and seed == 0 and args.reapply_steps > 0:
                extra["reapply"] = reapply_test(update, model, folders, data, recipe, tokenizer, evaluate, args)
                extra["reapply"]["steps"] = f"{args.reapply_steps} (lr {args.reapply_lr:g}, batch 16)"
                print(f"re-apply test: {extra['reapply']['max_abs_diff_target_plus_update']:.2e} max |Δ| error",
                      flush=True)
            del model
            write(out, args, recipe, recipe_seconds, rows, extra)
    sweep = extra.setdefault("sweep", {})
    for epsilon in args.sweep_epsilons:
        key = sweep_key(epsilon, args)
        if key in sweep:
            print(f"sweep {key}: kept from the previous run", flush=True)
            continue
        point_args = argparse.Namespace(**{**vars(args), "kfade_epsilon": epsilon})
        model, seconds, n_steps, units, _ = unlearn("kfade", folders["target"], data, recipe, 0, point_args)
        result = evaluate(model, f"kfade-sweep-{key}")
        sweep[key] = {"epsilon": epsilon, "steps": args.kfade_steps, "curvature_batches": args.kfade_curvature_batches,
                      "batch_size": args.batch_size, "summary": result["summary"], "unlearning_seconds": seconds,
                      "compute_units": units}
        print(f"sweep {key}: forget p {result['summary']['forget_probability']:.3f}, retain KL "
              f"{result['summary']['retain_kl']:.3g}, {units / 1e6:.3f} M token-passes", flush=True)
        del model
        write(out, args, recipe, recipe_seconds, rows, extra)
    write(out, args, recipe, recipe_seconds, rows, extra)


def plot_frontier(rows: dict[str, list[dict]], extra: dict, path: Path) -> None:
    """Forget answer probability against retain KL: every method (mean over seeds) and the K-FADE sweep as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, results in rows.items():
        kl = [r["summary"].get("retain_kl") for r in results]
        if name == "target" or any(v is None or v <= 0 for v in kl):
            continue
        x, y = float(np.mean(kl)), float(np.mean([r["summary"]["forget_probability"] for r in results]))
        ax.scatter(x, y, s=36)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    groups: dict[tuple, list[dict]] = {}
    for point in (extra.get("sweep") or {}).values():
        groups.setdefault((point["steps"], point["curvature_batches"]), []).append(point)
    for (steps, _), points in sorted(groups.items(), key=str):
        points.sort(key=lambda p: p["epsilon"])
        xs = [max(p["summary"]["retain_kl"], 1e-6) for p in points]
        ys = [p["summary"]["forget_probability"] for p in points]
        ax.plot(xs, ys, "k.-", lw=1, label=f"K-FADE sweep, {steps} step(s)")
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"ε={p['epsilon']:g}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("retain KL to the target, nats per answer token (lower is better)")
    ax.set_ylabel("forget answer probability (lower = more forgotten)")
    if groups:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_key(epsilon: float, args) -> str:
    """Name of one K-FADE sweep point: every setting that changes it."""
    curvature = "all" if args.kfade_curvature_batches is None else args.kfade_curvature_batches * args.batch_size
    return f"eps={epsilon:g},steps={args.kfade_steps},curvature_rows={curvature}"


def sweep_section(rows: dict[str, list[dict]], extra: dict) -> str:
    """The K-FADE budget sweep as markdown, and each baseline against the sweep at equal or stronger forgetting."""
    sweep = extra.get("sweep") or {}
    if not sweep:
        return ""
    points = sorted(sweep.values(), key=lambda p: (p["steps"], str(p["curvature_batches"]), p["epsilon"]))
    keys = ("forget_probability", "forget_truth_ratio", "forget_quality", "model_utility", "retain_kl")
    lines = ["| ε (nats/token/step) | steps | curvature rows | " + " | ".join(keys)
             + " | compute (M token-passes) | time (s) |", "|" + "---|" * (len(keys) + 5)]
    for p in points:
        rows_used = "all" if p["curvature_batches"] is None else p["curvature_batches"] * p["batch_size"]
        lines.append(f"| {p['epsilon']:g} | {p['steps']} | {rows_used} | "
                     + " | ".join(fmt([p["summary"].get(k)]) for k in keys)
                     + f" | {p['compute_units'] / 1e6:.3f} | {p['unlearning_seconds']:.0f} |")
    matched = ["| baseline | its forget p | its FQ | its retain KL | its compute | lowest-KL K-FADE point with forget "
               "p ≤ it | with FQ ≥ it |", "|---|---|---|---|---|---|---|"]

    def best(ok, units: float) -> str:
        chosen = [p for p in points if ok(p["summary"])]
        if not chosen:
            return "none"
        p = min(chosen, key=lambda q: q["summary"]["retain_kl"])
        s = p["summary"]
        return (f"ε {p['epsilon']:g}: retain KL {s['retain_kl']:.3g}, MU {s['model_utility']:.3g}, "
                f"{p['compute_units'] / units:.2f}× its compute")

    for name in ("grad_ascent", "grad_diff", "npo", "simnpo"):
        if name not in rows:
            continue
        mean = {k: float(np.mean([r["summary"][k] for r in rows[name]]))
                for k in ("forget_probability", "forget_quality", "retain_kl")}
        units = float(np.mean([r["compute_units"] for r in rows[name]]))
        by_p = best(lambda s, m=mean: s["forget_probability"] <= m["forget_probability"], units)
        by_fq = best(lambda s, m=mean: s["forget_quality"] >= m["forget_quality"], units)
        matched.append(f"| {name} | {mean['forget_probability']:.3g} | {mean['forget_quality']:.3g} | "
                       f"{mean['retain_kl']:.3g} | {units / 1e6:.3f} M | {by_p} | {by_fq} |")
    return ("\n## K-FADE budget sweep (seed 0, no attacks)\n\nEach point is one K-FADE run from the target; compute "
            "counts the curvature pass, the steps and the backtracking probes.\n\n" + "\n".join(lines)
            + "\n\nK-FADE against each baseline at equal or stronger forgetting (baselines: means over seeds):\n\n"
            + "\n".join(matched) + "\n")


def ordered(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """References first, then the methods in the order of BASELINES and FISHER_METHODS, then any others."""
    order = ["target", "retain", *BASELINES, *FISHER_METHODS]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(rows.items(), key=lambda item: rank.get(item[0], len(order))))


PRIVACY_COLUMNS = (
    ("forget_exact_memorization", "forget EM"), ("mia_auc_loss", "AUC LOSS"), ("mia_auc_zlib", "AUC zlib"),
    ("mia_auc_min_k", "AUC Min-K%"), ("mia_auc_min_k_plus_plus", "AUC Min-K%++"), ("privleak_loss", "PrivLeak LOSS"),
    ("privleak_zlib", "PrivLeak zlib"), ("privleak_min_k", "PrivLeak Min-K%"),
    ("privleak_min_k_plus_plus", "PrivLeak Min-K%++"), ("retain_probability", "retain p"),
    ("retain_rougeL_recall", "retain ROUGE-L"), ("world_probability", "world p"),
    ("world_rougeL_recall", "world ROUGE-L"),
)


def privacy_table(rows: dict[str, list[dict]]) -> str:
    """Mean ± std over seeds of memorisation, every membership-inference AUC and PrivLeak, and utility parts."""
    lines = ["| model | " + " | ".join(label for _, label in PRIVACY_COLUMNS) + " |",
             "|" + "---|" * (len(PRIVACY_COLUMNS) + 1)]
    for name, results in rows.items():
        cells = [fmt([r["summary"].get(key) for r in results]) for key, _ in PRIVACY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, args, recipe, recipe_seconds, rows, extra) -> None:
    rows = ordered(rows)
    first = {name: results[0] for name, results in rows.items()}
    plot_forget_quality_vs_utility(
        {f"{name}-{i}": r for name, results in rows.items() for i, r in enumerate(results)}, out / f"{args.name}.png")
    plot_frontier(rows, extra, out / f"{args.name}_frontier.png")
    (out / f"{args.name}.json").write_text(json.dumps(
        {**{name: [strip(r) for r in results] for name, results in rows.items()}, "_extra": [extra]}, indent=1,
        default=str))
    steps = {name: results[0].get("steps", 0) for name, results in rows.items() if not name.startswith("kfade")}
    kfade = extra.get("kfade_settings") or {"steps": args.kfade_steps, "epsilon": args.kfade_epsilon,
                                             "curvature_batches": args.kfade_curvature_batches,
                                             "batch_size": args.batch_size}
    curvature_rows = ("all" if kfade["curvature_batches"] is None
                      else f"a seeded random {kfade['curvature_batches'] * kfade['batch_size']}")
    load_note = f" {extra['load_note']}" if extra.get("load_note") else ""
    relearning_steps = first.get("npo", first["target"]).get("attacks", {}).get("relearning", {}).get("steps", "—")
    model_name = "SmolLM2-135M-Instruct (the default model)" if recipe.base_model == "default" else recipe.base_model
    text = f"""# Unlearning benchmark on the fictitious-facts data

Base model {model_name}; data `build_fictitious_facts(n_people={recipe.n_people})`: forget split
`{recipe.forget_split}` ({len(extra['retain_reference']['splits']['forget']['per_row']['probability'])} questions),
retain `{recipe.retain_split}` (first {args.max_retain_rows} scored), holdout people for MIA, world facts for
utility. Reference models (one recipe, cached): full fine-tune, {recipe.epochs:g} epochs, lr {recipe.learning_rate:g},
batch {recipe.batch_size} — target on all trainable people, retain on the retain people only
({recipe_seconds:.0f} s to make or load both). Unlearning: open-unlearning defaults (lr 1e-5, AdamW, weight decay
0.01, effective batch 32 = 8 x 4 accumulation, {args.epochs:g} epochs over the forget set = {max(steps.values(),
default=0)} steps), seeds per method as n in the table; retain term = retain NLL (GradDiff, NPO: α = 1;
SimNPO: γ = 0.125).
"+gu": the same with the GU projection (history 8, retain-NLL gradients, Adam metric). K-FADE: {kfade['steps']}
step(s) over the whole forget set, ε = {kfade['epsilon']:g} nats per retain answer token and step, retain curvature
(K-FAC, sampled labels, every token) on {curvature_rows} retain rows, damping 0.1 × mean
eigenvalue, backtracking on a 16-row retain probe (wall time includes the curvature pass). SSD: empirical
batch-reduced diagonal Fishers of forget and retain sets, α = {args.ssd_alpha:g}, λ = {args.ssd_lam:g} (one run).
Machine: 2 CPU cores, torch threads {args.threads}. Wall times move with machine load; the compute column
(token-passes through the model) does not.{load_note}

FQ = forget quality (KS p-value vs the retain model, higher is better, 1 = retain model); MU = model utility
(harmonic mean of probability, ROUGE-L recall and truth-ratio score on retain and world facts; ROUGE-L on the
first {args.max_new_tokens} greedy tokens); forget TR =
mean min(R, 1/R); ES = extraction strength; PrivLeak on Min-K%++ (0 = like the retain model); retain KL =
KL(target ‖ model) per answer token on retain questions. Mean ± std over seeds.

{table(rows)}

Memorisation, membership inference (forget people = members, holdout people = non-members; AUC 0.5 = cannot
tell them apart) and PrivLeak of each attack (relative AUC gap to the retain model, 0 = like it), and the parts
of model utility:

{privacy_table(rows)}

## Attacks (first seed of each method)

Recovery = (m_attacked − m_unlearned) / (m_target − m_unlearned) on the forget set: 0 = nothing comes back,
1 = back to the target; a ratio to what was forgotten, so it means little for a method that forgot
almost nothing (its denominator is near 0). Relearning: {relearning_steps} AdamW steps (lr 1e-5, batch 8) on half
of the forget people, scored on the other half.

{attack_table(first)}
{reapply_section(extra)}{sweep_section(rows, extra)}
![forget quality vs model utility]({args.name}.png)

![forget probability vs retain KL]({args.name}_frontier.png)
"""
    (out / f"{args.name}.md").write_text(text)


if __name__ == "__main__":
    main()
