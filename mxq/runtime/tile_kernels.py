"""The prefill expert sort (``expert_tiles``) in two Triton launches.

Why: the grouped prefill GEMMs (``moe_grouped``, ``fmt_moe_grouped``) need the (token, slot) pairs sorted by
expert and cut into tiles of one expert. In torch that is ~15 small ops (argsort, bincount, cumsum,
searchsorted, where, ...): launch-bound, 0.5-0.9 ms a layer on an H100, 11-21 ms of a 2,048-token prefill of
24 layers. Here the pairs are split into C chunks of BLOCK and:

1. ``_chunk_hist_kernel`` (C programs): each chunk's expert histogram -> counts [C, BE].
2. ``_sort_tiles_kernel`` (C + NT programs): every program first sums the whole counts table (per-expert
   totals, hence expert starts and tile counts; a chunk program also sums the chunks before its own), so no
   separate scan launch is needed (the table is small: C <= 256 up to P = 2^20). Chunk programs then write
   order[pos] = p for their pairs, SB at a time: pos = next free slot of the pair's expert (a running [BE]
   count, read with ``tl.gather``) + the number of earlier pairs of the same expert among the SB (a [SB, SB]
   comparison), which keeps the sort stable. Tile programs write TB entries of the tile table each, finding a
   tile's expert by a binary search over the experts' cumulative tile counts.

Every size comes from shapes: no host synchronisation. Expert ids must lie in [0, E) (checking would need a
sync); a pair with an id outside is left out of the counts, the order and the tiles (the last entries of
``order`` are then unspecified) rather than written out of bounds.
"""
from __future__ import annotations

import torch

from ._common import dev_ok, next_pow2, tl, triton

_TB = 512        # tile-table entries per tile program
_SB = 64         # pairs ranked together ([SB, SB] comparison)
_ELEMS = 4096    # elements of a [rows, BE] block of the counts table summed at once
_HIST_WARPS = 4
_SORT_WARPS = 8   # sm_90: 95 registers, no spills (4 warps: 164, the [SB, SB] comparison)


@triton.jit
def _chunk_hist_kernel(ids_ptr, counts_ptr, P, E, BE: tl.constexpr, BLOCK: tl.constexpr):
    """counts[c, e] = pairs of expert e among p in [c * BLOCK, (c + 1) * BLOCK) (ids outside [0, E) skipped)."""
    c = tl.program_id(0)
    p = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(ids_ptr + p, mask=p < P, other=-1)
    ok = (x >= 0) & (x < E)                                   # in the ids' own dtype: no int64 wrap-around
    x = tl.where(ok, x, 0).to(tl.int32)
    tl.store(counts_ptr + c * BE + tl.arange(0, BE), tl.histogram(x, BE, mask=ok))


@triton.jit
def _sort_tiles_kernel(ids_ptr, counts_ptr, order_ptr, te_ptr, ts_ptr, tn_ptr, P, E, C, T,
                       BE: tl.constexpr, LOG_BE: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr,
                       CB: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr):
    """Programs [0, C): order for chunk pid; programs [C, C + NT): tile table entries [(pid - C) * TB, +TB)."""
    pid = tl.program_id(0)
    ex = tl.arange(0, BE)
    total = tl.zeros([BE], tl.int32)                          # pairs of expert e
    before = tl.zeros([BE], tl.int32)                         # pairs of expert e in chunks < pid
    for c0 in range(0, C, CB):
        rows = c0 + tl.arange(0, CB)
        h = tl.load(counts_ptr + rows[:, None] * BE + ex[None, :], mask=(rows < C)[:, None], other=0)  # [CB, BE]
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where((rows < pid)[:, None], h, 0), axis=0)
    ends = tl.cumsum(total, axis=0)                           # [BE] sorted positions of expert e: [ends - total, ends)
    starts = ends - total
    if pid < C:
        nxt = starts + before                                 # [BE] next sorted position of expert e
        ii = tl.arange(0, SB)
        for s0 in range(0, BLOCK, SB):
            p = pid * BLOCK + s0 + ii                         # [SB] pair ids
            x = tl.load(ids_ptr + p, mask=p < P, other=-1)
            ok = (x >= 0) & (x < E)
            x = tl.where(ok, x, 0).to(tl.int32)
            same = (x[:, None] == x[None, :]) & ok[None, :] & (ii[None, :] < ii[:, None])      # [SB, SB]
            pos = tl.gather(nxt, x, 0) + tl.sum(same.to(tl.int32), axis=1)
            tl.store(order_ptr + pos, p, mask=ok)
            nxt += tl.histogram(x, BE, mask=ok)
    else:
        ntile = (total + BM - 1) // BM                        # [BE] tiles of expert e
        tend = tl.cumsum(ntile, axis=0)                       # its tiles are [tend - ntile, tend)
        first = starts - (tend - ntile) * BM                  # tile tau of expert e starts at first[e] + tau * BM
        tau = (pid - C) * TB + tl.arange(0, TB)               # [TB]
        # te = #experts with tend <= tau (searchsorted right), capped at BE - 1; branchless binary search
        te = tl.zeros([TB], tl.int32)
        for k in tl.static_range(LOG_BE):
            cand = te + (BE >> (k + 1))
            te = tl.where(tl.gather(tend, cand - 1, 0) <= tau, cand, te)
        te = tl.minimum(te, E - 1)
        ts = tl.gather(first, te, 0) + tau * BM
        tn = tl.minimum(ts + BM, tl.gather(ends, te, 0))
        live = tau < tl.sum(ntile, axis=0)                    # past the real tiles: ts == tn == 0
        m = tau < T
        tl.store(te_ptr + tau, te, mask=m)
        tl.store(ts_ptr + tau, tl.where(live, ts, 0), mask=m)
        tl.store(tn_ptr + tau, tl.where(live, tn, 0), mask=m)


def _check(idx: torch.Tensor, num_experts: int, bm: int) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError(f"idx must be a 2-D [N, k] tensor of expert ids, got {getattr(idx, 'shape', type(idx))}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"bm must be a power of two >= 16, got {bm}")


def expert_tiles_torch(idx: torch.Tensor, num_experts: int, bm: int):
    """The torch reference of ``expert_tiles`` (the ~15 launches it replaces; any device)."""
    _check(idx, num_experts, bm)
    flat = idx.reshape(-1).long()
    p = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    ends = counts.cumsum(0)
    starts = ends - counts
    ntile = (counts + bm - 1) // bm
    tend = ntile.cumsum(0)
    tbeg = tend - ntile
    tmax = (p + bm - 1) // bm + num_experts
    tau = torch.arange(tmax, device=idx.device)
    te = torch.searchsorted(tend, tau, right=True).clamp_(max=num_experts - 1)
    ts = starts[te] + (tau - tbeg[te]) * bm
    tn = torch.minimum(ts + bm, ends[te])
    valid = tau < tend[-1]
    ts = torch.where(valid, ts, torch.zeros_like(ts))
    tn = torch.where(valid, tn, torch.zeros_like(tn))
    return order.int(), te.int(), ts.int(), tn.int()


def chunk_size(p: int) -> int:
    """Pairs per chunk: at least 256, and at most 256 chunks up to P = 2^20 (the counts table every program of
    ``_sort_tiles_kernel`` sums stays small)."""
    return min(4096, max(256, next_pow2(triton.cdiv(p, 256))))


def expert_tiles(idx: torch.Tensor, num_experts: int, bm: int):
    """idx [N, k] int32/int64 expert ids in [0, E) -> (order [P] int32, te, ts, tn [T_max] int32), P = N * k,
    T_max = ceil(P / bm) + E, exactly ``expert_tiles_torch``'s outputs; two launches, no host sync. CPU tensors
    outside the Triton interpreter go to ``expert_tiles_torch``."""
    _check(idx, num_experts, bm)
    if not dev_ok(idx):
        return expert_tiles_torch(idx, num_experts, bm)
    e = int(num_experts)
    ids = idx.reshape(-1).contiguous()                                   # [P]
    p = ids.numel()
    t_max = triton.cdiv(p, bm) + e
    be = max(16, next_pow2(e))
    block = chunk_size(p)
    c = triton.cdiv(p, block)
    counts = torch.empty(max(c, 1), be, dtype=torch.int32, device=idx.device)   # [C, BE]
    order = torch.empty(p, dtype=torch.int32, device=idx.device)               # [P]
    te, ts, tn = torch.empty(3, t_max, dtype=torch.int32, device=idx.device).unbind(0)   # [T_max] each
    if c:
        _chunk_hist_kernel[(c,)](ids, counts, p, e, BE=be, BLOCK=block, num_warps=_HIST_WARPS)
    _sort_tiles_kernel[(c + triton.cdiv(t_max, _TB),)](
        ids, counts, order, te, ts, tn, p, e, c, t_max, BE=be, LOG_BE=be.bit_length() - 1, BLOCK=block, BM=bm,
        CB=max(1, _ELEMS // be), SB=_SB, TB=_TB, num_warps=_SORT_WARPS)
    return order, te, ts, tn
