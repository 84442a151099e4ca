"""Expert merging, the doing half: a plan's merge groups -> new weights of each group's anchor expert.

A merge plan keeps one expert per group (its anchor, ``members[0]``) and prunes the others; before the
pruning, ``merge_experts_`` overwrites the anchor with the group's merge (Li et al., M-SMoE, arXiv
2310.01334, the merging step): every parameter (gate_up, down and both biases) is the weighted average
``sum_i a_i W_i`` with ``a`` the group's normalised ``weights``, after the members' neurons are permuted to
match the anchor when ``align`` is on (``mxq.plan.align``). The merged weights are quantized once into the
anchor's planned format, so an MXFP4 model stays MXFP4 and exports in the published HF layout.

Router (gpt-oss: top-k on logits, softmax over the k, with a router bias; openai/gpt-oss gpt_oss/torch/model.py MLPBlock). Routing a
token to any member of a group means routing it to the merged expert, with the members' probability
mass summed; over the group that is a logit of ``LSE_i(l_i)`` (log-sum-exp), which no single linear row
gives. ``router`` chooses the row (weight and bias) of the merged expert:

* ``lse`` (default): the Gibbs variational bound LSE_i(l_i) >= sum_i q_i l_i + H(q), for any distribution
  q over the group, with equality when q is the within-group softmax of the l_i (Boyd & Vandenberghe,
  Convex Optimization, sec. 3.3.1 example 3.25: the conjugate of log-sum-exp is the negative entropy).
  With q the members' mean routing probabilities on calibration text (``router_weights``), the row is
  ``w = sum_i q_i w_i`` and the bias ``b = sum_i q_i b_i + H(q)``: the frequency-weighted mean row plus the
  entropy that keeps the group's share of the router's mass (identical members: exactly l + log n).
* ``mean``: the q-weighted mean row and bias, without the entropy term (a merged expert then competes
  like an average member, so a group's routing mass shrinks).
* ``anchor``: the anchor's own row and bias (the dominant expert's gate, MC-SMoE's convention).

Plan JSON, key ``merge`` (checked by ``check_merge`` before anything changes)::

    {"align": true, "router": "lse",
     "groups": [[{"members": [3, 7, 12], "weights": [...], "router_weights": [...]}, ...], ...]}   # [L][K]
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import get_format
from .align import ExpertWeights, align_perm, permute
from .plan import PRUNE, ROUTER_MODES, PlanError

def read_expert(ex, e: int) -> ExpertWeights:
    """Expert ``e`` of a ``PackedExperts``, dequantized to float32."""
    gu, dn = (ex.packed(k, e) for k in ("gate_up", "down"))
    w_gu = get_format(gu.format).dequantize(gu, torch.float32)                          # [2I, H]
    return ExpertWeights(w_gu, ex.gate_up_bias[e].detach().float().to(w_gu.device),      # [2I]
                         get_format(dn.format).dequantize(dn, torch.float32).to(w_gu.device),   # [H, I]
                         ex.down_bias[e].detach().float().to(w_gu.device))               # [H]


def normalised(w: list[float]) -> list[float]:
    """Weights summing to 1; all zero (no member was ever routed to) -> uniform."""
    s = float(sum(w))
    return [float(x) / s for x in w] if s > 0 else [1.0 / len(w)] * len(w)


def merge_weights(members: list[ExpertWeights], weights: list[float], align: bool) -> ExpertWeights:
    """sum_i a_i W_i over every parameter (members[0] is the anchor that the others are aligned to)."""
    a = normalised(weights)
    if align:
        members = [members[0]] + [permute(m, align_perm(members[0], m)) for m in members[1:]]

    def avg(name: str) -> torch.Tensor:
        out = torch.zeros_like(getattr(members[0], name), dtype=torch.float64)
        for ai, m in zip(a, members):
            out += ai * getattr(m, name).double()
        return out.float()

    return ExpertWeights(avg("gate_up"), avg("gate_up_bias"), avg("down"), avg("down_bias"))


def merge_router(weight: torch.Tensor, bias: torch.Tensor, q: list[float], mode: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router row [H] and bias [] of a merged group from its members' rows weight [G, H], bias [G]."""
    if mode == "anchor":
        return weight[0].clone(), bias[0].clone()
    qn = torch.tensor(normalised(q), dtype=torch.float64, device=weight.device)        # [G]
    w = (qn[:, None] * weight.double()).sum(0)
    b = (qn * bias.double()).sum()
    if mode == "lse":
        b = b - torch.xlogy(qn, qn).sum()                                              # + H(q)
    elif mode != "mean":
        raise PlanError(f"merge router mode {mode!r}: choose from {', '.join(ROUTER_MODES)}")
    return w.to(weight.dtype), b.to(bias.dtype)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 and back to its dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


@torch.no_grad()
def merge_layer_(mlp, groups: list[dict], row: list[str], align: bool, router: str) -> None:
    """Give each multi-member group's anchor of one MoE layer the group's merge, in place.

    Biases and router rows are written into fresh copies (never into the loaded tensors, which may be
    memory-mapped from the checkpoint) and swapped in once per layer. They are rounded to bf16, the dtype
    every released gpt-oss checkpoint stores them in, so the model in memory computes with exactly the
    values an export writes.
    """
    ex = mlp.experts
    gu_bias, dn_bias = ex.gate_up_bias.detach().clone(), ex.down_bias.detach().clone()      # [E, 2I], [E, H]
    r_w, r_b = mlp.router.weight.detach().clone(), mlp.router.bias.detach().clone()         # [E, H], [E]
    for g in groups:
        m = g["members"]
        if len(m) < 2:
            continue
        a = m[0]
        merged = merge_weights([read_expert(ex, e) for e in m], g["weights"], align)
        for kind, w in (("gate_up", merged.gate_up), ("down", merged.down)):
            ex.set_expert(kind, a, get_format(row[a]).quantize(w.to(gu_bias.device)))
        gu_bias[a] = bf16(merged.gate_up_bias).to(gu_bias)
        dn_bias[a] = bf16(merged.down_bias).to(dn_bias)
        idx = torch.tensor(m, device=r_w.device)
        w, b = merge_router(mlp.router.weight.index_select(0, idx), mlp.router.bias.index_select(0, idx),
                            g["router_weights"], router)
        r_w[a], r_b[a] = bf16(w), bf16(b)
    ex.gate_up_bias = nn.Parameter(gu_bias, requires_grad=False)
    ex.down_bias = nn.Parameter(dn_bias, requires_grad=False)
    mlp.router.weight = nn.Parameter(r_w, requires_grad=False)
    mlp.router.bias = nn.Parameter(r_b, requires_grad=False)


def merge_experts_(model, plan) -> None:
    """Carry out ``plan.merge`` on a loaded model (before ``apply_`` prunes the non-anchor members)."""
    spec = plan.merge
    for i, layer in enumerate(model.layers):
        merge_layer_(layer.mlp, spec["groups"][i], plan.experts[i], spec["align"], spec["router"])
