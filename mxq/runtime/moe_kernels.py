"""Triton kernels of the MoE block, reading the experts' stacked weights as stored.

MXFP4 experts: ``blocks`` u8 [E, out, in/32, 16] (element 2j in the low nibble, 2j+1 in the high) and
``scales`` u8 [E, out, in/32]; bf16 experts: ``weight`` [E, out, in]. Every kernel reads the expert ids on
the device, so a decode step needs no host synchronisation.

* ``router_topk``: router logits (bf16-rounded like ``nn.Linear``), top-k, softmax over the k.
* decode (GEMV, few tokens): ``gate_up_gemv`` covers every (token, slot) pair and 2*BN interleaved gate/up
  rows per program, adds the bias and applies the clamped SwiGLU; ``down_gemv`` covers (pair, BN rows), adds
  the bias and weights by the routing weight; the next RMSNorm kernel sums the k slots and adds the residual.
* prefill (grouped GEMM, many tokens): (token, slot) pairs sorted by expert, tiles of BM pairs of one
  expert; bf16 weights through ``tl.dot``, MXFP4 ones through ``tl.dot_scaled`` (decoded in registers).

Rounding follows the reference (``PackedExperts.expert_forward``): the matmul result is rounded to bf16,
the bias added in bf16, the expert output rounded to bf16 before the fp32 routing-weighted sum.
"""
from __future__ import annotations

import torch

from ._common import (INTERPRET, X_EXP, Y_EXP, GemvX, autotune, bf16r, cfg, e8m0_f16dec, e8m0_x4, FP4_ASM,
                      fp4_group_dot_f16, fp4q, h2perm, h2perm_index, launch, mma, next_pow2, swiglu, tl, triton)
from .pdl import grid_dep, pdl_kw
from . import tile_kernels

# ----------------------------------------------------------------------------------------------- router


@triton.jit
def _router_logit(x_ptr, w_ptr, b_ptr, t, e, H, BK: tl.constexpr):
    """bf16-rounded logit of token t for expert e (``nn.Linear`` in bf16: fp32 dot plus bias, one rounding)."""
    acc = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < H
        x = tl.load(x_ptr + t * H + kk, mask=km, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + e * H + kk, mask=km, other=0.0).to(tl.float32) * x
    return bf16r(tl.sum(acc, axis=0) + tl.load(b_ptr + e).to(tl.float32))


@triton.jit
def _topk_store(logit, t, idx_ptr, wt_ptr, TOPK: tl.constexpr, BE: tl.constexpr, KP: tl.constexpr):
    """Top-k of one token's logits [BE] (-inf past E; ties: lowest expert id first), softmax over the k, stored
    at row t of idx / wt."""
    offs_e = tl.arange(0, BE)
    offs_k = tl.arange(0, KP)
    vals = tl.full([KP], float("-inf"), tl.float32)
    ids = tl.zeros([KP], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        m = tl.max(logit, axis=0)
        i = tl.argmax(logit, axis=0)
        vals = tl.where(offs_k == j, m, vals)
        ids = tl.where(offs_k == j, i, ids)
        logit = tl.where(offs_e == i, float("-inf"), logit)
    mx = tl.max(vals, axis=0)
    p = tl.exp(vals - mx)
    p = p / tl.sum(p, axis=0)
    km = offs_k < TOPK
    tl.store(idx_ptr + t * TOPK + offs_k, ids, mask=km)
    tl.store(wt_ptr + t * TOPK + offs_k, p, mask=km)


@triton.jit
def _router_fused_kernel(x_ptr, w_ptr, b_ptr, lg_ptr, cnt_ptr, idx_ptr, wt_ptr, H, E, BK: tl.constexpr,
                         TOPK: tl.constexpr, BE: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, expert) writes its logit; the token's last program to finish (a per-token
    counter, acq_rel atomics) reads all E logits past L1 and does the top-k, then zeroes the counter for the
    next call. One launch instead of logits + top-k: a decode step has 24 routers, each launch ~2 us."""
    grid_dep(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    tl.store(lg_ptr + t * E + e, _router_logit(x_ptr, w_ptr, b_ptr, t, e, H, BK))
    done = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
    if done == E - 1:
        offs_e = tl.arange(0, BE)
        logit = tl.load(lg_ptr + t * E + offs_e, mask=offs_e < E, other=float("-inf"), cache_modifier=".cg")
        _topk_store(logit, t, idx_ptr, wt_ptr, TOPK, BE, KP)
        tl.atomic_xchg(cnt_ptr + t, 0, sem="relaxed")


@triton.jit
def _topk_kernel(lg_ptr, idx_ptr, wt_ptr, E, TOPK: tl.constexpr, BE: tl.constexpr, KP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BE)
    logit = tl.load(lg_ptr + t * E + offs_e, mask=offs_e < E, other=float("-inf")).to(tl.float32)  # fp32 or bf16
    _topk_store(logit, t, idx_ptr, wt_ptr, TOPK, BE, KP)


ROUTER_KERNEL_MAX_TOKENS = 64
_ROUTER_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _router_counters(device: torch.device) -> torch.Tensor:
    """Per-token arrival counters of ``_router_fused_kernel``, zero between calls (the kernel re-zeroes them).
    Allocated once per device at the largest size used, so a CUDA graph capture never allocates them."""
    c = _ROUTER_COUNTERS.get(device)
    if c is None:
        c = _ROUTER_COUNTERS[device] = torch.zeros(ROUTER_KERNEL_MAX_TOKENS, dtype=torch.int32, device=device)
    return c


def router_topk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] bf16, router weight [E, H], bias [E] -> (idx [N, k] int32, weights [N, k] fp32): top-k (ties:
    lowest expert id first) and the softmax over the k.

    A few tokens (decode): one launch, ``_router_fused_kernel``. Many (prefill): the logits from ``F.linear``,
    which is the reference's ``nn.Linear`` itself (one program per (token, expert) is slow at 2,048 tokens),
    then ``_topk_kernel``."""
    n, h = x.shape
    e = w.shape[0]
    idx = torch.empty(n, top_k, dtype=torch.int32, device=x.device)
    wt = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    be, kp = next_pow2(e), next_pow2(top_k)
    if n > ROUTER_KERNEL_MAX_TOKENS:
        logits = torch.nn.functional.linear(x, w, b)                          # [N, E] bf16
        _topk_kernel[(n,)](logits, idx, wt, e, TOPK=top_k, BE=be, KP=kp, num_warps=1)
    else:
        logits = torch.empty(n, e, dtype=torch.float32, device=x.device)
        _router_fused_kernel[(n, e)](x, w, b, logits, _router_counters(x.device), idx, wt, h, e, BK=1024,
                                     TOPK=top_k, BE=be, KP=kp, num_warps=4, **pdl_kw(x))
    return idx, wt


# ----------------------------------------------------------------------------------------------- decode GEMV


@triton.jit
def _split4(t, A: tl.constexpr, B: tl.constexpr):
    """t [A, B, 4] -> t[:, :, 0], .., t[:, :, 3] by ``tl.split`` (register renaming: the 4 sit in one thread)."""
    e, o = tl.split(tl.reshape(t, (A, B, 2, 2)))                               # index % 2
    t0, t2 = tl.split(e)
    t1, t3 = tl.split(o)
    return t0, t1, t2, t3


@triton.jit
def _fp4_group_sums(wd, s, xs0, xs1, xs2, xs3, R: tl.constexpr, BG: tl.constexpr):
    """Scaled sums of BG scale groups of R rows: [R, BG] fp32 = s * ``fp4_group_dot_f16`` of each group's 4 words
    (``wd`` [R, 4 BG] int32 words, group-major; ``s`` [R, BG] decoded scales; ``xsj`` [BG, 4] the x pairs of
    slot j of each group's 4 words).

    The words are a 2-D tile so that the load is coalesced along its contiguous axis (4 BG words of a row) the
    same way as the scales' (BG bytes of a row): split into the 4 words of each group, they sit in one thread
    in the scales' register layout, so no shared-memory layout conversion is needed between them."""
    w0, w1, w2, w3 = _split4(tl.reshape(wd, (R, BG, 4)), R, BG)
    a0, a1, a2, a3 = _split4(xs0[None], 1, BG)                                  # [1, BG]: slot 0 of words 0..3
    b0, b1, b2, b3 = _split4(xs1[None], 1, BG)                                  # slot 1
    c0, c1, c2, c3 = _split4(xs2[None], 1, BG)
    d0, d1, d2, d3 = _split4(xs3[None], 1, BG)
    return fp4_group_dot_f16(w0, w1, w2, w3, a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2, a3, b3, c3, d3,
                             FP4_ASM) * s


@triton.jit
def _rows_dot_fp4(x_row, blk, scl, rows, G, s_row, s_srow, R: tl.constexpr, BG: tl.constexpr, NS: tl.constexpr):
    """acc[r] = sum_k x[k] W[rows[r], k] (times the x scale) for one MXFP4 expert (``blk``/``scl`` at the expert).

    ``rows`` must all be valid rows (callers clamp the out-of-range ones to the last row and do not store
    them), so the loads need no row mask. ``x_row``: f16 in ``h2perm`` order, scaled by a power of two
    (|x| < 2^15; the caller multiplies the result back). Each iteration covers BG scale groups: the 16 bytes of
    a group are 4 int32 words, word w holding elements 8w + n (nibble n, low nibble first);
    ``fp4_group_dot_f16`` turns a group's 4 words and their 16 x pairs into the fp32 sum of its 32 products
    (f16 weights and products, summed in f16 chains), which is multiplied by the group's scale
    (``_fp4_group_sums``). The x pairs of slot j for the 4 words of a group are 16 contiguous bytes, laid out
    like the words by ``h2perm``.

    The G // BG full iterations run without masks; the G % BG remaining groups, if any, take one masked
    iteration after the loop (masks in the loop cost a predicate per load and zeroing of the masked registers
    every iteration).

    ``NS`` (``tl.range(num_stages=NS)``): NS > 1 software-pipelines the weight loads through ``cp.async``
    (Triton 3.6 pipelines a plain ``range`` loop only for loads that feed ``tl.dot``)."""
    offs_c = tl.arange(0, 4 * BG)                                               # (group, word), word fastest
    offs_g = tl.arange(0, BG)
    wp = blk.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * (s_row // 4) + offs_c[None, :]
    sp = scl + rows[:, None].to(tl.int64) * s_srow + offs_g[None, :]           # [R, BG]
    xp = x_row.to(tl.pointer_type(tl.int32)) + offs_g[:, None] * 16 + tl.arange(0, 4)[None, :]    # [BG, 4]: slot 0
    acc = tl.zeros([R, BG], dtype=tl.float32)
    g_full = G - G % BG
    for g0 in tl.range(0, g_full, BG, num_stages=NS):
        xg = xp + g0 * 16
        acc += _fp4_group_sums(tl.load(wp + g0 * 4), e8m0_f16dec(tl.load(sp + g0)), tl.load(xg), tl.load(xg + 4),
                               tl.load(xg + 8), tl.load(xg + 12), R, BG)
    if g_full < G:
        gm = g_full + offs_g < G
        cm = (g_full * 4 + offs_c < G * 4)[None, :]                            # words of real groups
        xm = gm[:, None]
        xg = xp + g_full * 16
        acc += _fp4_group_sums(tl.load(wp + g_full * 4, mask=cm, other=0),
                               e8m0_f16dec(tl.load(sp + g_full, mask=gm[None, :], other=0)),
                               tl.load(xg, mask=xm, other=0), tl.load(xg + 4, mask=xm, other=0),
                               tl.load(xg + 8, mask=xm, other=0), tl.load(xg + 12, mask=xm, other=0), R, BG)
    return tl.sum(acc, axis=1)


@triton.jit
def _rows_dot_bf16(x_row, w, rows, rmask, K, s_row, R: tl.constexpr, BK: tl.constexpr, NS: tl.constexpr):
    acc = tl.zeros([R, BK], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=NS):                             # pipelined: see _rows_dot_fp4
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        x = tl.load(x_row + kk, mask=km, other=0.0).to(tl.float32)
        wv = tl.load(w + rows[:, None].to(tl.int64) * s_row + kk[None, :], mask=rmask[:, None] & km[None, :],
                     other=0.0)
        acc += wv.to(tl.float32) * x[None, :]
    return tl.sum(acc, axis=1)


# (warps, kernel num_stages, rows BN, groups per iteration BG (x 32 elements for bf16), loop stages NS). The
# NS = 1 configs were the fastest for MXFP4 with cold weights (bench/results/gemv_configs_h100.json); NS = 3 ones
# serve bf16 experts, whose loop is load-bound like the dense GEMVs of linear_kernels (pipelining helps those).
# MXFP4 wants rows x BG >= 32 x warps (rows: 2 BN for gate_up, BN for down), so that each thread holds whole
# scale groups; a smaller tile (down's BN = 4 and BN = 8, BG = 8 configs, the 8-warp one) stays correct, but its
# 4-word groups are split over threads, which costs a shared-memory layout conversion and computes every group
# twice.
_GEMV_CONFIGS = [cfg(4, 2, BN=4, BG=16, NS=1), cfg(4, 2, BN=8, BG=16, NS=1), cfg(4, 2, BN=8, BG=8, NS=1),
                 cfg(8, 2, BN=8, BG=8, NS=1), cfg(4, 2, BN=16, BG=8, NS=1), cfg(4, 2, BN=32, BG=16, NS=1),
                 cfg(4, 2, BN=8, BG=8, NS=3), cfg(4, 2, BN=4, BG=16, NS=3)]


@autotune(_GEMV_CONFIGS, key=["P", "I", "K", "FP4"])
@triton.jit
def _gate_up_gemv_kernel(x_ptr, xinv_ptr, idx_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, P, K, I, G,
                         s_e, s_row, s_se, s_srow, alpha, limit, y_scale,
                         TOPK: tl.constexpr, FP4: tl.constexpr, YPERM: tl.constexpr, BN: tl.constexpr,
                         BG: tl.constexpr, NS: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    p = tl.program_id(0)
    nb = tl.program_id(1)
    t = (p // TOPK).to(tl.int64)
    e = tl.load(idx_ptr + p).to(tl.int64)
    rows = nb * (2 * BN) + tl.arange(0, 2 * BN)        # interleaved gate (even) / up (odd) rows, contiguous
    rm = rows < 2 * I
    x_row = x_ptr + t * K
    if FP4:
        acc = _rows_dot_fp4(x_row, w_ptr + e * s_e, s_ptr + e * s_se, tl.minimum(rows, 2 * I - 1), G, s_row,
                            s_srow, 2 * BN, BG, NS)
        acc = acc * tl.load(xinv_ptr + t)                                       # undo the x scale
    else:
        acc = _rows_dot_bf16(x_row, w_ptr + e * s_e, rows, rm, K, s_row, 2 * BN, BG * 32, NS)
    bias = tl.load(bias_ptr + e * (2 * I) + rows, mask=rm, other=0.0).to(tl.float32)
    a = bf16r(bf16r(acc) + bias)
    a_g, a_u = tl.split(tl.reshape(a, (BN, 2)))
    y = bf16r(swiglu(a_g, a_u, alpha, limit))          # the reference's y is bf16; kept in fp32 for down
    offs = nb * BN + tl.arange(0, BN)
    if YPERM:                                          # f16 x 2^Y_EXP in the MXFP4 down GEMV's layout
        tl.store(y_ptr + p.to(tl.int64) * I + h2perm(offs), (y * y_scale).to(tl.float16), mask=offs < I)
    else:
        tl.store(y_ptr + p.to(tl.int64) * I + offs, y, mask=offs < I)


@autotune(_GEMV_CONFIGS, key=["P", "H", "K", "FP4"])
@triton.jit
def _down_gemv_kernel(y_ptr, idx_ptr, wt_ptr, w_ptr, s_ptr, bias_ptr, z_ptr, P, K, H, G,
                      s_e, s_row, s_se, s_srow, y_inv,
                      FP4: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, NS: tl.constexpr,
                      PDL: tl.constexpr):
    grid_dep(PDL)
    p = tl.program_id(0).to(tl.int64)                  # (token, slot) pair
    hb = tl.program_id(1)
    rows = hb * BN + tl.arange(0, BN)
    rm = rows < H
    e = tl.load(idx_ptr + p).to(tl.int64)
    gw = tl.load(wt_ptr + p)
    y_row = y_ptr + p * K
    if FP4:
        acc = _rows_dot_fp4(y_row, w_ptr + e * s_e, s_ptr + e * s_se, tl.minimum(rows, H - 1), G, s_row, s_srow,
                            BN, BG, NS)
        acc = acc * y_inv
    else:
        acc = _rows_dot_bf16(y_row, w_ptr + e * s_e, rows, rm, K, s_row, BN, BG * 32, NS)
    bias = tl.load(bias_ptr + e * H + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(z_ptr + p * H + rows, gw * bf16r(bf16r(acc) + bias), mask=rm)


if INTERPRET:   # the interpreter runs one config per kernel (``_common.autotune``): large tiles, few programs
    _gate_up_gemv_kernel._mxq_default = dict(BN=64, BG=16, NS=1)
    _down_gemv_kernel._mxq_default = dict(BN=128, BG=16, NS=1)


class ExpertWeights:
    """One layer's stacked expert tensors of one kind, as the kernels take them."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int):
        self.fmt, self.out_f, self.in_f = fmt, out_features, in_features
        if fmt == "mxfp4":
            self.w, self.s = tensors["blocks"], tensors["scales"]            # [E, out, in/32, 16], [E, out, in/32]
            assert self.w.is_contiguous() and self.s.is_contiguous()
            self.s_e, self.s_row = self.w.stride(0), self.w.stride(1)
            self.s_se, self.s_srow = self.s.stride(0), self.s.stride(1)
        elif fmt == "bf16":
            self.w = tensors["weight"]                                       # [E, out, in]
            assert self.w.is_contiguous() and self.w.dtype == torch.bfloat16
            self.s = self.w                                                  # unused placeholder pointer
            self.s_e, self.s_row, self.s_se, self.s_srow = self.w.stride(0), self.w.stride(1), 0, 0
        else:
            raise ValueError(f"no kernel for expert format {fmt!r}")
        self.fp4 = fmt == "mxfp4"
        self.groups = in_features // 32


def gate_up_gemv(xs: torch.Tensor | GemvX, idx: torch.Tensor, gu: ExpertWeights, bias: torch.Tensor, alpha: float,
                 limit: float, yperm: bool) -> torch.Tensor:
    """xs: ``GemvX`` when ``gu`` is MXFP4, else [N, H] fp32; idx [N, k] int32 -> y [N*k, I] holding the bf16
    SwiGLU of gate_up + bias, pair p = t*k + j: fp32 in natural order, or (``yperm``, for an MXFP4 down GEMV)
    f16 x 2^Y_EXP in ``h2perm`` order (``y_natural`` undoes both)."""
    n, k = idx.shape
    i = gu.out_f // 2
    if gu.fp4 != isinstance(xs, GemvX):
        raise TypeError("gate_up_gemv: MXFP4 experts take a GemvX (rmsnorm(..., hs='h2perm')), bf16 experts "
                        "an fp32 tensor")
    x, inv = (xs.x, xs.inv) if gu.fp4 else (xs, xs)
    y = torch.empty(n * k, i, dtype=torch.float16 if yperm else torch.float32, device=x.device)
    launch(_gate_up_gemv_kernel, lambda m: (n * k, triton.cdiv(i, m["BN"])),
           x, inv, idx, gu.w, gu.s, bias, y, n * k, gu.in_f, i, gu.groups, gu.s_e, gu.s_row, gu.s_se, gu.s_srow,
           float(alpha), float(limit), float(2.0 ** Y_EXP), TOPK=k, FP4=gu.fp4, YPERM=yperm, **pdl_kw(x))
    return y


def down_gemv(y: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, dn: ExpertWeights,
              bias: torch.Tensor) -> torch.Tensor:
    """y [N*k, I] (from ``gate_up_gemv``: f16 ``h2perm`` x 2^Y_EXP when ``dn`` is MXFP4, else fp32), idx/wt
    [N, k] -> z [N, k, H] fp32 = wt * bf16(y W_down^T + b); the sum over k and the residual add happen in the
    next RMSNorm (``rmsnorm(..., moe=z)``)."""
    n, k = idx.shape
    h = dn.out_f
    if (y.dtype == torch.float16) != dn.fp4:
        raise TypeError(f"down_gemv: {dn.fmt} experts cannot take a {y.dtype} y (gate_up_gemv's yperm must be "
                        f"{dn.fp4})")
    z = torch.empty(n, k, h, dtype=torch.float32, device=y.device)
    launch(_down_gemv_kernel, lambda m: (n * k, triton.cdiv(h, m["BN"])),
           y, idx, wt, dn.w, dn.s, bias, z, n * k, dn.in_f, h, dn.groups, dn.s_e, dn.s_row, dn.s_se, dn.s_srow,
           float(2.0 ** -Y_EXP), FP4=dn.fp4, **pdl_kw(y))
    return z


# ----------------------------------------------------------------------------------------------- prefill grouped GEMM


@triton.jit
def _tile_dot(x_ptr, x_rows, rmask, blk, scl, wcols, wmask, K, s_row, s_srow, k_end,
              FP4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    """acc [BM, BN] = X[x_rows, :] @ W[wcols, :]^T for one expert; ``x_rows`` are element offsets of rows.

    MXFP4 on the GPU: ``tl.dot_scaled`` (bf16 x, E2M1 weights with their E8M0 scales, OCP MX v1.0 section 6.3):
    on Hopper Triton upcasts the nibbles to bf16 through byte permutes, multiplies by the scale in bf16 (exact:
    a 2-bit significand times a power of two) and feeds the weights to the tensor cores from registers with the
    token tile as the shared-memory operand, so each weight tile is decoded once per tile of BM pairs
    (``fast_math``: scale byte 255, NaN in the MX spec, is not special-cased). Under the interpreter
    (``DOT_F32``; it has no ``dot_scaled``) the fp32 ``fp4q`` decode of even/odd nibbles instead."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if FP4 and not DOT_F32:
        kk = tl.arange(0, BK)
        jj = tl.arange(0, BK // 2)
        gg = tl.arange(0, BK // 32)
        for k0 in range(0, k_end, BK):
            kc = k0 + kk
            x = tl.load(x_ptr + x_rows[:, None] + kc[None, :], mask=rmask[:, None] & (kc < K)[None, :],
                        other=0.0)                                              # [BM, BK] bf16
            kb = k0 // 2 + jj                                                   # byte column within a weight row
            b = tl.load(blk + wcols[None, :] * s_row + kb[:, None], mask=(kb < K // 2)[:, None] & wmask[None, :],
                        other=0)                                                # [BK/2, BN] u8, 2 nibbles along k
            g = k0 // 32 + gg
            s = tl.load(scl + wcols[:, None] * s_srow + g[None, :], mask=wmask[:, None] & (g < K // 32)[None, :],
                        other=0)                                                # [BN, BK/32] E8M0
            acc = tl.dot_scaled(x, None, "bf16", b, s, "e2m1", acc, fast_math=True)
    elif FP4:
        jj = tl.arange(0, BK // 2)
        for k0 in range(0, k_end, BK):
            kb = k0 // 2 + jj                                   # byte column within a weight row
            km = kb < K // 2
            xm = rmask[:, None] & km[None, :]
            xp = x_ptr + x_rows[:, None] + (k0 + 2 * jj)[None, :]
            xe = tl.load(xp, mask=xm, other=0.0)                 # [BM, BK/2] even elements
            xo = tl.load(xp + 1, mask=xm, other=0.0)             # odd elements
            wm = km[:, None] & wmask[None, :]
            b = tl.load(blk + wcols[None, :] * s_row + kb[:, None], mask=wm, other=0).to(tl.int32)   # [BK/2, BN]
            s = e8m0_x4(tl.load(scl + wcols[None, :] * s_srow + (kb // 16)[:, None], mask=wm, other=0))
            acc = mma(xe, (fp4q(b, 0) * s).to(tl.bfloat16), acc, DOT_F32)
            acc = mma(xo, (fp4q(b, 4) * s).to(tl.bfloat16), acc, DOT_F32)
    else:
        kk = tl.arange(0, BK)
        for k0 in range(0, k_end, BK):
            kc = k0 + kk
            km = kc < K
            x = tl.load(x_ptr + x_rows[:, None] + kc[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            w = tl.load(blk + wcols[None, :] * s_row + kc[:, None], mask=km[:, None] & wmask[None, :], other=0.0)
            acc = mma(x, w, acc, DOT_F32)
    return acc


# (warps, stages, BN weight rows (x2 for gate_up's interleaved gate/up rows), BK); autotuned per (shape, format, BM)
_GROUPED_CONFIGS = [cfg(4, 3, BN=64, BK=128), cfg(4, 3, BN=32, BK=128), cfg(8, 3, BN=128, BK=64),
                    cfg(4, 4, BN=64, BK=64), cfg(8, 3, BN=64, BK=128), cfg(8, 4, BN=64, BK=64)]


@triton.jit
def tile_rows(ts_ptr, tn_ptr, te_ptr, BM: tl.constexpr):
    """The tile of program_id(0) (``expert_tiles``): (expert id, sorted-pair rows [BM], row mask, non-empty)."""
    tau = tl.program_id(0)
    r0 = tl.load(ts_ptr + tau)
    r1 = tl.load(tn_ptr + tau)
    rows = r0 + tl.arange(0, BM)
    return tl.load(te_ptr + tau), rows, rows < r1, r0 < r1


@triton.jit
def gate_up_tile_out(acc, bias_ptr, e, cols, cm, rows, rm, y_ptr, I, nb, alpha, limit, BM: tl.constexpr,
                     BN: tl.constexpr):
    """Grouped gate_up epilogue: y[rows, nb*BN:] = bf16 SwiGLU(bf16(bf16(acc) + bias)) of the interleaved
    gate/up columns ``cols`` of expert ``e`` (acc [BM, 2BN] fp32)."""
    bias = tl.load(bias_ptr + e.to(tl.int64) * (2 * I) + cols, mask=cm, other=0.0).to(tl.float32)
    a = bf16r(bf16r(acc) + bias[None, :])
    a_g, a_u = tl.split(tl.reshape(a, (BM, BN, 2)))
    y = swiglu(a_g, a_u, alpha, limit)
    offs = nb * BN + tl.arange(0, BN)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * I + offs[None, :], y.to(tl.bfloat16),
             mask=rm[:, None] & (offs < I)[None, :])


@triton.jit
def down_tile_out(acc, bias_ptr, e, cols, cm, pair, rm, gw, z_ptr, H):
    """Grouped down epilogue: z[pair, cols] = routing weight x bf16(bf16(acc) + bias) (acc [BM, BN] fp32)."""
    bias = tl.load(bias_ptr + e.to(tl.int64) * H + cols, mask=cm, other=0.0).to(tl.float32)
    z = bf16r(bf16r(acc) + bias[None, :]) * gw[:, None]
    tl.store(z_ptr + pair[:, None] * H + cols[None, :], z, mask=rm[:, None] & cm[None, :])


@autotune(_GROUPED_CONFIGS, key=["P", "I", "K", "FP4", "BM"])
@triton.jit
def _gate_up_grouped_kernel(x_ptr, order_ptr, te_ptr, ts_ptr, tn_ptr, w_ptr, s_ptr, bias_ptr, y_ptr,
                            P, K, I, s_e, s_row, s_se, s_srow, alpha, limit,
                            TOPK: tl.constexpr, FP4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, DOT_F32: tl.constexpr):
    nb = tl.program_id(1)
    e, rows, rm, live = tile_rows(ts_ptr, tn_ptr, te_ptr, BM)
    e = e.to(tl.int64)
    pair = tl.load(order_ptr + rows, mask=rm, other=0)
    tok = (pair // TOPK).to(tl.int64)
    cols = nb * (2 * BN) + tl.arange(0, 2 * BN)             # interleaved gate/up weight rows
    cm = cols < 2 * I
    k_end = tl.where(live, K, 0)
    acc = _tile_dot(x_ptr, tok * K, rm, w_ptr + e * s_e, s_ptr + e * s_se, cols, cm, K, s_row, s_srow, k_end,
                    FP4, BM, 2 * BN, BK, DOT_F32)
    gate_up_tile_out(acc, bias_ptr, e, cols, cm, rows, rm, y_ptr, I, nb, alpha, limit, BM, BN)


@autotune(_GROUPED_CONFIGS, key=["P", "H", "K", "FP4", "BM"])
@triton.jit
def _down_grouped_kernel(y_ptr, order_ptr, wt_ptr, te_ptr, ts_ptr, tn_ptr, w_ptr, s_ptr, bias_ptr, z_ptr,
                         P, K, H, s_e, s_row, s_se, s_srow,
                         FP4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         DOT_F32: tl.constexpr):
    nb = tl.program_id(1)
    e, rows, rm, live = tile_rows(ts_ptr, tn_ptr, te_ptr, BM)
    e = e.to(tl.int64)
    pair = tl.load(order_ptr + rows, mask=rm, other=0).to(tl.int64)
    gw = tl.load(wt_ptr + pair, mask=rm, other=0.0)
    cols = nb * BN + tl.arange(0, BN)
    cm = cols < H
    k_end = tl.where(live, K, 0)
    acc = _tile_dot(y_ptr, rows.to(tl.int64) * K, rm, w_ptr + e * s_e, s_ptr + e * s_se, cols, cm, K, s_row,
                    s_srow, k_end, FP4, BM, BN, BK, DOT_F32)
    down_tile_out(acc, bias_ptr, e, cols, cm, pair, rm, gw, z_ptr, H)


GROUP_BM = 64          # pairs per tile of fmt_kernels' grouped GEMMs and the default of expert_tiles
# Pairs per tile of moe_kernels' grouped GEMMs by expert format: an MXFP4 weight tile is decoded once per tile, so
# larger tiles spend less on decoding (and more on padding: a tile holds one expert's pairs).
MOE_BM = {"mxfp4": 128, "bf16": 64}


def expert_tiles(idx: torch.Tensor, num_experts: int, bm: int = GROUP_BM):
    """Sort (token, slot) pairs by expert and cut them into tiles of <= bm pairs of one expert, on the device.

    Returns (order [P] int32: sorted position -> pair id, tile expert / start / end [T_max] int32); tiles past
    the real count have start == end and do nothing. T_max = ceil(P / bm) + E bounds the tile count. Two Triton
    launches, no host sync (``tile_kernels``; ids must be in [0, E)).
    """
    return tile_kernels.expert_tiles(idx, num_experts, bm)


def moe_grouped(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, gu: ExpertWeights, gu_bias: torch.Tensor,
                dn: ExpertWeights, dn_bias: torch.Tensor, alpha: float, limit: float,
                bm: int | None = None) -> torch.Tensor:
    """Prefill MoE: x [N, H] bf16 -> z [N, k, H] fp32 = wt_j * f_{e_j}(x) (summed by the next RMSNorm).

    ``bm``: pairs per tile (a power of two >= 16; default ``MOE_BM`` of the gate_up format)."""
    n, k = idx.shape
    p = n * k
    i, h = gu.out_f // 2, dn.out_f
    e = gu.w.shape[0]
    bm = MOE_BM[gu.fmt] if bm is None else int(bm)
    order, te, ts, tn = expert_tiles(idx, e, bm)                            # checks bm before any launch
    tmax = te.numel()
    y = torch.empty(p, i, dtype=torch.bfloat16, device=x.device)             # rows in sorted order
    launch(_gate_up_grouped_kernel, lambda m: (tmax, triton.cdiv(i, m["BN"])),
           x, order, te, ts, tn, gu.w, gu.s, gu_bias, y, p, gu.in_f, i, gu.s_e, gu.s_row, gu.s_se, gu.s_srow,
           float(alpha), float(limit), TOPK=k, FP4=gu.fp4, BM=bm, DOT_F32=INTERPRET)
    z = torch.empty(p, h, dtype=torch.float32, device=x.device)              # rows by pair id t*k + j
    launch(_down_grouped_kernel, lambda m: (tmax, triton.cdiv(h, m["BN"])),
           y, order, wt.reshape(-1), te, ts, tn, dn.w, dn.s, dn_bias, z, p, dn.in_f, h, dn.s_e, dn.s_row,
           dn.s_se, dn.s_srow, FP4=dn.fp4, BM=bm, DOT_F32=INTERPRET)
    return z.view(n, k, h)


def kernel_x(x: torch.Tensor, fp4: bool) -> torch.Tensor | GemvX:
    """x [N, K] -> the input ``gate_up_gemv`` expects (what ``rmsnorm(..., hs=...)`` writes): fp32 for bf16
    experts; for MXFP4 a ``GemvX`` (f16 in ``h2perm`` order, each row times the power of two 2^k that brings
    max |x| just below 2^X_EXP, and 2^-k)."""
    xs = x.float()
    if not fp4:
        return xs.contiguous()
    amax = xs.abs().amax(dim=1).clamp_min(2.0 ** -110)
    k = (X_EXP - torch.frexp(amax).exponent).float()                      # amax < 2^exponent: amax * 2^k < 2^X_EXP
    out = torch.empty(xs.shape, dtype=torch.float16, device=x.device)
    out[:, h2perm_index(x.shape[1], x.device)] = (xs * torch.exp2(k)[:, None]).half()
    return GemvX(out, torch.exp2(-k).float().contiguous())


def y_natural(y: torch.Tensor) -> torch.Tensor:
    """``gate_up_gemv``'s y as fp32 in natural order (undoing ``yperm``'s f16 layout and scale)."""
    if y.dtype != torch.float16:
        return y
    return y.float()[:, h2perm_index(y.shape[1], y.device)] * 2.0 ** -Y_EXP
