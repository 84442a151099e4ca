"""Time the prefill MoE's grouped GEMM kernels per launch configuration and tile size at gpt-oss-20b shapes.

A 2,048-token prompt routes 8,192 (token, slot) pairs over 32 experts; ``moe_grouped`` sorts them by expert
(``expert_tiles``) and runs the gate_up and down grouped GEMMs over tiles of BM pairs of one expert. This forces
each config of ``_GROUPED_CONFIGS`` (and each BM) in turn and prints milliseconds and TFLOP/s per kernel, and
the time of the sort, so the defaults (``MOE_BM``, the autotune list) can be chosen from measurements. One layer's
weights (the whole layer is read per tile column, so L2 reuse is what a real prefill sees too).

    python bench/grouped_configs.py --experts mxfp4,bf16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernel_bench import event_median_ms, synthetic_moe_layer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="mxfp4,bf16")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bm", default="64,128")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from mxq.runtime import moe_kernels as M
    from mxq.runtime._common import INTERPRET, forced_config, launch, triton

    dev, e, h, i, k = "cuda", 32, 2880, 2880, 4
    g = torch.Generator(device=dev).manual_seed(0)
    n = a.tokens
    x = torch.randn(n, h, device=dev, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(e, device=dev, generator=g)[:k] for _ in range(n)]).int()
    wt = torch.softmax(torch.randn(n, k, device=dev, generator=g), -1)
    p = n * k
    out = {"tokens": n, "pairs": p, "experts": e, "device": torch.cuda.get_device_name(), "results": []}
    for bm in (int(v) for v in a.bm.split(",")):
        out[f"expert_tiles_ms_bm{bm}"] = round(event_median_ms(lambda: M.expert_tiles(idx, e, bm), 10, 2), 4)
    for fmt in a.experts.split(","):
        ex, gu, dn = synthetic_moe_layer(fmt, e, h, i, dev, g)
        for bm in (int(v) for v in a.bm.split(",")):
            order, te, ts, tn = M.expert_tiles(idx, e, bm)
            tmax = te.numel()
            y = torch.empty(p, i, dtype=torch.bfloat16, device=dev)
            z = torch.empty(p, h, dtype=torch.float32, device=dev)

            def gate_up():
                launch(M._gate_up_grouped_kernel, lambda m: (tmax, triton.cdiv(i, m["BN"])),
                       x, order, te, ts, tn, gu.w, gu.s, ex.gate_up_bias, y, p, gu.in_f, i, gu.s_e, gu.s_row, gu.s_se,
                       gu.s_srow, 1.702, 7.0, TOPK=k, FP4=gu.fp4, BM=bm, DOT_F32=INTERPRET)

            def down():
                launch(M._down_grouped_kernel, lambda m: (tmax, triton.cdiv(h, m["BN"])),
                       y, order, wt.reshape(-1), te, ts, tn, dn.w, dn.s, ex.down_bias, z, p, dn.in_f, h, dn.s_e,
                       dn.s_row, dn.s_se, dn.s_srow, FP4=dn.fp4, BM=bm, DOT_F32=INTERPRET)

            for name, kern, fn, flops in (("gate_up", M._gate_up_grouped_kernel, gate_up, 2 * p * 2 * i * h),
                                          ("down", M._down_grouped_kernel, down, 2 * p * h * i)):
                for c in M._GROUPED_CONFIGS:
                    row = {"fmt": fmt, "kernel": name, "BM": bm, **c.kwargs, "warps": c.num_warps,
                           "stages": c.num_stages}
                    try:
                        with forced_config((kern,), c):
                            ms = event_median_ms(fn, 10, 2)
                        row.update(ms=round(ms, 4), TFLOPs=round(flops / ms / 1e9, 1))
                    except Exception as err:                 # noqa: BLE001 - resource limits of a config
                        row.update(error=f"{type(err).__name__}: {str(err)[:120]}")
                    out["results"].append(row)
                    print(json.dumps(row), flush=True)
        del ex, gu, dn
        torch.cuda.empty_cache()
    best = {}
    for r in out["results"]:
        key = f"{r['fmt']} {r['kernel']}"
        if "ms" in r and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    out["best"] = best
    layer_ms = {}
    for fmt in a.experts.split(","):
        for bm in (int(v) for v in a.bm.split(",")):
            rows = [r for r in out["results"] if r["fmt"] == fmt and r["BM"] == bm and "ms" in r]
            gu_ms = min((r["ms"] for r in rows if r["kernel"] == "gate_up"), default=None)
            dn_ms = min((r["ms"] for r in rows if r["kernel"] == "down"), default=None)
            if gu_ms and dn_ms:
                layer_ms[f"{fmt} BM={bm}"] = round(gu_ms + dn_ms + out[f"expert_tiles_ms_bm{bm}"], 3)
    out["best_layer_ms (sort + gate_up + down)"] = layer_ms
    print("best", json.dumps(best))
    print("layer", json.dumps(layer_ms))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
