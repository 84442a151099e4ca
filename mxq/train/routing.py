"""Router specialisation: how differently the four domains use each layer's experts.

For each domain, the expert-frequency distribution of a layer is the share of top-k routing slots that
go to each expert over that domain's tokens. The Jensen-Shannon divergence (base 2, so in [0, 1] bits)
between two domains' distributions says how specialised the routing is: 0 = both domains use the experts
identically, 1 = they use disjoint experts.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


@torch.no_grad()
def expert_frequencies(model, windows: dict[str, Tensor], batch: int = 16) -> dict[str, list[list[float]]]:
    """windows {domain: [n, T] token ids} -> {domain: [L][E] share of top-k slots per expert}."""
    cfg = model.config
    k, e = cfg.num_experts_per_tok, cfg.num_local_experts
    out = {}
    for d, w in windows.items():
        counts = torch.zeros(cfg.num_hidden_layers, e, dtype=torch.float64)
        for chunk in w.split(batch):
            res = model(chunk.to(model.device), output_router_logits=True)
            for layer, logits in enumerate(res.router_logits):                # [N, E]
                idx = torch.topk(logits, k, dim=-1).indices.reshape(-1).cpu()
                counts[layer] += torch.bincount(idx, minlength=e).double()
        out[d] = (counts / counts.sum(dim=1, keepdim=True)).tolist()
    return out


def js_divergence(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence in bits between two distributions over the same experts."""
    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def specialisation(freqs: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    """Per layer JS divergence of every domain pair, plus their mean ("mean") per layer."""
    domains = list(freqs)
    layers = len(freqs[domains[0]])
    out: dict[str, list[float]] = {}
    for a, b in itertools.combinations(domains, 2):
        out[f"{a}|{b}"] = [js_divergence(freqs[a][i], freqs[b][i]) for i in range(layers)]
    pairs = list(out.values())
    out["mean"] = [sum(p[i] for p in pairs) / len(pairs) for i in range(layers)]
    return out


def load_summary(freqs: dict[str, list[list[float]]]) -> list[dict[str, float]]:
    """Per layer, over all domains pooled: min / max expert share x E (1.0 = perfectly even)."""
    domains = list(freqs)
    layers, e = len(freqs[domains[0]]), len(freqs[domains[0]][0])
    out = []
    for i in range(layers):
        pooled = [sum(freqs[d][i][j] for d in domains) / len(domains) for j in range(e)]
        out.append({"min_load": min(pooled) * e, "max_load": max(pooled) * e})
    return out
