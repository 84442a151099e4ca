"""Serving throughput of the fast path: generated tokens/s against batch size, per plan, beside the roofline.

    python bench/throughput.py --work /tmp/ck20b --json $OUT/throughput.json --md $OUT/throughput.md \
        [--plans baseline,bf16,nvfp4,int4,nf4,fp8,prune_25pct] [--batches 1,4,16,64,256] [--contexts 1024,4096]
        [--new-tokens 64] [--budget-s 480] [--ragged]

Without ``--model`` it writes the synthetic gpt-oss-20b first (``python -m mxq.synth``). Per plan (the
checkpoint re-quantized in memory, ``mxq.plan.apply_``), context T and batch B: B random prompts of T tokens
(``--ragged``: lengths drawn in [T/2, T], left-padded to T with an attention mask), one
``mxq.runtime.fast_generate(model, ids, g, attention_mask=mask)`` after a warm-up that captures the batch
bucket's graph, timed with CUDA events:

* decode tokens/s in total = B (g - 1) / decode time, and per sequence = (g - 1) / decode time;
* end-to-end generated tokens/s = B g / (prefill + decode time);
* TTFT p50 / p95 over the batch's rows: the end of the prefill chunk that holds the row (the fast prefill
  runs rows in chunks of ``PREFILL_CHUNK_TOKENS`` tokens), from the start of the request;
* peak GPU memory (allocator) during the request, the KV cache of the bucket's state included;
* the roofline of a decode step: ``decode_bytes_per_step`` (dense weights once, the expected distinct experts
  of B routed tokens once, every row's KV cache at the mid-generation context) over the measured copy
  bandwidth, and the tensor-core limit 2 x active parameters x B over a measured bf16 matmul rate; the step
  cannot run faster than the larger of the two; % of roofline = measured / roofline tokens/s.

Plans: ``baseline`` the MXFP4 checkpoint as loaded; ``bf16``/``nvfp4``/``int4``/``nf4``/``fp8`` every expert
in that format (``int4`` = int4_g128, as recipes/recipe/int4.yaml); ``prune_25pct`` 8 of 32 experts per layer
removed (a fixed spread of expert ids: which experts go does not change the speed of random routing; the
recipe picks them by REAP scores), kept experts in MXFP4. ``--budget-s`` stops before a setting that would
start past it (skipped settings are listed).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import checkpoint, copy_bandwidth, sync  # noqa: E402

PLAN_FORMATS = {"baseline": None, "bf16": "bf16", "nvfp4": "nvfp4", "int4": "int4_g128", "nf4": "nf4",
                "fp8": "fp8", "prune_25pct": "prune"}


def matmul_flops(n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul rate (FLOP/s) of an n x n x n product on random data, median of ``reps``."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        sync()
        times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * n ** 3 / statistics.median(times)


def plan_model(src: Path, plan: str):
    """The checkpoint on the GPU with ``plan`` applied in memory; (model, seconds to apply)."""
    import mxq
    from mxq.plan import PRUNE, Plan, apply_

    model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
    cfg = model.config
    t0 = time.perf_counter()
    fmt = PLAN_FORMATS[plan]
    if fmt == "prune":
        e = cfg.num_local_experts
        drop = {round(j * e / (e // 4)) for j in range(e // 4)}               # 8 of 32, evenly spread
        apply_(model, Plan([[PRUNE if j in drop else "mxfp4" for j in range(e)]
                            for _ in range(cfg.num_hidden_layers)]))
    elif fmt is not None:
        apply_(model, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, fmt))
    sync()
    return model, time.perf_counter() - t0


def active_params(model) -> float:
    """Parameters one token multiplies (attention, router, k experts per layer, lm_head; no embedding)."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    n = sum(p.numel() for lyr in model.layers for p in lyr.self_attn.parameters())
    n += sum(p.numel() for lyr in model.layers for p in lyr.mlp.router.parameters())
    n += cfg.num_hidden_layers * k * 3 * cfg.hidden_size * cfg.intermediate_size
    return float(n + model.lm_head.weight.numel())


def prompts(b: int, t: int, vocab: int, ragged: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if ragged:
        lens = torch.randint(t // 2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None] >= (t - lens)[:, None]).long()
        ids = ids * mask
    return ids.cuda(), mask.cuda()


def measure(model, b: int, t: int, g: int, ragged: bool, bw: float, flops: float, act: float) -> dict:
    from mxq.runtime import decode_bytes_per_step, fast_generate
    from mxq.runtime.engine import PREFILL_CHUNK_TOKENS

    ids, mask = prompts(b, t, model.config.vocab_size, ragged, seed=b * 7919 + t)
    t0 = time.perf_counter()
    # compile and autotune the prefill at the shape of one prefill chunk (the timed request's chunks all have
    # it for these sizes), then the timed request captures the bucket's decode graph before its clock starts
    c = min(b, max(1, PREFILL_CHUNK_TOKENS // t))
    fast_generate(model, ids[:c], 2, attention_mask=mask[:c])
    sync()
    warm = time.perf_counter() - t0
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    tm: dict = {}
    fast_generate(model, ids, g, attention_mask=mask, timings=tm)
    peak = torch.cuda.max_memory_allocated()
    steps = tm["decode_steps"]
    dec_s = tm["decode_ms"] / 1e3
    ttft = torch.tensor(tm["ttft_rows_ms"])
    nbytes = decode_bytes_per_step(model, t + g // 2, b)
    t_mem = nbytes["total"] / bw
    t_flop = 2 * act * b / flops
    roof = b / max(t_mem, t_flop)
    tps = b * steps / dec_s
    return {"batch": b, "context": t, "new_tokens": g, "bucket": tm["batch_bucket"], "ragged": ragged,
            "warmup_s": round(warm, 1), "decode_tokens_per_s": round(tps, 1),
            "per_sequence_tokens_per_s": round(steps / dec_s, 2),
            "e2e_generated_tokens_per_s": round(b * g / ((tm["prefill_ms"] + tm["decode_ms"]) / 1e3), 1),
            "step_ms": round(1e3 * dec_s / steps, 3), "prefill_ms": round(tm["prefill_ms"], 1),
            "ttft_p50_ms": round(float(ttft.quantile(0.5)), 1), "ttft_p95_ms": round(float(ttft.quantile(0.95)), 1),
            "peak_gpu_gb": round(peak / 1e9, 2), "step_bytes": nbytes,
            "roofline_tokens_per_s": round(roof, 1), "bound": "bandwidth" if t_mem >= t_flop else "tensor cores",
            "pct_of_roofline": round(100 * tps / roof, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-decode-ckpt"))
    ap.add_argument("--plans", default=",".join(PLAN_FORMATS))
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ragged", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args()

    from mxq.runtime import disable, enable

    start = time.perf_counter()
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": [], "skipped": []}
    res["copy_bw_TBps"] = round(copy_bandwidth() / 1e12, 3)
    res["bf16_matmul_TFLOPs"] = round(matmul_flops() / 1e12, 1)
    bw, flops = res["copy_bw_TBps"] * 1e12, res["bf16_matmul_TFLOPs"] * 1e12
    src = checkpoint(a.model, a.work, res)
    batches = [int(v) for v in a.batches.split(",")]
    contexts = [int(v) for v in a.contexts.split(",")]

    def dump() -> None:
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")

    for plan in a.plans.split(","):
        if time.perf_counter() - start > a.budget_s:
            res["skipped"] += [f"{plan} T={t} B={b}" for t in contexts for b in batches]
            continue
        model, apply_s = plan_model(src, plan)
        rt = enable(model)
        act = active_params(model)
        print(f"{plan}: expert format {rt.expert_format}, plan applied in {apply_s:.1f} s", flush=True)
        for t in contexts:
            for b in batches:
                if time.perf_counter() - start > a.budget_s:
                    res["skipped"].append(f"{plan} T={t} B={b}")
                    continue
                try:
                    row = {"plan": plan, "expert_format": rt.expert_format,
                           **measure(model, b, t, a.new_tokens, a.ragged, bw, flops, act)}
                except torch.cuda.OutOfMemoryError as exc:
                    row = {"plan": plan, "batch": b, "context": t, "error": f"out of memory: {str(exc)[:120]}"}
                    rt._states.clear()
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "step_bytes"}), flush=True)
                dump()
        disable(model)
        del model, rt
        gc.collect()
        torch.cuda.empty_cache()

    lines = [f"{res['device']}, torch {res['torch']}, {res['date']}; copy bandwidth {res['copy_bw_TBps']} TB/s, "
             f"bf16 matmul {res['bf16_matmul_TFLOPs']} TFLOP/s; {a.new_tokens} new tokens"
             + (", ragged prompts" if a.ragged else ", equal-length prompts"), "",
             ("| plan | context | B | decode tok/s total | per sequence | e2e gen tok/s | TTFT p50 / p95 ms | "
              "peak GB | roofline tok/s (bound) | % of roofline |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['plan']} | {r['context']} | {r['batch']} | {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['plan']} | {r['context']} | {r['batch']} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['per_sequence_tokens_per_s']:.1f} | {r['e2e_generated_tokens_per_s']:,.0f} | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | {r['peak_gpu_gb']:.1f} | "
                     f"{r['roofline_tokens_per_s']:,.0f} ({r['bound']}) | {r['pct_of_roofline']:.1f} |")
    if res["skipped"]:
        lines += ["", "Not measured (time budget): " + ", ".join(res["skipped"])]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if a.md:
        a.md.write_text(text)
    dump()


if __name__ == "__main__":
    main()
