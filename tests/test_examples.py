"""The example scripts run as users run them."""

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
