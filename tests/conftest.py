"""Shared fixtures: tiny models built from configs and tiny token batches (no Hub, no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import make_batches, tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture
def batches():
    return make_batches(n_sequences=6, batch_size=3, seq_len=10, vocab=96, seed=1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny Llama with the default model's tokenizer (chat template), saved as a normal HF folder."""
    from transformers import AutoTokenizer

    from hf_fisher.models import default_model_dir, load_default_model
    from tests.helpers import tiny_llama

    if not (default_model_dir() / "tokenizer.json").is_file():
        load_default_model()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    folder = tmp_path_factory.mktemp("tiny-chat")
    tiny_llama(seed=0, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
