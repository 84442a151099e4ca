"""Training losses: next-token cross-entropy and the Switch-Transformer load-balancing loss.

Why the balancing loss: without it a freshly initialised router collapses onto a few experts, and an MoE
whose experts are mostly dead is useless for studying per-expert compression. Switch Transformer
(Fedus et al. 2021, eq. 4): ``aux = E * sum_e f_e * P_e`` with f_e the fraction of routed slots that go
to expert e (top-k selections, counted over all N*k slots) and P_e the mean router softmax probability of
e over the N tokens. It equals 1 for perfectly uniform routing and grows as routing concentrates; it
penalises imbalance over the whole batch only, so experts remain free to specialise by domain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [B, T, V], targets [B, T] -> mean cross-entropy (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """router_logits [N, E] (one layer) -> scalar ``E * sum_e f_e * P_e`` (1.0 when balanced)."""
    n, e = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)                          # [N, E]
    idx = torch.topk(router_logits, top_k, dim=-1).indices                        # [N, k]
    f = torch.zeros(e, device=router_logits.device).index_add_(
        0, idx.reshape(-1), torch.ones(n * top_k, device=router_logits.device)) / (n * top_k)   # [E]
    p = probs.mean(dim=0)                                                         # [E]
    return e * torch.sum(f * p)


def mean_balancing_loss(router_logits: tuple[Tensor, ...], top_k: int) -> Tensor:
    """The balancing loss averaged over layers."""
    return torch.stack([load_balancing_loss(r, top_k) for r in router_logits]).mean()
