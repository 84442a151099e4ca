"""Shared pieces of the Triton runtime: the import guard, the interpreter switch, the MXFP4 decode helpers.

``TRITON_INTERPRET=1`` runs every kernel on CPU tensors (development only). The interpreter has two gaps
that the kernels work around: its bf16 ``tl.dot`` is wrong (so dots run in fp32 there, ``DOT_F32``), and
autotuning is skipped (each kernel's first config is used).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

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


# MXQ_AUTOTUNE_FIRST=1: every autotuned kernel runs its first config, untuned (compute-sanitizer runs: tuning
# replays each config many times, which memcheck makes minutes long).
AUTOTUNE_FIRST = os.environ.get("MXQ_AUTOTUNE_FIRST", "0") == "1"


def autotune(configs, key):
    """``triton.autotune`` on a GPU; under the interpreter or with ``AUTOTUNE_FIRST``, the kernel itself
    (callers pass configs[0])."""
    def deco(fn):
        if INTERPRET or AUTOTUNE_FIRST:
            c = configs[0]
            fn._mxq_default = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
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


def h2perm_index(n: int, device=None) -> torch.Tensor:
    """perm[i] = position of element i in the MXFP4 GEMV's f16 x layout (``h2perm``): within each block of 32,
    element 8w + n sits at 8 (n % 4) + 2w + n // 4."""
    i = torch.arange(n, device=device)
    j = i % 32
    n8 = j % 8
    return i - j + (n8 % 4) * 8 + (j // 8) * 2 + n8 // 4


# The MXFP4 GEMV multiplies f16 weights (the E2M1 value times 2^-14, ``fp4_dot_f16``) by f16 activations scaled
# by a power of two so that |x| < 2^X_EXP: every product is then below 12 in magnitude (no overflow in the f16
# sums of 4 products) and, for all but negligible x, above the f16 subnormals. The SwiGLU output that feeds the
# down GEMV is bounded by (limit + 1) * limit (56 for gpt-oss's limit 7), so it gets the fixed factor 2^Y_EXP;
# ``y_f16_ok`` says whether a model's limit allows that.
X_EXP = 15
Y_EXP = 9


class GemvX(NamedTuple):
    """The MXFP4 gate_up GEMV's input: ``x`` [N, K] f16 in ``h2perm`` order, each row scaled by 2^k so that
    |x| < 2^X_EXP, and ``inv`` [N] fp32 = 2^-k (what ``rmsnorm(..., hs="h2perm")`` writes)."""
    x: torch.Tensor
    inv: torch.Tensor


def y_f16_ok(limit: float) -> bool:
    """True when |SwiGLU output| <= (limit + 1) * limit stays below 2^(X_EXP - Y_EXP), so the f16 y of the
    MXFP4 down GEMV cannot overflow."""
    return math.isfinite(limit) and limit >= 0 and (limit + 1.0) * limit < 2.0 ** (X_EXP - Y_EXP)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# (magnitude shift, sign shift) of pair slot j = 0..3 (nibbles j, j + 4) of an MXFP4 word: the 3 magnitude bits
# of nibble j move to bits 9-11 (negative: a right shift), its sign bit to bit 15; nibble j + 4 follows 16 bits up.
FP4_PAIR_SHIFTS = ((9, 12), (5, 8), (1, 4), (-3, 0))


def _fp4_pair_ptx(word: str, j: int) -> list[str]:
    """PTX putting pair slot j of the int32 ``word`` operand into the f16x2 register ``v`` (``FP4_PAIR_SHIFTS``:
    magnitude bits to 9-11 / 25-27, sign bits to 15 / 31; clobbers ``s``): the decode shared by both dot PTXs."""
    vs, ss = FP4_PAIR_SHIFTS[j]
    lines = [f"shl.b32 v, {word}, {vs};" if vs >= 0 else f"shr.b32 v, {word}, {-vs};", "and.b32 v, v, 0x0E000E00;"]
    if ss:
        lines += [f"shl.b32 s, {word}, {ss};", "and.b32 s, s, 0x80008000;"]
    else:
        lines.append(f"and.b32 s, {word}, 0x80008000;")
    return lines + ["or.b32 v, v, s;"]


def _fp4_f16_asm() -> str:
    """The PTX of ``fp4_dot_f16``, one block per pair slot of ``FP4_PAIR_SHIFTS``: $1 the word, $2..$5 the x
    pairs of slots 0..3, $0 the fp32 sum of the 8 products."""
    lines = [".reg .b32 v, s, a;", ".reg .b16 l, h;", ".reg .f32 fl, fh;"]
    for j in range(len(FP4_PAIR_SHIFTS)):
        lines += _fp4_pair_ptx("$1", j)
        lines.append(f"mul.rn.f16x2 a, v, ${2 + j};" if j == 0 else f"fma.rn.f16x2 a, v, ${2 + j}, a;")
    lines += ["mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", "add.f32 $0, fl, fh;"]
    return "{\n" + "\n".join(lines) + "\n}"


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

    # One int32 word of an MXFP4 block (nibble n = element 8w + n, low nibble first) times its 8 activations,
    # in f16. Pair j of the word is (nibble j, nibble j + 4), whose bits sit 16 apart, so one shift + mask of
    # the word puts both magnitudes' 3 bits at bits 9-11 of each f16 half (e1 e0 in the exponent's two low bits,
    # m in the top mantissa bit) and another shift + mask both sign bits at bits 15 and 31. That f16 pair is
    # exactly (E2M1 value) x 2^-14 for all 16 codes: e = 0 lands on the f16 subnormals 0 and 2^-15 = 0.5 x 2^-14,
    # so no fix-up is needed. ``fma.rn.f16x2`` (no .ftz: subnormals kept) multiplies the pair by the x of the two
    # nibbles (products exact: 2 x 8 significant bits) and sums the word's products in f16, 4 per lane; the two
    # lanes are added in fp32. Per 8 weights: 7 shifts, 12 logic ops, 4 HFMA2, 3 to finish, against 29 integer
    # ops + 8 FFMA in the fp32 decode this replaced (docs/runtime.md).
    _FP4_F16_ASM = tl.constexpr(_fp4_f16_asm())

    FP4_ASM = tl.constexpr(not INTERPRET)     # inline PTX is compiled code: not for the interpreter

    @triton.jit
    def f16_lanes(v):
        """An int32 tensor of f16 pairs -> (low half, high half) as fp32."""
        lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def fp4_pair_f16(w, VS: tl.constexpr, SS: tl.constexpr):
        """Pair (nibble j, nibble j + 4) of the int32 word ``w`` as an f16 pair (int32), each E2M1 value x 2^-14:
        magnitude bits shifted by VS (negative: right) to bits 9-11 / 25-27, sign bits by SS to 15 / 31."""
        if VS >= 0:
            v = w << VS
        else:
            v = w >> (-VS)
        return (v & 0x0E000E00) | ((w << SS) & -0x7FFF8000)                   # -0x7FFF8000: 0x80008000 as int32

    @triton.jit
    def fp4_dot_f16(w, x0, x1, x2, x3, ASM: tl.constexpr):
        """Sum over the 8 nibbles of the int32 word ``w`` of (E2M1 value x 2^-14) * x, as fp32; ``xj`` is the f16
        pair (int32) holding the x of nibbles j and j + 4 (the ``h2perm`` layout stores them side by side).

        ``ASM``: the f16x2 PTX above. The fallback (the Triton interpreter) decodes the same f16 pairs with
        integer ops and sums the exact products in fp32 (the GPU rounds each lane's running sum to f16)."""
        if ASM:
            return tl.inline_asm_elementwise(_FP4_F16_ASM, "=r,r,r,r,r,r", [w, x0, x1, x2, x3],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            w0l, w0h = f16_lanes(fp4_pair_f16(w, 9, 12))
            w1l, w1h = f16_lanes(fp4_pair_f16(w, 5, 8))
            w2l, w2h = f16_lanes(fp4_pair_f16(w, 1, 4))
            w3l, w3h = f16_lanes(fp4_pair_f16(w, -3, 0))
            a0, b0 = f16_lanes(x0)
            a1, b1 = f16_lanes(x1)
            a2, b2 = f16_lanes(x2)
            a3, b3 = f16_lanes(x3)
            return w0l * a0 + w0h * b0 + w1l * a1 + w1h * b1 + w2l * a2 + w2h * b2 + w3l * a3 + w3h * b3

    @triton.jit
    def h2perm(offs):
        """Position of element ``offs`` in the MXFP4 GEMV's f16 x layout: within each block of 32, element
        8w + n (nibble n of the block's int32 word w) is stored at 8 (n % 4) + 2w + n // 4, so for each j = 0..3
        the x pairs of nibbles (j, j + 4) of words 0..3 are one 16-byte vector, word-major, in the same register
        layout as the 4 weight words: no layout conversion in the GEMV."""
        j = offs % 32
        n = j % 8
        return offs - j + (n % 4) * 8 + (j // 8) * 2 + n // 4

    @triton.jit
    def x16_scale(amax):
        """(2^k, 2^-k) as fp32 for the largest k with amax * 2^k < 2^X_EXP (= 2^15), from the exponent bits of
        ``amax`` (amax < 2^(e - 126) for biased exponent e, so k = 141 - e); exact powers of two. e is clamped
        to [16, 254] (an all-zero row gets 2^125, which multiplies zeros)."""
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 16), 254)
        up = ((268 - e) << 23).to(tl.float32, bitcast=True)                # 2^(141 - e)
        down = ((e - 14) << 23).to(tl.float32, bitcast=True)               # 2^(e - 141)
        return up, down

    @triton.jit
    def e8m0_f16dec(s):
        """E8M0 scale byte -> 2^(s-127) x 2^14 as fp32 (undoes ``fp4_dot_f16``'s 2^-14); exact for bytes 0..240
        (larger ones, weights of magnitude >= 2^114, which no bf16 model has, overflow to inf)."""
        return ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)

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
        """GPT-OSS clamped SwiGLU on fp32 gate/up (gpt-oss ``swiglu``): (clamp(u) + 1) * g * sigmoid(alpha * g)."""
        g = tl.minimum(a_g, limit)
        u = tl.minimum(tl.maximum(a_u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(alpha * g))


def dev_ok(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


# The words of a scale group in ``fp4_group_dot_f16``'s f16 accumulation chains: words 0, 1 and words 2, 3.
FP4_GROUP_CHAINS = ((0, 1), (2, 3))


def _fp4_group_f16_asm() -> str:
    """The PTX of ``fp4_group_dot_f16``: $1..$4 the 4 words of a scale group, $(5 + 4w + j) the x pair of slot j
    of word w, $0 the fp32 sum of the group's 32 products. Each chain of ``FP4_GROUP_CHAINS`` multiplies and
    sums its 2 words' 16 products in f16x2, 8 per lane (word by word, the pair slots of ``FP4_PAIR_SHIFTS`` in
    order), the two chains are added in f16x2, and only the two lanes of that sum are converted and added in
    fp32."""
    lines = [".reg .b32 v, s, a, b;", ".reg .b16 l, h;", ".reg .f32 fl, fh;"]
    for acc, words in zip("ab", FP4_GROUP_CHAINS):
        for i, w in enumerate(words):
            for j in range(len(FP4_PAIR_SHIFTS)):
                lines += _fp4_pair_ptx(f"${1 + w}", j)
                x = f"${5 + 4 * w + j}"
                lines.append(f"mul.rn.f16x2 {acc}, v, {x};" if i == j == 0 else f"fma.rn.f16x2 {acc}, v, {x}, {acc};")
    lines += ["add.rn.f16x2 a, a, b;", "mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;",
              "add.f32 $0, fl, fh;"]
    return "{\n" + "\n".join(lines) + "\n}"


if HAVE_TRITON:
    # One MXFP4 scale group (4 int32 words, 32 weights) times its 32 activations, in f16: ``fp4_dot_f16``'s
    # decode and f16x2 products, but each lane sums 8 products per chain (2 words) and the 2 chains in f16
    # instead of 4 per word, so that the f16 -> fp32 conversions and fp32 adds run once per group, not once
    # per word (15 SASS instructions per group down to 4). Range: every product is below 12 in magnitude
    # (``X_EXP``), so a lane's sum of 16 stays below 192, far from the f16 maximum 65504. Rounding: the
    # products themselves are exact above the f16 subnormals (x holds a bf16 value, 8 significant bits, times
    # 2^k; the weight 2), only the f16 additions round, now 15 per lane instead of 3. Simulated against fp64
    # (bf16-valued x with Gaussian, Student-t and outlier-heavy rows scaled by 2^k as ``kernel_x`` does, and
    # SwiGLU-like y at the down GEMV's fixed 2^9; Gaussian MXFP4 weight rows of length 2880), the GEMV's
    # relative L2 error goes from 2.4-2.8e-4 (per-word sums) to 4.3-5.0e-4 (a single chain of 16 products
    # per lane: 5.3-6.3e-4; 4 chains of 4 added pairwise in f16: 3.7-4.1e-4 for 2 more instructions), below
    # the 1.6e-3 of the bf16 rounding of the output that follows. tests/test_runtime_layout.py re-measures one
    # case through the PTX itself (executed instruction by instruction) and bounds it by 1e-3.
    _FP4_GROUP_F16_ASM = tl.constexpr(_fp4_group_f16_asm())

    @triton.jit
    def fp4_group_dot_f16(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23,
                          x30, x31, x32, x33, ASM: tl.constexpr):
        """Sum over the 32 nibbles of a scale group's int32 words ``w0``..``w3`` of (E2M1 value x 2^-14) * x, as
        fp32; ``xwj`` is the f16 pair (int32) holding the x of nibbles j and j + 4 of word w (``h2perm``).

        ``ASM``: the PTX above. The fallback (the Triton interpreter) sums the 4 words' ``fp4_dot_f16``
        fallbacks: the same exact products, summed in fp32 (the GPU sums each chain in f16)."""
        if ASM:
            return tl.inline_asm_elementwise(_FP4_GROUP_F16_ASM, "=r" + ",r" * 20,
                                             [w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13,
                                              x20, x21, x22, x23, x30, x31, x32, x33],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return (fp4_dot_f16(w0, x00, x01, x02, x03, False) + fp4_dot_f16(w1, x10, x11, x12, x13, False)
                    + fp4_dot_f16(w2, x20, x21, x22, x23, False) + fp4_dot_f16(w3, x30, x31, x32, x33, False))
