"""Shared pieces of the runtime-kernel microbenchmarks (``grouped_configs.py``, ``gemv_configs.py``,
``expert_sort.py``): CUDA-event timing of eager calls and a synthetic gpt-oss MoE layer in the stacked layout a
loaded checkpoint has, so every sweep times the same thing the same way."""
from __future__ import annotations

import statistics

import torch


def event_median_ms(fn, reps: int, warmup: int) -> float:
    """Median over ``reps`` calls of the CUDA-event time of one eager call of ``fn`` (after ``warmup`` calls),
    in milliseconds: the host's launch gaps are included, as an eager prefill pays them."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def synthetic_moe_layer(fmt: str, e: int, h: int, i: int, dev: str, g: torch.Generator):
    """One ``PackedExperts`` layer of ``e`` experts with Gaussian weights (std 1/sqrt(fan-in)), stacked as
    ``fmt`` ("mxfp4" or "bf16") like a loaded checkpoint, bf16 biases -> (experts, gate_up, down) with the
    runtime's ``stacked_experts`` views."""
    from mxq.formats.mxfp4 import quantize_mxfp4
    from mxq.model.experts import PackedExperts
    from mxq.runtime import stacked_experts

    ex = PackedExperts(e, h, i, 1.702, 7.0).to(dev)
    for kind, shape in (("gate_up", (e, 2 * i, h)), ("down", (e, h, i))):
        w = torch.randn(*shape, device=dev, generator=g) * shape[-1] ** -0.5
        if fmt == "mxfp4":
            b, s = quantize_mxfp4(w)
            ex.set_stacked(kind, "mxfp4", {"blocks": b, "scales": s}, {"axis": 1, "block": 32})
        else:
            ex.set_stacked(kind, "bf16", {"weight": w.bfloat16().contiguous()})
        del w
    ex.gate_up_bias.data = ex.gate_up_bias.data.bfloat16()
    ex.down_bias.data = ex.down_bias.data.bfloat16()
    return ex, stacked_experts(ex, "gate_up"), stacked_experts(ex, "down")
