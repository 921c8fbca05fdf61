"""The main job end to end, on the embedded default model and the generated fictitious-facts data, offline.

1. estimate the diagonal Fisher of the model on the facts it is about to learn (answer tokens only);
2. fine-tune a LoRA initialised by the Fisher-weighted SVD of each weight (FWSVD) so the model learns the facts;
3. merge it and unlearn the forget people with K-FADE (a few retain-KL-budgeted Gauss-Newton steps preconditioned
   by K-FAC of the retain set); the full demo also runs NPO with the GU projection for comparison;
4. evaluate forget vs retain vs world facts before and after, including the 4-bit (NF4) quantization attack;
5. save the Fisher, the adapter (loads in vanilla PEFT), the unlearning update, model cards, a report and a plot.

``hf-fisher demo`` runs :func:`run_demo`; ``--fast`` is the few-minute version that CI runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline by design; PEFT's save probes the Hub otherwise

import torch  # noqa: E402

from hf_fisher.files import staged_folder  # noqa: E402

REPORT_KEYS = (
    ("forget_probability", "forget p"), ("forget_rougeL_recall", "forget ROUGE-L"),
    ("forget_truth_ratio", "forget TR"), ("retain_probability", "retain p"),
    ("retain_rougeL_recall", "retain ROUGE-L"), ("world_probability", "world p"), ("model_utility", "MU"),
    ("retain_kl", "retain KL"),
)
MARKER = "demo_report.json"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (``fast()`` for CI, ``full()`` for the ≤ 15-minute version)."""

    n_people: int = 20
    forget_percent: int = 10
    fisher_rows: int = 64
    lora_rank: int = 16
    lora_alpha: int = 32
    fwsvd_niter: int | None = 2  # randomized SVD for the FWSVD init (None: exact)
    finetune_epochs: float = 3.0
    finetune_lr: float = 1.5e-3
    batch_size: int = 16
    kfade_steps: int = 1
    kfade_epsilon: float = 0.05
    kfade_curvature_batches: int | None = 2
    kfade_target_modules: str | None = None
    kfade_probe_size: int = 16  # retain rows on which each K-FADE step's retain KL is measured (backtracking)
    gu_epochs: float = 0.0
    max_retain_rows: int = 24
    max_new_tokens: int = 32
    world_facts: bool = True
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(n_people=5, forget_percent=20, fisher_rows=16, kfade_curvature_batches=1, kfade_probe_size=8,
                   kfade_target_modules=r".*\.(mlp\.down_proj|self_attn\.o_proj)", max_retain_rows=8,
                   max_new_tokens=16, world_facts=False)

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(gu_epochs=3.0)


_START = [0.0]


def _log(step: str, text: str) -> None:
    print(f"[{step} {time.perf_counter() - _START[0]:5.0f} s] {text}", flush=True)


def _check_output(output_dir: Path) -> None:
    """Refuse to replace a folder that an earlier demo did not write."""
    if output_dir.exists() and not (output_dir / MARKER).is_file():
        raise FileExistsError(
            f"{output_dir} exists and is not an earlier demo's output; pass another --output-dir (nothing was "
            "overwritten)."
        )


def _fisher_loader(split, rows: int, batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    from hf_fisher.data.facts import pad_collate

    keys = ("input_ids", "attention_mask", "labels")
    picked = [{k: split[i][k] for k in keys} for i in range(min(rows, len(split)))]
    return [pad_collate(picked[i : i + batch_size], pad_id) for i in range(0, len(picked), batch_size)]


def _row(summary: dict[str, Any]) -> dict[str, float]:
    return {label: summary[key] for key, label in REPORT_KEYS if summary.get(key) is not None}


def _markdown_table(rows: dict[str, dict[str, float]]) -> str:
    columns = [label for _, label in REPORT_KEYS if any(label in r for r in rows.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        cells = [f"{row[c]:.3g}" if c in row else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    wanted = ["forget p", "forget ROUGE-L", "retain p", "retain ROUGE-L", "world p"]
    columns = [c for c in wanted if any(c in row for row in rows.values())]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(columns))
    for i, (name, row) in enumerate(rows.items()):
        ax.bar(x + i * width, [row.get(c, np.nan) for c in columns], width, label=name)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, columns)
    ax.set_ylim(0, 1)
    ax.set_ylabel("higher = knows it")
    ax.set_title("Learn the facts with FWSVD-LoRA, then unlearn the forget people")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(output_dir: str | os.PathLike = "hf_fisher_demo", *, fast: bool = False, model_name: str | None = None,
             settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the main job (see the module docstring), write everything to ``output_dir`` and return the report.

    Everything is written to a scratch folder first and moved to ``output_dir`` at the end, so an interrupted
    run leaves no half-written output; an existing ``output_dir`` is replaced only if an earlier demo wrote it.
    """
    _check_output(Path(output_dir))
    from peft import LoraConfig, get_peft_model

    from hf_fisher import build_fictitious_facts, estimate_diagonal_fisher, evaluate_unlearning, load_model
    from hf_fisher.trainers.unlearning import KFADEArguments, KFADETrainer
    from hf_fisher.trainers.unlearning.recipe import FactsRecipe, finetune_on_facts
    from hf_fisher.tuners.fwsvd import initialize_lora_fwsvd, save_fwsvd_adapter

    settings = settings or (DemoSettings.fast() if fast else DemoSettings.full())
    out = Path(output_dir)
    started = _START[0] = time.perf_counter()
    with staged_folder(out, replace=True) as scratch:  # _check_output: only an earlier demo's folder is replaced
        torch.manual_seed(settings.seed)
        _log("1/6", f"Loading {model_name or 'the default model (SmolLM2-135M-Instruct, offline)'} and "
                    f"{settings.n_people} fictitious people ...")
        model, tokenizer = load_model(model_name)
        model_id = model_name or getattr(model.config, "_name_or_path", "") or "default"
        data = build_fictitious_facts(tokenizer, n_people=settings.n_people, seed=settings.seed,
                                      forget_fractions=(settings.forget_percent / 100,))
        forget_split = f"forget{settings.forget_percent:02d}"
        retain_split = f"retain{100 - settings.forget_percent:02d}"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        _log("1/6", f"{len(data['full'])} training questions ({len(data[forget_split])} to forget later), "
                    f"{len(data['holdout'])} holdout, {len(data['world_facts'])} world facts")

        def evaluate(m, name: str, attacks=(), original=None) -> dict[str, Any]:
            return evaluate_unlearning(
                m, data, tokenizer, original_model=original, forget_split=forget_split, retain_split=retain_split,
                world_split="world_facts" if settings.world_facts else None, attacks=attacks,
                quantization_modes=("nf4",), max_retain_rows=settings.max_retain_rows,
                max_new_tokens=settings.max_new_tokens, seed=settings.seed, name=name)

        results: dict[str, dict[str, Any]] = {}
        results["base model"] = evaluate(model.eval(), "base")

        _log("2/6", f"Estimating the diagonal Fisher on {settings.fisher_rows} training questions (answer tokens)")
        loader = _fisher_loader(data["full"], settings.fisher_rows, settings.batch_size, pad_id)
        fisher = estimate_diagonal_fisher(model, loader, kind="empirical", reduction="sample",
                                          data_description=f"{settings.fisher_rows} fictitious-facts questions")
        fisher.save_pretrained(scratch / "fisher")

        _log("3/6", f"Fine-tuning a rank-{settings.lora_rank} LoRA initialised by FWSVD, "
                    f"{settings.finetune_epochs:g} epochs")
        lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        initialize_lora_fwsvd(peft_model, fisher, niter=settings.fwsvd_niter)
        peft_model.save_pretrained(str(scratch / "adapter_initial"))
        recipe = FactsRecipe(n_people=settings.n_people, epochs=settings.finetune_epochs,
                             learning_rate=settings.finetune_lr, batch_size=settings.batch_size, seed=settings.seed)
        with tempfile.TemporaryDirectory(prefix="hf_fisher_demo_train_") as train_dir:
            finetune_on_facts(peft_model, tokenizer, data["full"], recipe, train_dir)
        results["fine-tuned (FWSVD-LoRA)"] = evaluate(peft_model.eval(), "fine-tuned")
        rows = {name: _row(r["summary"]) for name, r in results.items()}
        save_fwsvd_adapter(
            peft_model, scratch / "adapter", scratch / "adapter_initial", base_model=model_id, metrics=rows,
            training={"data": f"build_fictitious_facts(n_people={settings.n_people}), 'full' split",
                      "epochs": settings.finetune_epochs, "learning_rate": settings.finetune_lr,
                      "batch_size": settings.batch_size,
                      "fisher": f"empirical diagonal Fisher of {settings.fisher_rows} questions"})
        shutil.rmtree(scratch / "adapter_initial")
        target = peft_model.merge_and_unload().eval().requires_grad_(True)  # PEFT left the base frozen

        _log("4/6", f"Unlearning the forget people with K-FADE ({settings.kfade_steps} steps, "
                    f"retain-KL budget {settings.kfade_epsilon:g} nats/token per step)")
        unlearned = copy.deepcopy(target)
        forget, retain = data[forget_split], data[retain_split]
        accumulation = -(-len(forget) // settings.batch_size)
        with tempfile.TemporaryDirectory(prefix="hf_fisher_demo_unlearn_") as unlearn_dir:
            args = KFADEArguments(output_dir=unlearn_dir, per_device_train_batch_size=settings.batch_size,
                                  gradient_accumulation_steps=accumulation, max_steps=settings.kfade_steps,
                                  kfade_epsilon=settings.kfade_epsilon, seed=settings.seed, save_strategy="no",
                                  kfade_curvature_batches=settings.kfade_curvature_batches,
                                  kfade_target_modules=settings.kfade_target_modules,
                                  kfade_probe_size=settings.kfade_probe_size,
                                  report_to="none", logging_steps=1, use_cpu=not torch.cuda.is_available(),
                                  disable_tqdm=True)
            trainer = KFADETrainer(unlearned, args, forget_dataset=forget, retain_dataset=retain)
            trainer.train()
        kfade_seconds = trainer.state.log_history[-1].get("train_runtime")
        _log("5/6", "Evaluating forget vs retain, and the 4-bit (NF4) quantization attack")
        results["K-FADE"] = evaluate(unlearned.eval(), "k-fade", attacks=("quantization",), original=target)
        attacked = results["K-FADE"]["attacks"]["quantization_nf4"]["forget"]
        rows["K-FADE"] = _row(results["K-FADE"]["summary"])
        rows["K-FADE, reloaded in 4-bit NF4"] = {"forget p": attacked["probability"],
                                                 "forget ROUGE-L": attacked["rougeL_recall"]}
        trainer.save_unlearning_update(
            scratch / "unlearning_update",
            metrics={k: rows[k] for k in ("fine-tuned (FWSVD-LoRA)", "K-FADE", "K-FADE, reloaded in 4-bit NF4")},
            forget_description=f"the {forget_split} people of build_fictitious_facts(n_people={settings.n_people}); "
                               "the update applies to the base model with the FWSVD-LoRA adapter merged")

        if settings.gu_epochs > 0:
            from hf_fisher.trainers.unlearning import UnlearningArguments, UnlearningTrainer

            _log("4b/6", f"Unlearning with NPO + GU projection ({settings.gu_epochs:g} epochs) for comparison")
            gu_model = copy.deepcopy(target)
            with tempfile.TemporaryDirectory(prefix="hf_fisher_demo_gu_") as gu_dir:
                gu_args = UnlearningArguments(
                    output_dir=gu_dir, unlearning_loss="npo", projection="gu", per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, num_train_epochs=settings.gu_epochs, learning_rate=2e-5,
                    seed=settings.seed, save_strategy="no", report_to="none", logging_steps=5,
                    use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
                UnlearningTrainer(gu_model, gu_args, forget_dataset=forget, retain_dataset=retain).train()
            results["NPO + GU"] = evaluate(gu_model.eval(), "npo+gu", original=target)
            rows["NPO + GU"] = _row(results["NPO + GU"]["summary"])

        _log("6/6", "Writing the report and the plot")
        _plot(rows, scratch / "demo_report.png")
        report = {"settings": dataclasses.asdict(settings), "model": model_id, "rows": rows,
                  "kfade_seconds": kfade_seconds, "seconds": time.perf_counter() - started,
                  "results": {name: {k: r[k] for k in ("summary", "attacks") if k in r} for name, r in
                              results.items()}}
        (scratch / MARKER).write_text(json.dumps(report, indent=1, default=str))
        (scratch / "demo_report.md").write_text(
            "# hf_fisher demo\n\n" + _markdown_table(rows) + "\n\n![report](demo_report.png)\n")
    print()
    print(_markdown_table(rows))
    print()
    print(f"Done in {report['seconds']:.0f} s. Written to {out}/:")
    for item, what in (("fisher/", "diagonal Fisher (safetensors + card)"),
                       ("adapter/", "FWSVD-LoRA adapter, loads with vanilla PEFT on the base model"),
                       ("unlearning_update/", "K-FADE update; hf_fisher.apply_unlearning_update(model, folder)"),
                       ("demo_report.md / .png / .json", "the table above and a plot")):
        print(f"  {item:32s} {what}")
    return report
