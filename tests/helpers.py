"""Builders for tiny models and batches used across the test suite."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 96) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 96) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def make_batches(
    n_sequences: int, batch_size: int, seq_len: int, vocab: int, seed: int, pad_right: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Random sequences with a prompt (labels -100), an answer, and right padding of random length."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (n_sequences, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for i in range(n_sequences):
        prompt = int(torch.randint(1, seq_len // 2, (1,), generator=g))
        pad = int(torch.randint(0, seq_len // 3, (1,), generator=g)) if i % 2 else 0
        labels[i, :prompt] = -100
        if pad:
            attention_mask[i, seq_len - pad :] = 0
            labels[i, seq_len - pad :] = -100
            input_ids[i, seq_len - pad :] = 0
    return [
        {
            "input_ids": input_ids[s : s + batch_size],
            "attention_mask": attention_mask[s : s + batch_size],
            "labels": labels[s : s + batch_size],
        }
        for s in range(0, n_sequences, batch_size)
    ]


def sequence_nll(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed NLL of one batch's supervised tokens, through the model's own loss (mean × count)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    n = int((labels[:, 1:] != -100).sum())
    return out.loss * n


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """‖got − reference‖ / ‖reference‖ in fp64: the tolerance measure for fp32 accumulations."""
    reference = reference.double()
    return float((got.double() - reference).norm() / reference.norm())


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free right now, so that concurrent two-process tests do not collide on a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_two_processes(script: str, *args: str) -> str:
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo); returns stdout.

    `accelerate launch --cpu --num_processes 2` would silently start only one process, so callers must check
    that the script saw a world size of 2.
    """
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), script, *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def qa_rows(n: int, seed: int, vocab: int = 96) -> list[dict[str, list[int]]]:
    """Tokenized rows of varying length: a prompt (labels -100) then an answer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        answer = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(1, vocab, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pad_rows(rows, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors of tokenized rows (the library's pad_collate, imported lazily)."""
    from hf_fisher.data.facts import pad_collate

    return pad_collate(rows, pad_token_id)
