"""bf16 GEMV for the decode step's dense projections (q/k/v in one launch, o_proj).

At batch 1 cuBLAS reached 1.2-1.7 TB/s on these shapes (bench/decode.py breakdown); this kernel splits the
output rows over many programs and streams each row once. Rounding as ``nn.Linear``: bf16(x @ W^T + b).
"""
from __future__ import annotations

import torch

from ._common import INTERPRET, autotune, cfg, launch, tl, triton
from .pdl import grid_dep, pdl_kw

# NS: stages of the K loop's software pipeline (``tl.range``; a plain ``range`` loop is not pipelined for loads
# that do not feed ``tl.dot``: see ``moe_kernels._rows_dot_fp4``); NS = 1 is the unpipelined loop.
_CONFIGS = [cfg(4, 2, BN=16, BK=256, NS=3), cfg(4, 2, BN=8, BK=512, NS=3), cfg(4, 2, BN=4, BK=512, NS=3),
            cfg(8, 2, BN=16, BK=512, NS=3), cfg(4, 2, BN=32, BK=128, NS=4), cfg(2, 2, BN=4, BK=256, NS=4),
            cfg(4, 2, BN=8, BK=256, NS=4), cfg(4, 2, BN=8, BK=512, NS=1), cfg(8, 2, BN=8, BK=128, NS=3)]


@autotune(_CONFIGS, key=["K", "NMAX", "NT"])
@triton.jit
def _gemv3_kernel(x_ptr, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, K, NMAX, NT,
                  BN: tl.constexpr, BK: tl.constexpr, NS: tl.constexpr, PDL: tl.constexpr):
    grid_dep(PDL)
    rb = tl.program_id(0)
    which = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    if which == 0:
        w, b, y, n = w0, b0, y0, n0
    elif which == 1:
        w, b, y, n = w1, b1, y1, n1
    else:
        w, b, y, n = w2, b2, y2, n2
    rows = rb * BN + tl.arange(0, BN)
    rm = rows < n
    k_end = tl.where(rb * BN < n, K, 0)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.range(0, k_end, BK, num_stages=NS):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        xv = tl.load(x_ptr + t * K + kk, mask=km, other=0.0).to(tl.float32)
        wv = tl.load(w + rows[:, None] * K + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    out = tl.sum(acc, axis=1) + tl.load(b + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(y + t * n + rows, out.to(tl.bfloat16), mask=rm)


if INTERPRET:   # the interpreter runs one config per kernel (``_common.autotune``): large tiles, few programs
    _gemv3_kernel._mxq_default = dict(BN=128, BK=256, NS=1)


def linear_gemv(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """x [N, K] bf16 (few rows) -> [x @ W_i^T + b_i for up to three (W_i [n_i, K], b_i [n_i])], one launch."""
    n_tok, k = x.shape
    outs = [torch.empty(n_tok, w.shape[0], dtype=torch.bfloat16, device=x.device) for w, _ in layers]
    args = []
    for i in range(3):
        w, b = layers[min(i, len(layers) - 1)]
        args += [w, b, outs[min(i, len(layers) - 1)], w.shape[0]]
    nmax = max(w.shape[0] for w, _ in layers)
    launch(_gemv3_kernel, lambda m: (triton.cdiv(nmax, m["BN"]), len(layers), n_tok), x, *args, k, nmax, n_tok,
           **pdl_kw(x))
    return outs
