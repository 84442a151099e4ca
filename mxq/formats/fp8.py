"""FP8 E4M3 weights with fp32 scales: per output channel (``fp8``) or per 128x128 block (``fp8_block``).

Reference: Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433 (E4M3: max 448, no
infinities). Layouts as in vLLM / compressed-tensors (``weight`` float8_e4m3fn + ``weight_scale`` fp32,
channel strategy: [out, 1]) and DeepSeek-V3 / vLLM block FP8 (``weight_scale_inv`` [ceil(out/128),
ceil(in/128)]); in both the scale multiplies: ``W ~= q * scale``.

Quantizer: ``scale = amax / 448`` (amax of the row or of the 128x128 block), then
``q = clamp(W / scale, -448, 448).to(torch.float8_e4m3fn)`` - the element rounding is exactly torch's
round-to-nearest-even cast; the clamp saturates instead of relying on the cast's overflow behaviour.
An all-zero row/block gets scale 1; a scale that would underflow fp32 is raised to 2^-149.
Block edges: a dimension that is not a multiple of 128 gets a partial last block (the scale grid uses
ceil division, as DeepSeek-V3 and vLLM do), so gpt-oss's 2880-wide matrices need no padding on disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed, div, row_chunks
from .registry import register_format

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 2.0 ** -149


def _scale_of(amax: Tensor) -> Tensor:
    """amax / 448 in fp32; 1 for an all-zero group, never 0 for a non-zero one."""
    s = div(amax.float(), FP8_MAX).clamp(min=_TINY)
    return torch.where(amax == 0, torch.ones_like(s), s)


def to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale (broadcast), saturated at +-448, cast to E4M3 with round-to-nearest-even."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


@dataclass(frozen=True)
class FP8Weight(Format):
    """FP8 E4M3 weight; ``block == 0``: one scale per output channel, else ``block x block`` tiles."""

    block: int = 0
    name: str = "fp8"

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, 1, self.name, name)  # [out, in]
        out, k = x.shape
        q = torch.empty(out, k, dtype=FP8, device=x.device)
        meta = {"axis": 1, "block": self.block}
        if self.block == 0:
            scale = torch.empty(out, 1, dtype=torch.float32, device=x.device)
            for sl in row_chunks(out, k):
                xs = x[sl]
                scale[sl] = _scale_of(xs.abs().amax(dim=1, keepdim=True))     # [r, 1]
                q[sl] = to_fp8(xs, scale[sl])
            return Packed(self.name, {"weight": q, "scale": scale}, (out, k), meta)
        b = self.block
        nb_o, nb_i = -(-out // b), -(-k // b)
        scale = torch.empty(nb_o, nb_i, dtype=torch.float32, device=x.device)
        for sl in row_chunks(out, k, multiple=b):
            xs = x[sl].float().contiguous()  # [r, in]
            r = xs.shape[0]
            xp = F.pad(xs, (0, nb_i * b - k, 0, -(-r // b) * b - r))           # zero padding: amax unchanged
            tiles = xp.reshape(-1, b, nb_i, b)                                  # [r/b, b, in/b, b]
            s = _scale_of(tiles.abs().amax(dim=(1, 3)))                         # [r/b, in/b]
            scale[sl.start // b: sl.start // b + s.shape[0]] = s
            q[sl] = to_fp8(tiles, s[:, None, :, None]).reshape(xp.shape)[:r, :k]
        return Packed(self.name, {"weight": q, "scale": scale}, (out, k), meta)

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        check_packed(p, self.name, {"weight": (FP8, (out, k)), "scale": (torch.float32, self._scale_shape(out, k))})
        q, scale = p.tensors["weight"], p.tensors["scale"]
        res = torch.empty(out, k, dtype=dtype, device=q.device)
        b = max(self.block, 1)
        for sl in row_chunks(out, k, multiple=b):
            if self.block == 0:
                s = scale[sl]                                                   # [r, 1]
            else:
                r = sl.stop - sl.start
                s = scale[sl.start // b: -(-sl.stop // b)]                      # [ceil(r/b), in/b]
                s = s.repeat_interleave(b, dim=0)[:r].repeat_interleave(b, dim=1)[:, :k]  # [r, in]
            res[sl] = (q[sl].float() * s).to(dtype)
        return res

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        so, si = self._scale_shape(out, k)
        return out * k + 4 * so * si

    def _scale_shape(self, out: int, k: int) -> tuple[int, int]:
        if self.block == 0:
            return (out, 1)
        return (-(-out // self.block), -(-k // self.block))

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not a non-empty [out, in]")
        return int(shape[0]), int(shape[1])


register_format("fp8")(FP8Weight)
register_format("fp8_block", block=128)(FP8Weight)
