"""Batch-1 decode at a 2,048-token context on the fast path (mxq.runtime), in one command.

    python bench/decode.py --work /tmp/ck20b --json $OUT/decode.json [--model DIR] [--md $OUT/decode.md]

Without ``--model`` it writes the synthetic gpt-oss-20b checkpoint first
(``python -m mxq.synth DIR --preset gpt-oss-20b --device cuda``). Measured in the same process:
* the bandwidth limit: bytes a decode step must read (``mxq.runtime.decode_bytes_per_token``) over the
  device-to-device copy bandwidth (a large tensor copy, bytes read + written, median of 10);
* mxq fast path: prefill of the prompt, then g decode steps (CUDA events; median of --runs), TTFT
  (wall time of ``fast_generate(ids, 1)``), peak GPU memory against weights + KV cache; unless
  ``--skip-breakdown``, each decode kernel alone (``breakdown_us``) and each prefill stage alone over the
  prompt (``prefill_breakdown``: where TTFT goes);
* mxq's reference torch path (``model.generate``): decode tokens/s from generate(9) - generate(1);
* bf16 experts on the fast path (the same experts dequantized to bf16 in place): decode tokens/s and their limit;
* transformers ``GptOssForCausalLM`` (Mxfp4Config(dequantize=True), bf16) ``generate``: decode tokens/s from
  generate(g+1) - generate(1), greedy, the same prompt.

``--formats mxfp4,nvfp4,nf4,int4_g128,fp8,bf16`` adds, per format, the same checkpoint with every expert
re-quantized in memory (``mxq.plan.apply_`` with a uniform plan: each expert converted from its MXFP4 values;
mxfp4 itself is the checkpoint as loaded) on the fast path: decode tokens/s, % of that format's bandwidth
limit, TTFT, peak GPU memory (rows ``fast_fmt_<format>``). Plan-converted experts run on ``fmt_kernels``; the
loaded MXFP4 checkpoint on ``moe_kernels`` unless ``--fmt-kernels-all``. ``--only-formats`` skips every other
section (each format compiles and autotunes its own kernels: about 1-2 minutes per format).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync() -> None:
    torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def checkpoint(model: Path | None, work: Path, res: dict) -> Path:
    """``model``, or the synthetic gpt-oss-20b in ``work`` (written on the GPU unless it is already there; the
    time goes to ``res["synth_s"]``); ``res["model"]`` names it."""
    src = model
    if src is None:
        src = work
        if not (src / "config.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mxq.synth", str(src), "--preset", "gpt-oss-20b", "--device",
                            "cuda", "--overwrite"], check=True)
            res["synth_s"] = round(time.perf_counter() - t0, 1)
    res["model"] = str(src)
    return src


def load_transformers(src: Path):
    """(transformers' GptOssForCausalLM with the MXFP4 experts dequantized to bf16, on the GPU, eval mode;
    load seconds)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    t0 = time.perf_counter()
    tf = GptOssForCausalLM.from_pretrained(src, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.bfloat16, device_map="cuda").eval()
    return tf, time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        sync()
        times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    free()
    return 2 * nbytes / statistics.median(times)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def prefix_agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def fast_section(model, ids, g: int, runs: int, label: str, res: dict, bw: float, ctx: int) -> list[int]:
    from mxq.runtime import decode_bytes_per_token, enable, fast_generate

    t0 = time.perf_counter()
    rt = enable(model)
    fast_generate(model, ids, 4)                          # compile, autotune, capture the graph
    sync()
    warm_s = time.perf_counter() - t0
    tps, pre = [], []
    out = None
    for _ in range(runs):
        tm: dict = {}
        out = fast_generate(model, ids, g + 1, timings=tm)
        tps.append(tm["decode_steps"] / (tm["decode_ms"] / 1e3))
        pre.append(tm["prefill_ms"])
    ttft = [timed(lambda: fast_generate(model, ids, 1)) * 1e3 for _ in range(runs)]
    bpt = decode_bytes_per_token(model, ctx)
    limit = bw / bpt["total"]
    med = statistics.median(tps)
    res[label] = {
        "path": getattr(model, "runtime_path", None), "expert_format": rt.expert_format,
        "warmup_compile_capture_s": round(warm_s, 1),
        "decode_tokens_per_s": round(med, 1), "decode_tokens_per_s_runs": [round(x, 1) for x in tps],
        "prefill_ms_events": round(statistics.median(pre), 2),
        "ttft_ms": round(statistics.median(ttft), 2), "ttft_ms_runs": [round(x, 2) for x in ttft],
        "bytes_per_token": bpt, "limit_tokens_per_s": round(limit, 1), "pct_of_limit": round(100 * med / limit, 1),
        "achieved_bandwidth_TBps": round(med * bpt["total"] / 1e12, 3),
    }
    return out[0, ids.shape[1]:].tolist()


def kernel_breakdown(rt, reps: int = 5) -> dict:
    """Time each decode kernel alone: one CUDA graph holding one call per layer (rotating over the layers,
    so that weights are not re-read from L2), replayed ``reps`` times; microseconds per call (median)."""
    import torch.nn.functional as F

    from mxq.runtime.attn_kernels import rmsnorm, rope_cache, sink_attention
    from mxq.runtime.linear_kernels import linear_gemv
    from mxq.runtime.moe_kernels import down_gemv, gate_up_gemv, kernel_x, router_topk

    st = rt._state
    m = rt.model
    cfg = m.config
    nl = len(rt.layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, cfg.hidden_size, device="cuda", generator=g).bfloat16()
    pos = st.pos.clone()                                     # current position (after a 2,048-token prefill)
    ids = [router_topk(x, L.wr, L.br, rt.top_k) for L in rt.layers]
    q = [F.linear(x, L.wq, L.bq) for L in rt.layers]
    k = [F.linear(x, L.wk, L.bk) for L in rt.layers]
    v = [F.linear(x, L.wv, L.bv) for L in rt.layers]
    qr = rope_cache(q[0], k[0], v[0], st.cos, st.sin, st.cache.k[0], st.cache.v[0], pos, 1)
    o = torch.randn(1, cfg.num_attention_heads * cfg.head_dim, device="cuda", generator=g).bfloat16()
    xs = kernel_x(x, rt.layers[0].gu.fp4)
    y = [gate_up_gemv(xs, ids[i][0], L.gu, L.gu_bias, rt.alpha, rt.limit, L.dn.fp4) for i, L in enumerate(rt.layers)]
    z = down_gemv(y[0], ids[0][0], ids[0][1], rt.layers[0].dn, rt.layers[0].dn_bias)
    full = [i for i, L in enumerate(rt.layers) if L.window == 0]
    slide = [i for i, L in enumerate(rt.layers) if L.window > 0]

    def attn(i):
        L = rt.layers[i]
        return sink_attention(qr, st.cache.k[i], st.cache.v[i], L.sinks, pos, 1, L.window, rt.scale, True)
    ops = {
        "add_rmsnorm (attn)": lambda i: rmsnorm(x, rt.layers[i].ln2, rt.eps, delta=x, hs="h2perm"),
        "moe_sum_rmsnorm": lambda i: rmsnorm(x, rt.layers[i].ln1, rt.eps, moe=z),
        "q_k_v GEMV": lambda i: linear_gemv(x, [(rt.layers[i].wq, rt.layers[i].bq), (rt.layers[i].wk, rt.layers[i].bk),
                                                (rt.layers[i].wv, rt.layers[i].bv)]),
        "q_k_v cuBLAS (3 calls, not used)": lambda i: (F.linear(x, rt.layers[i].wq, rt.layers[i].bq),
                                                       F.linear(x, rt.layers[i].wk, rt.layers[i].bk),
                                                       F.linear(x, rt.layers[i].wv, rt.layers[i].bv)),
        "rope_cache": lambda i: rope_cache(q[i], k[i], v[i], st.cos, st.sin, st.cache.k[i], st.cache.v[i], pos, 1),
        "attention (split + merge)": lambda i: attn(full[i % len(full)] if i % 2 else slide[i % len(slide)]),
        "attention full layer": lambda i: attn(full[i % len(full)]),
        "attention sliding layer": lambda i: attn(slide[i % len(slide)]),
        "o_proj GEMV": lambda i: linear_gemv(o, [(rt.layers[i].wo, rt.layers[i].bo)]),
        "router_topk": lambda i: router_topk(x, rt.layers[i].wr, rt.layers[i].br, rt.top_k),
        "gate_up_gemv": lambda i: gate_up_gemv(xs, ids[i][0], rt.layers[i].gu, rt.layers[i].gu_bias, rt.alpha,
                                               rt.limit, rt.layers[i].dn.fp4),
        "down_gemv": lambda i: down_gemv(y[i], ids[i][0], ids[i][1], rt.layers[i].dn, rt.layers[i].dn_bias),
        "lm_head": lambda i: F.linear(x, m.lm_head.weight),
        "argmax": lambda i: torch.argmax(o, dim=-1),
    }
    out = {}
    for name, fn in ops.items():
        n = 1 if name in ("lm_head", "argmax") else nl
        for i in range(n):
            fn(i)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                fn(i)
        times = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            sync()
            times.append(e0.elapsed_time(e1) * 1e3 / n)
        out[name] = round(statistics.median(times), 2)
        del graph
    lyr = rt.layers[0]
    nbytes = lambda t: t.numel() * t.element_size()                          # noqa: E731
    exp_bytes = rt.top_k * (nbytes(lyr.gu.w[0]) + (nbytes(lyr.gu.s[0]) if lyr.gu.fp4 else 0))
    out["gate_up_gemv_TBps"] = round(exp_bytes / out["gate_up_gemv"] / 1e6, 3)
    exp_bytes = rt.top_k * (nbytes(lyr.dn.w[0]) + (nbytes(lyr.dn.s[0]) if lyr.dn.fp4 else 0))
    out["down_gemv_TBps"] = round(exp_bytes / out["down_gemv"] / 1e6, 3)
    out["q_k_v_TBps"] = round(2 * (lyr.wq.numel() + lyr.wk.numel() + lyr.wv.numel()) / out["q_k_v GEMV"] / 1e6, 3)
    out["o_proj_TBps"] = round(2 * lyr.wo.numel() / out["o_proj GEMV"] / 1e6, 3)
    out["lm_head_TBps"] = round(2 * m.lm_head.weight.numel() / out["lm_head"] / 1e6, 3)
    per_layer = sum(out[k] for k in ("add_rmsnorm (attn)", "moe_sum_rmsnorm", "q_k_v GEMV", "rope_cache",
                                     "attention (split + merge)", "o_proj GEMV", "router_topk", "gate_up_gemv",
                                     "down_gemv"))
    out["sum_per_step_us"] = round(nl * per_layer + out["lm_head"] + out["argmax"], 1)
    return out


def prefill_breakdown(rt, t: int, reps: int = 3) -> dict:
    """Time each prefill stage alone over a t-token prompt (eager launches, as the prefill runs; milliseconds
    summed over the layers, mean of ``reps``): where TTFT goes. Uses the runtime's KV cache buffers as scratch
    (positions 0..t-1; the state's position is restored, its cache contents are not)."""
    import torch.nn.functional as F

    from mxq.runtime.attn_kernels import rmsnorm, rope_cache, sink_attention
    from mxq.runtime.fmt_kernels import FmtExperts, fmt_moe_grouped
    from mxq.runtime.moe_kernels import expert_tiles, moe_grouped, router_topk

    st, m = rt._state, rt.model
    cfg = m.config
    saved = st.pos.clone()
    st.pos.zero_()
    dev = st.cos.device
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(t, cfg.hidden_size, device=dev, generator=g).bfloat16()                    # [T, H]
    L0 = rt.layers[0]
    q, k, v = F.linear(x, L0.wq, L0.bq), F.linear(x, L0.wk, L0.bk), F.linear(x, L0.wv, L0.bv)
    qr = rope_cache(q, k, v, st.cos, st.sin, st.cache.k[0], st.cache.v[0], st.pos, t)
    o = torch.randn(t, cfg.num_attention_heads * cfg.head_dim, device=dev, generator=g).bfloat16()
    routes = [router_topk(x, L.wr, L.br, rt.top_k) for L in rt.layers]

    def moe(i):
        L = rt.layers[i]
        grouped = fmt_moe_grouped if isinstance(L.gu, FmtExperts) else moe_grouped
        return grouped(x, routes[i][0], routes[i][1], L.gu, L.gu_bias, L.dn, L.dn_bias, rt.alpha, rt.limit)

    ops = {
        "rmsnorm": lambda i: rmsnorm(x, rt.layers[i].ln2, rt.eps, delta=x),
        "q_k_v (cuBLAS)": lambda i: (F.linear(x, rt.layers[i].wq, rt.layers[i].bq),
                                     F.linear(x, rt.layers[i].wk, rt.layers[i].bk),
                                     F.linear(x, rt.layers[i].wv, rt.layers[i].bv)),
        "rope_cache": lambda i: rope_cache(q, k, v, st.cos, st.sin, st.cache.k[i], st.cache.v[i], st.pos, t),
        "attention": lambda i: sink_attention(qr, st.cache.k[i], st.cache.v[i], rt.layers[i].sinks, st.pos, t,
                                              rt.layers[i].window, rt.scale, split=False),
        "o_proj (cuBLAS)": lambda i: F.linear(o, rt.layers[i].wo, rt.layers[i].bo),
        "router_topk": lambda i: router_topk(x, rt.layers[i].wr, rt.layers[i].br, rt.top_k),
        "expert_tiles (sort)": lambda i: expert_tiles(routes[i][0], int(rt.layers[i].gu_bias.shape[0])),
        "moe grouped (tiles + gate_up + down)": moe,
        "lm_head (last position)": lambda i: F.linear(x[-1:], m.lm_head.weight),
    }
    out: dict = {"tokens": t}
    nl = len(rt.layers)
    for name, fn in ops.items():
        n = 1 if name.startswith("lm_head") else nl
        for i in range(n):
            fn(i)
        sync()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            for i in range(n):
                fn(i)
        e1.record()
        sync()
        out[name + " ms"] = round(e0.elapsed_time(e1) / reps, 2)
    out["sum ms"] = round(sum(v for kk, v in out.items() if kk.endswith(" ms") and "expert_tiles" not in kk), 2)
    st.pos.copy_(saved)
    return out


def formats_section(a, src: Path, ids, bw: float, ctx: int, res: dict) -> None:
    """One model per format in ``a.formats`` (re-quantized in memory), measured by ``fast_section``."""
    import mxq
    from mxq.plan import Plan, apply_
    from mxq.runtime import disable, enable
    from mxq.runtime.fmt_kernels import FmtExperts

    res["formats"] = a.formats.split(",")
    for fmt in res["formats"]:
        free()
        model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
        cfg = model.config
        t0 = time.perf_counter()
        if fmt != "mxfp4":
            apply_(model, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, fmt))
        sync()
        requant_s = time.perf_counter() - t0
        rt = enable(model)
        if a.fmt_kernels_all:                               # also the stacked checkpoint through fmt_kernels
            for L, lyr in zip(rt.layers, model.layers):
                if not isinstance(L.gu, FmtExperts):
                    L.gu, L.dn = FmtExperts(lyr.mlp.experts, "gate_up"), FmtExperts(lyr.mlp.experts, "down")
        kernels = "fmt_kernels" if isinstance(rt.layers[0].gu, FmtExperts) else "moe_kernels"
        free()
        torch.cuda.reset_peak_memory_stats()
        label = f"fast_fmt_{fmt}"
        fast_section(model, ids, a.gen, a.runs, label, res, bw, ctx)
        peak = torch.cuda.max_memory_allocated()
        kv = rt._state.cache.nbytes
        w = model_bytes(model)
        res[label].update(kernels=kernels, requantize_s=round(requant_s, 1), weights_gb=round(w / 1e9, 3),
                          peak_gpu_gb=round(peak / 1e9, 3), kv_cache_gb=round(kv / 1e9, 3),
                          peak_over_weights_kv_gb=round((peak - w - kv) / 1e9, 3))
        print(json.dumps(res[label], indent=1), flush=True)
        disable(model)
        del model, rt
        free()


def format_rows(res: dict) -> list[tuple[str, str]]:
    rows = []
    for fmt in res.get("formats", []):
        f = res[f"fast_fmt_{fmt}"]
        rows.append((f"mxq fast, {fmt} experts ({f['kernels']}): decode",
                     f"{f['decode_tokens_per_s']} tok/s ({f['pct_of_limit']}% of its limit {f['limit_tokens_per_s']} "
                     f"tok/s at {f['bytes_per_token']['total'] / 1e9:.3f} GB/token), TTFT {f['ttft_ms']} ms, peak "
                     f"{f['peak_gpu_gb']} GB = weights {f['weights_gb']} + KV {f['kv_cache_gb']} + "
                     f"{f['peak_over_weights_kv_gb']} GB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: synthesize the 20b)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-decode-ckpt"))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=64, help="decode steps timed after the prefill")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=8)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-bf16-experts", action="store_true")
    ap.add_argument("--skip-breakdown", action="store_true")
    ap.add_argument("--formats", default=None, help="comma-separated expert formats to measure, e.g. "
                    "mxfp4,nvfp4,nf4,int4_g128,fp8,bf16 (experts re-quantized in memory)")
    ap.add_argument("--only-formats", action="store_true", help="with --formats: skip every other section")
    ap.add_argument("--fmt-kernels-all", action="store_true",
                    help="with --formats: run the loaded MXFP4 checkpoint through fmt_kernels too")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args()
    if a.only_formats and not a.formats:
        ap.error("--only-formats needs --formats")
    import mxq

    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "context": a.context,
                 "gen": a.gen, "runs": a.runs}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    src = checkpoint(a.model, a.work, res)
    bw = copy_bandwidth()
    res["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    t0 = time.perf_counter()
    model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
    sync()
    res["load_s"] = round(time.perf_counter() - t0, 1)
    res["weights_gb"] = round(model_bytes(model) / 1e9, 3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 1100, (1, a.context), generator=g).cuda()
    ctx = a.context + a.gen // 2                                   # mean context over the timed steps

    if a.only_formats:                                   # --formats alone: one model per format
        del model
        formats_section(a, src, ids, bw, ctx, res)
        rows = [("device", res["device"]), ("copy bandwidth (read+write)", f"{res['copy_bandwidth_TBps']} TB/s")]
        finish(a, res, rows + format_rows(res))
        return

    # ---- mxq fast path, MXFP4 experts
    free()
    torch.cuda.reset_peak_memory_stats()
    fast_tokens = fast_section(model, ids, a.gen, a.runs, "fast_mxfp4", res, bw, ctx)
    peak = torch.cuda.max_memory_allocated()
    kv = model.__dict__["_mxq_runtime"]._state.cache.nbytes
    res["fast_mxfp4"].update(peak_gpu_gb=round(peak / 1e9, 3), kv_cache_gb=round(kv / 1e9, 3),
                             peak_over_weights_kv_gb=round((peak - model_bytes(model) - kv) / 1e9, 3))
    print(json.dumps(res["fast_mxfp4"], indent=1), flush=True)
    if not a.skip_breakdown:
        res["fast_mxfp4"]["breakdown_us"] = kernel_breakdown(model.__dict__["_mxq_runtime"])
        print(json.dumps(res["fast_mxfp4"]["breakdown_us"], indent=1), flush=True)
        try:                          # diagnostic only: a failure here must not cost the measurements after it
            res["fast_mxfp4"]["prefill_breakdown"] = prefill_breakdown(model.__dict__["_mxq_runtime"], a.context)
        except Exception as err:      # noqa: BLE001
            res["fast_mxfp4"]["prefill_breakdown"] = {"error": f"{type(err).__name__}: {err}"[:400]}
        print(json.dumps(res["fast_mxfp4"]["prefill_breakdown"], indent=1), flush=True)

    # ---- mxq reference path
    if not a.skip_reference:
        from mxq.runtime import disable
        disable(model)
        free()
        model.generate(ids[:, :64], max_new_tokens=2)
        t1 = timed(lambda: model.generate(ids, max_new_tokens=1))
        ref_out = None

        def run_ref():
            nonlocal ref_out
            ref_out = model.generate(ids, max_new_tokens=a.ref_steps + 1)
        tn = timed(run_ref)
        ref_tokens = ref_out[0, a.context:].tolist()
        res["reference"] = {"path": "mxq-torch-reference", "decode_tokens_per_s": round(a.ref_steps / (tn - t1), 2),
                            "ttft_ms": round(t1 * 1e3, 1),
                            "greedy_prefix_agreement_with_fast": prefix_agree(fast_tokens, ref_tokens),
                            "compared_tokens": len(ref_tokens)}
        print(json.dumps(res["reference"]), flush=True)

    # ---- transformers bf16
    if not a.skip_transformers:
        del model
        free()
        import transformers

        tf, load_s = load_transformers(src)
        mask = torch.ones_like(ids)

        def gen(n):
            return tf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.no_grad():
            tf.generate(input_ids=ids[:, :64], attention_mask=mask[:, :64], max_new_tokens=2, do_sample=False)
            t1 = statistics.median([timed(lambda: gen(1)) for _ in range(2)])
            outs = []
            tn = statistics.median([timed(lambda: outs.append(gen(a.gen + 1))) for _ in range(2)])
        tf_tokens = outs[-1][0, a.context:].tolist()
        tps = a.gen / (tn - t1)
        res["transformers"] = {"version": transformers.__version__, "load_s": round(load_s, 1),
                               "decode_tokens_per_s": round(tps, 2), "ttft_ms": round(t1 * 1e3, 1),
                               "greedy_prefix_agreement_with_fast": prefix_agree(fast_tokens, tf_tokens),
                               "compared_tokens": len(tf_tokens)}
        res["speedup_fast_vs_transformers"] = round(res["fast_mxfp4"]["decode_tokens_per_s"] / tps, 2)
        print(json.dumps(res["transformers"]), flush=True)
        del tf
        free()
        model = None

    # ---- bf16 experts on the fast path (experts dequantized in place)
    if not a.skip_bf16_experts:
        from mxq.formats.mxfp4 import dequantize_mxfp4
        from mxq.runtime import disable

        if model is None:
            model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
        disable(model)
        for lyr in model.layers:
            ex = lyr.mlp.experts
            for kind in ("gate_up", "down"):
                w = dequantize_mxfp4(getattr(ex, f"{kind}_blocks"), getattr(ex, f"{kind}_scales"), torch.bfloat16)
                delattr(ex, f"{kind}_blocks")
                delattr(ex, f"{kind}_scales")
                ex.set_stacked(kind, "bf16", {"weight": w.contiguous()})
        free()
        fast_section(model, ids, a.gen, max(2, a.runs // 2), "fast_bf16_experts", res, bw, ctx)
        print(json.dumps(res["fast_bf16_experts"], indent=1), flush=True)
        del model
        free()

    if a.formats:
        model = None
        free()
        formats_section(a, src, ids, bw, ctx, res)

    f = res["fast_mxfp4"]
    rows = [("device", res["device"]),
            ("copy bandwidth (read+write)", f"{res['copy_bandwidth_TBps']} TB/s"),
            ("bytes read per decode token (ctx %d)" % ctx, f"{f['bytes_per_token']['total'] / 1e9:.3f} GB"),
            ("bandwidth limit", f"{f['limit_tokens_per_s']} tok/s"),
            ("**mxq fast, MXFP4 experts: decode**", f"**{f['decode_tokens_per_s']} tok/s ({f['pct_of_limit']}% of limit, "
                                                   f"{f['achieved_bandwidth_TBps']} TB/s)**"),
            ("mxq fast: TTFT at %d (wall)" % a.context, f"{f['ttft_ms']} ms (prefill events {f['prefill_ms_events']} ms)"),
            ("mxq fast: peak GPU memory", f"{f['peak_gpu_gb']} GB = weights {res['weights_gb']} + KV {f['kv_cache_gb']} "
                                          f"+ {f['peak_over_weights_kv_gb']} GB")]
    if "fast_bf16_experts" in res:
        b = res["fast_bf16_experts"]
        rows.append(("mxq fast, bf16 experts: decode", f"{b['decode_tokens_per_s']} tok/s ({b['pct_of_limit']}% of its "
                                                        f"limit {b['limit_tokens_per_s']})"))
    if "reference" in res:
        r = res["reference"]
        rows.append(("mxq reference path: decode", f"{r['decode_tokens_per_s']} tok/s (greedy agreement with fast: "
                                                   f"{r['greedy_prefix_agreement_with_fast']}/{r['compared_tokens']})"))
    if "transformers" in res:
        t = res["transformers"]
        rows.append((f"transformers {t['version']} bf16 generate: decode", f"{t['decode_tokens_per_s']} tok/s, TTFT "
                     f"{t['ttft_ms']} ms (greedy agreement with fast: {t['greedy_prefix_agreement_with_fast']}/"
                     f"{t['compared_tokens']})"))
        rows.append(("speed-up fast / transformers (decode)", f"{res['speedup_fast_vs_transformers']}x"))
    finish(a, res, rows + format_rows(res))


def finish(a, res: dict, rows: list[tuple[str, str]]) -> None:
    md = "| measure | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(md)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    if a.md:
        a.md.write_text(md)


if __name__ == "__main__":
    main()
