"""Saving, loading and publishing curvature estimates: safetensors plus a JSON metadata file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "curvature_config.json"

T = TypeVar("T")


def library_version() -> str:
    from hf_fisher import __version__

    return __version__


def model_name_or_path(model: nn.Module) -> str | None:
    """The name a model was loaded from (Hub id or folder), if it knows it."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


@dataclass
class CurvatureMetadata:
    """What a curvature estimate is: its type, how it was computed and on what."""

    curvature_type: str  # "diagonal_fisher" or "kfac"
    kind: str  # "empirical" or "sampled"
    n_sequences: int
    n_tokens: int
    normalization: str
    model_name_or_path: str | None = None
    data_description: str | None = None
    reduction: str | None = None  # diagonal Fisher: "sample" or "batch"
    kfac_type: str | None = None  # K-FAC: "expand" or "reduce"
    model_dtype: str | None = None
    seed: int | None = None
    library_version: str = field(default_factory=library_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvatureMetadata:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def save_curvature(
    save_directory: str | os.PathLike, filename: str, tensors: dict[str, torch.Tensor], metadata: CurvatureMetadata
) -> Path:
    """Write ``tensors`` and ``metadata`` into ``save_directory`` atomically (temp files, then rename)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp_tensors = Path(f.name)
    save_file(contiguous, str(tmp_tensors), metadata={"format": "pt", "curvature_type": metadata.curvature_type})
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as f:
        f.write(metadata.to_json())
        tmp_config = Path(f.name)
    os.replace(tmp_tensors, out / filename)
    os.replace(tmp_config, out / CONFIG_NAME)
    from hf_fisher.cards import fisher_card, write_card

    write_card(fisher_card(metadata, filename), out)
    return out


def load_curvature(
    directory: str | os.PathLike, filename: str, expected_type: str
) -> tuple[dict[str, torch.Tensor], CurvatureMetadata]:
    """Read what :func:`save_curvature` wrote, checking that it is the expected curvature type."""
    folder = Path(directory)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {str(folder)!r}: not a saved curvature estimate. Save one with "
            "`.save_pretrained(directory)` first."
        )
    metadata = CurvatureMetadata.from_dict(json.loads(config_path.read_text()))
    if metadata.curvature_type != expected_type:
        raise ValueError(
            f"{str(folder)!r} holds a {metadata.curvature_type!r} estimate, not {expected_type!r}; load it "
            "with the matching class (DiagonalFisher or KFACFactors)."
        )
    return load_file(str(folder / filename)), metadata


def check_shapes_against_model(
    expected: dict[str, tuple[int, ...]], model: nn.Module, metadata: CurvatureMetadata, what: str
) -> None:
    """Raise if ``model`` lacks a named tensor of the estimate, or has it with another shape."""
    params = dict(model.named_parameters())
    missing = [name for name in expected if name not in params]
    mismatched = [
        f"{name}: estimate {tuple(shape)} vs model {tuple(params[name].shape)}"
        for name, shape in expected.items()
        if name in params and tuple(params[name].shape) != tuple(shape)
    ]
    if missing or mismatched:
        problems = "; ".join(
            ([f"missing in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else [])
            + ([f"shape mismatch: {mismatched[:5]}"] if mismatched else [])
        )
        raise ValueError(
            f"This {what} does not fit the model ({problems}). It was estimated on "
            f"{metadata.model_name_or_path or 'an unnamed model'}; estimate it again on this model, or load "
            "the model it was made for."
        )


class CurvatureEstimate(Mapping[str, T], Generic[T]):
    """A curvature estimate: entries keyed by parameter or module name, plus provenance metadata."""

    ENTRY = "entry"  # what one entry is, for error messages

    def __init__(self, entries: Mapping[str, T], metadata: CurvatureMetadata):
        self._entries = dict(entries)
        self.metadata = metadata

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"No {self.ENTRY} for {name!r}; this estimate covers {len(self)} such as {list(self._entries)[:3]}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        m = self.metadata
        method = f"reduction={m.reduction!r}" if m.reduction else f"kfac_type={m.kfac_type!r}"
        return (
            f"{type(self).__name__}({len(self)} entries, kind={m.kind!r}, {method}, n_sequences={m.n_sequences}, "
            f"n_tokens={m.n_tokens}, model={m.model_name_or_path!r})"
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        raise NotImplementedError

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
        """Save into a temporary folder (card included) and upload it to a Hub model repo (created if needed)."""
        from hf_fisher.hub import publish

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return publish(tmp, repo_id, token=token, private=bool(private),
                           commit_message=f"Upload {type(self).__name__}")


class TensorCurvatureEstimate(CurvatureEstimate[torch.Tensor]):
    """An estimate holding one tensor per parameter name: shared validation, saving and loading."""

    LABEL = "curvature estimate"

    def validate(self, model: nn.Module) -> None:
        """Raise if ``model`` lacks a parameter of this estimate or has it with another shape."""
        check_shapes_against_model({k: tuple(v.shape) for k, v in self.items()}, model, self.metadata, self.LABEL)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``FILENAME`` (safetensors) and ``curvature_config.json`` into the folder."""
        save_curvature(save_directory, self.FILENAME, self._entries, self.metadata)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | None = None,
                        device: str | torch.device = "cpu"):
        """Load a saved estimate; with ``model`` given, check that it fits that model."""
        tensors, metadata = load_curvature(directory, cls.FILENAME, cls.CURVATURE_TYPE)
        estimate = cls({k: v.to(device) for k, v in tensors.items()}, metadata)
        if model is not None:
            estimate.validate(model)
        return estimate

