"""Per-expert Hessians ``H_e = 2 X_e^T X_e / n_e`` from the tokens the router sent to expert ``e`` only.

GPTQ's Hessian of a linear layer (Frantar et al., arXiv 2210.17323, section 3) is built from that layer's
inputs; an MoE expert's inputs are only the tokens routed to it, so every expert gets its own ``H`` for
gate_up (input: the post-attention-norm hidden states of its tokens) and for down (input: the gated
SwiGLU output of that expert on them). Accumulated in float32 as sums of ``x^T x`` over batches and
normalised once at the end, so the result does not depend on the batch split beyond fp32 rounding.

``gate_weighted`` scales each token's contribution by its routing weight ``g_e(x)`` (the softmax over
the top-k logits): MoEQuant's affinity-guided quantization (Hu et al., arXiv 2505.03804, section 4.2),
which makes the reconstruction error of a token count as much as the token's share of the expert's
output. The normalisation is then the sum of the weights instead of the token count.
"""
from __future__ import annotations

import torch
from torch import Tensor


class ExpertHessians:
    """Running ``sum_t w_t x_t x_t^T`` [E, d, d] fp32, token counts [E] and weight sums [E] per expert."""

    def __init__(self, num_experts: int, dim: int, device: torch.device | str, gate_weighted: bool = False):
        self.gate_weighted = gate_weighted
        self.sums = torch.zeros(num_experts, dim, dim, dtype=torch.float32, device=device)   # [E, d, d]
        self.tokens = torch.zeros(num_experts, dtype=torch.long)                             # [E]
        self.weight = torch.zeros(num_experts, dtype=torch.float64)                          # [E]
        self.forced: Tensor | None = None    # [E] tokens added by expert-balanced calibration (calibrate.py)

    def add(self, e: int, x: Tensor, gate: Tensor | None = None) -> None:
        """Add the inputs x [n, d] of expert ``e`` (its routed tokens), with their routing weights gate [n]."""
        if x.shape[0] == 0:
            return
        xf = x.float()
        if self.gate_weighted:
            if gate is None:
                raise ValueError("gate-weighted Hessians need the routing weight of every token")
            xf = xf * gate.float().clamp(min=0).sqrt().unsqueeze(-1)                          # [n, d]
            self.weight[e] += float(gate.double().sum())
        else:
            self.weight[e] += x.shape[0]
        self.sums[e].addmm_(xf.t(), xf)
        self.tokens[e] += x.shape[0]

    def hessian(self, experts: list[int]) -> Tensor:
        """H [len(experts), d, d] = 2 * sums / weight (zero for an expert that saw no token)."""
        idx = torch.tensor(experts, dtype=torch.long)
        w = self.weight[idx].clamp(min=1e-30).to(torch.float32).to(self.sums.device)
        return self.sums[idx.to(self.sums.device)] * (2.0 / w).view(-1, 1, 1)


def condition(h: Tensor) -> list[tuple[int, float]]:
    """(numerical rank, condition number) of each symmetric PSD h [B, d, d], from fp32 eigenvalues.

    Rank counts eigenvalues above ``d * eps * largest`` (numpy's ``matrix_rank`` tolerance); the condition
    number is largest / smallest eigenvalue, ``inf`` when the smallest is below that tolerance.
    """
    ev = torch.linalg.eigvalsh(h.float()).double().cpu()                                    # [B, d] ascending
    out = []
    for row in ev:
        top = float(row[-1])
        if top <= 0:
            out.append((0, float("inf")))
            continue
        tol = top * row.numel() * torch.finfo(torch.float32).eps
        low = float(row[0])
        out.append((int((row > tol).sum()), top / low if low > tol else float("inf")))
    return out
