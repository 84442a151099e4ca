"""The grid each mxq format quantizes onto, split into "choose a group's scale" and "round a column".

GPTQ (Frantar et al., arXiv 2210.17323, section 4, "Additional details: grouping") needs the two halves of
a quantizer separately: a group's scale is fixed when the group is reached (or up front, with act-order's
static groups) and then every column of the group is rounded with it, one column at a time, while the
not-yet-rounded columns absorb the error. A ``Grid`` does exactly that for one registered format, with
the format's own scale rules, element rounding and storage dtypes, and finally packs the chosen codes
into the format's own tensors (names, dtypes, nibble order), so ``get_format(name).dequantize`` reads the
result unchanged and gives back exactly the values GPTQ rounded to (checked in ``Grid.pack``).

Shapes: a batch of ``B`` weights (experts) at once, ``w`` [B, out, in] fp32. A group's scale state is
per row, ``S`` [B, out, m] (m = 1, or 2 for int4 asym's scale and zero), already rounded to the storage
dtype and kept in fp32, so that rounding is ``values = code_value(x / s) * s`` with the stored ``s``.
``choose(wg, f)`` applies the format's scale rule to a group ``wg`` [B, out, g] as if its range were
``f`` times smaller (``f = None``: the format's own RTN rule, the one ``quantize`` uses; ``f`` < 1 clips,
for the MSE scale search). Formats whose scales cannot be chosen group by group are ``static``: NF4 with
double quantization (the 8-bit absmax codes need the mean of *all* absmax), FP8 per channel (one scale per
whole row) and FP8 blocks (a 128 x 128 tile spans 128 rows).

Registered grids: int4_g32, int4_g128 (+ _asym), nf4, nf4_dq, mxfp4, nvfp4, fp8, fp8_block. ``bf16`` has
none (nothing to calibrate).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import Packed, get_format
from ..formats.base import FormatError, div
from ..formats.fp8 import FP8, FP8_MAX, _scale_of
from ..formats.int4 import _ASYM_SCALE_MAX, _SYM_SCALE_MAX, _bf16_scale, _divide, sym_scale_search
from ..formats.mxfp4 import FP4_VALUES, e2m1_encode
from ..formats.nf4 import BLOCK as NF4_BLOCK
from ..formats.nf4 import _nf4_midpoints, dequantize_nested, nf4_code, quantize_nested
from ..formats.nvfp4 import FP4_MAX, e2m1_encode_rne, global_scale_of
from ..formats.nvfp4 import FP8_MAX as NV_FP8_MAX

GridFactory = Callable[[str, Tensor], "Grid"]
GRIDS: dict[str, GridFactory] = {}


def register_grid(*names: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for n in names:
            GRIDS[n] = cls
        return cls

    return deco


def make_grid(fmt: str, w: Tensor) -> Grid:
    """The grid of format ``fmt`` for the weights ``w`` [B, out, in] (per-tensor constants come from ``w``)."""
    if fmt not in GRIDS:
        raise FormatError(f"format {fmt!r} has no calibrated-quantization grid; grids exist for "
                          f"{', '.join(sorted(GRIDS))}")
    return GRIDS[fmt](fmt, w)


def _lut(device: torch.device) -> Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def _nibbles(codes: Tensor, low_first: bool) -> Tensor:
    """codes u8 [..., K] -> bytes [..., K/2]; ``low_first``: element 2j in the low nibble."""
    a, b = codes[..., 0::2], codes[..., 1::2]
    return a | (b << 4) if low_first else (a << 4) | b


@dataclass
class Grid:
    """Base class: ``group`` input columns share a scale state; see the module docstring."""

    fmt: str
    group: int
    static: bool = False
    row_block: int = 1          # rows sharing one scale (fp8_block: 128)

    def choose(self, wg: Tensor, f: float | None) -> Tensor:  # pragma: no cover - abstract
        """wg [B, out, g] -> S [B, out, m]."""
        raise NotImplementedError

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """x [B, out, n], S [B, out, m] -> (values fp32 [B, out, n], codes u8 [B, out, n])."""
        raise NotImplementedError

    def finalize(self, S: Tensor) -> Tensor:
        """All groups' states [B, out, G, m] -> the states really stored (nf4_dq: after double quantization)."""
        return S

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Weight ``b``'s packed tensors from codes u8 [out, in] and states [out, G, m]."""
        raise NotImplementedError

    def pack(self, codes: Tensor, S: Tensor, values: Tensor, name: str = "weight") -> list[Packed]:
        """codes [B, out, in], S [B, out, G, m], values [B, out, in] -> one ``Packed`` per weight.

        Every result is dequantized with the format's own ``dequantize`` and compared with ``values``
        bit for bit, and its tensors' names, dtypes, shapes and meta with an RTN ``quantize`` of the same
        shape: a mismatch is a bug here, raised instead of written.
        """
        fmt = get_format(self.fmt)
        shape, meta, want = _reference_layout(self.fmt, tuple(values.shape[1:]))
        out = []
        for b in range(codes.shape[0]):
            p = Packed(self.fmt, self.tensors(codes[b], S[b], b), shape, dict(meta))
            sig = {k: (tuple(v.shape), v.dtype) for k, v in p.tensors.items()}
            if sig != want:
                raise FormatError(f"{self.fmt}: {name}[{b}]: packed tensors {sig} differ from the format's {want}")
            back = fmt.dequantize(p, torch.float32)
            if not torch.equal(back, values[b]):
                bad = int((back != values[b]).sum())
                raise FormatError(f"{self.fmt}: {name}[{b}]: {bad} packed values do not decode to the rounded ones")
            out.append(p)
        return out


_LAYOUTS: dict[tuple[str, tuple[int, ...]], tuple] = {}


def _reference_layout(fmt: str, shape: tuple[int, ...]) -> tuple:
    """(shape, meta, {name: (shape, dtype)}) of the format's own ``quantize`` of an [out, in] weight."""
    key = (fmt, shape)
    if key not in _LAYOUTS:
        ref = get_format(fmt).quantize(torch.randn(shape))
        _LAYOUTS[key] = (ref.shape, dict(ref.meta), {k: (tuple(v.shape), v.dtype) for k, v in ref.tensors.items()})
    return _LAYOUTS[key]


def _group_view(w: Tensor, g: int) -> Tensor:
    """w [B, out, K] -> [B, out, ceil(K/g), g], zero-padded (zeros change no amax and no range)."""
    k = w.shape[-1]
    ng = -(-k // g)
    return F.pad(w, (0, ng * g - k)).reshape(*w.shape[:-1], ng, g)


@register_grid("int4_g32", "int4_g128", "int4_g32_asym", "int4_g128_asym")
class INT4Grid(Grid):
    """Group-wise INT4 (``mxq.formats.int4``): bf16 scale (and u8 zero) per group of 32 or 128."""

    def __init__(self, fmt: str, w: Tensor):
        f = get_format(fmt)
        super().__init__(fmt, f.group)
        self.asym = f.asym

    def choose(self, wg: Tensor, f: float | None) -> Tensor:
        x = wg.float()
        if not self.asym:
            if f is None:
                s = sym_scale_search(x.unsqueeze(-2)).squeeze(-1)                       # [B, out]
            else:
                amax = x.abs().amax(-1)
                s0 = torch.maximum(div(x.amax(-1).clamp(min=0.0), 7.0), div(-x.amin(-1).clamp(max=0.0), 8.0))
                s = _bf16_scale(s0 * f, amax > 0, _SYM_SCALE_MAX)
            return s.float().unsqueeze(-1)                                               # [B, out, 1]
        lo, hi = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
        if f is not None:
            lo, hi = lo * f, hi * f
        s = _bf16_scale(div(hi.double() - lo.double(), 15.0), hi > lo, _ASYM_SCALE_MAX).float()
        z = torch.round(_divide(-lo, s)).clamp(0, 15)
        return torch.stack((s, z), dim=-1)                                              # [B, out, 2]

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        s = S[..., :1]
        if not self.asym:
            q = torch.round(_divide(x, s)).clamp(-8, 7)
            return q * s, (q + 8).to(torch.uint8)
        z = S[..., 1:]
        q = (torch.round(_divide(x, s)) + z).clamp(0, 15)
        return (q - z) * s, q.to(torch.uint8)

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:
        t = {"packed": _nibbles(codes, True), "scales": S[..., 0].to(torch.bfloat16)}
        if self.asym:
            t["zeros"] = S[..., 1].to(torch.uint8)
        return t


@register_grid("nf4", "nf4_dq")
class NF4Grid(Grid):
    """NF4 (``mxq.formats.nf4``): fp32 absmax per 64; ``nf4_dq`` stores it double-quantized (static)."""

    def __init__(self, fmt: str, w: Tensor):
        self.dq = get_format(fmt).double_quant
        super().__init__(fmt, NF4_BLOCK, static=self.dq)
        self._nested: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def choose(self, wg: Tensor, f: float | None) -> Tensor:
        a = wg.float().abs().amax(-1)
        return (a if f is None else a * f).unsqueeze(-1)                                 # [B, out, 1]

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        a = S[..., :1]
        scaled = (x * (1.0 / a.clamp(min=1e-38))).clamp(-1.0, 1.0)
        idx = torch.bucketize(scaled, _nf4_midpoints(x.device))
        return nf4_code(x.device)[idx] * a, idx.to(torch.uint8)

    def finalize(self, S: Tensor) -> Tensor:
        if not self.dq:
            return S
        out = torch.empty_like(S)
        for b in range(S.shape[0]):
            q8, a2, off = quantize_nested(S[b, ..., 0].reshape(-1))
            self._nested[b] = (q8, a2, off)
            out[b, ..., 0] = dequantize_nested(q8, a2, off).reshape(S.shape[1:-1])
        return out

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:
        t = {"packed": _nibbles(codes, False)}
        if not self.dq:
            t["absmax"] = S[..., 0].contiguous()
            return t
        q8, a2, off = self._nested[b]
        t.update(absmax=q8.reshape(S.shape[:-1]), nested_absmax=a2, offset=off)
        return t


@register_grid("mxfp4")
class MXFP4Grid(Grid):
    """MXFP4 (``mxq.formats.mxfp4``): E8M0 scale 2^ceil(log2(amax / 6)) per 32, E2M1 ties away from zero."""

    def __init__(self, fmt: str, w: Tensor):
        super().__init__(fmt, 32)

    def choose(self, wg: Tensor, f: float | None) -> Tensor:
        amax = wg.float().abs().amax(-1)
        if f is not None:
            amax = amax * f
        bits = ((div(amax, 6.0).view(torch.int32) + 0x7FFFFF) & 0x7F800000) >> 23
        byte = torch.where(amax == 0, torch.zeros_like(bits), bits.clamp(0, 252))         # no overflow caps
        return byte.float().unsqueeze(-1)                                                # [B, out, 1]

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        e = S[..., :1] - 127.0
        codes = e2m1_encode(torch.ldexp(x, -e))
        return torch.ldexp(_lut(x.device)[codes.long()], e), codes

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:
        out, k = codes.shape
        return {"blocks": _nibbles(codes.reshape(out, k // 32, 32), True), "scales": S[..., 0].to(torch.uint8)}


@register_grid("nvfp4")
class NVFP4Grid(Grid):
    """NVFP4 (``mxq.formats.nvfp4``): per-weight fp32 global scale from the whole original weight, E4M3 per 16."""

    def __init__(self, fmt: str, w: Tensor):
        super().__init__(fmt, 16)
        self.g = torch.stack([global_scale_of(w[b].abs().amax()) for b in range(w.shape[0])])  # [B]

    def choose(self, wg: Tensor, f: float | None) -> Tensor:
        bamax = wg.float().abs().amax(-1)
        if f is not None:
            bamax = bamax * f
        g = self.g.view(-1, 1)
        s8 = (bamax / (FP4_MAX * g)).clamp(max=NV_FP8_MAX).to(torch.float8_e4m3fn)
        s8 = torch.where(bamax == 0, torch.ones_like(s8), s8)
        s8 = torch.where((s8.float() == 0) & (bamax > 0), torch.full_like(s8, 2.0 ** -9), s8)
        return s8.float().unsqueeze(-1)                                                  # [B, out, 1]

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        mult = S[..., :1] * self.g.view(-1, 1, 1)
        v = torch.where(mult > 0, x / mult, torch.zeros_like(x))
        codes = e2m1_encode_rne(v)
        return _lut(x.device)[codes.long()] * mult, codes

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:
        return {"packed": _nibbles(codes, True), "scales": S[..., 0].to(torch.float8_e4m3fn),
                "global_scale": self.g[b].reshape(())}


@register_grid("fp8", "fp8_block")
class FP8Grid(Grid):
    """FP8 E4M3 (``mxq.formats.fp8``): fp32 scale amax / 448 per row (``fp8``) or per 128 x 128 tile (static)."""

    def __init__(self, fmt: str, w: Tensor):
        blk = get_format(fmt).block
        super().__init__(fmt, blk if blk else w.shape[-1], static=True, row_block=max(blk, 1))
        self.k = w.shape[-1]

    def choose(self, wg: Tensor, f: float | None) -> Tensor:
        a = wg.float().abs().amax(-1)                                                   # [B, out]
        if self.row_block > 1:                                                          # tile amax over rows
            b, out = a.shape
            nb = -(-out // self.row_block)
            t = F.pad(a, (0, nb * self.row_block - out)).reshape(b, nb, self.row_block).amax(-1)
            a = t.repeat_interleave(self.row_block, dim=1)[:, :out]
        if f is not None:
            a = a * f
        return _scale_of(a).unsqueeze(-1)                                               # [B, out, 1]

    def quant(self, x: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        s = S[..., :1]
        q = (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return q.float() * s, q.view(torch.uint8)

    def tensors(self, codes: Tensor, S: Tensor, b: int) -> dict[str, Tensor]:
        w = codes.contiguous().view(FP8)
        if self.row_block == 1:
            return {"weight": w, "scale": S[:, :1, 0].contiguous()}                      # [out, 1]
        return {"weight": w, "scale": S[::self.row_block, :, 0].contiguous()}           # [out/128, in/128]
