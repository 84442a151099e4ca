"""BF16 passthrough: the "keep" format of a plan (an expert left in 16 bits).

Storage: ``weight`` bf16 [out, in]. fp32 inputs are rounded to nearest-even (torch's cast) after
saturating at the largest finite bf16, so an fp32 value just below FLT_MAX does not become inf.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed
from .registry import register_format

_BF16_MAX = torch.finfo(torch.bfloat16).max


@register_format("bf16")
@dataclass(frozen=True)
class BF16(Format):
    """Keep the weight in bf16 (no copy when it already is bf16, [out, in] and contiguous)."""

    name: str = "bf16"

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, 1, self.name, name)  # [out, in]
        if x.dtype != torch.bfloat16:
            x = x.float().clamp(-_BF16_MAX, _BF16_MAX).to(torch.bfloat16)
        return Packed(self.name, {"weight": x.contiguous()}, tuple(x.shape), {"axis": 1})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        check_packed(p, self.name, {"weight": (torch.bfloat16, (out, k))})
        return p.tensors["weight"].to(dtype)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        return 2 * out * k

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not a non-empty [out, in]")
        return int(shape[0]), int(shape[1])
