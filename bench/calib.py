"""Router-statistics collection throughput and memory at full model scale.

    python bench/calib.py --preset gpt-oss-20b --device cuda --synth-device cuda --work /tmp/ck20 \
        --tokens 131072 --seq-len 512 --batch-size 64 --eager-baseline \
        --json $OUT/calib_h100.json --markdown $OUT/calib_h100.md
    python bench/calib.py --preset tiny --tokens 16384 --seq-len 256 --batch-size 8 --threads 1     # CPU

Generates a synthetic checkpoint (``mxq.synth``; reused when ``--work`` already holds one) or takes
``--model DIR``, builds a corpus calibration set of ``--tokens`` tokens with the model's tokenizer, then
times two passes over it after one warm-up batch: the forward pass alone (``logits=False``, as collection
runs it) and ``mxq.stats.collect`` with every statistic on. ``--attn`` picks the attention implementation
(``auto`` = SDPA on CUDA, eager on CPU); ``--eager-baseline`` also times the forward pass with eager
attention for a before/after figure in the same run. On CUDA it records which SDPA backends accept the
sink-attention call. Prints a markdown table and JSON.
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; sampled process RSS (psutil) on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memwatch import PeakRSS  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def checkpoint(a: argparse.Namespace) -> tuple[Path, float]:
    """The model folder, and the seconds spent generating it (0 when given or reused)."""
    if a.model is not None:
        return a.model, 0.0
    import mxq.synth
    from mxq.synth import synth

    if (a.work / "config.json").exists():
        return a.work, 0.0
    if a.tiny_tokenizer:  # hosts without bpe-openai: tiny ids (< 6,144) are valid ids of every preset
        mxq.synth.TOKENIZER_KIND[a.preset] = "tiny"
    t0 = time.perf_counter()
    over = {"num_hidden_layers": a.layers} if a.layers else None
    synth(a.work, a.preset, "mxfp4", 0, a.synth_device or a.device, overrides=over, overwrite=True)
    return a.work, time.perf_counter() - t0


@torch.inference_mode()
def forward_only(model: torch.nn.Module, calib, batch_size: int) -> float:
    """Seconds for the bare forward passes (no observer), stopped before lm_head like collection."""
    dev = model.device
    sync(dev)
    t0 = time.perf_counter()
    for ids, mask, _ in calib.batches(batch_size):
        model(ids.to(dev), attention_mask=mask.to(dev), logits=False)
    sync(dev)
    return time.perf_counter() - t0


def sdpa_backends(model: torch.nn.Module, seq_len: int) -> dict[str, str]:
    """Which CUDA SDPA backends accept this model's sink-attention call (one sequence, sliding window):
    "ok", or why not (torch's warning). The default dispatch takes the first eligible in torch's order."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mxq.model.attention import attention_mask, sdpa_sink_attention

    c, dev, dt = model.config, model.device, model.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, c.num_attention_heads, seq_len, c.head_dim, device=dev, dtype=dt, generator=g)
    k, v = (torch.randn(1, c.num_key_value_heads, seq_len, c.head_dim, device=dev, dtype=dt, generator=g)
            for _ in range(2))
    allowed = attention_mask(torch.arange(seq_len, device=dev), torch.ones(1, seq_len, dtype=torch.bool, device=dev),
                             c.sliding_window)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend), torch.inference_mode():
                    o = sdpa_sink_attention(q, k, v, model.layers[0].self_attn.sinks, c.head_dim ** -0.5, allowed)
                sync(dev)
                out[name.lower()] = "ok" if bool(torch.isfinite(o).all()) else "non-finite output"
            except RuntimeError:
                out[name.lower()] = "; ".join(str(w.message) for w in caught)[:300] or "not available"
    return out


def measure(fn, dev: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes) of ``fn()``: GPU allocator peak on CUDA, sampled RSS on CPU."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(dev)
    with PeakRSS() as p:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return dt, p.peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="existing checkpoint folder (else synthesise)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers when synthesising")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-bench-calib"), help="synthetic checkpoint folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--synth-device", default=None, help="device that generates the weights (default --device)")
    ap.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--tiny-tokenizer", action="store_true",
                    help="synthesise with the tiny tokenizer (for hosts without bpe-openai; routing text differs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--attn", default="auto", choices=("auto", "eager", "sdpa"),
                    help="attention implementation (auto: SDPA on CUDA, eager on CPU)")
    ap.add_argument("--eager-baseline", action="store_true",
                    help="also time the forward pass with eager attention (the path before SDPA)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import mxq
    from mxq.calib import build_calibration
    from mxq.model import set_attention_impl
    from mxq.model.attention import inference_attention_impl
    from mxq.stats import collect

    dev = torch.device(a.device)
    dtype = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if a.dtype == "auto" else getattr(torch, a.dtype)
    folder, synth_s = checkpoint(a)
    t0 = time.perf_counter()
    model = mxq.load_model(folder, device=dev, dtype=dtype)
    load_s = time.perf_counter() - t0
    tok = mxq.load_tokenizer(folder)
    c = model.config
    n_seq = max(len(("austen", "web_bible", "kjv_bible", "shakespeare")), a.tokens // a.seq_len)
    calib = build_calibration({"source": "corpus", "num_sequences": n_seq, "seq_len": a.seq_len,
                               "seed": 0}, tok)
    warm = type(calib)(calib.input_ids[:a.batch_size], calib.attention_mask[:a.batch_size],
                       calib.domains[:a.batch_size], "warm-up")
    base = {}
    if a.eager_baseline:
        set_attention_impl(model, "eager")
        forward_only(model, warm, a.batch_size)                                          # kernels, allocator
        base["s"], base["peak"] = measure(lambda: forward_only(model, calib, a.batch_size), dev)
    set_attention_impl(model, a.attn)
    backends = sdpa_backends(model, a.seq_len) if dev.type == "cuda" else {}
    collect(model, warm, a.batch_size, progress=False)                                  # kernels, allocator
    fwd_s, fwd_peak = measure(lambda: forward_only(model, calib, a.batch_size), dev)
    out: dict = {}
    stats_s, stats_peak = measure(lambda: out.setdefault("s", collect(model, calib, a.batch_size, progress=False)),
                                  dev)
    stats = out["s"]
    tokens = calib.num_tokens
    res = {
        "model": str(folder), "preset": a.preset if a.model is None else None,
        "layers": c.num_hidden_layers, "experts": c.num_local_experts, "top_k": c.num_experts_per_tok,
        "hidden": c.hidden_size, "stored_experts": model.source_format,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "attention": inference_attention_impl(model), "sdpa_backends": backends,
        "tokens": tokens, "seq_len": a.seq_len, "batch_size": a.batch_size, "domains": len(calib.domain_names),
        "synth_s": round(synth_s, 1), "load_s": round(load_s, 1),
        "forward_s": round(fwd_s, 3), "forward_tokens_per_s": round(tokens / fwd_s, 1),
        "stats_s": round(stats_s, 3), "stats_tokens_per_s": round(tokens / stats_s, 1),
        "observer_overhead": round(stats_s / fwd_s - 1.0, 3),
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process RSS (psutil, sampled)",
        "forward_peak_gib": round(fwd_peak / 2**30, 3), "stats_peak_gib": round(stats_peak / 2**30, 3),
        "eager_forward_s": round(base["s"], 3) if base else None,
        "eager_forward_tokens_per_s": round(tokens / base["s"], 1) if base else None,
        "eager_forward_peak_gib": round(base["peak"] / 2**30, 3) if base else None,
        "super_experts": [list(x) for x in stats.super_experts], "uncalibrated": int(stats.uncalibrated.sum()),
        "host_cpus": os.cpu_count(), "host_load_avg_1m": round(os.getloadavg()[0], 2),
    }
    md = table(res)
    print(md)
    print(json.dumps(res, indent=2))
    for path, text in ((a.json, json.dumps(res, indent=2)), (a.markdown, md)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
    return res


def table(r: dict) -> str:
    rows = [
        ("model", f"{r['preset'] or r['model']}: {r['layers']} layers x {r['experts']} experts (top-{r['top_k']}), "
                  f"H={r['hidden']}, {r['stored_experts']} experts"),
        ("device / dtype", f"{r['device']} / {r['dtype']} (torch {r['torch']})"),
        ("calibration", f"{r['tokens']:,} tokens = {r['tokens'] // r['seq_len']} x {r['seq_len']}, "
                        f"{r['domains']} domains, batch {r['batch_size']} sequences"),
        ("attention", r["attention"] + (f"; SDPA backends: {r['sdpa_backends']}" if r["sdpa_backends"] else "")),
        ("forward only (no observer)", f"{r['forward_tokens_per_s']:,.0f} tokens/s ({r['forward_s']:.2f} s)"),
        ("collection, all statistics", f"{r['stats_tokens_per_s']:,.0f} tokens/s ({r['stats_s']:.2f} s)"),
        ("observer overhead", f"{100 * r['observer_overhead']:.1f}%"),
        *([("forward only, eager attention (baseline)",
            f"{r['eager_forward_tokens_per_s']:,.0f} tokens/s ({r['eager_forward_s']:.2f} s), peak "
            f"{r['eager_forward_peak_gib']:.2f} GiB; speed-up {r['eager_forward_s'] / r['forward_s']:.2f}x")]
          if r["eager_forward_s"] else []),
        (f"peak memory ({r['peak_memory_kind']})", f"forward {r['forward_peak_gib']:.2f} GiB, "
                                                   f"collection {r['stats_peak_gib']:.2f} GiB"),
        ("super experts / uncalibrated", f"{r['super_experts']} / {r['uncalibrated']}"),
        ("host", f"{r['host_cpus']} CPUs, 1-min load average {r['host_load_avg_1m']} at the end"),
    ]
    return "\n".join(["| quantity | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


if __name__ == "__main__":
    main()
