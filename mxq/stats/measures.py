"""Summary measures of routing: entropy, load balance, Jensen-Shannon divergence between domains.

Definitions (natural log for entropies; JSD in bits, so that it lies in [0, 1]):
* ``route_entropy`` of a layer: entropy of the average routing distribution, i.e. of the mean over
  tokens of the full softmax over all E router logits. log(E) means the router spreads its probability
  evenly over the experts on average; lower means some experts get systematically more.
* ``topk_entropy``: mean over tokens of the entropy of the top-k weights g(x) (the softmax over the k
  selected logits, the weights the MoE actually uses). log(k) means the k chosen experts are weighted
  equally; 0 means one expert carries the token alone.
* load balance: coefficient of variation (population std / mean) of the per-expert selection counts,
  and max count / mean count (1 and 0 are perfectly balanced).
* domain specialisation: the generalised JSD of the domains' selection-frequency distributions
  (entropy of their mean minus the mean of their entropies, equal weights), and the mean JSD over all
  pairs of domains.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

LN2 = math.log(2.0)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy in nats of distributions along ``dim`` (normalised first; 0 log 0 = 0)."""
    p = p / p.sum(dim=dim, keepdim=True)
    return -torch.xlogy(p, p).sum(dim=dim)


def load_balance(freq: Tensor) -> tuple[Tensor, Tensor]:
    """freq [L, E] counts -> (coefficient of variation [L], max/mean [L])."""
    mean = freq.mean(dim=-1)
    cv = freq.std(dim=-1, correction=0) / mean
    return cv, freq.amax(dim=-1) / mean


def jsd(dists: Tensor) -> Tensor:
    """Generalised Jensen-Shannon divergence in bits of D distributions: dists [D, L, E] -> [L]."""
    p = dists / dists.sum(dim=-1, keepdim=True)
    return (entropy(p.mean(dim=0)) - entropy(p).mean(dim=0)) / LN2


def mean_pairwise_jsd(dists: Tensor) -> Tensor:
    """Mean over pairs of domains of their JSD in bits: dists [D, L, E] -> [L] (NaN with one domain)."""
    pairs = list(itertools.combinations(range(dists.shape[0]), 2))
    if not pairs:
        return torch.full(dists.shape[1:2], float("nan"), dtype=torch.float64)
    return torch.stack([jsd(dists[[a, b]]) for a, b in pairs]).mean(dim=0)


def pairwise_jsd_matrix(dists: Tensor) -> Tensor:
    """[D, D] JSD in bits between domains, averaged over layers (for the specialisation plot)."""
    d = dists.shape[0]
    out = torch.zeros(d, d, dtype=torch.float64)
    for a, b in itertools.combinations(range(d), 2):
        out[a, b] = out[b, a] = jsd(dists[[a, b]]).mean()
    return out
