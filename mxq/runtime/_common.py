"""Shared pieces of the Triton runtime: the import guard, the interpreter switch, the MXFP4 decode helpers.

``TRITON_INTERPRET=1`` runs every kernel on CPU tensors (development only). The interpreter has two gaps
that the kernels work around: its bf16 ``tl.dot`` is wrong (so dots run in fp32 there, ``DOT_F32``), and
autotuning is skipped (each kernel's first config is used).
"""
from __future__ import annotations

import os

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs (CI) have none
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("mxq.runtime needs triton (it ships with CUDA builds of torch)")


def autotune(configs, key):
    """``triton.autotune`` on a GPU; under the interpreter, the kernel itself (callers pass configs[0])."""
    def deco(fn):
        if INTERPRET:
            fn._mxq_default = dict(configs[0].kwargs)
            return fn
        tuned = triton.autotune(configs=configs, key=key)(fn)
        tuned._mxq_default = None
        return tuned
    return deco


def launch(kernel, grid, *args, **kw):
    """Launch an ``autotune``-wrapped kernel; ``grid`` is a function of the meta-parameters."""
    meta = getattr(kernel, "_mxq_default", None)
    if meta:
        kernel[grid(meta)](*args, **kw, **meta)
    else:
        kernel[grid](*args, **kw)


def cfg(num_warps: int = 4, num_stages: int = 2, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if HAVE_TRITON:
    @triton.jit
    def fp4q(c, SHIFT: tl.constexpr):
        """A quarter of the E2M1 value of the nibble at bit SHIFT (0 or 4) of the byte ``c`` (int32), as fp32.

        No int->float conversion (slow on the GPU): the 3 magnitude bits (e, m) go to the bottom of the fp32
        exponent / top of the mantissa over a base exponent of 124, giving f = 2^(e-3) (1 + m/2); then
        min(f, 2f - 1/4) maps e = 0 to the E2M1 subnormals (0, 1/2)/4 and keeps e > 0; the sign bit is or-ed
        in. Callers fold the factor 4 into the block scale (``e8m0_x4``).
        """
        f = (((c << (22 - SHIFT)) & 0x01C00000) | 0x3E000000).to(tl.float32, bitcast=True)
        v = tl.minimum(f, 2.0 * f - 0.25)
        sign = (c & (8 << SHIFT)) << (28 - SHIFT)                  # bit 3 of the nibble -> bit 31
        return (v.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def e8m0_x4(s):
        """E8M0 scale byte -> 4 * 2^(s-127) as fp32, exact for bytes 0..252 (253, 254 overflow to inf: weights
        of magnitude >= 2^126, which no bf16 model has)."""
        return ((s.to(tl.int32) + 2) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def bf16r(x):
        """Round an fp32 tensor to bf16 and back (reproduces the reference's bf16 intermediates)."""
        return x.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def mma(a, b, acc, DOT_F32: tl.constexpr):
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)

    @triton.jit
    def swiglu(a_g, a_u, alpha, limit):
        """GPT-OSS clamped SwiGLU on fp32 gate/up (spec 4.6): (clamp(u) + 1) * g * sigmoid(alpha * g)."""
        g = tl.minimum(a_g, limit)
        u = tl.minimum(tl.maximum(a_u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(alpha * g))


def dev_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET
