"""Expert kernels for every mxq format: decode GEMVs and grouped prefill GEMMs that read each
format's packed bytes directly, and layers whose experts are in several formats.

Formats (docs/formats.md for the byte layouts; docs/runtime.md, "Expert formats", for the decoders):
mxfp4, nvfp4, nf4, nf4_dq, int4_g32, int4_g128, int4_g32_asym, int4_g128_asym, fp8, fp8_block, bf16.

Every weight matrix is read as 32-bit words along its input axis: a word holds 8 nibbles (E2M1, NF4,
INT4), 4 E4M3 bytes (fp8) or 2 bf16 values. Element ``i`` of a row is element ``i % EPW`` of word
``i // EPW`` (NF4 stores element 2j in the high nibble of byte j, so its nibble order within a byte is
swapped). A scale group is ``GW`` consecutive words of a row (16/32/64/128 elements; fp8 uses groups of
128 elements: its per-channel scale is read with a group stride of 0, its 128 x 128 block scale per 128
rows). The kernels decode in registers:

* decode GEMV (``fmt_gate_up_gemv``, ``fmt_down_gemv``): a program covers rows of one (token, slot) pair's
  expert and loops over BW words per row; per element position n it multiplies the decoded values by the
  fp32 input at 8w + n (plain fp32 x, strided loads that hit L1, amortised over the rows), sums within the
  group and applies the group scale once per group. Same contract and rounding as ``moe_kernels``'
  ``gate_up_gemv`` (bf16(bf16(acc) + bias), clamped SwiGLU) and ``down_gemv`` (z [N, k, H]).
* prefill (``fmt_moe_grouped``): (token, slot) pairs sorted by expert (``expert_tiles``), a tile of pairs
  of one expert times a weight tile decoded to fp32, scaled, rounded to bf16 (the reference's own
  dequantized values) and put back in natural k order (a tree of ``tl.join`` + ``tl.reshape``), one
  ``tl.dot`` per K step.

Mixed formats (``FmtExperts``): per layer and kind, one stack [E_f, ...] per format present (the experts
in that format), an expert -> (slot, index in its stack) map on the device, and one launch per slot;
a program whose expert belongs to another slot does nothing (no host synchronisation, graph-capturable).
Each (token, slot) pair is written by exactly one launch. Stacks reuse a checkpoint's stacked buffer where
the experts already are views of it; otherwise the per-expert tensors are copied into a new stack once and
the model's per-expert ``Packed`` tensors are re-pointed at views of it (``set_expert``), so the experts are
held once on the device.
"""
from __future__ import annotations

import torch

from ._common import INTERPRET, autotune, bf16r, cfg, e8m0_x4, launch, mma, swiglu, tl, triton, x_parts
from .pdl import grid_dep, pdl_kw
from .moe_kernels import GROUP_BM, down_tile_out, expert_tiles, gate_up_tile_out, tile_rows

# format name -> (kernel code, elements per 32-bit word, elements per scale group)
MXFP4, NVFP4, NF4, NF4DQ, INT4, FP8, BF16 = 0, 1, 2, 3, 4, 5, 6
FORMATS = {
    "mxfp4": (MXFP4, 8, 32), "nvfp4": (NVFP4, 8, 16), "nf4": (NF4, 8, 64), "nf4_dq": (NF4DQ, 8, 64),
    "int4_g32": (INT4, 8, 32), "int4_g128": (INT4, 8, 128), "int4_g32_asym": (INT4, 8, 32),
    "int4_g128_asym": (INT4, 8, 128), "fp8": (FP8, 4, 128), "fp8_block": (FP8, 4, 128), "bf16": (BF16, 2, 64),
}
_SIGN = tl.constexpr(-2147483648)            # int32 with only bit 31 set
_NF4_LUT = 0                                 # lut[0:16] = NF4 levels, lut[16:272] = 8-bit dynamic map (nf4_dq)
_DYN_LUT = 16


# ----------------------------------------------------------------------------------------------- decoders


@triton.jit
def _e2m1q(c, SH: tl.constexpr):
    """A quarter of the E2M1 value of the nibble at bits SH..SH+3 of the int32 words ``c`` (see
    ``_common.fp4q``: magnitude bits into the fp32 exponent/mantissa over base exponent 124, then
    min(f, 2f - 1/4) for the two subnormal codes, sign or-ed in)."""
    if SH <= 22:
        m = c << (22 - SH)
    else:
        m = c >> (SH - 22)
    f = ((m & 0x01C00000) | 0x3E000000).to(tl.float32, bitcast=True)
    v = tl.minimum(f, 2.0 * f - 0.25)
    s = (c << (28 - SH)) & _SIGN
    return (v.to(tl.int32, bitcast=True) | s).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(c, SH: tl.constexpr):
    """The FP8 E4M3 value of the byte at bits SH..SH+7 of ``c`` (int32), exact, without int->float
    conversion: the 7 magnitude bits go to fp32 bits 20..26 and the exponent is rebased by +120, giving
    2^(e-7) (1 + m/8) for e >= 1; min(f, 2f - 2^-6) turns e = 0 into the subnormals m 2^-9. (0x7F, NaN in
    E4M3, reads as 480; the quantizers never write it.)"""
    if SH <= 20:
        m = c << (20 - SH)
    else:
        m = c >> (SH - 20)
    f = ((m & 0x07F00000) + 0x3C000000).to(tl.float32, bitcast=True)
    v = tl.minimum(f, 2.0 * f - 0.015625)
    s = (c << (24 - SH)) & _SIGN
    return (v.to(tl.int32, bitcast=True) | s).to(tl.float32, bitcast=True)


@triton.jit
def _elem(c, n: tl.constexpr, zf, lut_ptr, FMT: tl.constexpr):
    """Element n of every word of ``c`` before its group scale (E2M1 formats: a quarter of it; INT4: q - zero,
    with ``zf`` = 2^23 + zero per group)."""
    if FMT == 0:
        v = _e2m1q(c, 4 * n)
    elif FMT == 1:
        v = _e2m1q(c, 4 * n)
    elif FMT == 2:
        v = tl.load(lut_ptr + ((c >> (4 * (n ^ 1))) & 15))          # NF4: element 2j is the high nibble
    elif FMT == 3:
        v = tl.load(lut_ptr + ((c >> (4 * (n ^ 1))) & 15))
    elif FMT == 4:
        # 2^23 + q exactly (q in the low mantissa bits), minus 2^23 + zero: exact q - zero
        v = (((c >> (4 * n)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zf
    elif FMT == 5:
        v = _e4m3(c, 8 * n)
    else:
        if n == 0:
            v = (c << 16).to(tl.float32, bitcast=True)                # bf16 -> fp32 is a shift
        else:
            v = (c & -65536).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _group_scale(s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm, gi, gm, s_se, s_sr, s_sg, s_ne,
                 FMT: tl.constexpr, SROW: tl.constexpr, ASYM: tl.constexpr):
    """(scale, 2^23 + zero) fp32 [len(rows), len(gi)] of the scale groups ``gi`` of ``rows`` of stacked
    expert ``j``. E2M1 scales carry the factor 4 that ``_e2m1q`` leaves out."""
    m2 = rm[:, None] & gm[None, :]
    if SROW == 1:
        sr = rows
    else:
        sr = rows // SROW
    off = sr[:, None].to(tl.int64) * s_sr + gi[None, :] * s_sg                  # within the expert
    sp = s_ptr + j * s_se + off
    zf = tl.full(off.shape, 8388616.0, tl.float32)                              # 2^23 + 8 (symmetric INT4)
    if FMT == 0:
        sc = e8m0_x4(tl.load(sp, mask=m2, other=0))
    elif FMT == 1:
        g = tl.load(g_ptr + j)
        sc = _e4m3(tl.load(sp, mask=m2, other=0).to(tl.int32), 0) * (4.0 * g)
    elif FMT == 2:
        sc = tl.load(sp, mask=m2, other=0.0)
    elif FMT == 3:
        q8 = tl.load(sp, mask=m2, other=0).to(tl.int32)
        nested = tl.load(n_ptr + j * s_ne + off // 256, mask=m2, other=0.0)    # blocks of 256 statistics
        sc = tl.load(lut_ptr + 16 + q8) * nested + tl.load(g_ptr + j)
    elif FMT == 4:
        sc = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
        if ASYM:
            zf = tl.load(z_ptr + j * s_se + off, mask=m2, other=0).to(tl.float32) + 8388608.0
    elif FMT == 5:
        sc = tl.load(sp, mask=m2, other=0.0)
    else:
        sc = tl.full(off.shape, 1.0, tl.float32)
    return sc, zf


@triton.jit
def _fmt_rows_dot(x_row, w_e, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm, w_end, WPR, s_wr, s_se, s_sr,
                  s_sg, s_ne, FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr,
                  ASYM: tl.constexpr, R: tl.constexpr, BW: tl.constexpr, NS: tl.constexpr):
    """acc[r] = sum_k x[k] W[rows[r], k] for stacked expert ``j`` (``w_e`` points at it); x fp32, plain order.

    Pipelined over NS stages (``tl.range``; a plain ``range`` loop is not pipelined for loads that do not
    feed ``tl.dot``, see ``moe_kernels._rows_dot_fp4``); the x tile is one contiguous load per iteration."""
    NG: tl.constexpr = BW // GW
    offs_g = tl.arange(0, NG)
    offs_w = tl.arange(0, GW)
    offs_n = tl.arange(0, EPW)
    acc = tl.zeros([R, NG], dtype=tl.float32)
    wrow = w_e + rows[:, None, None].to(tl.int64) * s_wr
    for w0 in tl.range(0, w_end, BW, num_stages=NS):
        gi = w0 // GW + offs_g                                                  # scale groups [NG]
        wi = gi[:, None] * GW + offs_w[None, :]                                 # words [NG, GW]
        wm = wi < WPR
        c = tl.load(wrow + wi[None, :, :], mask=rm[:, None, None] & wm[None, :, :], other=0)   # [R, NG, GW]
        sc, zf = _group_scale(s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm, gi, gi * GW < WPR, s_se, s_sr,
                              s_sg, s_ne, FMT, SROW, ASYM)
        z3 = zf[:, :, None]
        xs = x_parts(tl.load(x_row + wi[:, :, None] * EPW + offs_n[None, None, :], mask=wm[:, :, None],
                              other=0.0), NG, GW, EPW)                          # EPW x [NG, GW]
        part = tl.zeros([R, NG, GW], dtype=tl.float32)
        for n in tl.static_range(EPW):
            part += _elem(c, n, z3, lut_ptr, FMT) * xs[n][None, :, :]
        acc += tl.sum(part, axis=2) * sc
    return tl.sum(acc, axis=1)


@triton.jit
def _il2(a, b, R: tl.constexpr, C: tl.constexpr):
    """Interleave two [R, C] tensors: out[:, 2i] = a[:, i], out[:, 2i + 1] = b[:, i]."""
    return tl.reshape(tl.join(a, b), (R, 2 * C))


@triton.jit
def _fmt_w_tile(w_e, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, cols, cm, w0, WPR, s_wr, s_se, s_sr, s_sg, s_ne,
                FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr, ASYM: tl.constexpr,
                BN: tl.constexpr, BW: tl.constexpr):
    """W[cols, EPW*w0 : EPW*(w0 + BW)] of stacked expert ``j`` as bf16 [BN, EPW*BW] in natural k order: each
    value is bf16(fp32 decode x scale), the reference's dequantized weight."""
    wi = w0 + tl.arange(0, BW)
    wm = wi < WPR
    c = tl.load(w_e + cols[:, None].to(tl.int64) * s_wr + wi[None, :], mask=cm[:, None] & wm[None, :], other=0)
    sc, zf = _group_scale(s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, cols, cm, wi // GW, wm, s_se, s_sr, s_sg, s_ne,
                          FMT, SROW, ASYM)                                      # per word [BN, BW]
    if EPW == 8:
        v0 = (_elem(c, 0, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v1 = (_elem(c, 1, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v2 = (_elem(c, 2, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v3 = (_elem(c, 3, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v4 = (_elem(c, 4, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v5 = (_elem(c, 5, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v6 = (_elem(c, 6, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v7 = (_elem(c, 7, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        # out[8w + n] = v_n[w]: evens (n = 0, 2, 4, 6) interleaved with odds, each of those likewise
        ev = _il2(_il2(v0, v4, BN, BW), _il2(v2, v6, BN, BW), BN, 2 * BW)
        od = _il2(_il2(v1, v5, BN, BW), _il2(v3, v7, BN, BW), BN, 2 * BW)
        out = _il2(ev, od, BN, 4 * BW)
    elif EPW == 4:
        v0 = (_elem(c, 0, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v1 = (_elem(c, 1, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v2 = (_elem(c, 2, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        v3 = (_elem(c, 3, zf, lut_ptr, FMT) * sc).to(tl.bfloat16)
        out = _il2(_il2(v0, v2, BN, BW), _il2(v1, v3, BN, BW), BN, 2 * BW)
    else:
        out = _il2(_elem(c, 0, zf, lut_ptr, FMT).to(tl.bfloat16), _elem(c, 1, zf, lut_ptr, FMT).to(tl.bfloat16),
                   BN, BW)
    return out


# ----------------------------------------------------------------------------------------------- decode GEMV


# Every config compiles for sm_90 within 227 KB of shared memory for every format, without spills except an 8-byte
# stack for int4_g128_asym at BN = 16 / BW = 64
# (bench/compile_fmt_sm90.py); BN = 32 / BW = 64 spilled for NF4 and is used only by the interpreter (below).
_FMT_GEMV_CONFIGS = [cfg(4, 2, BN=8, BW=32, NS=3), cfg(4, 2, BN=4, BW=64, NS=3), cfg(4, 2, BN=16, BW=32, NS=3),
                     cfg(4, 2, BN=8, BW=32, NS=1),     # NF4: pipelining turns its table gathers into cp.async
                     cfg(8, 2, BN=16, BW=64, NS=3), cfg(2, 2, BN=4, BW=32, NS=4), cfg(4, 2, BN=8, BW=64, NS=4)]
_GEMV_KEY = ["P", "K", "FMT", "GW", "SROW", "ASYM"]


@triton.jit
def _slot_of(slot_ptr, sidx_ptr, e, slot):
    """(expert ``e`` is in this launch's format stack, its index j in that stack): one launch per stack, a
    program whose expert lives in another stack stores nothing (``FmtExperts``)."""
    return tl.load(slot_ptr + e) == slot, tl.load(sidx_ptr + e).to(tl.int64)


@autotune(_FMT_GEMV_CONFIGS, key=_GEMV_KEY + ["I"])
@triton.jit(do_not_specialize=["slot"])
def _fmt_gate_up_gemv_kernel(x_ptr, idx_ptr, slot_ptr, sidx_ptr, slot, w_ptr, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr,
                             bias_ptr, y_ptr, P, K, I, WPR, s_we, s_wr, s_se, s_sr, s_sg, s_ne, alpha, limit,
                             TOPK: tl.constexpr, FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr,
                             SROW: tl.constexpr, ASYM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                             NS: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    p = tl.program_id(0)
    nb = tl.program_id(1)
    t = (p // TOPK).to(tl.int64)
    e = tl.load(idx_ptr + p)
    mine, j = _slot_of(slot_ptr, sidx_ptr, e, slot)
    rows = nb * (2 * BN) + tl.arange(0, 2 * BN)           # interleaved gate (even) / up (odd) rows
    rm = tl.where(mine, rows < 2 * I, False)      # (where, not &: the interpreter's & of a scalar mask fails)
    acc = _fmt_rows_dot(x_ptr + t * K, w_ptr + j * s_we, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm,
                        tl.where(mine, WPR, 0), WPR, s_wr, s_se, s_sr, s_sg, s_ne, FMT, EPW, GW, SROW, ASYM,
                        2 * BN, BW, NS)
    bias = tl.load(bias_ptr + e.to(tl.int64) * (2 * I) + rows, mask=rm, other=0.0).to(tl.float32)
    a = bf16r(bf16r(acc) + bias)
    a_g, a_u = tl.split(tl.reshape(a, (BN, 2)))
    y = bf16r(swiglu(a_g, a_u, alpha, limit))
    offs = nb * BN + tl.arange(0, BN)
    tl.store(y_ptr + p.to(tl.int64) * I + offs, y, mask=tl.where(mine, offs < I, False))


@autotune(_FMT_GEMV_CONFIGS, key=_GEMV_KEY + ["H"])
@triton.jit(do_not_specialize=["slot"])
def _fmt_down_gemv_kernel(y_ptr, idx_ptr, wt_ptr, slot_ptr, sidx_ptr, slot, w_ptr, s_ptr, z_ptr, g_ptr, n_ptr,
                          lut_ptr, bias_ptr, z_out, P, K, H, WPR, s_we, s_wr, s_se, s_sr, s_sg, s_ne,
                          FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr,
                          ASYM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr, NS: tl.constexpr,
                          PDL: tl.constexpr):
    grid_dep(PDL)
    p = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    e = tl.load(idx_ptr + p)
    mine, j = _slot_of(slot_ptr, sidx_ptr, e, slot)
    rows = hb * BN + tl.arange(0, BN)
    rm = tl.where(mine, rows < H, False)
    gw = tl.load(wt_ptr + p)
    acc = _fmt_rows_dot(y_ptr + p * K, w_ptr + j * s_we, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm,
                        tl.where(mine, WPR, 0), WPR, s_wr, s_se, s_sr, s_sg, s_ne, FMT, EPW, GW, SROW, ASYM, BN, BW,
                        NS)
    bias = tl.load(bias_ptr + e.to(tl.int64) * H + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(z_out + p * H + rows, gw * bf16r(bf16r(acc) + bias), mask=rm)


# ----------------------------------------------------------------------------------------------- prefill


# (BN = 64 with 4 warps spilled; BN = 64, BK = 256 needed up to 256 KB of shared memory for NF4, whose table
# gathers the pipeliner multi-buffers.)
_FMT_GROUPED_CONFIGS = [cfg(4, 3, BN=32, BK=128), cfg(8, 3, BN=64, BK=128), cfg(8, 2, BN=32, BK=256),
                        cfg(8, 2, BN=64, BK=128)]
_GROUPED_KEY = ["P", "K", "FMT", "GW", "SROW", "ASYM", "BM"]


@autotune(_FMT_GROUPED_CONFIGS, key=_GROUPED_KEY + ["I"])
@triton.jit(do_not_specialize=["slot"])
def _fmt_gate_up_grouped_kernel(x_ptr, order_ptr, te_ptr, ts_ptr, tn_ptr, slot_ptr, sidx_ptr, slot, w_ptr, s_ptr,
                                z_ptr, g_ptr, n_ptr, lut_ptr, bias_ptr, y_ptr, P, K, I, WPR, s_we, s_wr, s_se,
                                s_sr, s_sg, s_ne, alpha, limit,
                                TOPK: tl.constexpr, FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr,
                                SROW: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr, DOT_F32: tl.constexpr):
    BW: tl.constexpr = BK // EPW
    nb = tl.program_id(1)
    e, rows, rm, live = tile_rows(ts_ptr, tn_ptr, te_ptr, BM)
    mine, j = _slot_of(slot_ptr, sidx_ptr, e, slot)
    rm = tl.where(mine, rm, False)
    pair = tl.load(order_ptr + rows, mask=rm, other=0)
    tok = (pair // TOPK).to(tl.int64)
    cols = nb * (2 * BN) + tl.arange(0, 2 * BN)
    cm = cols < 2 * I
    w_end = tl.where(live & mine, WPR, 0)
    kk = tl.arange(0, BK)
    acc = tl.zeros([2 * BN, BM], dtype=tl.float32)          # transposed: the decoded tile is the A operand
    w_e = w_ptr + j * s_we
    for w0 in range(0, w_end, BW):
        kc = w0 * EPW + kk
        xt = tl.load(x_ptr + tok[None, :] * K + kc[:, None], mask=rm[None, :] & (kc < K)[:, None], other=0.0)
        wt = _fmt_w_tile(w_e, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, cols, cm, w0, WPR, s_wr, s_se, s_sr, s_sg,
                         s_ne, FMT, EPW, GW, SROW, ASYM, 2 * BN, BW)
        acc = mma(wt, xt, acc, DOT_F32)
    gate_up_tile_out(tl.trans(acc), bias_ptr, e, cols, cm, rows, rm, y_ptr, I, nb, alpha, limit, BM, BN)


@autotune(_FMT_GROUPED_CONFIGS, key=_GROUPED_KEY + ["H"])
@triton.jit(do_not_specialize=["slot"])
def _fmt_down_grouped_kernel(y_ptr, order_ptr, wt_ptr, te_ptr, ts_ptr, tn_ptr, slot_ptr, sidx_ptr, slot, w_ptr,
                             s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, bias_ptr, z_out, P, K, H, WPR, s_we, s_wr, s_se,
                             s_sr, s_sg, s_ne,
                             FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr,
                             ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             DOT_F32: tl.constexpr):
    BW: tl.constexpr = BK // EPW
    nb = tl.program_id(1)
    e, rows, rm, live = tile_rows(ts_ptr, tn_ptr, te_ptr, BM)
    mine, j = _slot_of(slot_ptr, sidx_ptr, e, slot)
    rm = tl.where(mine, rm, False)
    pair = tl.load(order_ptr + rows, mask=rm, other=0).to(tl.int64)
    gw = tl.load(wt_ptr + pair, mask=rm, other=0.0)
    cols = nb * BN + tl.arange(0, BN)
    cm = cols < H
    w_end = tl.where(live & mine, WPR, 0)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BN, BM], dtype=tl.float32)              # transposed, as in the gate_up kernel
    w_e = w_ptr + j * s_we
    for w0 in range(0, w_end, BW):
        kc = w0 * EPW + kk
        yt = tl.load(y_ptr + rows.to(tl.int64)[None, :] * K + kc[:, None], mask=rm[None, :] & (kc < K)[:, None],
                     other=0.0)
        wt = _fmt_w_tile(w_e, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, cols, cm, w0, WPR, s_wr, s_se, s_sr, s_sg,
                         s_ne, FMT, EPW, GW, SROW, ASYM, BN, BW)
        acc = mma(wt, yt, acc, DOT_F32)
    down_tile_out(tl.trans(acc), bias_ptr, e, cols, cm, pair, rm, gw, z_out, H)


if INTERPRET:   # the interpreter runs one config per kernel (``_common.autotune``): large tiles, few programs
    for _k in (_fmt_gate_up_gemv_kernel, _fmt_down_gemv_kernel):
        _k._mxq_default = dict(BN=32, BW=64, NS=2)
    for _k in (_fmt_gate_up_grouped_kernel, _fmt_down_grouped_kernel):
        _k._mxq_default = dict(BN=64, BK=256)


# ----------------------------------------------------------------------------------------------- host side


_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def format_lut(device) -> torch.Tensor:
    """fp32 [272]: the 16 NF4 levels, then the 256 codes of the 8-bit dynamic map (nf4_dq statistics)."""
    dev = torch.device(device)
    if dev not in _LUT_CACHE:
        from ..formats.nf4 import dynamic_map, nf4_code
        _LUT_CACHE[dev] = torch.cat([nf4_code(dev), dynamic_map(dev)]).contiguous()
    return _LUT_CACHE[dev]


def _words(t: torch.Tensor, out_f: int) -> torch.Tensor:
    """A stacked packed tensor [E, out, ...] (u8 / fp8 / bf16, contiguous) viewed as int32 words [E, out, W]."""
    t = t.contiguous()
    b = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return b.reshape(t.shape[0], out_f, -1).view(torch.int32)


class FmtStack:
    """The experts of one layer kind in one format, stacked [E_f, ...] as the kernels read them.

    ``tensors``: the format's ``Packed`` tensor names, each with a leading expert axis."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int):
        from ..formats import get_format

        if fmt not in FORMATS:
            raise ValueError(f"no kernel for expert format {fmt!r}")
        self.fmt = fmt
        self.code, self.epw, group = FORMATS[fmt]
        if in_features % self.epw:
            raise ValueError(f"{fmt}: input width {in_features} is not a whole number of 32-bit words")
        self.tensors = tensors                       # kept: the model's per-expert tensors may be views of these
        self.out_f, self.in_f = out_features, in_features
        self.gw = group // self.epw
        self.srow, self.asym = 1, 0
        n_e = next(iter(tensors.values())).shape[0]
        dev = next(iter(tensors.values())).device
        wname = {"mxfp4": "blocks", "fp8": "weight", "fp8_block": "weight", "bf16": "weight"}.get(fmt, "packed")
        self.w = _words(tensors[wname], out_features)                      # [E_f, out, W] int32
        self.wpr = self.w.shape[2]
        self.s_we, self.s_wr = self.w.stride(0), self.w.stride(1)
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        self.s = self.z = self.g = self.n = dummy
        self.s_se = self.s_sr = self.s_sg = self.s_ne = 0
        sname = {"nf4": "absmax", "nf4_dq": "absmax", "fp8": "scale", "fp8_block": "scale"}.get(fmt, "scales")
        if self.code != BF16:
            s = tensors[sname].contiguous()
            if s.dtype == torch.float8_e4m3fn:
                s = s.view(torch.uint8)
            self.s = s.reshape(n_e, s.shape[1], -1)                          # [E_f, scale rows, scale cols]
            self.s_se, self.s_sr, self.s_sg = self.s.stride(0), self.s.stride(1), 1
        if self.code == INT4:
            f = get_format(fmt)
            self.asym = int(f.asym)
            if f.asym:
                self.z = tensors["zeros"].contiguous()
                assert self.z.shape == self.s.shape
        elif self.code == NVFP4:
            self.g = tensors["global_scale"].reshape(n_e).float().contiguous()
        elif self.code == NF4DQ:
            self.g = tensors["offset"].reshape(n_e).float().contiguous()
            self.n = tensors["nested_absmax"].reshape(n_e, -1).contiguous()
            self.s_ne = self.n.stride(0)
            assert self.s_sr == in_features // 64
        elif self.code == FP8:
            if get_format(fmt).block:
                self.srow = get_format(fmt).block
                assert self.srow == 128 and self.s.shape[2] == -(-in_features // 128)
            else:
                self.s_sg = 0                                              # one scale per row: group stride 0
        self.lut = format_lut(dev)

    def args(self):
        return (self.w, self.s, self.z, self.g, self.n, self.lut)

    def strides(self):
        return (self.wpr, self.s_we, self.s_wr, self.s_se, self.s_sr, self.s_sg, self.s_ne)

    def meta(self):
        return dict(FMT=self.code, EPW=self.epw, GW=self.gw, SROW=self.srow, ASYM=self.asym)

    def nbytes_per_expert(self) -> float:
        n_e = self.w.shape[0]
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) / n_e


def _consecutive(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """[n, ...] view of tensors that already lie one after the other in one storage (e.g. a previous
    ``FmtExperts``' stack), else None."""
    t0 = ts[0]
    step = t0.numel()
    for j, t in enumerate(ts):
        if (t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() or not t.is_contiguous()
                or t.shape != t0.shape or t.dtype != t0.dtype or t.storage_offset() != t0.storage_offset() + j * step):
            return None
    return torch.as_strided(t0, (len(ts), *t0.shape), (step, *t0.stride()), t0.storage_offset())


def _stack_one_format(experts, kind: str, fmt: str, members: list[int], repoint: bool):
    """(stacked tensors, index of each member in them), holding the experts once on the device:

    * every member is a view of a stacked [E, ...] buffer of the layer (a checkpoint): that buffer, indexed by
      expert id (rows of experts in other formats stay unused, as they were);
    * the members' tensors already lie one after the other in one storage (a previous ``FmtExperts``): a view;
    * otherwise the tensors are copied into new stacks once and, with ``repoint``, the model's per-expert
      tensors become views of them (``set_expert``), so the old per-expert tensors are freed."""
    from ..formats import Packed

    specs = [experts._spec[kind][e] for e in members]
    refs = specs[0][3]
    if all(s[0] == fmt and s[3] == refs for s in specs) and all(st for _, st in refs.values()):
        return {n: getattr(experts, b) for n, (b, _) in refs.items()}, list(members)
    ps = [experts.packed(kind, e) for e in members]
    views = {n: _consecutive([p.tensors[n] for p in ps]) for n in ps[0].tensors}
    if all(v is not None for v in views.values()):
        return views, list(range(len(members)))
    stacked = {n: torch.stack([p.tensors[n] for p in ps]) for n in ps[0].tensors}
    if repoint:
        for jj, (e, p) in enumerate(zip(members, ps)):
            experts.set_expert(kind, e, Packed(fmt, {n: t[jj] for n, t in stacked.items()}, p.shape, dict(p.meta)))
    return stacked, list(range(len(members)))


class FmtExperts:
    """One layer kind's experts for the ``fmt_*`` kernels: a stack per format present, and on the device
    ``slot`` [E] (which stack holds expert e) and ``sidx`` [E] (its index there)."""

    fp4 = False                                   # x and y in plain fp32 order (no ``h2perm``)

    def __init__(self, experts, kind: str, repoint: bool = True):
        e_n = experts.num_experts
        out_f, in_f = (2 * experts.intermediate, experts.hidden) if kind == "gate_up" else \
            (experts.hidden, experts.intermediate)
        self.kind, self.out_f, self.in_f, self.num_experts = kind, out_f, in_f, e_n
        groups: dict[str, list[int]] = {}
        for e in range(e_n):
            groups.setdefault(experts.packed(kind, e).format, []).append(e)
        slot, sidx = [0] * e_n, [0] * e_n
        self.stacks: list[FmtStack] = []
        for s, (fmt, members) in enumerate(groups.items()):
            if fmt not in FORMATS:
                raise ValueError(f"no fast-path kernel for {kind} experts in format {fmt!r}")
            tensors, where = _stack_one_format(experts, kind, fmt, members, repoint)
            self.stacks.append(FmtStack(fmt, tensors, out_f, in_f))
            for e, i in zip(members, where):
                slot[e], sidx[e] = s, i
        dev = experts.gate_up_bias.device
        self.slot = torch.tensor(slot, dtype=torch.int32, device=dev)
        self.sidx = torch.tensor(sidx, dtype=torch.int32, device=dev)
        self.counts = {fmt: len(m) for fmt, m in groups.items()}
        self.fmt = next(iter(groups)) if len(groups) == 1 else \
            "mixed(" + ",".join(f"{f}x{n}" for f, n in self.counts.items()) + ")"


def fmt_gate_up_gemv(xs: torch.Tensor, idx: torch.Tensor, gu: FmtExperts, bias: torch.Tensor, alpha: float,
                     limit: float) -> torch.Tensor:
    """xs [N, H] fp32 (plain order), idx [N, k] int32 -> y [N*k, I] fp32: bf16 SwiGLU of gate_up + bias."""
    n, k = idx.shape
    i = gu.out_f // 2
    y = torch.empty(n * k, i, dtype=torch.float32, device=xs.device)
    for s, st in enumerate(gu.stacks):
        launch(_fmt_gate_up_gemv_kernel, lambda m: (n * k, triton.cdiv(i, m["BN"])),
               xs, idx, gu.slot, gu.sidx, s, *st.args(), bias, y, n * k, gu.in_f, i, *st.strides(),
               float(alpha), float(limit), TOPK=k, **st.meta(), **pdl_kw(y))
    return y


def fmt_down_gemv(y: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, dn: FmtExperts,
                  bias: torch.Tensor) -> torch.Tensor:
    """y [N*k, I] fp32, idx/wt [N, k] -> z [N, k, H] fp32 = wt * bf16(y W_down^T + b) (summed by the next RMSNorm)."""
    n, k = idx.shape
    h = dn.out_f
    z = torch.empty(n, k, h, dtype=torch.float32, device=y.device)
    for s, st in enumerate(dn.stacks):
        launch(_fmt_down_gemv_kernel, lambda m: (n * k, triton.cdiv(h, m["BN"])),
               y, idx, wt, dn.slot, dn.sidx, s, *st.args(), bias, z, n * k, dn.in_f, h, *st.strides(), **st.meta(),
               **pdl_kw(z))
    return z


def fmt_moe_grouped(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gu: FmtExperts, gu_bias: torch.Tensor,
                    dn: FmtExperts, dn_bias: torch.Tensor, alpha: float, limit: float,
                    bm: int | None = None) -> torch.Tensor:
    """Prefill (and batched decode) MoE for ``FmtExperts``: x [N, H] bf16 -> z [N, k, H] fp32 = wt_j * f_{e_j}(x).

    ``bm``: pairs per tile (a power of two >= 16, default ``GROUP_BM``); the pairs are the dot's N operand
    (the decoded weight tile is A), so small tiles suit a decode batch with a few pairs per expert."""
    n, k = idx.shape
    p = n * k
    i, h = gu.out_f // 2, dn.out_f
    bm = GROUP_BM if bm is None else int(bm)
    order, te, ts, tn = expert_tiles(idx, gu.num_experts, bm)
    tmax = te.numel()
    y = torch.empty(p, i, dtype=torch.bfloat16, device=x.device)             # rows in sorted order
    for s, st in enumerate(gu.stacks):
        launch(_fmt_gate_up_grouped_kernel, lambda m: (tmax, triton.cdiv(i, m["BN"])),
               x, order, te, ts, tn, gu.slot, gu.sidx, s, *st.args(), gu_bias, y, p, gu.in_f, i, *st.strides(),
               float(alpha), float(limit), TOPK=k, BM=bm, DOT_F32=INTERPRET, **st.meta())
    z = torch.empty(p, h, dtype=torch.float32, device=x.device)              # rows by pair id t*k + j
    for s, st in enumerate(dn.stacks):
        launch(_fmt_down_grouped_kernel, lambda m: (tmax, triton.cdiv(h, m["BN"])),
               y, order, wt.reshape(-1), te, ts, tn, dn.slot, dn.sidx, s, *st.args(), dn_bias, z, p, dn.in_f, h,
               *st.strides(), BM=bm, DOT_F32=INTERPRET, **st.meta())
    return z.view(n, k, h)
