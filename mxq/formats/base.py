"""Format protocol and the ``Packed`` container shared by every numeric format.

Why a plain dataclass and not a tensor subclass: the runtime keeps expert weights packed exactly as they
are stored on disk, and every consumer (the forward pass, the exporter, the byte counter) only needs the
named tensors plus a dequantize/matmul function (see docs/architecture.md). A tensor subclass would
have to re-implement every torch op it meets or silently dequantize.

Axis convention shared by every format: ``quantize(w, axis)`` names the *contraction* (input) axis of ``w``.
The packed result is always stored ``[out, in]``-major, i.e. ``axis=0`` means ``w`` arrives as ``[in, out]``
(HF's transposed ``gate_up_proj``/``down_proj``) and is transposed before packing. ``Packed.shape`` is the
logical ``[out_features, in_features]`` shape and ``dequantize`` always returns ``[out, in]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor


class FormatError(ValueError):
    """Bad input to a quantizer or a packed tensor set that does not fit its format."""


@dataclass(frozen=True)
class Packed:
    """One weight matrix in a packed format.

    ``shape`` is always the logical ``[out_features, in_features]`` shape; ``tensors`` holds the format's
    named packed tensors (for MXFP4: ``blocks`` u8 [out, in/32, 16] and ``scales`` u8 [out, in/32]).
    """

    format: str
    tensors: dict[str, Tensor]
    shape: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str) -> "Packed":
        return Packed(self.format, {k: v.to(device) for k, v in self.tensors.items()}, self.shape, dict(self.meta))


class Format:
    """Base class of a numeric format. Subclasses are frozen dataclasses registered by name."""

    name: str = ""

    def quantize(self, w: Tensor, axis: int = -1, *, name: str | None = None) -> Packed:  # pragma: no cover
        """Pack ``w`` along its contraction ``axis``; ``name`` (e.g. the checkpoint key) labels error messages."""
        raise NotImplementedError

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        n = 1
        for s in shape:
            n *= int(s)
        return 8.0 * self.nbytes(tuple(shape)) / n

    def matmul(self, x: Tensor, p: Packed) -> Tensor:
        """``x @ W^T`` for ``x`` [N, in] -> [N, out]; the reference path dequantizes to ``x``'s dtype."""
        if x.shape[-1] != p.shape[1]:
            raise FormatError(f"{self.name}: x has {x.shape[-1]} input features, the weight expects {p.shape[1]}")
        return x @ self.dequantize(p, x.dtype).t()


def check_finite(w: Tensor, name: str = "weight") -> None:
    """Reject NaN/Inf before quantizing: a non-finite value would silently poison a whole block's scale.

    One ``aminmax`` pass (NaN propagates through min/max) instead of an elementwise mask; the mask is only
    built to report the first bad index.
    """
    lo, hi = torch.aminmax(w)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise FormatError(f"{name}: non-finite value (NaN or Inf) at index {bad}; refusing to quantize")


def check_axis(w: Tensor, axis: int, block: int, name: str = "weight") -> int:
    """Normalise ``axis`` and require the quantization axis to be divisible by the block size."""
    if w.dim() < 1:
        raise FormatError(f"{name}: expected at least 1 dimension, got a scalar")
    if not -w.dim() <= axis < w.dim():
        raise FormatError(f"{name}: axis {axis} is out of range for a {w.dim()}-D tensor")
    ax = axis % w.dim()
    if w.shape[ax] % block != 0:
        raise FormatError(
            f"{name}: dimension {ax} has size {w.shape[ax]}, which is not divisible by the block size {block}"
        )
    return ax


def as_out_in(w: Tensor, axis: int, block: int, fmt: str, tensor: str | None = None) -> Tensor:
    """Validate a weight and return it as ``[out, in]`` (contraction axis last), without copying when possible.

    Checks, in order: a 2-D floating tensor, the axis divisible by ``block``, every value finite. Errors name
    the format and the tensor (``tensor``, e.g. a checkpoint key; "weight" when not given).
    """
    name = f"{fmt}: {tensor or 'weight'}"
    if not isinstance(w, Tensor):
        raise FormatError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise FormatError(f"{name}: expected a floating-point weight, got {w.dtype}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise FormatError(f"{name}: unsupported dtype {w.dtype} (use float32, bfloat16 or float16)")
    ax = check_axis(w, axis, block, name)
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise FormatError(f"{name}: empty weight of shape {tuple(w.shape)}")
    check_finite(w, name)
    return w if ax == 1 else w.t()


def check_packed(p: Packed, fmt: str, expect: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Check a ``Packed`` against the tensors a format expects: names, dtypes and exact shapes.

    Why: dequantizing a tensor set that belongs to another format (or a mis-sliced expert) must fail
    loudly instead of producing plausible-looking garbage.
    """
    if not isinstance(p, Packed):
        raise FormatError(f"{fmt}: expected a Packed, got {type(p).__name__}")
    if p.format != fmt:
        raise FormatError(f"{fmt}: cannot dequantize a Packed of format {p.format!r}")
    if len(p.shape) != 2:
        raise FormatError(f"{fmt}: Packed.shape must be [out, in], got {p.shape}")
    missing = sorted(set(expect) - set(p.tensors))
    extra = sorted(set(p.tensors) - set(expect))
    if missing or extra:
        raise FormatError(f"{fmt}: packed tensors missing {missing} / unexpected {extra}")
    for key, (dtype, shape) in expect.items():
        t = p.tensors[key]
        if t.dtype != dtype:
            raise FormatError(f"{fmt}: tensor {key!r} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"{fmt}: tensor {key!r} must have shape {tuple(shape)}, got {tuple(t.shape)}")


_CONST_CACHE: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}


def const(key: str, values: tuple[float, ...], device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant table (boundaries, code books) cached per device, so no host->device copy per call."""
    k = (key, torch.device(device), dtype)
    if k not in _CONST_CACHE:
        _CONST_CACHE[k] = torch.tensor(values, dtype=dtype, device=device)
    return _CONST_CACHE[k]


def div(x: Tensor, c: float) -> Tensor:
    """``x / c`` with true IEEE division on every device.

    Why: on CUDA, PyTorch turns division by a Python scalar into multiplication by its reciprocal, which
    rounds differently (e.g. ``amax / 448``); dividing by a one-element device tensor keeps CPU and GPU
    results bit-identical.
    """
    return x / const(f"div:{c!r}", (c,), x.device, x.dtype)


# Row chunks bound the temporaries (fp32 copies, codes) of a quantizer to about this many elements.
CHUNK_ELEMS = 1 << 24


def row_chunks(rows: int, cols: int, multiple: int = 1, chunk_elems: int | None = None) -> Iterator[slice]:
    """Yield row slices of about ``chunk_elems`` (default ``CHUNK_ELEMS``) elements, a multiple of ``multiple`` rows."""
    limit = CHUNK_ELEMS if chunk_elems is None else chunk_elems
    step = max(multiple, (limit // max(cols, 1)) // multiple * multiple)
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))
