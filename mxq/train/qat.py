"""MXFP4 quantization-aware training of the experts (straight-through estimator).

Why: the shipped checkpoint stores experts in MXFP4 (4.25 bits a weight), and rounding a model trained in
full precision costs loss. For the last steps of training every expert matmul sees its weight rounded
exactly as the writer will round it (``mxq.formats.mxfp4.quantize_mxfp4`` then ``dequantize_mxfp4``),
while gradients pass straight through to the full-precision master weights (Bengio et al. 2013). The
checkpoint written afterwards then holds exactly the weights the final steps were trained with.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mxq.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from mxq.model.experts import DenseExperts


def fake_mxfp4(w: Tensor) -> Tensor:
    """w [..., K] (K % 32 == 0) -> its MXFP4 rounding in the forward pass, identity gradient backward."""
    with torch.no_grad():
        blocks, scales = quantize_mxfp4(w.detach())                                  # blocks along K
        q = dequantize_mxfp4(blocks, scales, torch.float32).view_as(w).to(w.dtype)   # [..., K]
    return w + (q - w).detach()


class MXFP4QATExperts(DenseExperts):
    """``DenseExperts`` whose matmuls use the fake-quantised stacks computed once per MoE forward."""

    def refresh(self) -> None:
        self._gate_up_q = fake_mxfp4(self.gate_up_weight)     # [E, 2I, H], blocks along H (contraction)
        self._down_q = fake_mxfp4(self.down_weight)           # [E, H, I], blocks along I (contraction)

    def gate_up_matmul(self, e: int, x: Tensor) -> Tensor:
        return x @ self._gate_up_q[e].to(x.dtype).t()

    def down_matmul(self, e: int, y: Tensor) -> Tensor:
        return y @ self._down_q[e].to(y.dtype).t()


def _refresh_hook(moe: nn.Module, args: tuple) -> None:
    moe.experts.refresh()


def enable_mxfp4_qat_(model: nn.Module) -> None:
    """Switch every layer's ``DenseExperts`` to MXFP4 fake quantization, in place (parameters unchanged)."""
    for layer in model.layers:
        ex = layer.mlp.experts
        if not isinstance(ex, DenseExperts):
            raise TypeError(f"QAT needs a trainable model (DenseExperts), got {type(ex).__name__}")
        if not isinstance(ex, MXFP4QATExperts):
            ex.__class__ = MXFP4QATExperts       # same parameters, only the matmuls change
            layer.mlp.register_forward_pre_hook(_refresh_hook)
