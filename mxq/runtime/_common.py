"""Shared pieces of the Triton runtime: the import guard, the interpreter switch, the MXFP4 decode helpers.

``TRITON_INTERPRET=1`` runs every kernel on CPU tensors (development only). The interpreter has two gaps
that the kernels work around: its bf16 ``tl.dot`` is wrong (so dots run in fp32 there, ``DOT_F32``), and
autotuning is skipped (each kernel's first config is used).
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def forced_config(kernels, config):
    """Run the ``autotune``-wrapped ``kernels`` with exactly ``config`` inside the block.

    Autotuning only ever runs the config it picks for a shape key, so tests that must check every config,
    and sweeps that time configs outside the list, force them one at a time; the kernels' own lists and fresh
    tuning caches come back on exit. (GPU only: under the interpreter ``autotune`` returns the plain kernel.)"""
    saved = [k.configs for k in kernels]
    try:
        for k in kernels:
            k.configs = [config]
            k.cache.clear()
        yield
    finally:
        for k, c in zip(kernels, saved):
            k.configs = c
            k.cache.clear()


def xperm_index(n: int, device=None) -> torch.Tensor:
    """perm[i] = position of element i in the MXFP4 GEMV's x layout (``xperm``: 8w + n -> 4n + w per 32)."""
    i = torch.arange(n, device=device)
    j = i % 32
    return i - j + (j % 8) * 4 + j // 8


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

    # E2M1 magnitudes / 4 (0, 1/8, 1/4, 3/8, 1/2, 3/4, 1, 3/2) as fp32: byte 3 and byte 2 of each value, as two
    # 8-entry byte tables for prmt (table bytes 0-3 in the first word, 4-7 in the second; OCP MX spec 5.3.3).
    _FP4_ASM = tl.constexpr("""
    {
    .reg .b32 m, mh, hb, lb, sh, ta, tb, la, lb2, sgn;
    mov.b32 ta, 0x3E3E3E00;
    mov.b32 tb, 0x3F3F3F3F;
    mov.b32 la, 0xC0800000;
    mov.b32 lb2, 0xC0804000;
    mov.b32 sgn, 0x80000000;
    and.b32 m, $8, 0x77777777;
    shr.b32 mh, m, 16;
    prmt.b32 hb, ta, tb, m;
    prmt.b32 lb, la, lb2, m;
    prmt.b32 $0, hb, lb, 0x0488;
    prmt.b32 $1, hb, lb, 0x1588;
    prmt.b32 $2, hb, lb, 0x2688;
    prmt.b32 $3, hb, lb, 0x3788;
    shl.b32 sh, $8, 28;
    lop3.b32 $0, $0, sh, sgn, 0xF8;
    shl.b32 sh, $8, 24;
    lop3.b32 $1, $1, sh, sgn, 0xF8;
    shl.b32 sh, $8, 20;
    lop3.b32 $2, $2, sh, sgn, 0xF8;
    shl.b32 sh, $8, 16;
    lop3.b32 $3, $3, sh, sgn, 0xF8;
    prmt.b32 hb, ta, tb, mh;
    prmt.b32 lb, la, lb2, mh;
    prmt.b32 $4, hb, lb, 0x0488;
    prmt.b32 $5, hb, lb, 0x1588;
    prmt.b32 $6, hb, lb, 0x2688;
    prmt.b32 $7, hb, lb, 0x3788;
    shl.b32 sh, $8, 12;
    lop3.b32 $4, $4, sh, sgn, 0xF8;
    shl.b32 sh, $8, 8;
    lop3.b32 $5, $5, sh, sgn, 0xF8;
    shl.b32 sh, $8, 4;
    lop3.b32 $6, $6, sh, sgn, 0xF8;
    lop3.b32 $7, $7, $8, sgn, 0xF8;
    }
    """)

    FP4_ASM = tl.constexpr(not INTERPRET)     # inline PTX is compiled code: not for the interpreter

    @triton.jit
    def fp4x8(w, ASM: tl.constexpr):
        """The 8 E2M1 nibbles of the int32 word ``w`` (nibble n = bits 4n..4n+3, i.e. element 8*word + n of an
        MXFP4 block) as 8 fp32 tensors, each a quarter of the E2M1 value (callers scale by ``e8m0_x4``).

        ``ASM``: about 3.6 integer instructions per weight instead of ~9 -- two ``prmt`` byte-table lookups give
        the top two bytes of the fp32 of 4 magnitudes at once, one ``prmt`` per weight assembles the fp32 (its
        two low bytes are zero through prmt's sign-replicate mode on a table byte below 0x80), one shift and
        one ``lop3`` copy the sign bit. The fallback (``fp4q`` per nibble) is for the Triton interpreter."""
        if ASM:
            return tl.inline_asm_elementwise(
                _FP4_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32,
                       tl.float32), is_pure=True, pack=1)
        else:
            return (fp4q(w, 0), fp4q(w, 4), fp4q(w >> 8, 0), fp4q(w >> 8, 4), fp4q(w >> 16, 0),
                    fp4q(w >> 16, 4), fp4q(w >> 24, 0), fp4q(w >> 24, 4))

    @triton.jit
    def xperm(offs):
        """Position of element ``offs`` in the MXFP4 GEMV's x layout: within each block of 32, element 8w + n
        (nibble n of the block's int32 word w) is stored at 4n + w. The GEMV then loads, for each n, the x of
        the 4 words of a group as one 16-byte vector, in the same register layout as the 4 weight words (a
        [BG, 4] tile like the words' [R, BG, 4]): no layout conversion through shared memory, and x is read
        once per weight with a multiply-add chain per word."""
        j = offs % 32
        return offs - j + (j % 8) * 4 + j // 8

    @triton.jit
    def x_parts(xv, NG: tl.constexpr, GW: tl.constexpr, EPW: tl.constexpr):
        """The x tile [NG, GW, EPW] (x[EPW w + n] at [.., n]) as a tuple of EPW tensors [NG, GW], element n of
        every word at index n, by ``tl.split`` (free register renaming: the split axes are within a thread)."""
        if EPW == 8:
            e, o = tl.split(tl.reshape(xv, (NG, GW, 2, 2, 2)))                     # n % 2
            e0, e1 = tl.split(e)
            o0, o1 = tl.split(o)                                                    # n // 2 % 2
            x0, x4 = tl.split(e0)
            x2, x6 = tl.split(e1)
            x1, x5 = tl.split(o0)
            x3, x7 = tl.split(o1)                                                   # n // 4
            return x0, x1, x2, x3, x4, x5, x6, x7
        elif EPW == 4:
            e, o = tl.split(tl.reshape(xv, (NG, GW, 2, 2)))
            x0, x2 = tl.split(e)
            x1, x3 = tl.split(o)
            return x0, x1, x2, x3
        else:
            x0, x1 = tl.split(xv)
            return x0, x1

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
