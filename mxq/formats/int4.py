"""Group-wise INT4 round-to-nearest, symmetric or asymmetric, groups of 32 or 128 along the input axis.

References: Frantar et al., "GPTQ", arXiv 2210.17323 (group-wise uint4 layout with per-group scale and
zero point); Lin et al., "AWQ", arXiv 2306.00978 (``pseudo_quantize_tensor``). This is the plain RTN
baseline that both start from (no Hessian/activation-aware correction):

* symmetric (``int4_g*``): ``q = clamp(round(x / scale), -8, 7)``, ``W ~= q * scale``, with the group's
  scale chosen to minimise the squared error ``sum (x - q * scale)^2`` of the group over a fixed set of
  candidates (the scale/clip search of AWQ's ``auto_clip`` and of llama.cpp's ``make_qx_quants``;
  Lin et al., arXiv 2306.00978, section 3.2): ``s0 * f`` for the 10 shrink factors
  ``f = 1, 0.98, ..., 0.82`` of the full-range scale ``s0 = max(max(x, 0) / 7, -min(x, 0) / 8)`` (the
  smallest scale that clips nothing, using code -8 for a negative extreme and +7 for a positive one),
  plus ``amax / 7.5`` and ``amax / 7``. Each candidate is rounded to bf16 first and scored with the codes it really
  produces; the first minimum wins (ties go to the larger scale). The result is never worse than
  ``amax / 7``, ``amax / 7.5`` or ``s0`` on any group; on Gaussian groups of 32 it has about 0.79x the
  squared error of AWQ's ``amax / 7`` rule (``zero_point=False``: max_int 7, which never produces code -8).
  Shrinking clips outliers on purpose, so a single element's error may exceed half a step (by at most 18%
  of the group's amax). On the embedded model's experts (MXFP4 values, groups of 32) the squared error is
  0.51x that of ``amax / 7``; a wider grid (down to 0.70, 16 factors) gains nothing there and under 0.5% on
  Gaussian groups of 128.
  The nibble stores ``q + 8`` (offset binary), i.e. GPTQ's symmetric storage with zero point 8 and
  compressed-tensors' ``pack-quantized`` int4 (which also adds 8); readers are unaffected by the rule.
* asymmetric (``int4_g*_asym``): GPTQ's ``Quantizer`` rule: the range is widened to contain 0
  (``min' = min(min, 0)``, ``max' = max(max, 0)``), ``scale = (max' - min') / 15``,
  ``zero = round(-min' / scale)`` in [0, 15], ``q = clamp(round(x / scale) + zero, 0, 15)``,
  ``W ~= (q - zero) * scale``.

Storage: ``packed`` u8 [out, in/2] with element 2j in the low nibble (byte-identical to GPTQ's
little-endian int32 packing along the input axis), ``scales`` bf16 [out, in/g] (GPTQ/AWQ store fp16;
bf16 keeps the fp32 exponent range, so large or tiny weights never overflow the scale; convert on export),
``zeros`` u8 [out, in/g] for the asymmetric variants (one byte per group, not nibble-packed).
Scales are rounded to bf16 *before* the codes are chosen, so the codes are optimal for the stored scale.
``round`` is round-half-to-even (``torch.round``), as in GPTQ and AWQ.

Ragged last group: gpt-oss's contraction dimension is 2880 = 22.5 x 128, so the group grid uses ceil
division (``scales`` [out, ceil(in/g)]) and the last group of ``int4_g128`` holds 64 elements, as
AutoGPTQ's ``ceil(infeatures / group_size)`` scale rows allow. Padding with zeros is exactly equivalent
(zeros change neither amax nor the zero-widened asymmetric range). ``in`` must be even (two per byte).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed, div, row_chunks
from .registry import register_format

_BF16_TINY = 2.0 ** -133  # smallest positive bf16 (subnormal)


def _bf16_floor(v: float) -> float:
    """Largest bf16 value <= v (v > 0): truncate the fp32 bit pattern to its upper 16 bits."""
    bits = torch.tensor([v], dtype=torch.float32).view(torch.int32) & ~0xFFFF
    return float(bits.view(torch.float32).item())


# Scale ceilings that keep every dequantized value finite: |q| <= 8 (sym), |q - zero| <= 15 (asym).
_SYM_SCALE_MAX = _bf16_floor(torch.finfo(torch.float32).max / 8)
_ASYM_SCALE_MAX = _bf16_floor(torch.finfo(torch.float32).max / 15)


def _bf16_scale(s: Tensor, positive: Tensor, ceiling: float) -> Tensor:
    """fp32/fp64 scale -> bf16, never 0 where the group is non-zero, never so large that q * scale overflows."""
    s16 = s.clamp(max=ceiling).to(torch.float32).to(torch.bfloat16)
    return torch.where(positive & (s16 == 0), torch.full_like(s16, _BF16_TINY), s16)


def _divide(x: Tensor, s: Tensor) -> Tensor:
    """x / s with 0 where the scale is 0 (an all-zero group), so no 0/0 NaN reaches the rounding."""
    return torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x))


# Shrink factors of the full-range scale tried by the symmetric rule (module docstring).
SYM_SHRINK = tuple(round(1.0 - 0.02 * i, 2) for i in range(10))


def sym_scale_search(xg: Tensor, shrink: tuple[float, ...] = SYM_SHRINK) -> Tensor:
    """xg [R, G, g] (zero-padded groups) -> bf16 scales [R, G] minimising each group's squared error.

    Candidates: ``s0 * f`` for ``f`` in ``shrink`` with ``s0 = max(max(x, 0) / 7, -min(x, 0) / 8)``, then
    ``amax / 7.5`` and ``amax / 7``; each rounded to bf16 and scored with the codes it produces. Errors are measured on
    ``x / amax`` so that huge groups (|x| near 3e38) do not overflow the squares.
    """
    xg = xg.float()
    amax = xg.abs().amax(dim=-1)                                                # [R, G]
    pos = amax > 0
    s0 = torch.maximum(div(xg.amax(dim=-1).clamp(min=0.0), 7.0), div(-xg.amin(dim=-1).clamp(max=0.0), 8.0))
    inv = torch.where(pos, 1.0 / torch.where(pos, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    xn = xg * inv.unsqueeze(-1)                                                 # [R, G, g] in [-1, 1]
    best_s = best_e = None
    one = torch.ones_like(amax)
    for c in [s0 * f for f in shrink] + [div(amax, 7.5), div(amax, 7.0)]:
        s = _bf16_scale(c, pos, _SYM_SCALE_MAX)                                 # [R, G], > 0 where pos
        safe = torch.where(pos, s.float(), one).unsqueeze(-1)                   # all-zero group: x = 0, q = 0
        q = torch.round(xg / safe).clamp_(-8, 7)                                # [R, G, g]
        e = (q.mul_(safe * inv.unsqueeze(-1)) - xn).pow_(2).sum(dim=-1, dtype=torch.float64)  # [R, G]
        if best_s is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s


@dataclass(frozen=True)
class INT4(Format):
    """Group-wise INT4 RTN along the contraction axis (see the module docstring for the exact rules)."""

    group: int = 128
    asym: bool = False
    name: str = "int4"

    def _quantize_rows(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [R, K] -> (packed u8 [R, K/2], scales bf16 [R, ceil(K/g)], zeros u8 [R, ceil(K/g)] or None)."""
        r, k = x.shape
        ng = -(-k // self.group)
        xg = F.pad(x.float(), (0, ng * self.group - k)).reshape(r, ng, self.group)  # [R, G, g], zero-padded
        if not self.asym:
            s = sym_scale_search(xg)                                            # bf16 [R, K/g]
            q = torch.round(_divide(xg, s.float().unsqueeze(-1))).clamp(-8, 7) + 8
            zeros = None
        else:
            lo = xg.amin(dim=-1).clamp(max=0.0)                                 # [R, K/g]
            hi = xg.amax(dim=-1).clamp(min=0.0)
            rng = div(hi.double() - lo.double(), 15.0)                           # fp64: max - min never overflows
            s = _bf16_scale(rng, hi > lo, _ASYM_SCALE_MAX)
            sf = s.float()
            z = torch.round(_divide(-lo, sf)).clamp(0, 15)                      # [R, K/g]
            q = (torch.round(_divide(xg, sf.unsqueeze(-1))) + z.unsqueeze(-1)).clamp(0, 15)
            zeros = z.to(torch.uint8)
        codes = q.to(torch.uint8).reshape(r, -1)[:, :k]                        # [R, K]
        return codes[:, 0::2] | (codes[:, 1::2] << 4), s, zeros

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, 2, self.name, name)  # [out, in]
        out, k = x.shape
        dev, ng = x.device, -(-k // self.group)
        packed = torch.empty(out, k // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(out, ng, dtype=torch.bfloat16, device=dev)
        zeros = torch.empty(out, ng, dtype=torch.uint8, device=dev) if self.asym else None
        for sl in row_chunks(out, k):
            packed[sl], scales[sl], z = self._quantize_rows(x[sl])
            if zeros is not None:
                zeros[sl] = z
        tensors = {"packed": packed, "scales": scales}
        if zeros is not None:
            tensors["zeros"] = zeros
        return Packed(self.name, tensors, (out, k), {"axis": 1, "group": self.group, "asym": self.asym})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        ng = -(-k // self.group)
        expect = {"packed": (torch.uint8, (out, k // 2)), "scales": (torch.bfloat16, (out, ng))}
        if self.asym:
            expect["zeros"] = (torch.uint8, (out, ng))
        check_packed(p, self.name, expect)
        packed, scales = p.tensors["packed"], p.tensors["scales"]
        res = torch.empty(out, k, dtype=dtype, device=packed.device)
        for sl in row_chunks(out, k):
            b = packed[sl]                                                      # [r, K/2]
            q = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(b.shape[0], k).float()  # [r, K]
            q = F.pad(q, (0, ng * self.group - k)).reshape(-1, ng, self.group)  # [r, G, g]
            z = p.tensors["zeros"][sl].float().unsqueeze(-1) if self.asym else 8.0
            res[sl] = ((q - z) * scales[sl].float().unsqueeze(-1)).reshape(-1, ng * self.group)[:, :k].to(dtype)
        return res

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        ng = -(-k // self.group)
        return out * k // 2 + out * ng * (2 + (1 if self.asym else 0))

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0 or shape[1] % 2 != 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not a non-empty [out, in] with an even in")
        return int(shape[0]), int(shape[1])


register_format("int4_g32", group=32)(INT4)
register_format("int4_g128", group=128)(INT4)
register_format("int4_g32_asym", group=32, asym=True)(INT4)
register_format("int4_g128_asym", group=128, asym=True)(INT4)
