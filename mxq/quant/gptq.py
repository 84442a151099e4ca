"""GPTQ for a batch of weights that share a format (the experts of one layer), onto any ``Grid``.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv 2210.17323, Algorithm 1: with ``H = 2 X^T X`` over the calibration inputs ``X`` [n, in] of a
linear layer, the input columns are rounded one at a time in the order of ``H^-1``'s upper Cholesky factor
``U``; column ``j``'s rounding error ``(w_j - q_j) / U_jj`` is spread over the columns not rounded yet
through row ``j`` of ``U``. Columns are processed in blocks (``block_size``, 128 in the paper) with the
updates to later blocks applied once per block ("lazy batch updates", section 4, step 2). Damping adds
``damp * mean(diag H)`` to the diagonal (section 4, step 3; 1% by default); when the Cholesky
factorisation still fails the damping is multiplied by 10 (up to 4 times) and the damping actually applied
is reported. Input channels that never saw a non-zero input (``H_jj = 0``) get ``H_jj = 1``: their weights
are rounded as by RTN, and unlike the paper's reference code they are not set to zero, since an expert's
channel that was silent on the calibration text may not be silent on other text.

Groups (section 4, "Additional details"): without act-order a group's scale is chosen from the current
(already error-corrected) weights when its first column is reached. With ``act_order`` the columns are
processed by decreasing ``diag(H)`` and every group's scale is chosen up front from the original weights
("static groups", as GPTQ's ``static_groups`` and llm-compressor's ``actorder=static``), so the scales
stay contiguous in the stored layout. Formats whose grid is ``static`` always choose up front.

MSE scale search (``mse_shrink``): each group's scale is the format's own rule applied to ``f`` times the
group's range, for the factor ``f`` of the grid (always including the plain rule) with the smallest
``sum_j H_jj (w_j - q_j)^2`` over the group's columns (GPTQ's ``Quantizer(mse=True)`` grid, weighted by
the Hessian diagonal as the proxy of each input channel's importance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import Grid

MAX_DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQSettings:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    mse_shrink: tuple[float, ...] = ()     # empty: the format's own scale rule only


@dataclass
class GPTQResult:
    values: Tensor                 # [B, out, in] fp32, exactly the grid values written
    codes: Tensor                  # [B, out, in] u8
    states: Tensor                 # [B, out, G, m] per-group scale states (after ``Grid.finalize``)
    info: list[dict[str, Any]] = field(default_factory=list)   # per weight: damping, dead columns, ...


def _choose_groups(grid: Grid, w: Tensor, hdiag: Tensor, shrink: tuple[float, ...]) -> Tensor:
    """Scale states of every group from ``w`` [B, out, in]: [B, out, G, m] (MSE search when ``shrink``)."""
    g, k = grid.group, w.shape[-1]
    states = []
    for c0 in range(0, k, g):
        states.append(_choose_one(grid, w[..., c0:c0 + g], hdiag[..., c0:c0 + g], shrink))
    return torch.stack(states, dim=2)


def _choose_one(grid: Grid, wg: Tensor, hd: Tensor, shrink: tuple[float, ...]) -> Tensor:
    """One group wg [B, out, g] with Hessian diagonal hd [B, g] -> state [B, out, m]."""
    best = grid.choose(wg, None)
    if not shrink:
        return best
    best_e = _group_error(grid, wg, hd, best)
    for f in shrink:
        s = grid.choose(wg, f)
        e = _group_error(grid, wg, hd, s)
        better = (e < best_e).unsqueeze(-1)
        best, best_e = torch.where(better, s, best), torch.minimum(e, best_e)
    return best


def _group_error(grid: Grid, wg: Tensor, hd: Tensor, s: Tensor) -> Tensor:
    """[B, out]: sum over the group's columns of H_jj (w - q)^2, summed over tiles of ``row_block`` rows."""
    v, _ = grid.quant(wg, s)
    e = ((wg - v).pow(2) * hd.unsqueeze(1)).sum(-1, dtype=torch.float64)           # [B, out]
    if grid.row_block > 1:
        b, out = e.shape
        rb = grid.row_block
        nb = -(-out // rb)
        t = F.pad(e, (0, nb * rb - out)).reshape(b, nb, rb).sum(-1)
        e = t.repeat_interleave(rb, dim=1)[:, :out]
    return e


def _inverse_factor(h: Tensor, damp: float) -> tuple[Tensor, list[float], list[int]]:
    """H [B, n, n] -> (upper Cholesky factor of H^-1 [B, n, n], damping applied, retries) per weight."""
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    mean = h.diagonal(dim1=-2, dim2=-1).mean(-1)                                    # [B]
    out = torch.empty_like(h)
    applied, retries = [], []
    for b in range(h.shape[0]):
        lam = damp
        for r in range(MAX_DAMP_RETRIES + 1):
            hb = h[b] + (lam * mean[b]) * eye
            chol, bad = torch.linalg.cholesky_ex(hb)
            if not int(bad):
                inv = torch.cholesky_inverse(chol)
                u, bad = torch.linalg.cholesky_ex(inv, upper=True)
                if not int(bad):
                    break
            if r == MAX_DAMP_RETRIES:
                raise torch.linalg.LinAlgError(f"Hessian {b} is not positive definite even with damping {lam}")
            lam *= 10.0
        out[b] = u
        applied.append(lam)
        retries.append(r)
    return out, applied, retries


@torch.no_grad()
def gptq(w: Tensor, h: Tensor, grid: Grid, cfg: GPTQSettings) -> GPTQResult:
    """Quantize ``w`` [B, out, in] with Hessians ``h`` [B, in, in] (fp32) onto ``grid``."""
    W = w.float().clone()                                                            # [B, out, in]
    H = h.float().clone()                                                            # [B, in, in]
    B, out, k = W.shape
    g = grid.group
    diag = H.diagonal(dim1=-2, dim2=-1)                                              # [B, in] (a view)
    dead = diag == 0
    n_dead = dead.sum(-1).tolist()
    diag.masked_fill_(dead, 1.0)
    hdiag = diag.clone()                                                             # [B, in]
    static = cfg.act_order or grid.static
    states = None
    if static:
        states = grid.finalize(_choose_groups(grid, W, hdiag, cfg.mse_shrink))       # [B, out, G, m]
    if cfg.act_order:
        perm = torch.argsort(hdiag, dim=-1, descending=True, stable=True)            # [B, in]
    else:
        perm = torch.arange(k, device=W.device).expand(B, k)
    W = torch.gather(W, 2, perm.unsqueeze(1).expand(B, out, k))
    H = torch.gather(torch.gather(H, 1, perm.unsqueeze(2).expand(B, k, k)), 2, perm.unsqueeze(1).expand(B, k, k))
    U, damp, retries = _inverse_factor(H, cfg.damp)                                  # [B, in, in]
    del H
    Q = torch.empty_like(W)
    C = torch.empty(B, out, k, dtype=torch.uint8, device=W.device)
    group_of = perm // g                                                             # [B, in] original group
    dyn_states: list[Tensor] = []
    bs = cfg.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[..., i1:i2].clone()                                                   # [B, out, n]
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]                                                      # [B, n, n]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:                                            # group starts: choose now
                wg = torch.cat((W1[..., i:], W[..., i2:]), dim=-1)[..., :g]
                dyn_states.append(_choose_one(grid, wg, hdiag[:, j:j + g], cfg.mse_shrink))
            if static:
                idx = group_of[:, j].view(B, 1, 1, 1).expand(B, out, 1, states.shape[-1])
                S = torch.gather(states, 2, idx).squeeze(2)                          # [B, out, m]
            else:
                S = dyn_states[j // g]
            col = W1[..., i:i + 1]                                                   # [B, out, 1]
            v, c = grid.quant(col, S)
            Q[..., j:j + 1], C[..., j:j + 1] = v, c
            d = U1[:, i, i].view(B, 1, 1)
            err = (col - v) / d                                                      # [B, out, 1]
            W1[..., i:] -= err * U1[:, i:i + 1, i:]                                  # [B, out, n - i]
            E1[..., i:i + 1] = err
        W[..., i2:] -= E1 @ U[:, i1:i2, i2:]                                         # lazy batch update
    inv = torch.argsort(perm, dim=-1)
    Q = torch.gather(Q, 2, inv.unsqueeze(1).expand(B, out, k))
    C = torch.gather(C, 2, inv.unsqueeze(1).expand(B, out, k))
    if not static:
        states = grid.finalize(torch.stack(dyn_states, dim=2))
    info = [{"damp": damp[b], "damp_retries": retries[b], "dead_inputs": n_dead[b]} for b in range(B)]
    return GPTQResult(Q, C, states, info)
