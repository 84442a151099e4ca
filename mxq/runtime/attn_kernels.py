"""Triton kernels around attention: RMSNorm (with the residual add), RoPE + KV-cache write, sink attention
with GQA and the sliding window (prefill and split-K decode), the token embedding and the greedy advance.

Positions come from a device scalar (``pos``: the cache index of the first token of the step), so the
decode kernels need no host value and a captured CUDA graph replays at every position.
"""
from __future__ import annotations

import torch

from ._common import INTERPRET, GemvX, bf16r, h2perm, mma, next_pow2, tl, triton, x16_scale
from .pdl import grid_dep, pdl_kw

# ----------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rmsnorm_kernel(x_ptr, d_ptr, xo_ptr, h_ptr, hs_ptr, inv_ptr, w_ptr, H, eps,
                    ADD: tl.constexpr, TOPK: tl.constexpr, HS: tl.constexpr, BH: tl.constexpr,
                    PDL: tl.constexpr):
    grid_dep(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BH)
    m = offs < H
    x = tl.load(x_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32)
    if ADD == 1:                                   # residual + a bf16 delta (attention output)
        x = bf16r(x + tl.load(d_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32))
    if ADD == 2:                                   # residual + bf16(sum of the k weighted expert outputs)
        acc = tl.zeros([BH], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            acc += tl.load(d_ptr + (row * TOPK + j) * H + offs, mask=m, other=0.0)
        x = bf16r(x + bf16r(acc))
    if ADD > 0:
        tl.store(xo_ptr + row * H + offs, x.to(tl.bfloat16), mask=m)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h = (w * (x * r)).to(tl.bfloat16)
    tl.store(h_ptr + row * H + offs, h, mask=m)
    if HS == 1:                                    # fp32 copy for the bf16-expert GEMV
        tl.store(hs_ptr + row * H + offs, h.to(tl.float32), mask=m)
    if HS == 2:                                    # f16 copy x 2^k for the MXFP4 GEMV (``h2perm``), and 2^-k
        hf = h.to(tl.float32)
        up, down = x16_scale(tl.max(tl.abs(hf), axis=0))
        tl.store(hs_ptr + row * H + h2perm(offs), (hf * up).to(tl.float16), mask=m)
        tl.store(inv_ptr + row, down)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
            moe: torch.Tensor | None = None, hs: str | None = None):
    """RMSNorm of x [N, H] in fp32 (like ``mxq.model.attention.rms_norm``), first adding to the residual x
    either ``delta`` [N, H] bf16 or the MoE partials ``moe`` [N, k, H] fp32 (x <- bf16(x + bf16(sum_j))).

    Returns h, or (x_new, h) with an add; ``hs`` also returns h for the expert GEMV kernels: "fp32" an fp32
    copy, "h2perm" the MXFP4 GEMV's ``GemvX`` (f16 in ``h2perm`` order, scaled per row by a power of two)."""
    n, hd = x.shape
    h = torch.empty_like(x)
    add = 1 if delta is not None else 2 if moe is not None else 0
    d = delta if delta is not None else moe if moe is not None else x
    xo = torch.empty_like(x) if add else x
    hs_mode = {None: 0, "fp32": 1, "h2perm": 2}[hs]
    hsb = torch.empty(n, hd, dtype=torch.float16 if hs_mode == 2 else torch.float32, device=x.device) \
        if hs_mode else h
    inv = torch.empty(n, dtype=torch.float32, device=x.device) if hs_mode == 2 else h
    _rmsnorm_kernel[(n,)](x, d, xo, h, hsb, inv, weight, hd, float(eps), ADD=add,
                          TOPK=moe.shape[1] if moe is not None else 1, HS=hs_mode, BH=next_pow2(hd),
                          num_warps=8 if hd > 2048 else 4, **pdl_kw(x))
    out = (xo, h) if add else (h,)
    if hs_mode:
        out = out + ((GemvX(hsb, inv) if hs_mode == 2 else hsb),)
    return out if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------------------------- RoPE + cache


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, off_ptr,
                       N, T, NH, KV, L, HALF: tl.constexpr, BT: tl.constexpr, HAS_OFF: tl.constexpr,
                       PDL: tl.constexpr):
    """BT tokens (row-major over [B, T]) of one head per program: q heads, then kv heads (k rotated into the
    cache, v copied). Several tokens per program: one token per program made the 2,048-token prefill
    scheduling-bound (147k programs of 64 elements each). ``HAS_OFF``: row b is left-padded by off[b] cache
    slots, so the token at cache index i has RoPE position i - off[b] (pads clamp to 0; nothing attends to
    them)."""
    grid_dep(PDL)
    n = tl.program_id(0) * BT + tl.arange(0, BT)                 # [BT] tokens
    hh = tl.program_id(1)
    nm = n < N
    b = (n // T).to(tl.int64)
    pos = (tl.load(pos_ptr) + n % T).to(tl.int64)                # cache index
    rp = pos
    if HAS_OFF:
        rp = tl.maximum(pos - tl.load(off_ptr + b, mask=nm, other=0), 0)     # RoPE position
    D: tl.constexpr = 2 * HALF
    o = tl.arange(0, HALF)
    m2 = nm[:, None]
    c = tl.load(cos_ptr + rp[:, None] * HALF + o[None, :], mask=m2, other=0.0).to(tl.float32)   # [BT, HALF]
    s = tl.load(sin_ptr + rp[:, None] * HALF + o[None, :], mask=m2, other=0.0).to(tl.float32)
    n64 = n.to(tl.int64)
    if hh < NH:
        src = q_ptr + (n64 * NH + hh) * D
        dst = qo_ptr + (n64 * NH + hh) * D
    else:
        kh = (hh - NH).to(tl.int64)
        src = k_ptr + (n64 * KV + kh) * D
        dst = kc_ptr + ((b * KV + kh) * L + pos) * D
    x1 = tl.load(src[:, None] + o[None, :], mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(src[:, None] + HALF + o[None, :], mask=m2, other=0.0).to(tl.float32)
    # the reference rotates in bf16: every product and sum rounds to bf16
    r1 = bf16r(bf16r(x1 * c) - bf16r(x2 * s))
    r2 = bf16r(bf16r(x2 * c) + bf16r(x1 * s))
    tl.store(dst[:, None] + o[None, :], r1.to(tl.bfloat16), mask=m2)
    tl.store(dst[:, None] + HALF + o[None, :], r2.to(tl.bfloat16), mask=m2)
    if hh >= NH:
        kh2 = (hh - NH).to(tl.int64)
        vs = v_ptr + (n64 * KV + kh2) * D
        vd = vc_ptr + ((b * KV + kh2) * L + pos) * D
        tl.store(vd[:, None] + o[None, :], tl.load(vs[:, None] + o[None, :], mask=m2), mask=m2)
        tl.store(vd[:, None] + HALF + o[None, :], tl.load(vs[:, None] + HALF + o[None, :], mask=m2), mask=m2)


def rope_cache(q, k, v, cos, sin, kc, vc, pos, t: int, off: torch.Tensor | None = None):
    """q [N, nh*d], k/v [N, kv*d] (N = B*T) -> rotated q [N, nh, d]; rotated k and v written into the caches
    kc/vc [B, kv, L, d] at cache index pos + t. cos/sin [L, d/2] (``Rope`` values, bf16). ``off`` [B] int32:
    left padding of each row (RoPE position = cache index - off[b], as the reference's cumsum of the mask)."""
    n = q.shape[0]
    _, kv, L, d = kc.shape
    nh = q.shape[1] // d
    qo = torch.empty(n, nh, d, dtype=q.dtype, device=q.device)
    bt = min(32, next_pow2(n))
    _rope_cache_kernel[(triton.cdiv(n, bt), nh + kv)](q, k, v, cos, sin, qo, kc, vc, pos,
                                                      pos if off is None else off, n, t, nh, kv, L,
                                                      HALF=d // 2, BT=bt, HAS_OFF=off is not None,
                                                      num_warps=1 if bt == 1 else 2, **pdl_kw(q))
    return qo


# ----------------------------------------------------------------------------------------------- attention


@triton.jit
def _attn_kernel(q_ptr, kc_ptr, vc_ptr, sink_ptr, o_ptr, pm_ptr, pl_ptr, pa_ptr, pos_ptr, off_ptr,
                 T, NH, KV, L, scale, chunk, R,
                 G: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, HAS_OFF: tl.constexpr, DOT_F32: tl.constexpr,
                 PDL: tl.constexpr):
    """Keys of row b start at cache index off[b] (``HAS_OFF``: left padding; else 0): every key range, the
    decode splits included, is laid out from there, so a padded row reads its keys in the same blocks and
    splits, summed in the same order, as the same sequence alone."""
    grid_dep(PDL)
    bk = tl.program_id(0)                        # b * KV + kv head
    qb = tl.program_id(1)                        # block of BM // G queries (all G heads of the kv head)
    sp = tl.program_id(2)                        # key split (decode)
    b = bk // KV
    kvh = bk % KV
    start = tl.load(pos_ptr)
    TQ: tl.constexpr = BM // G
    rows = tl.arange(0, BM)
    t = qb * TQ + rows // G
    head = kvh * G + rows % G
    rm = t < T
    qi = start + t                               # cache index of each query row
    od = tl.arange(0, D)
    qrow = ((b * T + t).to(tl.int64) * NH + head) * D
    q = tl.load(q_ptr + qrow[:, None] + od[None, :], mask=rm[:, None], other=0.0)
    t_lo = qb * TQ
    t_hi = tl.minimum(t_lo + TQ, T) - 1
    hi = start + t_hi + 1
    k0 = start - start                           # first real key of the row
    if HAS_OFF:
        k0 = tl.load(off_ptr + b)
    lo = k0
    if WINDOW > 0:
        lo = tl.maximum(start + t_lo - WINDOW + 1, k0)
    if SPLIT:
        lo = tl.maximum(lo, k0 + sp * chunk)
        hi = tl.minimum(hi, k0 + sp * chunk + chunk)
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
    else:
        m_i = tl.load(sink_ptr + head).to(tl.float32)   # the sink joins the softmax as one more logit
        l_i = tl.full([BM], 1.0, tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    kbase = kc_ptr + (bk.to(tl.int64) * L) * D
    vbase = vc_ptr + (bk.to(tl.int64) * L) * D
    for s0 in range(lo, hi, BN):
        ks = s0 + tl.arange(0, BN)
        km = ks < hi
        kt = tl.load(kbase + ks.to(tl.int64)[None, :] * D + od[:, None], mask=km[None, :], other=0.0)   # [D, BN]
        s = bf16r(mma(q, kt, tl.zeros([BM, BN], dtype=tl.float32), DOT_F32)) * scale   # bf16 scores, as ref
        ok = km[None, :] & (ks[None, :] <= qi[:, None]) & (ks[None, :] >= k0)
        if WINDOW > 0:
            ok = ok & (ks[None, :] > qi[:, None] - WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vbase + ks.to(tl.int64)[:, None] * D + od[None, :], mask=km[:, None], other=0.0)  # [BN, D]
        acc = mma(p.to(tl.bfloat16), v, acc * alpha[:, None], DOT_F32)
        m_i = m_new
    if SPLIT:
        prow = sp.to(tl.int64) * R + (b * T + t).to(tl.int64) * NH + head      # partial row index
        tl.store(pm_ptr + prow, m_i, mask=rm)
        tl.store(pl_ptr + prow, l_i, mask=rm)
        tl.store(pa_ptr + prow[:, None] * D + od[None, :], acc, mask=rm[:, None])
    else:
        tl.store(o_ptr + qrow[:, None] + od[None, :], (acc / l_i[:, None]).to(tl.bfloat16), mask=rm[:, None])


@triton.jit
def _attn_combine_kernel(pm_ptr, pl_ptr, pa_ptr, sink_ptr, o_ptr, R, NH, NS,
                         D: tl.constexpr, NSP: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    r = tl.program_id(0).to(tl.int64)           # (token, head) row
    head = r % NH
    sp = tl.arange(0, NSP)
    sm = sp < NS
    m = tl.load(pm_ptr + sp * R + r, mask=sm, other=-1.0e30)
    l = tl.load(pl_ptr + sp * R + r, mask=sm, other=0.0)
    sink = tl.load(sink_ptr + head).to(tl.float32)
    mt = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp(m - mt)
    lt = tl.sum(l * w, axis=0) + tl.exp(sink - mt)
    od = tl.arange(0, D)
    a = tl.load(pa_ptr + (sp.to(tl.int64)[:, None] * R + r) * D + od[None, :], mask=sm[:, None], other=0.0)
    o = tl.sum(a * w[:, None], axis=0) / lt
    tl.store(o_ptr + r * D + od, o.to(tl.bfloat16))


DECODE_KEYS_PER_SPLIT = 128


def sink_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, sinks: torch.Tensor, pos: torch.Tensor,
                   t: int, window: int, scale: float, split: bool, off: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention with sinks over the cache.

    q [B*T, nh, d] rotated queries at cache indices pos + [0, T); kc/vc [B, kv, L, d] already hold keys up to
    pos + T. window 0 = full attention. ``split`` (decode): the keys are cut in splits of
    ``DECODE_KEYS_PER_SPLIT`` processed in parallel and merged (with the sink) by a second kernel; a
    sliding-window layer whose window fits one split reads so few keys that one pass without the merge launch
    is faster, so it ignores ``split``. ``off`` [B] int32: keys before cache index off[b] are row b's left
    padding and are masked (a query on a pad sees no key: its output is 0).
    Returns o [B*T, nh, d] bf16.
    """
    n, nh, d = q.shape
    bsz, kv, L, _ = kc.shape
    g = nh // kv
    o = torch.empty_like(q)
    pdl = pdl_kw(q)
    offp = pos if off is None else off
    if split and not 0 < window <= DECODE_KEYS_PER_SPLIT:
        bm = max(16, g)
        ns = triton.cdiv(L, DECODE_KEYS_PER_SPLIT)
        r = n * nh
        pm = torch.empty(ns, r, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pa = torch.empty(ns, r, d, dtype=torch.float32, device=q.device)
        grid = (bsz * kv, triton.cdiv(t * g, bm), ns)
        _attn_kernel[grid](q, kc, vc, sinks, o, pm, pl, pa, pos, offp, t, nh, kv, L, float(scale),
                           DECODE_KEYS_PER_SPLIT, r, G=g, D=d, WINDOW=window, SPLIT=True, BM=bm, BN=64,
                           HAS_OFF=off is not None, DOT_F32=INTERPRET, num_warps=4, num_stages=2, **pdl)
        _attn_combine_kernel[(r,)](pm, pl, pa, sinks, o, r, nh, ns, D=d, NSP=next_pow2(ns), num_warps=4, **pdl)
    else:
        bm = max(64, g)
        grid = (bsz * kv, triton.cdiv(t * g, bm), 1)
        _attn_kernel[grid](q, kc, vc, sinks, o, o, o, o, pos, offp, t, nh, kv, L, float(scale), 0, 0,
                           G=g, D=d, WINDOW=window, SPLIT=False, BM=bm, BN=64, HAS_OFF=off is not None,
                           DOT_F32=INTERPRET, num_warps=4, num_stages=2, **pdl)
    return o


# ----------------------------------------------------------------------------------------------- embed / advance


@triton.jit
def _embed_kernel(seq_ptr, pos_ptr, emb_ptr, x_ptr, H, S, BH: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    b = tl.program_id(0).to(tl.int64)
    tok = tl.load(seq_ptr + b * S + tl.load(pos_ptr)).to(tl.int64)
    offs = tl.arange(0, BH)
    m = offs < H
    tl.store(x_ptr + b * H + offs, tl.load(emb_ptr + tok * H + offs, mask=m), mask=m)


def embed_at(seq: torch.Tensor, pos: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """x [B, H] = emb[seq[b, pos]] (the token at the device position of every row)."""
    bsz, s = seq.shape
    h = emb.shape[1]
    x = torch.empty(bsz, h, dtype=emb.dtype, device=emb.device)
    _embed_kernel[(bsz,)](seq, pos, emb, x, h, s, BH=next_pow2(h), num_warps=4, **pdl_kw(x))
    return x


@triton.jit
def _advance_kernel(nxt_ptr, seq_ptr, pos_ptr, B, S, BB: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    pos = tl.load(pos_ptr)
    ob = tl.arange(0, BB)
    m = ob < B
    nxt = tl.load(nxt_ptr + ob, mask=m, other=0).to(tl.int32)
    tl.store(seq_ptr + ob.to(tl.int64) * S + pos + 1, nxt, mask=m & (pos + 1 < S))
    tl.store(pos_ptr, pos + 1)


def advance(nxt: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
    """seq[b, pos + 1] = nxt[b]; pos += 1 (one program, so the read of pos precedes its write)."""
    bsz, s = seq.shape
    _advance_kernel[(1,)](nxt, seq, pos, bsz, s, BB=next_pow2(max(bsz, 2)), num_warps=1, **pdl_kw(seq))


# ----------------------------------------------------------------------------------------------- greedy pick

ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_part_kernel(lg_ptr, pv_ptr, pi_ptr, V, NB, BLOCK: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(lg_ptr + b * V + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(v, axis=0)
    i = tl.min(tl.where(v == m, offs, 2147483647), axis=0)       # first index of the maximum, like torch
    tl.store(pv_ptr + b * NB + j, m)
    tl.store(pi_ptr + b * NB + j, i)


@triton.jit
def _argmax_advance_kernel(pv_ptr, pi_ptr, seq_ptr, pos_ptr, B, NB, S, NBP: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    pos = tl.load(pos_ptr)
    o = tl.arange(0, NBP)
    om = o < NB
    for b in range(B):
        v = tl.load(pv_ptr + b * NB + o, mask=om, other=float("-inf"))
        i = tl.load(pi_ptr + b * NB + o, mask=om, other=2147483647)
        m = tl.max(v, axis=0)
        nxt = tl.min(tl.where(v == m, i, 2147483647), axis=0)
        tl.store(seq_ptr + S.to(tl.int64) * b + pos + 1, nxt, mask=pos + 1 < S)
    tl.store(pos_ptr, pos + 1)


def argmax_advance(logits: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
    """Greedy step on the device: seq[b, pos + 1] = argmax(logits[b]) (first maximum, as torch.argmax), then
    pos += 1. Two launches: per-block maxima over the vocabulary (201,088 logits: 50 blocks a row, where
    torch.argmax ran one 16 us kernel), then one program that reduces them for every row and moves pos."""
    bsz, v = logits.shape
    nb = triton.cdiv(v, ARGMAX_BLOCK)
    pv = torch.empty(bsz, nb, dtype=torch.float32, device=logits.device)
    pi = torch.empty(bsz, nb, dtype=torch.int32, device=logits.device)
    pdl = pdl_kw(logits)
    _argmax_part_kernel[(bsz, nb)](logits, pv, pi, v, nb, BLOCK=ARGMAX_BLOCK, num_warps=8, **pdl)
    _argmax_advance_kernel[(1,)](pv, pi, seq, pos, bsz, nb, seq.shape[1], NBP=next_pow2(nb), num_warps=2, **pdl)
