"""Prune a gpt-oss checkpoint and export it; wall time and peak host RSS.

    python bench/prune_export.py --preset gpt-oss-20b --work /tmp/s20 --md bench/results/prune_export_cpu.md
    python bench/prune_export.py --model DIR --paths stream,model,dequantize

Paths (each runs in a fresh subprocess, so one path's freed-but-cached memory never counts for another):
* ``stream``: ``mxq.io.targets.export_checkpoint(src, plan, out)``: checkpoint to checkpoint, one layer at a time,
  without loading the model (what pruning a published checkpoint needs).
* ``model``: ``mxq.load_model`` (experts stay packed, tensors memory-mapped) -> ``apply_`` -> ``export_model``,
  i.e. what ``python -m mxq.run`` does; RSS includes the mapped checkpoint pages the export touches.
* ``dequantize``: ``python -m mxq.dequantize`` of the pruned export to bf16 (where other tools run out of
  memory: huggingface/transformers#43696).
The plan prunes ``--fraction`` of the experts of every layer at random (seeded): calibrating REAP on a
20B model is not possible on a CPU in benchmark time, and which experts go does not change the cost.
Peak RSS is sampled every 20 ms in a thread (psutil), so it counts resident mapped file pages too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import psutil  # noqa: E402

from bench.memwatch import PeakRSS  # noqa: E402


def make_plan(src: Path, fraction: float, seed: int):
    """A random prune plan over the checkpoint's experts (kept experts stay in their source format)."""
    from mxq.plan import Plan
    from mxq.plan.plan import removed_count
    from mxq.plan.scores import choose_pruned
    from mxq.io.sources import open_source

    s = open_source(src)
    cfg = s.config
    n = removed_count(fraction, cfg.num_local_experts)
    pruned, notes, info = choose_pruned(cfg, None, "random", n, True, seed)
    rows = [["prune" if e in set(p) else f for e, f in enumerate(s.formats(i))] for i, p in enumerate(pruned)]
    return Plan(rows, planner="prune", recipe={"prune": {"fraction": fraction, "criterion": "random", "seed": seed}},
                notes=notes, info={"prune": info}), cfg


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run_path(path: str, src: Path, work: Path, fraction: float, seed: int) -> dict:
    import torch

    import mxq
    from mxq.io.targets import export_checkpoint, export_model
    from mxq.plan import apply_

    plan, cfg = make_plan(src, fraction, seed)
    out = work / f"out_{path}"
    shutil.rmtree(out, ignore_errors=True)
    res: dict = {"path": path}
    pruned = work / "out_stream"
    if path == "dequantize" and not (pruned / "config.json").exists():
        export_checkpoint(src, plan, pruned)          # its input, outside the measurement
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if path == "stream":
            export_checkpoint(src, plan, out)
        elif path == "model":
            model = mxq.load_model(src, dtype=torch.bfloat16)
            res["load_s"] = round(time.perf_counter() - t0, 2)
            t1 = time.perf_counter()
            apply_(model, plan)
            res["apply_s"] = round(time.perf_counter() - t1, 2)
            t1 = time.perf_counter()
            export_model(model, plan, out, source_dir=src)
            res["export_s"] = round(time.perf_counter() - t1, 2)
        elif path == "dequantize":
            from mxq.dequantize import dequantize

            dequantize(pruned, out)
        else:
            raise SystemExit(f"unknown path {path!r}")
        res["wall_s"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_gb"] = round(rss.peak / 1e9, 3)
    res["out_bytes"] = folder_bytes(out)
    ocfg = json.loads((out / "config.json").read_text())
    res["num_local_experts"] = ocfg["num_local_experts"]
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    res["tensor_bytes"] = total
    if path != "dequantize":
        res["plan_bytes_match"] = plan.bytes(cfg)["total"] == total
    if path != "stream":                  # keep disk use bounded; the stream export feeds "dequantize"
        shutil.rmtree(out)
    return res


def markdown(summary: dict) -> str:
    lines = [f"# Prune + export benchmark ({summary['preset'] or summary['model']})", "",
             f"Machine: {summary['machine']}. Source: {summary['source_gb']} GB checkpoint, "
             f"{summary['layers']} layers x {summary['experts']} experts; plan: prune {summary['fraction']:.0%} per "
             f"layer at random (seed {summary['seed']}) -> {summary['kept']} experts, source format kept.", "",
             "| path | wall (s) | peak RSS (GB) | output (GB) | num_local_experts | Plan.bytes == written |",
             "|---|---|---|---|---|---|"]
    for r in summary["results"]:
        lines.append(f"| {r['path']} | {r['wall_s']} | {r['peak_rss_gb']} | {r['out_bytes'] / 1e9:.2f} | "
                     f"{r['num_local_experts']} | {r.get('plan_bytes_match', '-')} |")
    if summary.get("synth_s"):
        lines += ["", f"Synthetic checkpoint generation: {summary['synth_s']} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="existing checkpoint folder")
    ap.add_argument("--preset", default="gpt-oss-20b", help="synthesize this preset when --model is not given")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-bench-prune"))
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default="stream,model")
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)   # one path, in a child process
    ap.add_argument("--keep", action="store_true", help="keep the stream export in WORK/out_stream")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    a = ap.parse_args()
    src = a.model or a.work / "src"
    if a.path:
        print(json.dumps(run_path(a.path, src, a.work, a.fraction, a.seed)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": str(a.model) if a.model else None, "preset": None if a.model else a.preset,
                     "fraction": a.fraction, "seed": a.seed,
                     "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
                                f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"}
    if a.model is None and not (src / "config.json").exists():
        from mxq.synth import synth

        t0 = time.perf_counter()
        synth(src, a.preset, "mxfp4", 0, "cpu")
        summary["synth_s"] = round(time.perf_counter() - t0, 1)
    plan, cfg = make_plan(src, a.fraction, a.seed)
    summary.update(source_gb=round(folder_bytes(src) / 1e9, 2), layers=cfg.num_hidden_layers,
                   experts=cfg.num_local_experts, kept=plan.num_kept, results=[])
    for p in a.paths.split(","):
        cmd = [sys.executable, __file__, "--path", p, "--model", str(src), "--work", str(a.work),
               "--fraction", str(a.fraction), "--seed", str(a.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"path {p} failed:\n{out.stderr[-3000:]}")
        summary["results"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(summary["results"][-1]), flush=True)
    for p in a.work.glob("out_*"):
        if not a.keep:
            shutil.rmtree(p)
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
