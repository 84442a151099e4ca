"""MXFP4 as stored in the gpt-oss checkpoints.

Format: OCP Microscaling Formats (MX) v1.0, section 5.3.3 (FP4 E2M1 elements) and 5.4.1 (E8M0 scale),
https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf; the gpt-oss byte
layout is that of openai/gpt-oss ``gpt_oss/torch/weights.py`` and README "Precision format", and of
transformers ``integrations/mxfp4.py`` (``_convert_moe_packed_tensors``).

Element: FP4 E2M1; scale: E8M0 (a power of two, bias 127) per block of 32 along the input axis.
Bytes: ``blocks`` [..., in/32, 16] u8, element 2j in the low nibble and 2j+1 in the high nibble;
``scales`` [..., in/32] u8. The quantizer follows OpenAI's Triton reference rule (triton-lang/triton
``python/triton_kernels/triton_kernels/numerics_details/mxfp.py``, ``downcast_to_mxfp_torch``, ROUND_UP):
the scale is amax/6 rounded *up* to a power of two, elements round to nearest with ties away from zero.

Round trip (tested in tests/test_formats_mxfp4.py): for every block with scale byte >= 1 whose dequantized
values are finite, ``dequantize(quantize(dequantize(b, s)))`` reproduces the dequantized values exactly
(scale byte 0 = 2^-127 is the exception: its amax/6 rounds up to 2^-126 and halves the codes). The *bytes*
come back only for canonical blocks: scale byte in [1, 252], largest magnitude 4 or 6 (codes 6/7, so that
amax/6 rounds up to the same power of two) and no negative zero (code 8 re-encodes as +0); an all-zero
block re-encodes as scale byte 0 with all codes 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed, div, const, row_chunks
from .registry import register_format

BLOCK = 32
# E2M1 code -> value (OCP MX v1.0 section 5.3.3); bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}: |v| >= midpoint -> next code
# (">=" implements ties away from zero).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_LUT_CACHE: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}


def fp4_byte_lut(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """[256, 2]: byte -> (value of the low nibble, value of the high nibble); one gather per byte. The E2M1
    values are exact in fp32 and bf16."""
    key = ("byte", torch.device(device), dtype)
    if key not in _LUT_CACHE:
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        b = torch.arange(256)
        _LUT_CACHE[key] = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).to(device, dtype)  # [256, 2]
    return _LUT_CACHE[key]


def e2m1_encode(v: Tensor) -> Tensor:
    """Encode already-scaled values to E2M1 codes (u8 in 0..15), nearest, ties away from zero, saturating."""
    mags = v.abs()
    mid = const("e2m1_mid", _MIDPOINTS, v.device, v.dtype)
    code = torch.bucketize(mags, mid, right=True).to(torch.uint8)  # number of midpoints <= |v|
    sign = (torch.signbit(v) & (code > 0)).to(torch.uint8) << 3   # -0.0 encodes as +0
    return code | sign


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, K] (any float dtype) -> (blocks u8 [R, K/32, 16], scales u8 [R, K/32])."""
    r, k = x.shape
    x = x.float().contiguous().reshape(r, k // BLOCK, BLOCK)  # [R, G, 32]
    amax = x.abs().amax(dim=-1)                                       # [R, G]
    # d = 2^ceil(log2(amax/6)) computed on the fp32 bit pattern exactly like the Triton reference.
    bits = div(amax, 6.0).view(torch.int32)
    bits = (bits + 0x7FFFFF) & 0x7F800000
    biased = (bits >> 23).clamp(0, 254)                              # E8M0 scale byte (255 = NaN is never written)
    scale = torch.where(amax == 0, torch.zeros_like(biased), biased)  # [R, G]
    # Divide by 2^(s-127) via ldexp so that s = 0 (2^-127, subnormal in fp32) stays exact.
    v = torch.ldexp(x, (127 - scale).unsqueeze(-1).to(torch.float32))
    codes = e2m1_encode(v)                                            # [R, G, 32]
    # Overflow guard (deviation from the Triton rule only where it would produce inf): a block with
    # amax > 6 * 2^125 gets scale byte 253, and magnitude 4 * 2^126 = 2^128 is not a finite fp32.
    # Saturate such blocks at magnitude 3 (code 5; 1.5 = code 3 for byte 254, unreachable from finite fp32)
    # so that every dequantized value stays finite.
    cap = (7 - 2 * (scale - 252).clamp(0, 2)).to(torch.uint8).unsqueeze(-1)  # [R, G, 1]: 7, 5 (253), 3 (254)
    codes = torch.minimum(codes & 0x7, cap) | (codes & 0x8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)               # [R, G, 16]
    return packed, scale.to(torch.uint8)


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., K] (K % 32 == 0) -> (blocks u8 [..., K/32, 16], scales u8 [..., K/32]).

    Work is done in fp32 (every bf16/fp16 input is exactly representable there), in row chunks so that
    the temporaries stay bounded for a whole [E, out, in] expert tensor.
    """
    if w.dim() < 1 or w.shape[-1] % BLOCK != 0:
        raise FormatError(f"mxfp4: last dimension of {tuple(w.shape)} is not divisible by the block size {BLOCK}")
    *lead, k = w.shape
    x = w.reshape(-1, k)                                              # [R, K]
    blocks = torch.empty(x.shape[0], k // BLOCK, 16, dtype=torch.uint8, device=w.device)
    scales = torch.empty(x.shape[0], k // BLOCK, dtype=torch.uint8, device=w.device)
    for sl in row_chunks(x.shape[0], k):
        blocks[sl], scales[sl] = _quantize_rows(x[sl])
    return blocks.reshape(*lead, k // BLOCK, 16), scales.reshape(*lead, k // BLOCK)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(blocks u8 [..., G, 16], scales u8 [..., G]) -> [..., G*32] in ``dtype`` (exact unless it overflows)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise FormatError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise FormatError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *lead, g, _ = blocks.shape
    b = blocks.reshape(-1, g, 16)                                     # [R, G, 16]
    s = scales.reshape(-1, g)                                         # [R, G]
    out = torch.empty(b.shape[0], g * BLOCK, dtype=dtype, device=blocks.device)
    if dtype == torch.bfloat16 and blocks.is_cuda:                      # (on a CPU bf16 math is slower)
        return _dequantize_bf16(b, s, out).reshape(*lead, g * BLOCK)
    lut = fp4_byte_lut(blocks.device)                                 # [256, 2]
    for sl in row_chunks(b.shape[0], g * BLOCK):
        vals = lut[b[sl].long()].flatten(-2)                          # [r, G, 32]; low nibble = element 2j
        vals = torch.ldexp(vals, (s[sl].to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
        out[sl] = vals.flatten(-2).to(dtype)                          # [r, G*32]
    return out.reshape(*lead, g * BLOCK)


def _scale_table(device: torch.device) -> Tensor:
    """[256] bf16: E8M0 byte -> 2^(s-127) (byte 0 is the bf16 subnormal 2^-127; 255, NaN in E8M0, gives inf
    exactly as ``torch.ldexp`` does in the fp32 path)."""
    key = ("scale", torch.device(device), torch.bfloat16)
    if key not in _LUT_CACHE:
        e = torch.arange(256, dtype=torch.float32) - 127
        _LUT_CACHE[key] = torch.ldexp(torch.ones(256), e).to(torch.bfloat16).to(device)
    return _LUT_CACHE[key]


def _dequantize_bf16(b: Tensor, s: Tensor, out: Tensor) -> Tensor:
    """bf16 dequantization without fp32 intermediates: the E2M1 values and the power-of-two scales are exact
    in bf16, so one bf16 multiply (computed exactly, rounded once) gives the same bits as the fp32 path's
    ldexp followed by a cast. About 3x less memory traffic than the fp32 path, which matters when the
    reference forward dequantizes every expert of every layer (calibration at 20b size on a GPU)."""
    lut = fp4_byte_lut(b.device, torch.bfloat16)                      # [256, 2]
    stab = _scale_table(b.device)                                     # [256]
    g = b.shape[1]
    for sl in row_chunks(b.shape[0], g * BLOCK):
        vals = lut[b[sl].int()].flatten(-2)                           # [r, G, 32] bf16
        out[sl] = (vals * stab[s[sl].int()].unsqueeze(-1)).flatten(-2)
    return out


@register_format("mxfp4")
@dataclass(frozen=True)
class MXFP4(Format):
    """MXFP4 with the gpt-oss byte layout; quantization axis = the input (contraction) axis."""

    name: str = "mxfp4"

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, BLOCK, self.name, name)  # [out, in]
        blocks, scales = quantize_mxfp4(x)
        return Packed(self.name, {"blocks": blocks, "scales": scales}, tuple(x.shape), {"axis": 1, "block": BLOCK})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        check_packed(p, self.name, {"blocks": (torch.uint8, (out, k // BLOCK, 16)),
                                    "scales": (torch.uint8, (out, k // BLOCK))})
        return dequantize_mxfp4(p.tensors["blocks"], p.tensors["scales"], dtype)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        return out * (k // 2) + out * (k // BLOCK)

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[1] % BLOCK != 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not [out, in] with in divisible by {BLOCK}")
        return int(shape[0]), int(shape[1])
