"""The deployment-study speed sweep, mxq and transformers in one command.

    python bench/speed_sweep.py --work /tmp/ck20b --json $OUT/sweep.json --md $OUT/sweep.md [--model DIR]

Without ``--model`` it writes the synthetic gpt-oss-20b checkpoint first (``python -m mxq.synth``). Then, in one
process and on the same checkpoint:

* mxq: ``mxq.evaluate.speed.speed_report`` with the ``eval=speed`` preset's settings (recipes/eval/speed.yaml:
  contexts 128/512/1024/2048, g = 64, greedy and sampling, NVML energy, APE; ``--repeats`` overrides) on the
  code path ``speed.runtime=auto`` picks (the fast runtime on CUDA), and the allocator peak with the KV cache
  of the longest setting alive;
* transformers ``GptOssForCausalLM`` (``Mxfp4Config(dequantize=True)``, bf16, its default attention) ``generate``
  at the same contexts, same random prompts protocol: TTFT = ``generate(max_new_tokens=1)``, end to end =
  ``generate(g)`` (``min_new_tokens=g``, greedy), decode tokens/s = (g - 1) / (e2e - TTFT), medians over the
  repeats; p50/p95 of e2e; energy from the same NVML counter; peak memory.

Prints and writes one table per context: tokens/s, TTFT, p50/p95, J per 1,000 tokens, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import checkpoint, load_transformers, sync  # noqa: E402


def preset_speed_cfg() -> dict:
    """The ``speed`` block of recipes/eval/speed.yaml (read with omegaconf, no Hydra run)."""
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    return dict(OmegaConf.to_container(OmegaConf.load(root / "recipes" / "eval" / "speed.yaml"))["speed"])


def transformers_sweep(src: Path, contexts: list[int], g: int, repeats: int, seed: int, vocab: int) -> dict:
    """Greedy ``generate`` of transformers' GptOssForCausalLM (MXFP4 dequantized to bf16) per context."""
    import transformers

    from mxq.evaluate.metrics import quantile
    from mxq.evaluate.speed import NOT_AVAILABLE, EnergyMeter

    tf, load_s = load_transformers(src)
    sync()
    out = {"version": transformers.__version__, "load_s": round(load_s, 1),
           "attn_implementation": getattr(tf.config, "_attn_implementation", None), "by_context": []}
    meter = EnergyMeter(torch.device("cuda"))
    torch.cuda.reset_peak_memory_stats()
    for ctx in contexts:
        gen = torch.Generator().manual_seed(seed * 100_003 + ctx)
        prompts = [torch.randint(0, vocab, (1, ctx), generator=gen).cuda() for _ in range(repeats)]

        def run(ids: torch.Tensor, n: int) -> float:
            mask = torch.ones_like(ids)
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                tf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            sync()
            return time.perf_counter() - t

        run(prompts[0], 2)                                              # warm-up
        e0 = meter.read_j()
        ttft = [run(ids, 1) for ids in prompts]
        e2e = [run(ids, g) for ids in prompts]
        e1 = meter.read_j()
        dec = [(g - 1) / max(b - a, 1e-9) for a, b in zip(ttft, e2e)]
        row = {"context": ctx, "new_tokens": g, "repeats": repeats, "ttft_s": statistics.median(ttft),
               "decode_tokens_per_s": statistics.median(dec),
               "e2e_p50_s": quantile(torch.tensor(e2e), 0.5), "e2e_p95_s": quantile(torch.tensor(e2e), 0.95)}
        if e0 is not None and e1 is not None:
            tokens = repeats * (g + 1)                                  # the TTFT runs generate one token each
            row["energy_j_per_1k_tokens"] = 1000.0 * (e1 - e0) / tokens
            row["tokens_per_j"] = tokens / (e1 - e0) if e1 > e0 else None
        else:
            row["energy_j_per_1k_tokens"] = NOT_AVAILABLE
        out["by_context"].append(row)
        print("transformers", json.dumps(row), flush=True)
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    out["energy_source"] = "NVML" if meter.handle is not None else meter.reason
    return out


def fmt(v, nd: int = 1) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: synthesize the 20b)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-decode-ckpt"))
    ap.add_argument("--repeats", type=int, default=None, help="override the preset's repeats")
    ap.add_argument("--contexts", default=None, help="override the preset's contexts, e.g. 128,2048")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args()

    import mxq
    from mxq.evaluate.speed import speed_report

    cfg = preset_speed_cfg()
    if a.repeats:
        cfg["repeats"] = a.repeats
    if a.contexts:
        cfg["contexts"] = [int(c) for c in a.contexts.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "speed_cfg": cfg}
    src = checkpoint(a.model, a.work, res)
    model = mxq.load_model(src, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res["mxq"] = speed_report(model, cfg, progress=False)
    res["mxq"]["sweep_s"] = round(time.perf_counter() - t0, 1)
    res["mxq"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    vocab = int(model.config.vocab_size)
    del model                                       # speed_report has detached the runtime it attached
    torch.cuda.empty_cache()
    if not a.skip_transformers:
        res["transformers"] = transformers_sweep(src, cfg["contexts"], int(cfg["new_tokens"]), int(cfg["repeats"]),
                                                 int(cfg.get("seed", 0)), vocab)

    rows = ["| context | mode | mxq decode tok/s | mxq TTFT ms | mxq e2e p50 / p95 s | mxq J / 1k tok | APE | "
            "transformers decode tok/s | TTFT ms | e2e p50 / p95 s | J / 1k tok | decode ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tfr = {r["context"]: r for r in res.get("transformers", {}).get("by_context", [])}
    for r in res["mxq"]["by_setting"].values():
        t = tfr.get(r["context"]) if r["mode"] == "greedy" else None
        ratio = (f"{r['decode_tokens_per_s'] / t['decode_tokens_per_s']:.1f}x" if t else "")
        rows.append(f"| {r['context']} | {r['mode']} | {fmt(r['decode_tokens_per_s'])} | {fmt(1e3 * r['ttft_s'])} | "
                    f"{fmt(r['e2e_p50_s'], 3)} / {fmt(r['e2e_p95_s'], 3)} | {fmt(r['energy_j_per_1k_tokens'])} | "
                    f"{fmt(r.get('ape_decode'))} | "
                    + (f"{fmt(t['decode_tokens_per_s'])} | {fmt(1e3 * t['ttft_s'])} | {fmt(t['e2e_p50_s'], 3)} / "
                       f"{fmt(t['e2e_p95_s'], 3)} | {fmt(t['energy_j_per_1k_tokens'])} | {ratio} |" if t else
                       "| | | | |"))
    head = [f"device {res['device']}, torch {res['torch']}, model {res['model']}",
            f"mxq code path: {res['mxq'].get('code_path')}; energy: "
            f"{res['mxq'].get('energy_source')}; mxq peak GPU {res['mxq']['peak_gpu_bytes'] / 1e9:.2f} GB"]
    if "transformers" in res:
        t = res["transformers"]
        head.append(f"transformers {t['version']} ({t['attn_implementation']}), peak GPU "
                    f"{t['peak_gpu_bytes'] / 1e9:.2f} GB, load {t['load_s']} s")
    text = "\n".join(head) + "\n\n" + "\n".join(rows) + "\n"
    print(text, flush=True)
    if a.md:
        a.md.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
