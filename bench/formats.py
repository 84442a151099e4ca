"""Quantize/dequantize throughput of every format, and re-quantizing gpt-oss-20b's experts.

    python bench/formats.py --device cuda --requant-20b --json $OUT/formats.json
    python bench/formats.py --device cpu --repeat 1 --requant-20b --layers 1 --md bench/results/formats_cpu.md

Throughput is reported as GB/s of bf16 weights (2 bytes per weight) processed, on expert-sized matrices
(gate_up [5760, 2880] and down [2880, 2880] in [out, in] layout). ``--requant-20b`` builds a synthetic
gpt-oss-20b layer by layer (32 experts x gate_up + down, random bf16 -> ``quantize_mxfp4``, not timed) and
times, per format, MXFP4 -> bf16 dequantization plus quantization into the format for every expert (disk
excluded, device-synchronised). With ``--layers`` < 24 the 24-layer time is also extrapolated.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mxq.formats import dequantize_mxfp4, get_format, list_formats, quantize_mxfp4  # noqa: E402

SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, repeat: int) -> tuple[float, object]:
    """Best-of-``repeat`` wall time of ``fn()`` (after one warm-up call), device-synchronised."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(names: list[str], dev: torch.device, repeat: int, seed: int) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(seed)
    rows = []
    for shape_name, shape in SHAPES.items():
        w = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)   # [out, in]
        gb = w.numel() * 2 / 1e9
        for name in names:
            f = get_format(name)
            tq, p = timed(lambda: f.quantize(w), dev, repeat)
            td, _ = timed(lambda: f.dequantize(p, torch.bfloat16), dev, repeat)
            rows.append({"format": name, "matrix": shape_name, "shape": list(shape),
                         "bits_per_weight": round(f.bits_per_weight(shape), 4),
                         "quantize_s": tq, "dequantize_s": td,
                         "quantize_GBps": gb / tq, "dequantize_GBps": gb / td})
            print(f"  {name:15s} {shape_name:8s} quantize {gb / tq:7.2f} GB/s  dequantize {gb / td:7.2f} GB/s",
                  flush=True)
    return rows


def requant(names: list[str], dev: torch.device, layers: int, experts: int, seed: int) -> dict:
    """Seconds per format to turn every MXFP4 expert of ``layers`` synthetic layers into that format."""
    g = torch.Generator(device=dev).manual_seed(seed)
    total = {name: 0.0 for name in names}
    for layer in range(layers):
        source = []                                                    # [(blocks, scales)] per expert matrix
        for _ in range(experts):
            for shape in SHAPES.values():
                w = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
                source.append(quantize_mxfp4(w))
        sync(dev)
        for name in names:
            f = get_format(name)
            t0 = time.perf_counter()
            for blocks, scales in source:
                f.quantize(dequantize_mxfp4(blocks, scales, torch.bfloat16))
            sync(dev)
            total[name] += time.perf_counter() - t0
        print(f"  layer {layer + 1}/{layers}: " + ", ".join(f"{n} {t:.1f}s" for n, t in total.items()), flush=True)
        del source
    return total


def check_cpu(names: list[str], dev: torch.device, seed: int) -> dict:
    """Quantize the same weights on ``dev`` and on the CPU; count packed bytes that differ (0 = bit-identical)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(384, 2880, generator=g) * 0.02
    w[0] = 0.0
    w[1] *= 1e-36
    w[2, :64] = 3e38
    w = w.to(torch.bfloat16)
    out = {}
    for name in names:
        f = get_format(name)
        a, b = f.quantize(w.to(dev)).to("cpu"), f.quantize(w)
        diff = {k: int((a.tensors[k].reshape(-1).view(torch.uint8) != b.tensors[k].reshape(-1).view(torch.uint8)).sum())
                for k in b.tensors}
        same_deq = torch.equal(f.dequantize(a), f.dequantize(b))
        out[name] = {"differing_bytes": diff, "dequantized_equal": same_deq}
        print(f"  {name:15s} differing bytes vs cpu {diff}  dequantized equal: {same_deq}", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"Device: {res['device']}; torch {res['torch']}; best of {res['repeat']} after a warm-up.", "",
             "| format | bits/weight (gate_up) | quantize GB/s (gate_up / down) | dequantize GB/s (gate_up / down) |",
             "|---|---|---|---|"]
    by = {(r["format"], r["matrix"]): r for r in res["throughput"]}
    for name in res["formats"]:
        gu, dn = by[(name, "gate_up")], by[(name, "down")]
        lines.append(f"| {name} | {gu['bits_per_weight']:.4f} | {gu['quantize_GBps']:.2f} / {dn['quantize_GBps']:.2f} "
                     f"| {gu['dequantize_GBps']:.2f} / {dn['dequantize_GBps']:.2f} |")
    if "bf16" in res["formats"]:
        lines += ["", "bf16 dequantize to bf16 returns the stored tensor itself (no copy), hence its number."]
    rq = res.get("requant_20b")
    if rq:
        lines += ["", f"Re-quantizing gpt-oss-20b experts from MXFP4 ({rq['layers']} of 24 layers x {rq['experts']} "
                  "experts, gate_up + down; MXFP4 dequantize + quantize, disk excluded):", "",
                  "| format | measured s | estimated s for 24 layers x 32 experts |", "|---|---|---|"]
        for name, sec in rq["seconds"].items():
            lines.append(f"| {name} | {sec:.1f} | {rq['estimated_full_s'][name]:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", default=",".join(list_formats()), help="comma-separated registry names")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--requant-20b", action="store_true")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-cpu", action="store_true", help="compare the device's packed bytes with the CPU's")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    names = [n for n in a.formats.split(",") if n]
    cpu = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
                 "torch": torch.__version__, "repeat": a.repeat, "formats": names}
    if a.check_cpu:
        print(f"parity of {res['device']} with the cpu", flush=True)
        res["cpu_parity"] = check_cpu(names, dev, a.seed)
    print(f"throughput on {res['device']}", flush=True)
    res["throughput"] = throughput(names, dev, a.repeat, a.seed)
    if a.requant_20b:
        print(f"re-quantizing {a.layers} layer(s) x {a.experts} experts", flush=True)
        sec = requant(names, dev, a.layers, a.experts, a.seed)
        scale = (24 / a.layers) * (32 / a.experts)
        res["requant_20b"] = {"layers": a.layers, "experts": a.experts, "seconds": sec,
                              "estimated_full_s": {n: s * scale for n, s in sec.items()}}
    table = markdown(res)
    print(table)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(table)


if __name__ == "__main__":
    main()
