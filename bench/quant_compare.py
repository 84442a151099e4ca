"""RTN vs GPTQ (mxq) vs peer tools on the embedded model: KL to the unquantized model, top-1, perplexity, time.

    python bench/quant_compare.py --out bench/results/quant_compare_cpu.json [--peer-python PY]

Source: the embedded model's MXFP4 experts dequantized to bf16 once (exact) and written as an HF bf16
checkpoint (``--work``/bf16); every method quantizes from those values and KL is measured against that
checkpoint (``mxq.evaluate.accuracy.heldout_accuracy``: KL(P_bf16 || Q), top-1 agreement and perplexity
per domain on the held-out split). All methods get the same calibration windows (``--calib-seqs`` x
``--calib-len`` tokens of the corpus calib split, ``mxq.calib.build_calibration``).

Peers (``--peer-python``, a Python where llm-compressor / auto-round are installed): ``quant_peers.py``
runs llm-compressor's ``GPTQModifier`` and AutoRound (W4A16, symmetric, group 32) on the same bf16
checkpoint and windows and writes their fake-quantized expert weights (fp32); they are evaluated here in
the same model and KL code, with attention, router and lm_head untouched as for mxq.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxq
from mxq.calib import build_calibration
from mxq.evaluate.accuracy import heldout_accuracy
from mxq.io.targets import export_checkpoint
from mxq.plan import Plan
from mxq.quant import quantize_

FORMATS = ["int4_g32", "int4_g128", "nf4", "mxfp4", "nvfp4"]


def bf16_source(work: Path) -> Path:
    """The embedded model with its MXFP4 experts dequantized to bf16 (exact), in the HF bf16 layout."""
    out = work / "bf16"
    if not (out / "config.json").is_file():
        m = mxq.load_model(ROOT / "mxq" / "assets" / "tiny", device="cpu", dtype=torch.float32)
        c = m.config
        export_checkpoint(ROOT / "mxq" / "assets" / "tiny", Plan.uniform(c.num_hidden_layers, c.num_local_experts,
                                                                          "bf16"), out)
    return out


def evaluate(model, tok, src: Path, args) -> dict:
    cfg = {"perplexity": {"domains": "all", "max_tokens": args.eval_tokens, "max_length": 256, "stride": 256,
                          "batch_size": 8}, "kl": {"enabled": True, "cache_dtype": "float16",
                                                   "max_cache_bytes": 1 << 30}}
    acc = heldout_accuracy(model, tok, cfg, str(src), Path(args.work) / "cache", progress=False)
    kl = acc["kl_vs_baseline"]
    return {"kl": kl["mean"], "kl_p99": kl["p99"], "top1": kl["top1_agreement"], "tokens": kl["tokens"],
            "ppl": acc["perplexity"]}


def _amax7(xg: torch.Tensor, shrink=()) -> torch.Tensor:
    """The symmetric INT4 scale rule mxq used before the MSE search: bf16(amax / 7) (AWQ's max_int 7)."""
    from mxq.formats import int4

    amax = xg.float().abs().amax(dim=-1)
    return int4._bf16_scale(int4.div(amax, 7.0), amax > 0, int4._SYM_SCALE_MAX)


def run_mxq(method: str, fmt: str, src: Path, calib, tok, args) -> dict:
    if method == "rtn_amax7":          # the previous RTN rule, for the before/after row
        from mxq.formats import int4

        saved, int4.sym_scale_search = int4.sym_scale_search, _amax7
        try:
            return run_mxq("rtn", fmt, src, calib, tok, args) | {"method": "rtn_amax7"}
        finally:
            int4.sym_scale_search = saved
    model = mxq.load_model(src, device="cpu", dtype=torch.float32)
    c = model.config
    plan = Plan.uniform(c.num_hidden_layers, c.num_local_experts, fmt)
    gptq = dict(args.gptq)
    recipe = {"planner": "uniform", "quant": {"format": fmt, "method": method, "gptq": gptq}}
    t0 = time.perf_counter()
    rep = quantize_(model, plan, recipe, calib=calib, progress=False)
    dt = time.perf_counter() - t0
    row = {"tool": "mxq", "method": method, "format": fmt, "seconds": round(dt, 2), **evaluate(model, tok, src, args)}
    if rep is not None:
        row["fallbacks"] = len(rep["fallbacks"])
        row["gptq_options"] = gptq
    return row


def run_peer(kind: str, src: Path, calib, tok, args) -> dict:
    """Run a peer tool in its own Python, then evaluate its fake-quantized experts here."""
    work = Path(args.work)
    torch.save({"input_ids": calib.input_ids, "attention_mask": calib.attention_mask}, work / "calib.pt")
    out = work / f"peer_{kind}.safetensors"
    cmd = [args.peer_python, str(ROOT / "bench" / "quant_peers.py"), "--src", str(src), "--calib", str(work / "calib.pt"),
           "--method", kind, "--group", "32", "--out", str(out)]
    side = out.with_suffix(".json")
    t0 = time.perf_counter()
    if not (out.is_file() and side.is_file()):          # a finished peer run is reused (they take many minutes)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"tool": kind, "method": kind, "format": "int4 g32", "error": proc.stderr[-2000:]}
        side.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
    dt = time.perf_counter() - t0
    info = json.loads(side.read_text())
    from safetensors.torch import load_file

    from mxq.model.experts import DenseExperts

    w = load_file(str(out))
    model = mxq.load_model(src, device="cpu", dtype=torch.float32)
    for i, layer in enumerate(model.layers):
        old = layer.mlp.experts
        new = DenseExperts(old.num_experts, old.hidden, old.intermediate, old.alpha, old.limit)
        with torch.no_grad():
            new.gate_up_weight.copy_(w[f"layers.{i}.gate_up"])                          # [E, 2I, H]
            new.down_weight.copy_(w[f"layers.{i}.down"])                                # [E, H, I]
            new.gate_up_bias.copy_(old.gate_up_bias)
            new.down_bias.copy_(old.down_bias)
        layer.mlp.experts = new.requires_grad_(False)
    return {"tool": info["tool"], "method": kind, "format": "int4 g32 sym", "seconds": round(info["seconds"], 2),
            "wall_seconds": round(dt, 2), "version": info.get("version"), **evaluate(model, tok, src, args)}


def markdown(rows: list[dict]) -> str:
    """The BENCHMARKS.md table: one row per (tool, method, format, options)."""
    doms = list(next(r["ppl"] for r in rows if "ppl" in r))
    head = ("| tool | method | format | KL mean (nats/token) | KL p99 | top-1 agreement | "
            + " | ".join(f"ppl {d}" for d in doms) + " | quantize time (s) |")
    lines = [head, "|" + "---|" * (7 + len(doms))]
    order = {f: i for i, f in enumerate(FORMATS)}
    for r in sorted(rows, key=lambda r: order.get(r["format"], 0)):          # peers' "int4 g32 sym" with int4_g32
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['method']} | {r['format']} | failed: {r['error'][-120:]!r} |")
            continue
        opts = r.get("gptq_options")
        meth = r["method"] + (f" {json.dumps(opts, separators=(',', ':'))}" if opts else "")
        lines.append(f"| {r['tool']} | {meth} | {r['format']} | {r['kl']:.5f} | {r['kl_p99']:.4f} | {r['top1']:.4f} | "
                     + " | ".join(f"{r['ppl'][d]:.3f}" for d in doms) + f" | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq_quant_compare"))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--peers", default="", help="comma list of llmc_gptq, llmc_rtn, autoround")
    ap.add_argument("--peer-python", default=str(ROOT.parent / "peer-venv" / "bin" / "python"))
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--gptq", default="{}", help="JSON of quant.gptq options for the mxq GPTQ rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    args.gptq = json.loads(args.gptq)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    src = bf16_source(args.work)
    tok = mxq.load_tokenizer(src)
    calib = build_calibration({"num_sequences": args.calib_seqs, "seq_len": args.calib_len}, tok)
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    done = {(r["tool"], r["method"], r["format"], json.dumps(r.get("gptq_options"))) for r in rows}
    jobs = [("mxq", m, f) for f in args.formats.split(",") if f for m in args.methods.split(",") if m]
    jobs += [("peer", p, "int4 g32") for p in args.peers.split(",") if p]
    for kind, method, fmt in jobs:
        if kind == "mxq":
            key = ("mxq", method, fmt, json.dumps(args.gptq if method == "gptq" else None))
            if method == "rtn_amax7" and not fmt.startswith("int4"):
                continue
            if key in done:
                continue
            row = run_mxq(method, fmt, src, calib, tok, args)
        else:
            row = run_peer(method, src, calib, tok, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ppl"}), flush=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                "calib_tokens": int(calib.attention_mask.sum()), "eval_tokens_per_domain": args.eval_tokens,
                "command": " ".join(sys.argv)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(rows))


if __name__ == "__main__":
    main()
