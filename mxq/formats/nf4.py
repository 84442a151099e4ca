"""NF4 (NormalFloat4) with absmax blocks of 64, optionally with double quantization of the absmax.

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314 (NF4 data
type, section 3 and appendix E; double quantization, section 3). Bit-for-bit target:
``bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=...)`` on
the CPU (bitsandbytes is the test reference only). The rules reproduced here:

* Blocks: 64 consecutive elements of the row-major flattened ``[out, in]`` weight (= along the input
  axis, since we require in % 64 == 0). ``absmax`` = max |x| per block, fp32.
* Codes: ``x * (1 / max(absmax, 1e-38))``, clamped to [-1, 1], goes to the nearest of the 16 NF4 levels;
  a value exactly on a midpoint goes to the *lower* level (bnb's strict ``x > threshold`` decision tree in
  the CUDA kernel and ``bucketize`` on the fp32 midpoints on the CPU give the same thresholds).
* Packing: two codes per byte, element 2j in the *high* nibble (bnb's order; MXFP4 is the opposite).
* Double quantization (``nf4_dq``): ``offset = mean(absmax)``; ``absmax - offset`` is quantized with the
  signed 8-bit dynamic map (Dettmers 2015, arXiv 1511.04561) in blocks of 256 (``nested_absmax`` = their
  absmax). bnb's CPU kernel rounds through a 65536-entry lookup table over [-1, 1] (index
  ``trunc((v + 1) * 0.5 * 65535 + 0.5)``; each entry holds the code nearest to its grid point), which
  differs from exact nearest rounding for about 0.1% of the statistics; we reproduce the table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Format, FormatError, Packed, as_out_in, check_packed, div, row_chunks
from .registry import register_format

BLOCK = 64
NESTED_BLOCK = 256
# The 16 NF4 levels (QLoRA appendix E; bitsandbytes get_4bit_type("nf4")): quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero; 7 negative and 8 positive levels.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_LUT_SIZE = 65536
_CACHE: dict[tuple[str, torch.device], Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The NF4 levels as fp32 [16] (bnb's ``QuantState.code``)."""
    key = ("nf4", torch.device(device))
    if key not in _CACHE:
        _CACHE[key] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _CACHE[key]


def _nf4_midpoints(device: torch.device) -> Tensor:
    """The 15 fp32 decision thresholds (code[i] + code[i+1]) / 2; equal to bnb's CUDA decision-tree constants."""
    key = ("nf4_mid", torch.device(device))
    if key not in _CACHE:
        code = nf4_code(device)
        _CACHE[key] = 0.5 * (code[:-1] + code[1:])
    return _CACHE[key]


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """Signed 8-bit dynamic-exponent map (Dettmers, arXiv 1511.04561), sorted fp32 [256].

    For exponent e = 0..6 the 2^e + 1 evenly spaced points of [0.1, 1] give 2^e interval midpoints, scaled
    by 10^(e-6) and mirrored; plus 0 and 1. This is bnb's ``create_dynamic_map()`` (= ``state2.code``).
    """
    key = ("dynamic", torch.device(device))
    if key not in _CACHE:
        vals: list[float] = [0.0, 1.0]
        for e in range(7):
            edges = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float32)   # [2^e + 1]
            mids = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (e - 6))         # fp32, [2^e]
            vals += mids.tolist() + (-mids).tolist()
        _CACHE[key] = torch.tensor(sorted(vals), dtype=torch.float32, device=device)
    return _CACHE[key]


def _dynamic_lut(device: torch.device) -> Tensor:
    """[65536] int64: grid point i of [-1, 1] -> index of the nearest dynamic-map code (ties low)."""
    key = ("lut", torch.device(device))
    if key not in _CACHE:
        code = dynamic_map(device)
        mid = 0.5 * (code[:-1] + code[1:])                                     # fp32 [255]
        i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)
        grid = -1.0 + div(2.0 * i, float(_LUT_SIZE - 1))
        _CACHE[key] = torch.bucketize(grid, mid)                              # midpoints < grid point
    return _CACHE[key]


def quantize_nested(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization of the flat fp32 absmax [n] -> (codes u8 [n], nested_absmax f32 [n/256], offset f32 [])."""
    offset = a.mean()
    if not torch.isfinite(offset):        # the fp32 sum overflowed (values near 3e38); bnb would give NaN
        offset = a.double().mean().float()
    c = a - offset                                                             # [n]
    n = c.numel()
    pad = (-n) % NESTED_BLOCK
    cb = torch.nn.functional.pad(c, (0, pad)).reshape(-1, NESTED_BLOCK)        # [n/256, 256]
    a2 = cb.abs().amax(dim=-1)                                                 # [n/256]
    inv = torch.where(a2 > 0, 1.0 / a2, torch.zeros_like(a2))                 # zero block: all codes 0 below
    v = (cb * inv.unsqueeze(-1)).clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _dynamic_lut(c.device)[idx]
    q = torch.where((a2 == 0).unsqueeze(-1), torch.zeros_like(q), q)          # zero block -> code 0
    return q.reshape(-1)[:n].to(torch.uint8), a2, offset.reshape(())


def dequantize_nested(q: Tensor, a2: Tensor, offset: Tensor) -> Tensor:
    """(codes u8 [n], nested_absmax f32 [n/256], offset f32 []) -> absmax f32 [n]."""
    n = q.numel()
    vals = dynamic_map(q.device)[q.long()]                                     # [n]
    vals = torch.nn.functional.pad(vals, (0, (-n) % NESTED_BLOCK)).reshape(-1, NESTED_BLOCK)
    return (vals * a2.unsqueeze(-1)).reshape(-1)[:n] + offset


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, K] -> (packed u8 [R, K/2], absmax f32 [R, K/64])."""
    r, k = x.shape
    xb = x.float().contiguous().reshape(r, k // BLOCK, BLOCK)  # [R, K/64, 64]
    absmax = xb.abs().amax(dim=-1)                                             # [R, K/64]
    scaled = (xb * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp(-1.0, 1.0)
    q = torch.bucketize(scaled, _nf4_midpoints(x.device)).to(torch.uint8).reshape(r, k)
    return (q[:, 0::2] << 4) | q[:, 1::2], absmax


@register_format("nf4", double_quant=False)
@register_format("nf4_dq", double_quant=True)
@dataclass(frozen=True)
class NF4(Format):
    """NF4, blocks of 64 along the input axis; ``double_quant`` stores the absmax in 8 bits (QLoRA DQ)."""

    double_quant: bool = False
    name: str = "nf4"

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:
        x = as_out_in(w, axis, BLOCK, self.name, name)  # [out, in]
        out, k = x.shape
        packed = torch.empty(out, k // 2, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(out, k // BLOCK, dtype=torch.float32, device=x.device)
        for sl in row_chunks(out, k):
            packed[sl], absmax[sl] = _quantize_rows(x[sl])
        meta = {"axis": 1, "block": BLOCK}
        if not self.double_quant:
            return Packed(self.name, {"packed": packed, "absmax": absmax}, (out, k), meta)
        q8, a2, offset = quantize_nested(absmax.reshape(-1))
        tensors = {"packed": packed, "absmax": q8.reshape(out, k // BLOCK), "nested_absmax": a2, "offset": offset}
        return Packed(self.name, tensors, (out, k), {**meta, "nested_block": NESTED_BLOCK})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
        out, k = self._shape(p.shape)
        nb = out * k // BLOCK
        if self.double_quant:
            check_packed(p, self.name, {"packed": (torch.uint8, (out, k // 2)),
                                        "absmax": (torch.uint8, (out, k // BLOCK)),
                                        "nested_absmax": (torch.float32, (-(-nb // NESTED_BLOCK),)),
                                        "offset": (torch.float32, ())})
            t = p.tensors
            absmax = dequantize_nested(t["absmax"].reshape(-1), t["nested_absmax"], t["offset"]).reshape(out, -1)
        else:
            check_packed(p, self.name, {"packed": (torch.uint8, (out, k // 2)),
                                        "absmax": (torch.float32, (out, k // BLOCK))})
            absmax = p.tensors["absmax"]
        packed = p.tensors["packed"]
        code = nf4_code(packed.device)
        res = torch.empty(out, k, dtype=dtype, device=packed.device)
        for sl in row_chunks(out, k):
            b = packed[sl].long()                                              # [r, K/2]
            q = torch.stack((b >> 4, b & 0x0F), dim=-1)                        # [r, K/2, 2]; high nibble first
            vals = code[q].reshape(-1, k // BLOCK, BLOCK) * absmax[sl].unsqueeze(-1)
            res[sl] = vals.reshape(-1, k).to(dtype)
        return res

    def nbytes(self, shape: tuple[int, ...]) -> int:
        out, k = self._shape(shape)
        nb = out * k // BLOCK
        if self.double_quant:
            return out * k // 2 + nb + 4 * -(-nb // NESTED_BLOCK) + 4
        return out * k // 2 + 4 * nb

    def _shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) != 2 or shape[1] % BLOCK != 0:
            raise FormatError(f"{self.name}: shape {tuple(shape)} is not [out, in] with in divisible by {BLOCK}")
        return int(shape[0]), int(shape[1])
