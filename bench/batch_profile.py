"""Where a batched decode step goes: per-kernel device time at several batch sizes, and the MoE / dense
projection alternatives (batch-1 GEMVs against grouped GEMMs and cuBLAS) timed on one layer.

    python bench/batch_profile.py --work /tmp/ck20b --json $OUT/profile.json [--batches 1,16,64] [--ctx 1024]

Without ``--model`` it writes the synthetic gpt-oss-20b (``python -m mxq.synth``). Per batch size B: a prefill
of B random prompts of ``--ctx`` tokens, then (a) the captured decode step timed by graph replay (median of 20,
CUDA events) and (b) one eager decode step under ``torch.profiler``, device time summed per kernel name (the
graph's kernels are the same launches). Then, on layer 0 with B tokens routed by its own router: the MoE as
the decode GEMVs (``gate_up_gemv`` + ``down_gemv``) and as the grouped GEMMs (``moe_grouped``) at tiles of 16,
32, 64 and 128 pairs; q/k/v as the fused GEMV (``linear_gemv``) and as three ``F.linear`` (cuBLAS); medians of
CUDA-graph replays over the 24 layers' weights (so weights are not re-read from L2). Steps are timed on the
batch-1 kernels ("gemv": the runtime's thresholds set out of reach) and on the runtime's own choice ("auto").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import checkpoint, copy_bandwidth, sync  # noqa: E402
from bench.kernel_bench import event_median_ms  # noqa: E402


def graph_time_us(fn, reps: int = 10) -> float:
    """Median microseconds of one replay of a CUDA graph holding ``fn()``."""
    fn()
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    us = event_median_ms(g.replay, reps, warmup=0) * 1e3
    del g
    return us


def step_profile(rt, st) -> dict:
    """Device microseconds per kernel name of one eager decode step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    saved = st.pos.clone()
    rt._decode_body(st)
    sync()
    st.pos.copy_(saved)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rt._decode_body(st)
        sync()
    st.pos.copy_(saved)
    acc: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc[ev.name[:60]] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    total = sum(acc.values())
    top = sorted(acc.items(), key=lambda kv: -kv[1])[:14]
    return {"kernel_sum_us": round(total, 1), "top_us": {k: round(v, 1) for k, v in top}}


def layer_alternatives(rt, b: int) -> dict:
    from mxq.runtime.fmt_kernels import FmtExperts
    from mxq.runtime.linear_kernels import linear_gemv
    from mxq.runtime.moe_kernels import down_gemv, gate_up_gemv, kernel_x, moe_grouped, router_topk

    cfgm = rt.model.config
    gen = torch.Generator(device="cuda").manual_seed(b)
    x = torch.randn(b, cfgm.hidden_size, device="cuda", generator=gen).bfloat16()
    layers = rt.layers
    if isinstance(layers[0].gu, FmtExperts):
        return {}
    routes = [router_topk(x, L.wr, L.br, rt.top_k) for L in layers]
    xs = kernel_x(x, layers[0].gu.fp4)
    n = len(layers)
    out = {}
    i_ctr = [0]

    def rot():
        i_ctr[0] = (i_ctr[0] + 1) % n
        return i_ctr[0]

    def gemv_all():
        for i, L in enumerate(layers):
            y = gate_up_gemv(xs, routes[i][0], L.gu, L.gu_bias, rt.alpha, rt.limit, L.dn.fp4)
            down_gemv(y, routes[i][0], routes[i][1], L.dn, L.dn_bias)
    out["moe_gemv_us"] = round(graph_time_us(gemv_all) / n, 1)
    for bm in (16, 32, 64, 128):
        def grouped_all(bm=bm):
            for i, L in enumerate(layers):
                moe_grouped(x, routes[i][0], routes[i][1], L.gu, L.gu_bias, L.dn, L.dn_bias, rt.alpha, rt.limit,
                            bm=bm)
        try:
            out[f"moe_grouped_bm{bm}_us"] = round(graph_time_us(grouped_all) / n, 1)
        except Exception as exc:                                               # noqa: BLE001
            out[f"moe_grouped_bm{bm}_us"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    ne = torch.stack([torch.bincount(r[0].reshape(-1).long(), minlength=32) > 0 for r in routes]).sum(1).float()
    out["experts_hit_mean"] = round(float(ne.mean()), 2)

    def qkv_gemv():
        for L in layers:
            linear_gemv(x, [(L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)])

    def qkv_cublas():
        for L in layers:
            F.linear(x, L.wq, L.bq), F.linear(x, L.wk, L.bk), F.linear(x, L.wv, L.bv)
    out["qkv_gemv_us"] = round(graph_time_us(qkv_gemv) / n, 1)
    out["qkv_cublas_us"] = round(graph_time_us(qkv_cublas) / n, 1)
    o = torch.randn(b, cfgm.num_attention_heads * cfgm.head_dim, device="cuda", generator=gen).bfloat16()
    out["o_gemv_us"] = round(graph_time_us(lambda: [linear_gemv(o, [(L.wo, L.bo)]) for L in layers]) / n, 1)
    out["o_cublas_us"] = round(graph_time_us(lambda: [F.linear(o, L.wo, L.bo) for L in layers]) / n, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-decode-ckpt"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--alt-batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import mxq
    from mxq.runtime import enable

    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["copy_bw_TBps"] = round(copy_bandwidth() / 1e12, 3)
    src = checkpoint(a.model, a.work, res)
    model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
    rt = enable(model)
    vocab = model.config.vocab_size

    def dump():
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res), flush=True)

    res["alternatives"] = {}
    for b in [int(v) for v in a.alt_batches.split(",") if v]:
        res["alternatives"][b] = layer_alternatives(rt, b)
        print(b, res["alternatives"][b], flush=True)
        dump()
    res["steps"] = {}
    paths = {"gemv (batch-1 kernels)": (1 << 30, 1 << 30),
             "auto": (rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens)}
    for b in [int(v) for v in a.batches.split(",")]:
        ids = torch.randint(0, vocab, (b, a.ctx), device="cuda", generator=torch.Generator("cuda").manual_seed(b))
        for name, (dmax, gmin) in paths.items():
            if b == 1 and name != "auto":
                continue
            rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens = dmax, gmin
            rt._states.clear()
            st = rt.state_for(b, a.ctx + 64)
            rt.prefill(st, ids)
            sync()
            times = []
            for _ in range(20):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                rt.step(st)
                e1.record()
                sync()
                times.append(e0.elapsed_time(e1))
            ms = statistics.median(times)
            r = {"step_ms": round(ms, 3), "tokens_per_s": round(b / ms * 1e3, 1)}
            r.update(step_profile(rt, st))
            res["steps"][f"{b} {name}"] = r
            print(b, name, r, flush=True)
            dump()
    rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens = paths["auto"]

if __name__ == "__main__":
    main()
