"""The GPT-OSS MoE block: router (top-k on logits, softmax over the k; spec 4.5) and weighted experts (4.7)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .experts import DenseExperts, PackedExperts


class MoE(nn.Module):
    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int,
                 experts: PackedExperts | DenseExperts):
        super().__init__()
        self.layer = layer
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=True)
        self.experts = experts
        self.observer = None  # set by mxq.model.observe

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, H] -> (logits [N, E] fp32, topk_idx [N, k], topk_w [N, k] fp32)."""
        logits = self.router(x).float()
        vals, idx = torch.topk(logits, self.top_k, dim=-1)
        return logits, idx, torch.softmax(vals, dim=-1)

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, H], valid [B, T] -> (out [B, T, H], router logits [N, E])."""
        b, t, h = x.shape
        flat = x.reshape(-1, h)                                                  # [N, H]
        logits, idx, w = self.route(flat)
        obs = self.observer
        if obs is not None:
            obs.on_route(self.layer, logits, idx, w, valid.reshape(-1))
        out = torch.zeros_like(flat, dtype=torch.float32)
        # Group tokens by expert: one sort instead of E boolean scans.
        order = idx.flatten().argsort(stable=True)                               # [N*k]
        counts = torch.bincount(idx.flatten(), minlength=self.experts.num_experts).tolist()
        tok_of = order // self.top_k
        w_of = w.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, gw = tok_of[start:start + n], w_of[start:start + n]             # [n], [n]
            start += n
            y = self.experts.expert_forward(e, flat[tok])                        # [n, H]
            if obs is not None:
                obs.on_expert(self.layer, e, tok, gw, y.float())
            out.index_add_(0, tok, y.float() * gw[:, None])
        return out.to(x.dtype).view(b, t, h), logits
