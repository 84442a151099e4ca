"""Time every launch configuration of the decode MoE GEMV kernels at gpt-oss-20b shapes (batch 1, top-4).

Autotuning can only pick among the configs it is given; this sweeps a wider grid (rows per program, groups per
iteration, warps, stages), prints microseconds and achieved bandwidth per config, and the best per kernel, so the
autotune lists in mxq/runtime/moe_kernels.py can be chosen from measurements.
Each config is timed on the same weights launch after launch, so tensors that fit the 50 MB L2 (q/k/v, o_proj)
read partly from L2: rank configs with it, do not read its TB/s as what a decode step gets.

    python bench/gemv_configs.py --experts mxfp4 --json out.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps // 20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps // 20 * 20)


def sweep(name: str, kern, call, nbytes: int, grid, inner: str) -> list[dict]:
    """Time ``call`` with each (warps, stages, BN, ``inner``) config of ``grid`` forced on ``kern``."""
    from mxq.runtime._common import cfg, forced_config

    rows = []
    for w, st, bn, bk in grid:
        try:
            with forced_config((kern,), cfg(w, st, BN=bn, **{inner: bk})):
                us = time_us(call)
        except Exception as err:                      # noqa: BLE001 - resource limits of a config
            print(name, w, st, bn, bk, "failed:", type(err).__name__, flush=True)
            continue
        row = {"warps": w, "stages": st, "BN": bn, inner: bk, "us": round(us, 2),
               "TBps": round(nbytes / us / 1e6, 3)}
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    a = ap.parse_args()

    from mxq.formats.mxfp4 import quantize_mxfp4
    from mxq.model.experts import PackedExperts
    from mxq.runtime import moe_kernels as M
    from mxq.runtime import stacked_experts

    dev = "cuda"
    e, h, i, k = 32, 2880, 2880, 4
    g = torch.Generator(device=dev).manual_seed(0)
    ex = PackedExperts(e, h, i, 1.702, 7.0).to(dev)
    for kind, shape in (("gate_up", (e, 2 * i, h)), ("down", (e, h, i))):
        w = torch.randn(*shape, device=dev, generator=g) * shape[-1] ** -0.5
        if a.experts == "mxfp4":
            b, s = quantize_mxfp4(w)
            ex.set_stacked(kind, "mxfp4", {"blocks": b, "scales": s}, {"axis": 1, "block": 32})
        else:
            ex.set_stacked(kind, "bf16", {"weight": w.bfloat16().contiguous()})
        del w
    ex.gate_up_bias.data = ex.gate_up_bias.data.bfloat16()
    ex.down_bias.data = ex.down_bias.data.bfloat16()
    gu, dn = stacked_experts(ex, "gate_up"), stacked_experts(ex, "down")
    fp4 = gu.fp4
    x = torch.randn(1, h, device=dev, generator=g).bfloat16()
    xs = M.kernel_x(x, fp4)
    idx = torch.randperm(e, device=dev, generator=g)[:k].int()[None]
    wt = torch.softmax(torch.randn(1, k, device=dev, generator=g), -1)
    y = M.gate_up_gemv(xs, idx, gu, ex.gate_up_bias, 1.702, 7.0, yperm=dn.fp4)
    per_w = (gu.w[0].numel() * gu.w.element_size() + (gu.s[0].numel() if fp4 else 0))
    bytes_gu = k * per_w
    bytes_dn = k * (dn.w[0].numel() * dn.w.element_size() + (dn.s[0].numel() if fp4 else 0))

    space = ((4, 8), (2,), (4, 8, 16, 32), (4, 8, 16, 32)) if a.quick else \
        ((2, 4, 8), (1, 2, 3), (2, 4, 8, 16, 32), (4, 8, 16, 32))
    grid = [c for c in itertools.product(*space) if c[2] * c[3] <= 512]
    results = {}
    for name, kern, call, nbytes in (
            ("gate_up", M._gate_up_gemv_kernel,
             lambda: M.gate_up_gemv(xs, idx, gu, ex.gate_up_bias, 1.702, 7.0, yperm=dn.fp4), bytes_gu),
            ("down", M._down_gemv_kernel, lambda: M.down_gemv(y, idx, wt, dn, ex.down_bias), bytes_dn)):
        results[name] = sweep(name, kern, call, nbytes, grid, "BG")
    from mxq.runtime import linear_kernels as LK

    hq = torch.randn(1, h, device=dev, generator=g).bfloat16()
    ho = torch.randn(1, 4096, device=dev, generator=g).bfloat16()
    lin = lambda n, kk: ((torch.randn(n, kk, device=dev, generator=g) * kk ** -0.5).bfloat16(),   # noqa: E731
                         torch.zeros(n, device=dev, dtype=torch.bfloat16))
    qkv = [lin(4096, h), lin(512, h), lin(512, h)]
    wo = [lin(h, 4096)]
    lgrid = [c for c in itertools.product((2, 4, 8), (2, 3) if not a.quick else (2,), (4, 8, 16, 32),
                                          (128, 256, 512)) if c[2] * c[3] <= 8192]
    for name, call, nbytes in (("q_k_v", lambda: LK.linear_gemv(hq, qkv), 2 * h * 5120),
                               ("o_proj", lambda: LK.linear_gemv(ho, wo), 2 * h * 4096)):
        results[name] = sweep(name, LK._gemv3_kernel, call, nbytes, lgrid, "BK")
    best = {n: min(r, key=lambda x: x["us"]) for n, r in results.items() if r}
    print("best", json.dumps(best))
    if a.json:
        a.json.write_text(json.dumps({"experts": a.experts, "best": best, "results": results}, indent=1))


if __name__ == "__main__":
    main()
