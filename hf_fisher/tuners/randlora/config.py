"""Configuration of the fast RandLoRA tuner: PEFT's ``RandLoraConfig`` plus the choice of contraction order."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field

from peft import RandLoraConfig

CONTRACTIONS = ("auto", "merged", "per_token")
BASES = ("random", "fisher")


class HfFisherPeftType(enum.StrEnum):
    """PEFT types registered by hf_fisher (a str enum like ``peft.PeftType``: transformers reads ``.value``)."""

    FAST_RANDLORA = "FAST_RANDLORA"


@dataclass
class FastRandLoraConfig(RandLoraConfig):
    """A ``RandLoraConfig`` whose adapters compute the same function as PEFT's RandLoRA, in the cheaper order.

    Every field of ``peft.RandLoraConfig`` keeps its meaning (same bases from ``projection_prng_key``, same
    ``randlora_alpha / r`` scaling), so a fast adapter and a PEFT RandLoRA adapter with equal weights give equal
    outputs. The bases are never stored per layer: with ``save_projection=False`` (the default here) they are
    regenerated from the seed on load; with ``True`` they are saved once per adapter.
    """

    save_projection: bool = field(
        default=False,
        metadata={
            "help": (
                "Save the shared random bases once in the adapter file (True) or regenerate them from "
                "projection_prng_key on load (False, the default: the bases come from a seeded CPU generator)."
            )
        },
    )
    contraction: str = field(
        default="auto",
        metadata={
            "help": (
                "How each adapted layer contracts the bases with its input: 'merged' builds the dense update once per "
                "forward and runs one matmul with W + ΔW (cost independent of the token count), 'per_token' applies "
                "the bases to every token (PEFT's order), 'auto' picks whichever needs fewer FLOPs for the batch."
            )
        },
    )

    basis: str = field(
        default="random",
        metadata={
            "help": (
                "'random': PEFT RandLoRA's bases (vanilla-compatible). 'fisher': the update diag(u) ΔW diag(v) with "
                "u, v the square-root row/column Fisher weights of each layer (set by initialize_fisher_basis); not "
                "PEFT's math, so such adapters load only with hf_fisher."
            )
        },
    )

    def __post_init__(self) -> None:
        with warnings.catch_warnings():
            # PEFT warns when the bases are not saved; ours are regenerated bit-exactly from a CPU generator.
            warnings.filterwarnings("ignore", message="Specified to not save basis_A")
            super().__post_init__()
        self.peft_type = HfFisherPeftType.FAST_RANDLORA
        if self.contraction not in CONTRACTIONS:
            raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {self.contraction!r}.")
        if self.contraction == "merged" and self.randlora_dropout > 0:
            raise ValueError(
                "contraction='merged' cannot apply randlora_dropout (dropout acts on the adapter's input only, which "
                "the dense W + ΔW form does not have). Use contraction='auto' (per-token while dropout is active) or "
                "randlora_dropout=0."
            )
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}.")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if self.sparse and self.very_sparse:
            raise ValueError("Choose at most one of sparse=True and very_sparse=True.")

    @classmethod
    def from_randlora(cls, config: RandLoraConfig, **overrides) -> FastRandLoraConfig:
        """The fast config equivalent to a PEFT ``RandLoraConfig`` (same bases, same scaling)."""
        if not isinstance(config, RandLoraConfig):
            raise TypeError(f"Expected a peft.RandLoraConfig, got {type(config).__name__}.")
        values = {name: getattr(config, name) for name in RandLoraConfig.__dataclass_fields__ if name != "peft_type"}
        for name in ("contraction",):
            if hasattr(config, name):
                values[name] = getattr(config, name)
        values.update(overrides)
        if isinstance(values.get("target_modules"), set):
            values["target_modules"] = sorted(values["target_modules"])
        return cls(**values)

    def to_randlora(self) -> RandLoraConfig:
        """PEFT's own ``RandLoraConfig`` with the same fields (what vanilla PEFT needs to rebuild this adapter)."""
        values = {name: getattr(self, name) for name in RandLoraConfig.__dataclass_fields__ if name != "peft_type"}
        if isinstance(values.get("target_modules"), set):
            values["target_modules"] = sorted(values["target_modules"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Specified to not save basis_A")
            return RandLoraConfig(**values)
