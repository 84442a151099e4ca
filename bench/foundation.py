"""Synthetic gpt-oss checkpoint -> mxq load -> generation -> transformers agreement.

One command does everything so it fits one device call:
    python bench/foundation.py --preset gpt-oss-20b --device cuda --work /tmp/ck --json $OUT/foundation.json
Measures: synthetic generation time, load time, peak host RSS and peak GPU memory while loading, greedy
generation time (mxq's reference torch path), and bf16 logit agreement with transformers'
GptOssForCausalLM (Mxfp4Config(dequantize=True)) on the same folder and the same tokens.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memwatch import PeakRSS  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Agreement of logits ``x`` with ``ref`` ([1, T, V]): max/relative error, top-1 agreement, KL(ref || x)."""
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(x, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"max_abs_logit_diff": round((x - ref).abs().max().item(), 5),
            "rel_l2": round(((x - ref).norm() / ref.norm()).item(), 6),
            "top1_agreement": round((x.argmax(-1) == ref.argmax(-1)).float().mean().item(), 5),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-bench-ckpt"))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import mxq
    from mxq.synth import synth

    dev = torch.device(a.device)
    res: dict = {"preset": a.preset, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    over = {"num_hidden_layers": a.layers} if a.layers else None
    if not (a.work / "config.json").exists():
        t0 = time.perf_counter()
        synth(a.work, a.preset, "mxfp4", 0, a.device, False, over, overwrite=True)
        res["synth_s"] = round(time.perf_counter() - t0, 2)
    res["checkpoint_bytes"] = sum(f.stat().st_size for f in a.work.glob("*.safetensors"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        model = mxq.load_model(a.work, device=dev, dtype=torch.bfloat16)
        sync(dev)
        res["load_s"] = round(time.perf_counter() - t0, 2)
    res["load_peak_rss_gb"] = round(rss.peak / 1e9, 3)
    if dev.type == "cuda":
        res["load_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 1100, (1, a.prompt_len), generator=g).to(dev)
    model.generate(ids[:, :16], max_new_tokens=2)   # warm-up
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=a.new_tokens)
    sync(dev)
    dt = time.perf_counter() - t0
    res["generate"] = {"prompt_tokens": a.prompt_len, "new_tokens": int(out.shape[1] - ids.shape[1]),
                       "seconds": round(dt, 3), "tokens_per_s": round((out.shape[1] - ids.shape[1]) / dt, 2),
                       "path": "mxq-torch-reference (per-expert MXFP4 dequantize + matmul)"}
    with torch.no_grad():
        ours = model(ids).logits.float().cpu()
    if dev.type == "cuda":
        res["run_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    del model, out
    free(dev)
    # Ground truth: mxq in float32 (it matches transformers in float32 to ~3e-6 on the CPU, see
    # tests/test_model_parity.py); each bf16 path is then compared against it.
    with torch.no_grad():
        gold = mxq.load_model(a.work, device=dev, dtype=torch.float32)(ids).logits.float().cpu()
    free(dev)
    res["mxq_bf16_vs_fp32"] = compare(ours, gold)
    if not a.skip_transformers:
        import transformers
        from transformers import GptOssForCausalLM, Mxfp4Config

        t0 = time.perf_counter()
        ref = GptOssForCausalLM.from_pretrained(a.work, quantization_config=Mxfp4Config(dequantize=True),
                                                dtype=torch.bfloat16, device_map=a.device if dev.type == "cuda" else None).eval()
        res["transformers_load_s"] = round(time.perf_counter() - t0, 2)
        with torch.no_grad():
            theirs = ref(ids).logits.float().cpu()
        res["transformers"] = transformers.__version__
        res["transformers_bf16_vs_fp32"] = compare(theirs, gold)
        res["mxq_bf16_vs_transformers_bf16"] = compare(ours, theirs)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
