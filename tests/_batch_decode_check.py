"""Padded batched greedy decode against per-sequence decode on the fast path (shared by the GPU test and the
Triton-interpreter worker).

Each row's greedy tokens from one left-padded batch must equal the tokens of the same prompt decoded alone.
Rounding may differ between a batch and a single row where a library picks another kernel for another row
count (cuBLAS / CPU BLAS for the dense projections and lm_head, autotuned GEMV tiles keyed by the pair count),
so a row may leave the per-sequence tokens only at a step where the per-sequence logits of the two tokens are
within ``TIE_ULPS`` bf16 units of the larger (a near-tie); up to there the batch's logits must match
(relative L2 < 1e-2). Broken padding (wrong RoPE positions, a pad key attended) moves the logits by far more
and changes the first token.
"""
from __future__ import annotations

import torch

TIE_ULPS = 4


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids [B, T], attention_mask [B, T]) padded on the left."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros(len(rows), t, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        ids[b, t - len(r):] = r
        mask[b, t - len(r):] = 1
    return ids, mask


@torch.no_grad()
def greedy_with_logits(rt, ids: torch.Tensor, mask: torch.Tensor | None, steps: int):
    """Greedy decode through the runtime's own API (prefill, then graph-replayed steps fed the argmax):
    (tokens [B, steps], logits [B, steps, V] fp32)."""
    b, t = ids.shape
    st = rt.state_for(b, t + steps)
    rt.use_sampling(st, None)
    lg = rt.prefill(st, ids, attention_mask=mask)[:b].float()
    toks, lgs = [], []
    for s in range(steps):
        nxt = lg.argmax(-1)
        toks.append(nxt)
        lgs.append(lg)
        if s + 1 < steps:
            lg = rt.step(st, nxt)[:b].float().clone()
    return torch.stack(toks, 1), torch.stack(lgs, 1)


def near_tie(logits: torch.Tensor, a: int, b: int) -> bool:
    """True when logits[a] and logits[b] are within ``TIE_ULPS`` bf16 units of the larger."""
    hi = max(abs(float(logits[a])), abs(float(logits[b])), 1e-30)
    ulp = 2.0 ** (torch.tensor(hi).log2().floor().item() - 7)
    return abs(float(logits[a]) - float(logits[b])) <= TIE_ULPS * ulp


def compare(rt, rows: list[torch.Tensor], steps: int) -> dict:
    """Batch of ``rows`` (left-padded) vs each row alone, and ``generate`` vs the step loop on the batch.
    Returns per-row verdicts; ``ok`` is the overall pass."""
    ids, mask = left_pad(rows)
    bt, bl = greedy_with_logits(rt, ids, mask, steps)
    gen = rt.generate(ids, steps, attention_mask=mask)[:, ids.shape[1]:]
    out = {"rows": [], "generate_equal": bool(torch.equal(gen.cpu(), bt.cpu()))}
    for b, r in enumerate(rows):
        st_, sl = greedy_with_logits(rt, r[None], None, steps)
        st_, sl = st_[0], sl[0]
        diff = (bt[b] != st_).nonzero()
        j = int(diff[0]) if diff.numel() else steps
        upto = min(j + 1, steps)
        err = float((bl[b, :upto] - sl[:upto]).norm() / sl[:upto].norm())
        tie = j == steps or near_tie(sl[j], int(st_[j]), int(bt[b, j]))
        out["rows"].append({"len": len(r), "first_diff": j, "logits_rel": err, "tie_at_diff": tie})
    out["ok"] = out["generate_equal"] and all(x["tie_at_diff"] and x["logits_rel"] < 1e-2 for x in out["rows"])
    return out
