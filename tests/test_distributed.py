"""Two real processes (accelerate launch, CPU, gloo) give the same curvature as one process."""

import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from hf_fisher import DiagonalFisher, KFACFactors, estimate_diagonal_fisher, estimate_kfac
from tests.helpers import launch_two_processes, relative_error, tiny_llama
from tests.scripts.distributed_curvature import dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    launch_two_processes(str(ROOT / "tests/scripts/distributed_curvature.py"), str(tmp_path))
    assert json.loads((tmp_path / "world.json").read_text())["world_size"] == 2

    model = tiny_llama()
    loader = DataLoader(dataset(), batch_size=2, shuffle=False)
    fisher = estimate_diagonal_fisher(model, loader)
    factors = estimate_kfac(model, loader, kind="empirical")

    dist_fisher = DiagonalFisher.from_pretrained(tmp_path / "fisher", model=model)
    assert dist_fisher.metadata.n_sequences == fisher.metadata.n_sequences == 16
    assert dist_fisher.metadata.n_tokens == fisher.metadata.n_tokens
    for name in fisher:
        assert relative_error(dist_fisher[name], fisher[name]) <= 1e-5, name
    dist_factors = KFACFactors.from_pretrained(tmp_path / "kfac", model=model)
    for name, layer in factors.items():
        assert relative_error(dist_factors[name].A, layer.A) <= 1e-5, name
        assert relative_error(dist_factors[name].G, layer.G) <= 1e-5, name

    # A process without any batch: same factors as one process over the single batch.
    one = estimate_kfac(model, DataLoader(dataset()[:2], batch_size=2), kind="empirical")
    dist_one = KFACFactors.from_pretrained(tmp_path / "kfac_one", model=model)
    assert dist_one.metadata.n_sequences == 2
    for name, layer in one.items():
        assert relative_error(dist_one[name].A, layer.A) <= 1e-5, name
        assert relative_error(dist_one[name].G, layer.G) <= 1e-5, name
