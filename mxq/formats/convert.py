"""Re-packing one weight into another format, and the quantization error that costs.

A weight already in its target format keeps its bytes (e.g. an MXFP4 expert kept as MXFP4 is copied
byte for byte, never re-quantized); any other conversion goes through the exact float32 dequantization
of the source and the target format's quantizer. Errors are measured the same way, by actually
quantizing the weight, so that the planner's numbers are the ones ``apply_`` will produce.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Packed
from .registry import get_format


def convert(p: Packed, target: str, name: str | None = None) -> Packed:
    """``p`` in format ``target``: unchanged when it already is, else dequantize (fp32) and quantize.
    ``name`` (the weight's checkpoint name) labels the quantizer's errors."""
    if p.format == target:
        return p
    return get_format(target).quantize(get_format(p.format).dequantize(p, torch.float32), name=name)


def quantize_dense(w: Tensor, fmt: str, name: str | None = None) -> Packed:
    """A dense [out, in] weight (attention projection, lm_head) packed in ``fmt``."""
    w = w.detach()
    return get_format(fmt).quantize(w if w.dtype in (torch.float32, torch.bfloat16) else w.float(), name=name)


def relative_errors(weights: list[Tensor], source_format: str, menu: list[str]) -> list[float]:
    """Relative Frobenius error of ``menu`` formats on one expert's matrices taken together.

    err(f) = sqrt(sum_m ||W_m - Q_f(W_m)||^2 / sum_m ||W_m||^2) over the expert's matrices m (gate_up,
    down), W being the dequantized source. The source format itself has error 0: ``convert`` keeps its
    bytes, so choosing it changes nothing.
    """
    den = sum(float(w.double().pow(2).sum()) for w in weights)
    out = []
    for f in menu:
        if f == source_format:
            out.append(0.0)
            continue
        fmt = get_format(f)
        num = 0.0
        for w in weights:
            q = fmt.dequantize(fmt.quantize(w), torch.float32)
            num += float((w - q).double().pow(2).sum())
        out.append((num / den) ** 0.5 if den > 0 else 0.0)
    return out
