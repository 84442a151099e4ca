"""MXFP4 as stored in the gpt-oss checkpoints (format spec section 3; OCP Microscaling v1.0).

Element: FP4 E2M1; scale: E8M0 (a power of two, bias 127) per block of 32 along the input axis.
Bytes: ``blocks`` [..., in/32, 16] u8, element 2j in the low nibble and 2j+1 in the high nibble;
``scales`` [..., in/32] u8. The quantizer follows OpenAI's Triton reference rule (spec 3.4): the scale
is amax/6 rounded *up* to a power of two, elements round to nearest with ties away from zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Format, FormatError, Packed, check_axis, check_finite
from .registry import register_format

BLOCK = 32
# E2M1 code -> value (spec 3.1 table); bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}: |v| >= midpoint -> next code
# (">=" implements ties away from zero).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_LUT_CACHE: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def fp4_lut(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (device, dtype)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return _LUT_CACHE[key]


def e2m1_encode(v: Tensor) -> Tensor:
    """Encode already-scaled values to E2M1 codes (u8 in 0..15), nearest, ties away from zero, saturating."""
    mags = v.abs()
    mid = torch.tensor(_MIDPOINTS, dtype=v.dtype, device=v.device)
    code = torch.bucketize(mags, mid, right=True).to(torch.uint8)  # number of midpoints <= |v|
    sign = (torch.signbit(v) & (code > 0)).to(torch.uint8) << 3   # -0.0 encodes as +0
    return code | sign


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., K] (K % 32 == 0) -> (blocks u8 [..., K/32, 16], scales u8 [..., K/32]).

    Work is done in fp32: every bf16/fp16 input is exactly representable there.
    """
    *lead, k = w.shape
    x = w.float().reshape(*lead, k // BLOCK, BLOCK)                  # [..., G, 32]
    amax = x.abs().amax(dim=-1)                                       # [..., G]
    # d = 2^ceil(log2(amax/6)) computed on the fp32 bit pattern exactly like the Triton reference.
    bits = (amax / 6.0).view(torch.int32)
    bits = (bits + 0x7FFFFF) & 0x7F800000
    biased = (bits >> 23).clamp(0, 254)                              # E8M0 scale byte (255 = NaN is never written)
    scale = torch.where(amax == 0, torch.zeros_like(biased), biased)
    # Divide by 2^(s-127) via ldexp so that s = 0 (2^-127, subnormal in fp32) stays exact.
    v = torch.ldexp(x, (127 - scale).unsqueeze(-1).to(torch.float32))
    codes = e2m1_encode(v)                                            # [..., G, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)               # [..., G, 16]
    return packed.contiguous(), scale.to(torch.uint8).contiguous()


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(blocks u8 [..., G, 16], scales u8 [..., G]) -> [..., G*32] in ``dtype`` (exact unless it overflows)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise FormatError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise FormatError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = fp4_lut(blocks.device, torch.float32)
    lo = lut[(blocks & 0x0F).long()]                                  # element 2j
    hi = lut[(blocks >> 4).long()]                                    # element 2j+1
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)                  # [..., G, 32]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    return vals.flatten(-2).to(dtype)                                 # [..., G*32]


@register_format("mxfp4")
@dataclass(frozen=True)
class MXFP4(Format):
    """MXFP4 with the gpt-oss byte layout; quantization axis = the input (contraction) axis."""

    name: str = "mxfp4"

    def quantize(self, w: Tensor, axis: int = -1) -> Packed:
        if w.dim() != 2:
            raise FormatError(f"mxfp4: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
        check_finite(w, "mxfp4 input")
        ax = check_axis(w, axis, BLOCK, "mxfp4 input")
        x = w if ax == 1 else w.t()
        blocks, scales = quantize_mxfp4(x)
        return Packed("mxfp4", {"blocks": blocks, "scales": scales}, tuple(x.shape), {"axis": 1, "block": BLOCK})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_mxfp4(p.tensors["blocks"], p.tensors["scales"], dtype)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = shape
        return out * (k // 2) + out * (k // BLOCK)
