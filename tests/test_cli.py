"""The hf-fisher command: the fast demo end to end, and clear errors for bad arguments."""

import pytest

from hf_fisher import DiagonalFisher
from hf_fisher.cli import main, per_block_summary


@pytest.mark.slow
def test_fast_demo_runs_and_saves(tmp_path, capsys):
    assert main(["demo", "--fast", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Where the Fisher mass sits" in out and str(tmp_path / "fisher") in out
    fisher = DiagonalFisher.from_pretrained(tmp_path / "fisher")
    assert len(fisher) == 30 * 7 and fisher.metadata.n_sequences == 8
    rows = per_block_summary(fisher)
    assert len(rows) == 30
    assert abs(sum(attn + mlp for _, attn, mlp, _ in rows) - 1.0) < 1e-6


def test_fisher_subcommand_errors_cleanly(tmp_path, capsys):
    code = main(["fisher", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert code != 0
    assert not (tmp_path / "out").exists()


def test_unknown_choice_is_rejected():
    with pytest.raises(SystemExit) as exc:
        main(["fisher", "--curvature", "full", "--output-dir", "x"])
    assert exc.value.code == 2


def test_compress_subcommand_with_plain_svd(tmp_path):
    import torch

    from hf_fisher import load_compressed_model
    from hf_fisher.compression import LowRankLinear
    from tests.helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "compressed"
    args = ["compress", "--model", str(tmp_path / "tiny"), "--ratio", "0.5", "--fisher", "none"]
    assert main([*args, "--output-dir", str(out)]) == 0
    model = load_compressed_model(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # An existing output folder is refused, and nothing is written.
    assert main([*args, "--output-dir", str(out)]) == 2
    assert main(["compress", "--model", str(tmp_path / "tiny"), "--output-dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
