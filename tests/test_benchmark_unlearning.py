"""Smoke test of benchmarks/unlearning.py on a tiny model: every section is written, and --resume keeps what ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_FISHER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "unlearning.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_unlearning_benchmark_runs_and_resumes_on_a_tiny_model(tmp_path, tiny_chat_model):
    out = tmp_path / "results"
    common = ["--base_model", str(tiny_chat_model), "--n_people", "10", "--recipe_epochs", "1", "--seeds", "1",
              "--epochs", "1", "--kfade_steps", "1", "--kfade_curvature_batches", "1", "--max_retain_rows", "6",
              "--max_new_tokens", "4", "--reapply_steps", "1", "--threads", "1", "--out", str(out)]
    _run(common + ["--methods", "grad_diff", "kfade", "--sweep_epsilons", "0.05"], tmp_path)
    first = json.loads((out / "unlearning.json").read_text())
    assert {"target", "retain", "grad_diff", "kfade"} <= set(first)
    assert first["grad_diff"][0]["compute_units"] > 0 and "relearning" in first["grad_diff"][0]["attacks"]
    extra = first["_extra"][0]
    assert extra["reapply"]["max_abs_diff_target_plus_update"] < 1e-5  # target + saved Δ = the unlearned model
    assert list(extra["sweep"]) == ["eps=0.05,steps=1,curvature_rows=16"]
    text = (out / "unlearning.md").read_text()
    for section in ("| grad_diff (n=1) |", "AUC zlib", "## Attacks", "## K-FADE re-apply test",
                    "## K-FADE budget sweep", "| grad_diff | "):
        assert section in text, section
    assert (out / "unlearning.png").stat().st_size > 0 and (out / "unlearning_frontier.png").stat().st_size > 0

    log = _run(common + ["--resume", "--methods", "grad_diff", "--sweep_epsilons", "0.05", "0.5"], tmp_path)
    assert "target, retain: kept" in log and "grad_diff: kept 1 seed(s)" in log and "sweep eps=0.05" in log
    second = json.loads((out / "unlearning.json").read_text())
    assert second["grad_diff"] == first["grad_diff"]  # kept, not re-run
    assert second["kfade"] == first["kfade"]  # not asked for this time: kept as it was
    assert list(second["_extra"][0]["sweep"]) == ["eps=0.05,steps=1,curvature_rows=16",
                                                  "eps=0.5,steps=1,curvature_rows=16"]
