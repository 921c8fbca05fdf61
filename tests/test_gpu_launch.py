"""FSDP and DeepSpeed launches of the examples. They need CUDA: accelerate's FSDP plugin refuses to start without
an accelerator device ("There are currently no available devices found"), even with use_cpu, and DeepSpeed needs
CUDA kernels. Skipped here; run them on any CUDA machine (`pytest -m gpu`)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _launch(config: str, script: str, *args: str, mixed_precision: str = "bf16") -> str:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    n = torch.cuda.device_count()
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "examples/accelerate_configs" / config),
           "--num_processes", str(n), "--mixed_precision", mixed_precision, "--main_process_port", str(free_port()),
           str(ROOT / script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"on {n} process(es)" in result.stdout
    return result.stdout


def _finetune_args(model, out) -> list[str]:
    return ["--method", "lora", "--model_name_or_path", str(model), "--output_dir", str(out), "--n_people", "10",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--rank", "4", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--report_to", "none"]


def _loads_in_vanilla_peft(base, adapter) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_finetune_example_under_fsdp(tmp_path, tiny_chat_model):
    _launch("fsdp.yaml", "examples/finetune.py", *_finetune_args(tiny_chat_model, tmp_path / "fsdp"))
    assert (tmp_path / "fsdp" / "adapter_model.safetensors").is_file()
    _loads_in_vanilla_peft(tiny_chat_model, tmp_path / "fsdp")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_finetune_example_under_deepspeed_zero2(tmp_path, tiny_chat_model):
    _launch("deepspeed_zero2.yaml", "examples/finetune.py", *_finetune_args(tiny_chat_model, tmp_path / "ds"))
    assert (tmp_path / "ds" / "adapter_model.safetensors").is_file()
    _loads_in_vanilla_peft(tiny_chat_model, tmp_path / "ds")


def test_estimate_fisher_example_under_fsdp(tmp_path, tiny_chat_model):
    """The example keeps a whole model per process (the curvature engine reads whole weights and does not wrap the
    model), so an FSDP launch shards the data only; the estimate must equal the one-process estimate."""
    from hf_fisher import DiagonalFisher

    common = ["--model_name_or_path", str(tiny_chat_model), "--seq_len", "32", "--max_sequences", "4",
              "--per_device_batch_size", "2"]
    _launch("fsdp.yaml", "examples/estimate_fisher.py", "--output_dir", str(tmp_path / "fsdp"), *common,
            mixed_precision="no")  # fp32 like the one-process run
    single = subprocess.run([sys.executable, str(ROOT / "examples/estimate_fisher.py"), "--output_dir",
                             str(tmp_path / "one"), *common], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    sharded, one = DiagonalFisher.from_pretrained(tmp_path / "fsdp"), DiagonalFisher.from_pretrained(tmp_path / "one")
    assert sharded.metadata.n_sequences == one.metadata.n_sequences == 4
    for name in one:
        torch.testing.assert_close(sharded[name].float(), one[name].float(), rtol=1e-3, atol=1e-8)
