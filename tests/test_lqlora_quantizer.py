"""NF-k quantizer: levels, nearest-level codes, error bound, exact bits accounting, packing, odd shapes."""

import math

import pytest
import torch

from hf_fisher import nf_dequantize, nf_quantize
from hf_fisher.tuners.lqlora.quantizer import NFConfig, nf_levels, pack_codes, unpack_codes


def test_nf4_levels_match_bitsandbytes():
    import bitsandbytes.functional as bnbf

    reference = bnbf.get_4bit_type("nf4", device="cpu").float()
    torch.testing.assert_close(nf_levels(4), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_are_sorted_in_unit_interval_with_exact_zero(bits):
    levels = nf_levels(bits)
    assert levels.numel() == 2**bits
    assert (levels[1:] > levels[:-1]).all()
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    # 2^(b-1) positive levels, 2^(b-1) - 1 negative ones.
    assert int((levels > 0).sum()) == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trips_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 1000):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(n / 8) * bits  # really b bits per code
        torch.testing.assert_close(unpack_codes(packed, bits, n), codes)


CONFIGS = [
    NFConfig(4, 64, 8, 256, "fp32"),
    NFConfig(3, 64, 8, 256, "fp32"),
    NFConfig(2, 16, 3, 16, "bf16"),
    NFConfig(8, 32, 4, 64, "fp16"),
]


def _reference_dequantize(w: torch.Tensor, config: NFConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-line reference: per-block scales, double-quantized, then brute-force nearest level."""
    flat = w.reshape(-1).double()
    n_blocks = math.ceil(flat.numel() / config.block_size)
    flat = torch.cat([flat, flat.new_zeros(n_blocks * config.block_size - flat.numel())])
    blocks = flat.view(n_blocks, -1)
    absmax = blocks.abs().amax(1)
    offset = absmax.min()
    top = 2**config.scale_bits - 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.scale_dtype]
    scales = torch.empty_like(absmax)
    for start in range(0, n_blocks, config.scale_block_size):
        part = absmax[start : start + config.scale_block_size] - offset
        gmax = float(part.max().float().to(dtype).double())
        codes = torch.round(part / gmax * top).clamp(0, top) if gmax > 0 else torch.zeros_like(part)
        scales[start : start + config.scale_block_size] = offset + codes / top * gmax
    levels = nf_levels(config.bits).double()
    ratio = blocks / scales[:, None]
    idx = (ratio[..., None] - levels).abs().argmin(-1)
    near_tie = ((ratio[..., None] - (levels[1:] + levels[:-1]) / 2).abs().amin(-1) < 1e-5).reshape(-1)
    deq = (levels[idx] * scales[:, None]).reshape(-1)[: w.numel()].view(w.shape)
    return deq, scales, near_tie[: w.numel()].view(w.shape)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1, 7), (33, 5)])
def test_quantize_matches_reference_and_error_bound(config, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    q = nf_quantize(w, config)
    deq = nf_dequantize(q)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    reference, scales, near_tie = _reference_dequantize(w, config)
    # fp32 vs fp64 may pick the other level only where the ratio sits on a midpoint between two levels.
    differs = ~torch.isclose(deq.double(), reference, atol=1e-6, rtol=1e-5)
    assert not (differs & ~near_tie).any()
    assert int(differs.sum()) <= 2
    # Error bound: half the widest level gap times the (dequantized) block scale, plus any clipping excess.
    levels = nf_levels(config.bits).double()
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    per_elem_scale = scales.repeat_interleave(config.block_size)[: w.numel()].view(shape)
    bound = half_gap * per_elem_scale + (w.double().abs() - per_elem_scale).clamp(min=0)
    assert ((deq.double() - w.double()).abs() <= bound + 1e-6).all()


def test_bits_per_parameter_against_hand_count():
    # NF4 (8-bit scales in groups of 256, fp32 group max), 576 x 576 = 331776 elements = 5184 blocks of 64.
    config = NFConfig(4, 64, 8, 256, "fp32")
    assert config.nominal_bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))  # 4.127
    q = nf_quantize(torch.randn(576, 576), config)
    groups = math.ceil(5184 / 256)  # 21 (the last one padded)
    expected = 331776 * 4 + 5184 * 8 + groups * 32 + 32
    assert q.storage_bits() == expected == config.storage_bits(576 * 576)
    assert q.codes.numel() * 8 == 331776 * 4  # the codes really take 4 bits each
    # 1 x 7 with NF3: padded to one block of 64 -> 24 bytes of codes; one 8-bit scale code -> 1 byte (padded to 8
    # codes -> 8 bytes for 8-bit); one fp16 group max; the offset.
    config = NFConfig(3, 64, 8, 16, "fp16")
    q = nf_quantize(torch.randn(1, 7), config)
    assert q.storage_bits() == 64 * 3 + 8 * 8 + 16 + 32 == config.storage_bits(7)
    assert q.bits_per_parameter == pytest.approx(q.storage_bits() / 7)


def test_quantization_is_real_and_deterministic():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    q = nf_quantize(w, NFConfig(3, 32, 8, 16))
    assert all(t.dtype == torch.uint8 for t in (q.codes, q.scale_codes))
    assert sum(t.numel() * t.element_size() for t in q.tensors().values()) * 8 == q.storage_bits()
    torch.testing.assert_close(nf_dequantize(nf_quantize(w, q.config)), nf_dequantize(q), atol=0, rtol=0)
    # Quantizing a dequantized matrix again is a fixed point up to the rescaling of the scales.
    assert (nf_dequantize(nf_quantize(nf_dequantize(q), q.config)) - nf_dequantize(q)).abs().max() < 1e-2


def test_zero_and_constant_blocks():
    w = torch.zeros(4, 16)
    w[2, 3] = 0.5
    deq = nf_dequantize(nf_quantize(w, NFConfig(2, 16, 2, 2)))
    assert torch.isfinite(deq).all()
    torch.testing.assert_close(deq, w)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        NFConfig(bits=5)
    with pytest.raises(ValueError, match="scale_dtype"):
        NFConfig(scale_dtype="fp8")
    with pytest.raises(ValueError, match="block_size"):
        NFConfig(block_size=0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        nf_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        nf_quantize(torch.ones(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("shape", [(96, 80), (1, 7), (33, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_kernel_path_equals_the_pytorch_path(block, shape, dtype):
    """The CUDA fast path (nibble-swapped codes + decoded scales into bitsandbytes' dequantize_4bit), run here
    through bitsandbytes' CPU backend, rebuilds the same matrix as our own dequantization; odd sizes included."""
    from hf_fisher.tuners.lqlora.quantizer import nf4_dequantize_bitsandbytes

    w = torch.randn(shape, generator=torch.Generator().manual_seed(block + shape[0]))
    q = nf_quantize(w, NFConfig(4, block, 8, 16, "bf16"))
    want = nf_dequantize(q, dtype)
    got = nf4_dequantize_bitsandbytes(q, dtype)
    assert got.shape == want.shape and got.dtype == dtype
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)  # bf16: one rounding of the product
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    with pytest.raises(ValueError, match="4-bit codes"):
        nf4_dequantize_bitsandbytes(nf_quantize(w, NFConfig(3, 64)))
