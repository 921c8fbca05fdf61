"""The example scripts run as users run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fisher import DiagonalFisher, KFACFactors
from tests.helpers import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_estimate_fisher_example(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "examples/estimate_fisher.py"), "--output_dir", str(tmp_path / "fisher"),
        "--seq_len", "32", "--max_sequences", "4", "--per_device_batch_size", "2", "--use_cpu",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    fisher = DiagonalFisher.from_pretrained(tmp_path / "fisher")
    assert fisher.metadata.n_sequences == 4 and len(fisher) == 210
    assert "lee_background" in fisher.metadata.data_description


@pytest.mark.slow
@pytest.mark.multiprocess
def test_estimate_fisher_example_on_two_processes(tmp_path):
    stdout = launch_two_processes(
        str(ROOT / "examples/estimate_fisher.py"), "--output_dir", str(tmp_path / "kfac"), "--curvature", "kfac",
        "--kind", "sampled", "--seq_len", "32", "--max_sequences", "5", "--per_device_batch_size", "2", "--use_cpu",
    )
    assert "on 2 process(es)" in stdout
    factors = KFACFactors.from_pretrained(tmp_path / "kfac")
    # even_batches=False: 5 sequences over 2 processes are counted once each, none repeated.
    assert factors.metadata.n_sequences == 5 and factors.metadata.n_tokens == 5 * 31


UNLEARN_ARGS = ["--n_people", "10", "--per_device_train_batch_size", "2", "--max_steps", "2", "--use_cpu",
                "--report_to", "none", "--save_strategy", "no", "--forget_percent", "25"]


def test_unlearn_example_npo_with_gu_and_report(tmp_path, tiny_chat_model):
    cmd = [sys.executable, str(ROOT / "examples/unlearn.py"), "--model_name_or_path", str(tiny_chat_model),
           "--output_dir", str(tmp_path / "out"), "--unlearning_loss", "npo", "--projection", "gu", "--evaluate",
           "--eval_attacks", "quantization", "--eval_max_retain_rows", "4",
           *UNLEARN_ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UnlearningTrainer on 1 process(es)" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "report" / "unlearned.md").is_file()


@pytest.mark.multiprocess
def test_unlearn_example_kfade_on_two_processes(tmp_path, tiny_chat_model):
    stdout = launch_two_processes(
        str(ROOT / "examples/unlearn.py"), "--kfade", "--model_name_or_path", str(tiny_chat_model),
        "--output_dir", str(tmp_path / "out"), "--kfade_epsilon", "0.01", *UNLEARN_ARGS,
    )
    assert "KFADETrainer on 2 process(es)" in stdout
    assert (tmp_path / "out" / "unlearning_update" / "unlearning_update.safetensors").is_file()
