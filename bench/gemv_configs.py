"""Time every launch configuration of the decode MoE GEMV kernels at gpt-oss-20b shapes (batch 1, top-4).

Autotuning can only pick among the configs it is given; this sweeps a wider grid (warps, pipeline stages NS of the
K loop, rows per program, groups per iteration), prints microseconds and achieved bandwidth per config, and the
best per kernel, so the autotune lists in mxq/runtime/{moe,linear}_kernels.py can be chosen from measurements.
Like a decode step, which reads every layer's weights once, consecutive launches read different weights: each
kernel rotates over ``--copies`` independent weight sets (default 8: 280 MB of MXFP4 gate_up, 236 MB of q/k/v),
more than the 50 MB L2, so the figures are DRAM bandwidth, not L2 hits.

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
from bench.kernel_bench import synthetic_moe_layer  # noqa: E402


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


class Rotating:
    """A zero-argument callable that runs ``fn(i)`` for i = 0, 1, ..., L-1, 0, ... (one weight set per call)."""

    def __init__(self, fn, copies: int):
        self.fn, self.copies, self.i = fn, copies, 0

    def __call__(self):
        self.fn(self.i % self.copies)
        self.i += 1


def sweep(name: str, kern, call, nbytes: int, grid, inner: str) -> list[dict]:
    """Time ``call`` with each (warps, NS, BN, ``inner``) config of ``grid`` forced on ``kern``."""
    from mxq.runtime._common import cfg, forced_config

    rows = []
    for w, ns, bn, bk in grid:
        try:
            with forced_config((kern,), cfg(w, 2, BN=bn, NS=ns, **{inner: bk})):
                us = time_us(call)
        except Exception as err:                      # noqa: BLE001 - resource limits of a config
            print(name, w, ns, bn, bk, "failed:", type(err).__name__, flush=True)
            continue
        row = {"warps": w, "NS": ns, "BN": bn, inner: bk, "us": round(us, 2),
               "TBps": round(nbytes / us / 1e6, 3)}
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--copies", type=int, default=8, help="weight sets rotated over (cold L2)")
    a = ap.parse_args()

    from mxq.runtime import moe_kernels as M

    dev = "cuda"
    e, h, i, k, L = 32, 2880, 2880, 4, a.copies
    g = torch.Generator(device=dev).manual_seed(0)
    layers = [synthetic_moe_layer(a.experts, e, h, i, dev, g) for _ in range(L)]
    ex, gu, dn = layers[0]
    fp4 = gu.fp4
    x = torch.randn(1, h, device=dev, generator=g).bfloat16()
    xs = M.kernel_x(x, fp4)
    idx = torch.randperm(e, device=dev, generator=g)[:k].int()[None]
    wt = torch.softmax(torch.randn(1, k, device=dev, generator=g), -1)
    y = M.gate_up_gemv(xs, idx, gu, ex.gate_up_bias, 1.702, 7.0, yperm=dn.fp4)
    per_w = (gu.w[0].numel() * gu.w.element_size() + (gu.s[0].numel() if fp4 else 0))
    bytes_gu = k * per_w
    bytes_dn = k * (dn.w[0].numel() * dn.w.element_size() + (dn.s[0].numel() if fp4 else 0))

    # (warps, NS, BN, BG); NS = 1 is the unpipelined loop
    space = ((4, 8), (1, 3, 4), (4, 8, 16, 32), (8, 16)) if a.quick else \
        ((2, 4, 8), (1, 2, 3, 4, 6), (2, 4, 8, 16, 32), (4, 8, 16, 32))
    grid = [c for c in itertools.product(*space) if c[2] * c[3] <= 512]
    results = {}
    gate_up = Rotating(lambda j: M.gate_up_gemv(xs, idx, layers[j][1], layers[j][0].gate_up_bias, 1.702, 7.0,
                                                yperm=dn.fp4), L)
    down = Rotating(lambda j: M.down_gemv(y, idx, wt, layers[j][2], layers[j][0].down_bias), L)
    for name, kern, call, nbytes in (("gate_up", M._gate_up_gemv_kernel, gate_up, bytes_gu),
                                     ("down", M._down_gemv_kernel, down, bytes_dn)):
        results[name] = sweep(name, kern, call, nbytes, grid, "BG")
    del layers
    from mxq.runtime import linear_kernels as LK

    hq = torch.randn(1, h, device=dev, generator=g).bfloat16()
    ho = torch.randn(1, 4096, device=dev, generator=g).bfloat16()
    lin = lambda n, kk: ((torch.randn(n, kk, device=dev, generator=g) * kk ** -0.5).bfloat16(),   # noqa: E731
                         torch.zeros(n, device=dev, dtype=torch.bfloat16))
    qkv = [[lin(4096, h), lin(512, h), lin(512, h)] for _ in range(L)]
    wo = [[lin(h, 4096)] for _ in range(L)]
    lspace = ((4, 8), (1, 3), (4, 8, 16), (256, 512)) if a.quick else \
        ((2, 4, 8), (1, 2, 3, 4), (4, 8, 16, 32), (128, 256, 512))
    lgrid = [c for c in itertools.product(*lspace) if c[2] * c[3] <= 8192]
    for name, call, nbytes in (("q_k_v", Rotating(lambda j: LK.linear_gemv(hq, qkv[j]), L), 2 * h * 5120),
                               ("o_proj", Rotating(lambda j: LK.linear_gemv(ho, wo[j]), L), 2 * h * 4096)):
        results[name] = sweep(name, LK._gemv3_kernel, call, nbytes, lgrid, "BK")
    best = {n: min(r, key=lambda x: x["us"]) for n, r in results.items() if r}
    print("best", json.dumps(best))
    if a.json:
        a.json.write_text(json.dumps({"experts": a.experts, "copies": a.copies, "best": best, "results": results},
                                     indent=1))


if __name__ == "__main__":
    main()
