"""NVFP4: FP4 E2M1 elements, an FP8 E4M3 scale per 16 elements, one fp32 scale per tensor.

Reference: NVIDIA's NVFP4 definition ("Introducing NVFP4 for Efficient and Accurate Low-Precision
Inference", https://developer.nvidia.com/blog/introducing-nvfp4-for-efficient-and-accurate-low-precision-inference/)
as implemented by NVIDIA TensorRT Model Optimizer (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``,
``NVFP4QTensor``); the same numbers as compressed-tensors' ``nvfp4-pack-quantized``. Two-level scaling:

    global_scale = amax(W) / (6 * 448)                       # fp32, per tensor (= per expert)
    scale_b      = fp8_e4m3(amax(block_b) / (6 * global_scale))  # RNE, <= 448
    q            = e2m1_rne(W / (scale_b * global_scale))    # ties to even, saturating at 6
    W           ~= e2m1(q) * scale_b * global_scale

Convention: we store ``global_scale`` *multiplicatively* (ModelOpt's ``weight_scale_2``: W ~= q * s * g),
the same direction as every other scale in mxq (W ~= q * scale). compressed-tensors stores the reciprocal
(``weight_global_scale = 6 * 448 / amax`` and divides); an exporter writes ``1 / global_scale``.
Bytes: ``packed`` u8 [out, in/2] (element 2j in the low nibble, as MXFP4 and ModelOpt),
``scales`` float8_e4m3fn [out, in/16], ``global_scale`` f32 [].

Degenerate inputs (where ModelOpt would divide by zero): an all-zero tensor gets global_scale 1; an
all-zero block gets scale 1 (as ModelOpt); a non-zero block whose scale underflows fp8 gets the smallest
fp8 subnormal 2^-9 instead of 0, so no element is ever divided by zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed, div, const, row_chunks
from .mxfp4 import fp4_byte_lut
from .registry import register_format

BLOCK = 16
FP8_MAX = 448.0
FP4_MAX = 6.0
_FP8_MIN_SUBNORMAL = 2.0 ** -9
# E2M1 magnitude boundaries; a value exactly on a boundary goes to the neighbour with an even code
# (round-to-nearest-even, as the hardware cvt.rn.satfinite.e2m1x2 and ModelOpt's _cast_fp4).
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (0.75, 1.75, 3.5)  # boundaries whose upper neighbour has the even code


def e2m1_encode_rne(v: Tensor) -> Tensor:
    """Scaled fp32 values -> E2M1 codes u8 (nearest, ties to even, saturating; sign bit set for v < 0)."""
    mags = v.abs()
    bounds = const("e2m1_bounds", _BOUNDS, v.device, v.dtype)
    code = torch.bucketize(mags, bounds)                                   # boundaries < |v| (ties low)
    tie_up = (mags == _TIES_UP[0]) | (mags == _TIES_UP[1]) | (mags == _TIES_UP[2])
    code = (code + tie_up.to(code.dtype)).to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def global_scale_of(amax: Tensor) -> Tensor:
    """amax / (6 * 448) as fp32 scalar; 1 for an all-zero tensor, never 0 for a non-zero one."""
    g = div(amax.float(), FP4_MAX * FP8_MAX)
    tiny = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps  # 2^-149
    return torch.where(amax == 0, torch.ones_like(g), g.clamp(min=tiny))


def _quantize_rows(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, K], g f32 [] -> (packed u8 [R, K/2], scales f8e4m3 [R, K/16])."""
    r, k = x.shape
    xb = x.float().contiguous().reshape(r, k // BLOCK, BLOCK)  # [R, K/16, 16]
    bamax = xb.abs().amax(dim=-1)                                           # [R, K/16]
    s = (bamax / (FP4_MAX * g)).clamp(max=FP8_MAX)
    s8 = s.to(torch.float8_e4m3fn)                                          # RNE to E4M3
    s8 = torch.where(bamax == 0, torch.ones_like(s8), s8)                   # ModelOpt: zero block -> 1
    s8 = torch.where((s8.float() == 0) & (bamax > 0), torch.full_like(s8, _FP8_MIN_SUBNORMAL), s8)
    denom = (s8.float() * g).unsqueeze(-1)                                  # [R, K/16, 1]
    v = torch.where(denom > 0, xb / denom, torch.zeros_like(xb))
    codes = e2m1_encode_rne(v).reshape(r, k)                                # [R, K]
    return codes[:, 0::2] | (codes[:, 1::2] << 4), s8


@register_format("nvfp4")
@dataclass(frozen=True)
class NVFP4(Format):
    """NVFP4 (block 16, E4M3 block scales, fp32 per-tensor scale) along the contraction axis."""

    name: str = "nvfp4"

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, BLOCK, self.name, name)  # [out, in]
        out, k = x.shape
        g = global_scale_of(x.abs().amax())                                 # f32 []
        packed = torch.empty(out, k // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(out, k // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
        for sl in row_chunks(out, k):
            packed[sl], scales[sl] = _quantize_rows(x[sl], g)
        tensors = {"packed": packed, "scales": scales, "global_scale": g.reshape(())}
        return Packed(self.name, tensors, (out, k), {"axis": 1, "block": BLOCK})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        check_packed(p, self.name, {"packed": (torch.uint8, (out, k // 2)),
                                    "scales": (torch.float8_e4m3fn, (out, k // BLOCK)),
                                    "global_scale": (torch.float32, ())})
        packed, scales, g = p.tensors["packed"], p.tensors["scales"], p.tensors["global_scale"]
        lut = fp4_byte_lut(packed.device)                                   # [256, 2]
        res = torch.empty(out, k, dtype=dtype, device=packed.device)
        for sl in row_chunks(out, k):
            vals = lut[packed[sl].long()].reshape(-1, k // BLOCK, BLOCK)    # [r, K/16, 16]
            mult = (scales[sl].float() * g).unsqueeze(-1)                   # [r, K/16, 1]
            res[sl] = (vals * mult).reshape(-1, k).to(dtype)
        return res

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        return out * (k // 2) + out * (k // BLOCK) + 4

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[1] % BLOCK != 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not [out, in] with in divisible by {BLOCK}")
        return int(shape[0]), int(shape[1])
