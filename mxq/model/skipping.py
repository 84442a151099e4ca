"""Dynamic expert skipping at inference (Lu et al., "Not All Experts are Equal", arXiv 2402.14800, "dynamic skipping").

A token skips its k-th routed expert (k >= 2) when that expert's gate weight is below ``beta`` times the
token's top gate weight; the remaining weights are renormalised to sum to 1, as the paper's reference
implementation does. ``beta`` is per layer; ``calibrate_beta`` sets it, as the paper does, to the mean over
calibration tokens of w_2 / w_1 (second gate weight over the top one): for gpt-oss's top-4 the same
threshold then applies to slots 2-4, so the lower slots are skipped more often than the second.

Skipped (token, slot) pairs get weight exactly 0 and ``MoE.forward`` does not run them (``group_by_expert``
with ``drop_zero``), so the reference path saves the work, not only FLOPs on paper. The Triton fast path
(``mxq.runtime``) does not implement skipping and refuses a model with it on, so speed is measured on the
path that skips.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def skip_weights(w: Tensor, beta: float) -> Tensor:
    """w [N, k] top-k gate weights, sorted descending -> the same with slots below beta * w[:, 0] zeroed and
    the rest renormalised (slot 0 is never skipped)."""
    keep = w >= beta * w[:, :1]                                                  # [N, k], slot 0 always True
    w = torch.where(keep, w, 0.0)
    return w / w.sum(dim=-1, keepdim=True)


def set_skipping(model, beta: float | list[float] | None) -> None:
    """Turn skipping on with one ``beta`` for every layer or one per layer; ``None`` turns it off."""
    layers = [layer.mlp for layer in model.layers]
    betas = beta if isinstance(beta, (list, tuple)) else [beta] * len(layers)
    if len(betas) != len(layers):
        raise ValueError(f"skip.beta: {len(betas)} values for {len(layers)} MoE layers")
    for m, b in zip(layers, betas):
        if b is not None and not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"skip.beta={b!r}: must be in [0, 1] (0 skips nothing, 1 keeps only the top expert "
                             "and its ties)")
        m.skip_beta = None if b is None else float(b)


@torch.inference_mode()
def calibrate_beta(model, calib, batch_size: int = 8) -> dict[str, Any]:
    """Per layer beta = mean over calibration tokens of w_2 / w_1, and the share of (token, slot >= 2)
    pairs that this beta skips on the same tokens. Skipping must be off while this runs."""
    layers = [layer.mlp for layer in model.layers]
    if any(m.skip_beta is not None for m in layers):
        raise RuntimeError("calibrate_beta: expert skipping is already on; turn it off first (set_skipping(m, None))")
    ratios: list[list[Tensor]] = [[] for _ in layers]

    def hook(mlp, args, output) -> None:
        x, valid = args[0], args[1]
        flat = x.reshape(-1, x.shape[-1])[valid.reshape(-1).bool()]                # [n, H]
        _, _, w = mlp.route(flat)                                                    # [n, k] descending
        ratios[mlp.layer].append((w[:, 1:] / w[:, :1]).float().cpu())               # [n, k - 1]

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for ids, mask, _ in calib.batches(batch_size):
            model(ids.to(model.device), attention_mask=mask.to(model.device), logits=False)
    finally:
        for h in handles:
            h.remove()
    betas, skipped, tokens = [], [], 0
    for parts in ratios:
        r = torch.cat(parts)                                                         # [T, k - 1]
        beta = float(r[:, 0].mean())
        betas.append(beta)
        skipped.append((r < beta).float().mean(dim=0).tolist())                      # per slot 2..k
        tokens = r.shape[0]
    return {"beta": betas, "skipped_share_per_slot": skipped, "tokens": tokens}
