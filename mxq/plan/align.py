"""Neuron alignment of two gpt-oss experts before they are averaged.

The intermediate neurons of a SwiGLU expert can be permuted without changing its function (permute the
rows of gate_up and the columns of down alike), so two experts trained apart rarely number their neurons
the same way, and averaging them unaligned mixes unrelated neurons (Li et al., M-SMoE, arXiv 2310.01334,
"permutation alignment" before merging). ``align_perm`` finds the permutation of an expert's neurons that best
matches an anchor expert by weight matching: maximise the summed inner products of matched neurons'
weights, a linear assignment problem solved exactly by ``scipy.optimize.linear_sum_assignment``
(Ainsworth et al., Git Re-Basin, arXiv 2209.04836, sec. 3.2).

gpt-oss layout (transformers' ``GptOssExperts`` in models/gpt_oss/modeling_gpt_oss.py slices gate as
``gate_up[..., ::2]`` and up as ``gate_up[..., 1::2]``): gate_up [2I, H] is interleaved along the
intermediate axis, row 2n the gate and row 2n+1 the up projection of neuron n, so a neuron is the row pair (2n, 2n+1) with its two bias
entries, together with column n of down [H, I]; a permutation moves the pair and the column together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass
class ExpertWeights:
    """One expert's parameters in float32, in the gpt-oss [out, in] orientation."""

    gate_up: Tensor          # [2I, H], rows interleaved gate0, up0, gate1, up1, ...
    gate_up_bias: Tensor     # [2I]
    down: Tensor             # [H, I]
    down_bias: Tensor        # [H]

    @property
    def intermediate(self) -> int:
        return self.down.shape[1]


def neuron_features(w: ExpertWeights) -> Tensor:
    """[I, 3H + 2] per neuron: its gate row, up row, both bias entries and its down column."""
    I, H = w.intermediate, w.gate_up.shape[1]
    pair = w.gate_up.reshape(I, 2 * H)                                        # [I, 2H]: gate_n | up_n
    return torch.cat([pair, w.gate_up_bias.reshape(I, 2), w.down.t()], dim=1)  # [I, 3H + 2]


def align_perm(anchor: ExpertWeights, other: ExpertWeights) -> np.ndarray:
    """perm [I] such that ``permute(other, perm)`` numbers its neurons like ``anchor``.

    Neuron n of the permuted expert is neuron ``perm[n]`` of ``other``; chosen to maximise
    sum_n <feat_anchor[n], feat_other[perm[n]]> over all permutations.
    """
    if anchor.down.shape != other.down.shape or anchor.gate_up.shape != other.gate_up.shape:
        raise ValueError(f"cannot align experts of different shapes {tuple(anchor.down.shape)} and "
                         f"{tuple(other.down.shape)}")
    fa, fo = neuron_features(anchor).double(), neuron_features(other).double()
    sim = (fa @ fo.t()).cpu().numpy()                                          # [I, I]
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def permute(w: ExpertWeights, perm: np.ndarray | Tensor) -> ExpertWeights:
    """The same function with its intermediate neurons renumbered: new neuron n = old neuron perm[n]."""
    I, H = w.intermediate, w.gate_up.shape[1]
    p = torch.as_tensor(np.asarray(perm), dtype=torch.long, device=w.down.device)
    if sorted(p.tolist()) != list(range(I)):
        raise ValueError(f"not a permutation of the {I} intermediate neurons")
    return ExpertWeights(
        gate_up=w.gate_up.reshape(I, 2, H)[p].reshape(2 * I, H),              # gate/up pairs move together
        gate_up_bias=w.gate_up_bias.reshape(I, 2)[p].reshape(2 * I),
        down=w.down[:, p],                                                     # [H, I]
        down_bias=w.down_bias.clone(),
    )
