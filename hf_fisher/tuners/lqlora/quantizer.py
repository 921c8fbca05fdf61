"""NormalFloat-k quantizer with block-wise absmax scales, double quantization, padding and real bit packing.

A config ``(b, b₀, b₁, B₀, B₁)`` stores a matrix as

* element codes: ``b``-bit indices into the NormalFloat-b level table (NF4's construction generalised to
  2, 3, 4 and 8 bits), one per element of the row-major flattened, zero-padded matrix;
* first-level scales: the absmax of each block of ``B₀`` consecutive elements;
* second-level quantization of those scales: ``offset = min(scales)`` (one fp32 number per matrix) and
  ``(scale − offset)`` as unsigned ``b₀``-bit codes in groups of ``B₁`` scales, each group's max kept in
  ``b₁`` format (bf16, fp16 or fp32).

Codes are bit-packed into a ``uint8`` stream (8 codes in ``b`` bytes), so a 3-bit matrix really takes
3 bits per element; dequantization unpacks on the fly. The nominal cost is
``b + b₀/B₀ + b₁/(B₀·B₁)`` bits per parameter; :meth:`QuantizedTensor.storage_bits` counts every stored
bit of one matrix (padding, the offset, the packed bytes) for exact budgets.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ScaleDtype = Literal["bf16", "fp16", "fp32"]
SUPPORTED_BITS = (2, 3, 4, 8)
_SCALE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NF_OFFSET = 0.9677083
"""Quantile of the outermost NormalFloat level: bitsandbytes' NF4 constant, kept for every bit width."""


@dataclass(frozen=True)
class NFConfig:
    """One quantization configuration ``(bits, block_size, scale_bits, scale_block_size, scale_dtype)``.

    ``bits`` (b) per element in {2, 3, 4, 8}; ``block_size`` (B₀) elements share an absmax scale;
    ``scale_bits`` (b₀) per quantized scale in {2, 3, 4, 8}; ``scale_block_size`` (B₁) scales share one group
    max stored as ``scale_dtype`` (b₁).
    """

    bits: int = 4
    block_size: int = 64
    scale_bits: int = 8
    scale_block_size: int = 256
    scale_dtype: ScaleDtype = "fp32"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}.")
        if self.scale_bits not in SUPPORTED_BITS:
            raise ValueError(f"scale_bits must be one of {SUPPORTED_BITS}, got {self.scale_bits}.")
        for name in ("block_size", "scale_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}.")

    @property
    def nominal_bits_per_parameter(self) -> float:
        """``b + b₀/B₀ + b₁/(B₀·B₁)``: the asymptotic cost, ignoring padding and the per-matrix offset."""
        b1 = torch.finfo(_SCALE_DTYPES[self.scale_dtype]).bits
        return self.bits + self.scale_bits / self.block_size + b1 / (self.block_size * self.scale_block_size)

    def storage_bits(self, numel: int) -> int:
        """Exact number of bits :func:`nf_quantize` stores for a matrix of ``numel`` elements."""
        n_blocks = math.ceil(numel / self.block_size)
        n_groups = math.ceil(n_blocks / self.scale_block_size)
        b1 = torch.finfo(_SCALE_DTYPES[self.scale_dtype]).bits
        return (
            8 * _packed_nbytes(n_blocks * self.block_size, self.bits)
            + 8 * _packed_nbytes(n_blocks, self.scale_bits)
            + n_groups * b1
            + 32  # the fp32 offset
        )

    @property
    def name(self) -> str:
        """Short readable id, e.g. ``nf3-B64-s8x256-fp32``."""
        return f"nf{self.bits}-B{self.block_size}-s{self.scale_bits}x{self.scale_block_size}-{self.scale_dtype}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NFConfig:
        return cls(**data)


@functools.cache
def _levels_cached(bits: int) -> tuple[float, ...]:
    half = 2 ** (bits - 1)
    # 2^(b-1) positive levels and 2^(b-1) - 1 negative ones, from normal quantiles between NF_OFFSET and 1/2,
    # plus an exact zero; normalised into [-1, 1] (NF4's asymmetric construction, for any b).
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    levels = levels / levels.abs().max()
    return tuple(levels.tolist())


def nf_levels(bits: int) -> torch.Tensor:
    """The ``2^bits`` sorted NormalFloat levels in [−1, 1] (fp32); for ``bits=4`` these are NF4's."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}.")
    return torch.tensor(_levels_cached(bits), dtype=torch.float32)


def _packed_nbytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes / 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into a ``uint8`` stream: every 8 codes take ``bits`` bytes."""
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.to(torch.uint8)
    groups = flat.view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)  # at most 8 * 4 = 32 bits used
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n_codes`` codes as ``int64``."""
    data = packed.to(torch.int64)
    if bits == 8:
        return data[:n_codes]
    byte_shifts = torch.arange(bits, device=data.device, dtype=torch.int64) * 8
    words = (data.view(-1, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=data.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n_codes]


@dataclass
class QuantizedTensor:
    """A matrix stored by :func:`nf_quantize`: packed codes, packed scale codes, group maxima, offset."""

    shape: tuple[int, ...]
    config: NFConfig
    codes: torch.Tensor  # uint8, packed b-bit element codes (padded numel)
    scale_codes: torch.Tensor  # uint8, packed b0-bit codes of (scale - offset)
    group_scales: torch.Tensor  # one max per group of B1 scales, in the b1 dtype
    offset: torch.Tensor  # fp32 scalar: min of the first-level scales

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def storage_bits(self) -> int:
        """Every bit this object stores for the matrix (codes, scale codes, group maxima, offset)."""
        return (
            8 * self.codes.numel()
            + 8 * self.scale_codes.numel()
            + self.group_scales.numel() * self.group_scales.element_size() * 8
            + 32
        )

    @property
    def bits_per_parameter(self) -> float:
        return self.storage_bits() / self.numel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nf_dequantize(self, dtype=dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(
            self.shape, self.config, self.codes.to(device), self.scale_codes.to(device),
            self.group_scales.to(device), self.offset.to(device),
        )

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The stored tensors by name, for safetensors (shape and config go in the JSON metadata)."""
        return {
            f"{prefix}codes": self.codes,
            f"{prefix}scale_codes": self.scale_codes,
            f"{prefix}group_scales": self.group_scales,
            f"{prefix}offset": self.offset,
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], config: NFConfig, prefix: str = ""
    ) -> QuantizedTensor:
        return cls(
            tuple(shape), config, tensors[f"{prefix}codes"], tensors[f"{prefix}scale_codes"],
            tensors[f"{prefix}group_scales"], tensors[f"{prefix}offset"],
        )


def _nearest_level(ratio: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each ratio (ties to the lower level), by bisection on the midpoints."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(ratio, midpoints, right=False)


def _dequantized_scales(
    scale_codes: torch.Tensor, group_scales: torch.Tensor, offset: torch.Tensor, config: NFConfig, n_blocks: int
) -> torch.Tensor:
    top = (1 << config.scale_bits) - 1
    group_max = group_scales.float().repeat_interleave(config.scale_block_size)[:n_blocks]
    return offset.float() + scale_codes.float() / top * group_max


def nf_quantize(weight: torch.Tensor, config: NFConfig | None = None) -> QuantizedTensor:
    """Quantize ``weight`` (any shape, any float dtype; computed in fp32) with NormalFloat config ``config``."""
    config = config or NFConfig()
    if not weight.dtype.is_floating_point:
        raise ValueError(f"nf_quantize needs a floating-point tensor, got dtype {weight.dtype}.")
    if weight.numel() == 0:
        raise ValueError("nf_quantize got an empty tensor; there is nothing to quantize.")
    if not torch.isfinite(weight).all():
        raise ValueError("nf_quantize got NaN/Inf values; a quantized matrix needs finite weights.")
    w = weight.detach().reshape(-1).float()
    numel = w.numel()
    n_blocks = math.ceil(numel / config.block_size)
    pad = n_blocks * config.block_size - numel
    if pad:
        w = torch.cat([w, w.new_zeros(pad)])
    blocks = w.view(n_blocks, config.block_size)
    scales = blocks.abs().amax(dim=1)

    # Second level: offset, then (scale - offset) as unsigned b0-bit codes per group of B1 with a b1 group max.
    offset = scales.min()
    shifted = scales - offset
    n_groups = math.ceil(n_blocks / config.scale_block_size)
    gpad = n_groups * config.scale_block_size - n_blocks
    grouped = torch.cat([shifted, shifted.new_zeros(gpad)]).view(n_groups, config.scale_block_size)
    group_scales = grouped.amax(dim=1).to(_SCALE_DTYPES[config.scale_dtype])
    top = (1 << config.scale_bits) - 1
    gmax = group_scales.float().repeat_interleave(config.scale_block_size)[:n_blocks]
    safe = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    scale_codes = torch.where(gmax > 0, torch.round(shifted / safe * top), torch.zeros_like(shifted))
    scale_codes = scale_codes.clamp_(0, top).to(torch.int64)
    deq_scales = offset + scale_codes.float() / top * gmax

    # Element codes: nearest level of w / dequantized scale (a zero scale maps its block to the zero level).
    levels = nf_levels(config.bits).to(w.device)
    nonzero = deq_scales > 0
    ratio = blocks / torch.where(nonzero, deq_scales, torch.ones_like(deq_scales))[:, None]
    ratio = torch.where(nonzero[:, None], ratio, torch.zeros_like(ratio))
    codes = _nearest_level(ratio.reshape(-1), levels)
    return QuantizedTensor(
        shape=tuple(weight.shape),
        config=config,
        codes=pack_codes(codes, config.bits),
        scale_codes=pack_codes(scale_codes, config.scale_bits),
        group_scales=group_scales,
        offset=offset.reshape(()).to(torch.float32),
    )


BNB_NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes of bitsandbytes' 4-bit kernels: 4-bit configs with these blocks can use them."""


def bitsandbytes_compatible(config: NFConfig) -> bool:
    """Whether bitsandbytes' 4-bit kernel can dequantize matrices of this config (NF4, one of its block sizes)."""
    return config.bits == 4 and config.block_size in BNB_NF4_BLOCK_SIZES


@functools.cache
def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # not installed, or no binary for this platform: the PyTorch path serves
        return False
    return True


def _block_scales(quantized: QuantizedTensor) -> torch.Tensor:
    """The fp32 absmax scale of every block, from the double-quantized scale codes."""
    config = quantized.config
    n_blocks = math.ceil(quantized.numel / config.block_size)
    scale_codes = unpack_codes(quantized.scale_codes, config.scale_bits, n_blocks)
    return _dequantized_scales(scale_codes, quantized.group_scales, quantized.offset, config, n_blocks)


def nf4_dequantize_bitsandbytes(quantized: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`nf_dequantize` of a 4-bit matrix through bitsandbytes' ``dequantize_4bit`` kernel (same result).

    Our stream holds the first of each pair of codes in a byte's low nibble, bitsandbytes in the high one, so the
    bytes are nibble-swapped first (one elementwise pass); the double-quantized block scales are decoded here and
    passed as bitsandbytes' absmax. :func:`nf_dequantize` uses this on CUDA, where the kernel is faster.
    """
    import bitsandbytes.functional as bnbf

    config = quantized.config
    if not bitsandbytes_compatible(config):
        raise ValueError(
            f"bitsandbytes' kernel needs 4-bit codes in blocks of {BNB_NF4_BLOCK_SIZES}, got {config.name}; "
            "use nf_dequantize"
        )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # the kernel's output dtypes
        return nf4_dequantize_bitsandbytes(quantized).to(dtype)
    packed = quantized.codes[: (quantized.numel + 1) // 2]
    swapped = ((packed << 4) | (packed >> 4)).reshape(-1, 1)  # bitsandbytes' (bytes, 1) layout
    state = bnbf.QuantState(absmax=_block_scales(quantized).contiguous(), shape=torch.Size(quantized.shape),
                            blocksize=config.block_size, quant_type="nf4", dtype=dtype)
    return bnbf.dequantize_4bit(swapped, quant_state=state).reshape(quantized.shape)


def nf_dequantize(quantized: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the matrix from its packed codes and double-quantized scales (computed in fp32).

    4-bit matrices on CUDA go through bitsandbytes' kernel when it is installed (:func:`nf4_dequantize_bitsandbytes`);
    everything else through the PyTorch path below.
    """
    config = quantized.config
    if quantized.codes.is_cuda and bitsandbytes_compatible(config) and _bitsandbytes_available():
        return nf4_dequantize_bitsandbytes(quantized, dtype)
    numel = quantized.numel
    n_blocks = math.ceil(numel / config.block_size)
    scales = _block_scales(quantized)
    n_codes = n_blocks * config.block_size
    values = _level_values(quantized.codes, config.bits, n_codes).view(n_blocks, config.block_size)
    values = values * scales[:, None]
    return values.reshape(-1)[:numel].view(quantized.shape).to(dtype)


@functools.cache
def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 / bits) level values of the codes packed in each possible byte (bits 2, 4 and 8)."""
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int64)
    codes = torch.stack([(byte >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=1)
    return nf_levels(bits)[codes].to(device)


def _level_values(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Level values of the first ``n_codes`` packed codes; one table lookup per byte where codes align to bytes."""
    if bits in (2, 4, 8):
        return _byte_table(bits, packed.device)[packed.to(torch.int32)].reshape(-1)[:n_codes]
    levels = nf_levels(bits).to(packed.device)
    return levels[unpack_codes(packed, bits, n_codes)]
