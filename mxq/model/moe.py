"""The GPT-OSS MoE block: router (top-k on logits, softmax over the k) and weighted experts.

As openai/gpt-oss ``gpt_oss/torch/model.py::MLPBlock.forward`` and transformers ``GptOssTopKRouter``: the
down-projection bias is added per expert before the routing weight multiplies the output.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .experts import DenseExperts, PackedExperts


def group_by_expert(idx: Tensor, w: Tensor, num_experts: int, drop_zero: bool = False
                    ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (expert, token indices [n], routing weights [n]) for every expert that received a token.

    ``drop_zero``: (token, slot) pairs of weight exactly 0 (skipped by ``mxq.model.skipping``) are sent to a
    sentinel expert ``num_experts`` that is never run, so a skipped pair costs no expert work.

    idx [N, k] top-k expert ids, w [N, k] their weights. One stable sort of the N*k (token, slot) pairs
    by expert replaces E boolean scans; tokens stay in ascending order within an expert. The group
    sizes are read to the host once (one ``.tolist()`` of E counts, the only host sync of the layer):
    the expert matmuls need them as shapes. They are counted with ``scatter_add_``, not ``bincount``,
    whose CUDA version reads the min and max of its input to the host first (two more syncs).
    """
    k = idx.shape[1]
    flat = idx.flatten()                                                         # [N*k]
    if drop_zero:
        flat = torch.where(w.flatten() > 0, flat, num_experts)
    order = flat.argsort(stable=True)                                            # [N*k]
    counts = torch.zeros(num_experts + drop_zero, dtype=torch.long, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat)).tolist()        # E ints (host sync)
    tok_of = order // k                                                          # [N*k] token of each pair
    w_of = w.flatten()[order]                                                    # [N*k]
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n:
            yield e, tok_of[start:start + n], w_of[start:start + n]
        start += n


class MoE(nn.Module):
    def __init__(self, layer: int, hidden: int, num_experts: int, top_k: int,
                 experts: PackedExperts | DenseExperts):
        super().__init__()
        self.layer = layer
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=True)
        self.experts = experts
        self.observer = None  # set by mxq.model.observe
        self.skip_beta: float | None = None  # dynamic expert skipping (mxq.model.skipping); None = off

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, H] -> (logits [N, E] fp32, topk_idx [N, k], topk_w [N, k] fp32)."""
        logits = self.router(x).float()
        vals, idx = torch.topk(logits, self.top_k, dim=-1)
        w = torch.softmax(vals, dim=-1)
        if self.skip_beta is not None:
            from .skipping import skip_weights

            w = skip_weights(w, self.skip_beta)
        return logits, idx, w

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, H], valid [B, T] -> (out [B, T, H], router logits [N, E]).

        Each expert runs once on its gathered tokens; its output f_e(x) (in the activation dtype, then
        fp32) is weighted and summed in fp32, experts in ascending order, so every token's sum has the
        same order on CPU and GPU. ``index_add_`` with the (unique) token indices of one expert: measured
        as fast as ``index_put_(accumulate=True)`` or faster on one CPU thread, and free of atomics
        contention on CUDA since no index repeats within a call.
        """
        b, t, h = x.shape
        flat = x.reshape(-1, h)                                                  # [N, H]
        logits, idx, w = self.route(flat)
        obs = self.observer
        if obs is not None:
            obs.on_route(self.layer, logits, idx, w, valid.reshape(-1))
        out = torch.zeros_like(flat, dtype=torch.float32)                        # [N, H]
        for e, tok, gw in group_by_expert(idx, w, self.experts.num_experts, self.skip_beta is not None):
            y = self.experts.expert_forward(e, flat[tok]).float()                # [n, H]
            if obs is not None:
                obs.on_expert(self.layer, e, tok, gw, y)
            out.index_add_(0, tok, y * gw[:, None])
        return out.to(x.dtype).view(b, t, h), logits
