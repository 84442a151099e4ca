"""The whole ``python -m mxq.run`` pipeline at gpt-oss-20b size, per recipe, in one command.

    python bench/pipeline.py --work /tmp/pipe --md $OUT/pipeline.md --json $OUT/pipeline.json

Without ``--model`` it first writes the synthetic gpt-oss-20b checkpoint on the GPU
(``python -m mxq.synth WORK/src --preset gpt-oss-20b --device cuda``, reused when it exists). Then for each
recipe (default ``prune_25pct,mixed_budget,baseline``) it runs, in a fresh process,

    python -m mxq.run recipe=R model.path=SRC calib=large eval=speed device=cuda <the overrides below>

i.e. load -> router statistics over the calibration set (calib=large: 256 x 512 = 131,072 tokens) -> plan ->
apply -> export -> greedy generation -> evaluation (memory with the peak probe, speed on the fast runtime
where it accepts the model, a small perplexity + KL check) -> outputs, and reads back what the run folder
says: stage times (``run_meta.json``), calibration tokens and whether the statistics came from the cache
(``router_stats.json``), peak GPU memory (per stage, the memory probe's and the speed sweep's), decode tok/s
and the code path that produced it (``metrics.json``), exported size (``model/``). The markdown table and
JSON are rewritten after every recipe, so a run cut short keeps what finished.

The evaluation is limited to speed and memory (what this benchmark is for) plus a perplexity/KL check on 4 x 256
held-out tokens (``DEFAULT_OVERRIDES``; add or replace any with ``--set key=value``). ``--cache shared``
(default) shares the statistics / KL-reference / hash cache between the recipes of one invocation, as a
sweep does (a recipe that reuses statistics says "cache hit" in the table; the first recipe pays for
them); ``--cache fresh`` gives every recipe its own empty cache, so each row is a cold pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = "prune_25pct,mixed_budget,baseline"
DEFAULT_OVERRIDES = [
    "calib=large", "batch_size=32",
    "eval=speed", "eval.progress=false",
    "eval.memory.context=2048", "eval.memory.new_tokens=16",
    "eval.speed.contexts=[2048]", "eval.speed.modes=[greedy,sample]", "eval.speed.new_tokens=32",
    "eval.speed.repeats=3", "eval.speed.warmup=1", "eval.speed.headline_context=2048",
    "eval.perplexity.max_tokens=256", "eval.perplexity.max_length=256", "eval.perplexity.stride=256",
]
STAGES = ("load", "validate", "stats", "plan", "generate", "evaluate", "outputs")
GB = 1e9


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _get(d: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def collect_run(run_dir: Path, recipe: str | None = None, proc: dict | None = None) -> dict[str, Any]:
    """One row of facts from a ``python -m mxq.run`` folder (missing files give None, never an error)."""
    run_dir = Path(run_dir)
    meta, metrics = _json(run_dir / "run_meta.json") or {}, _json(run_dir / "metrics.json") or {}
    stats = _json(run_dir / "router_stats.json") or {}
    proc = proc or {}
    timings = meta.get("timings_s") or metrics.get("timings_s") or {}
    peaks = [v for v in (meta.get("gpu_peak_allocated_bytes") or {}).values() if v]
    peaks += [v for v in (_get(metrics, "memory.peak.peak_allocated_bytes"),
                          _get(metrics, "speed.peak_allocated_bytes")) if isinstance(v, int)]
    model = run_dir / "model"
    export_bytes = proc.get("export_bytes", folder_bytes(model) or None)
    layout = proc.get("export_layout")
    if layout is None and model.is_dir():
        layout = "mxq" if (model / "mxq_manifest.json").exists() else "hf"
    if proc.get("status"):
        status = proc["status"]
    else:
        status = "ok" if meta and metrics else "failed"
    return {
        "recipe": recipe or _get(metrics, "recipe.name") or run_dir.name,
        "status": status,
        "run_dir": str(run_dir),
        "timings_s": {k: v for k, v in timings.items() if k in STAGES or k.startswith("plan_")},
        "eval_timings_s": _get(metrics, "eval.timings_s") or {},
        "pipeline_s": meta.get("wall_s") or (round(sum(timings.get(k) or 0 for k in STAGES), 3) if timings else None),
        "process_wall_s": proc.get("wall_s"),
        "calib_tokens": meta.get("calib_tokens") or stats.get("tokens"),
        "calib_cache": _get(stats, "meta.cache"),
        "calib_seconds": _get(stats, "meta.seconds"),
        "calib_tokens_per_s": _get(stats, "meta.tokens_per_s"),
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "peak_gpu_by_stage": meta.get("gpu_peak_allocated_bytes"),
        "memory_probe_peak_bytes": _get(metrics, "memory.peak.peak_allocated_bytes"),
        "speed_peak_bytes": _get(metrics, "speed.peak_allocated_bytes"),
        "weight_bytes": _get(metrics, "memory.weight_bytes"),
        "bits_per_expert_weight": _get(metrics, "memory.bits_per_expert_weight"),
        "decode_tokens_per_s": _get(metrics, "speed.decode_tokens_per_s"),
        "ttft_s": _get(metrics, "speed.ttft_s"),
        "headline": _get(metrics, "speed.headline"),
        "by_setting": {k: {"decode_tokens_per_s": v.get("decode_tokens_per_s"), "ttft_s": v.get("ttft_s")}
                       for k, v in (_get(metrics, "speed.by_setting") or {}).items()},
        "code_path": _get(metrics, "speed.code_path") or _get(metrics, "speed.precision.path"),
        "fallback_reason": _get(metrics, "speed.fallback_reason"),
        "expert_formats": _get(metrics, "precision.expert_formats"),
        "num_local_experts": _get(metrics, "model.num_local_experts"),
        "ppl_mean": _get(metrics, "accuracy.perplexity.mean"),
        "kl_mean": _get(metrics, "accuracy.kl_vs_baseline.mean"),
        "export_bytes": export_bytes,
        "export_layout": layout,
        "error": proc.get("error"),
        "device": (f"{_get(meta, 'env.gpu')}, torch {_get(meta, 'env.torch')}, CUDA {_get(meta, 'env.cuda')}"
                   if _get(meta, "env.gpu") else None),
    }


def _f(v: Any, fmt: str = "{:.1f}", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def markdown(summary: dict[str, Any]) -> str:
    """The report: one row per recipe, then the notes (fallback reasons, failures)."""
    rows = summary.get("runs", [])
    lines = [f"# Full pipeline per recipe ({summary.get('source_desc') or summary.get('model')})", ""]
    if summary.get("device"):
        lines.append(f"Device: {summary['device']}. ")
    if summary.get("synth_s") is not None:
        lines.append(f"Synthetic checkpoint written in {summary['synth_s']:.1f} s "
                     f"({_f(summary.get('source_gb'), '{:.2f}')} GB). ")
    if summary.get("command"):
        lines += ["", "Per recipe: `" + summary["command"] + "`"]
    lines += ["", "| recipe | status | load s | stats s | plan s (build/apply/export) | generate s | "
              "evaluate s (mem/speed/acc) | pipeline s | process s | calib tokens | peak GPU GB | "
              "decode tok/s (code path) | TTFT ms | weights GB | export GB (layout) |",
              "|" + "---|" * 15]
    for r in rows:
        t = r.get("timings_s") or {}
        ev = r.get("eval_timings_s") or {}
        evs = "/".join(_f(ev.get(k), "{:.0f}") for k in ("memory", "speed", "accuracy")) if ev else ""
        calib = _f(r.get("calib_tokens"), "{:,}")
        if r.get("calib_cache"):
            calib += f" ({r['calib_cache']}" + (f", {r['calib_seconds']:.1f} s" if r.get("calib_cache") == "miss"
                                                and r.get("calib_seconds") else "") + ")"
        path = r.get("code_path") or "-"
        dec = f"{_f(r.get('decode_tokens_per_s'))} ({path})" if r.get("decode_tokens_per_s") is not None else "-"
        exp = (f"{r['export_bytes'] / GB:.2f} ({r.get('export_layout')})" if r.get("export_bytes") else "-")
        plan = _f(t.get("plan"))
        if any(t.get(k) is not None for k in ("plan_build", "plan_apply", "plan_export")):
            plan += " (" + "/".join(_f(t.get(k)) for k in ("plan_build", "plan_apply", "plan_export")) + ")"
        lines.append("| " + " | ".join([
            str(r.get("recipe")), str(r.get("status")), _f(t.get("load")), _f(t.get("stats")), plan,
            _f(t.get("generate")), f"{_f(t.get('evaluate'))} ({evs})" if evs else _f(t.get("evaluate")),
            _f(r.get("pipeline_s")), _f(r.get("process_wall_s")), calib,
            _f(r["peak_gpu_bytes"] / GB if r.get("peak_gpu_bytes") else None, "{:.2f}"), dec,
            _f(r["ttft_s"] * 1e3 if r.get("ttft_s") is not None else None),
            _f(r["weight_bytes"] / GB if r.get("weight_bytes") else None, "{:.2f}"), exp]) + " |")
    notes = []
    for r in rows:
        if r.get("fallback_reason"):
            notes.append(f"* {r['recipe']}: speed measured on `{r.get('code_path')}`: {r['fallback_reason']}")
        if r.get("status") != "ok":
            notes.append(f"* {r['recipe']}: {r.get('status')}" + (f": {r['error']}" if r.get("error") else ""))
        if r.get("by_setting") and len(r["by_setting"]) > 1:
            s = ", ".join(f"{k} {_f(v.get('decode_tokens_per_s'))} tok/s" for k, v in r["by_setting"].items())
            notes.append(f"* {r['recipe']}: decode by setting: {s}")
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines += ["", "Columns: stage wall times from the run's `run_meta.json` (plan = build + apply + export); "
              "pipeline = all stages in the process, process = the whole `python -m mxq.run` command (imports, "
              "Hydra, writing the report); calib tokens = router-statistics tokens (cache miss: collected in "
              "this run, with its collection time; hit: reused from an earlier run of the same checkpoint and "
              "calibration set); peak GPU = the largest `torch.cuda.max_memory_allocated` over the stages, the "
              "memory probe and the speed sweep; decode tok/s = the speed headline (greedy) with the code path "
              "that produced it; export = bytes of `model/` (hf: the published gpt-oss layout, mxq: mxq's own)."]
    return "\n".join(lines) + "\n"


def run_recipe(recipe: str, src: Path, work: Path, overrides: list[str], cache: Path, timeout: float,
               keep_export: bool, device: str = "cuda") -> dict[str, Any]:
    run_dir = work / "runs" / recipe
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "mxq.run", f"recipe={recipe}", f"model.path={src}", f"device={device}",
           f"cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides]
    proc: dict[str, Any] = {"cmd": " ".join(cmd)}
    log = work / f"{recipe}.log"
    t0 = time.perf_counter()
    try:
        with log.open("w") as f:
            r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1))
        proc["status"] = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
    except subprocess.TimeoutExpired:
        proc["status"] = f"timeout after {timeout:.0f} s"
    proc["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc["status"] != "ok":
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error" in ln or "Could not" in ln][-3:]
        proc["error"] = " / ".join(errs or lines[-3:])[-600:] + f" (log: {log})"
    model = run_dir / "model"
    if model.is_dir():
        proc["export_bytes"] = folder_bytes(model)
        proc["export_layout"] = "mxq" if (model / "mxq_manifest.json").exists() else "hf"
        if not keep_export:                 # disk: a 20b export is 10-14 GB
            shutil.rmtree(model)
    return collect_run(run_dir, recipe, proc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mxq-pipeline"))
    ap.add_argument("--model", type=Path, default=None, help="existing checkpoint (default: synthesise WORK/src)")
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--device", default="cuda", help="for the synthesis and every run (cpu: smoke tests only)")
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every run (replaces a default override of the same key)")
    ap.add_argument("--cache", choices=["shared", "fresh"], default="shared")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget of the whole command; each run gets what is left")
    ap.add_argument("--keep-export", action="store_true")
    ap.add_argument("--md", type=Path, action="append", default=[], help="markdown output (repeatable)")
    ap.add_argument("--json", type=Path, action="append", default=[], help="JSON output (repeatable)")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    keys = {o.split("=", 1)[0] for o in a.set}
    overrides = [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in keys] + a.set
    summary: dict[str, Any] = {"model": str(a.model) if a.model else None, "preset": a.preset, "runs": [],
                               "overrides": overrides, "cache": a.cache}
    src = a.model or a.work / "src"
    if a.model is None and not (src / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mxq.synth", str(src), "--preset", a.preset, "--device", a.device,
                        "--overwrite"], cwd=ROOT, check=True)
        summary["synth_s"] = round(time.perf_counter() - t0, 1)
    summary["source_gb"] = round(folder_bytes(src) / GB, 2)
    summary["source_desc"] = f"{'synthetic ' + a.preset if a.model is None else src}, {summary['source_gb']} GB"
    summary["command"] = (f"python -m mxq.run recipe=R model.path=SRC device={a.device} cache_dir=CACHE "
                          + " ".join(overrides))

    def write() -> None:
        md = markdown(summary)
        for p in a.md:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(md)
        for p in a.json:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    for recipe in [r.strip() for r in a.recipes.split(",") if r.strip()]:
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            summary["runs"].append({"recipe": recipe, "status": "skipped (budget spent)"})
            write()
            continue
        cache = a.work / "cache" if a.cache == "shared" else a.work / f"cache_{recipe}"
        if a.cache == "fresh":
            shutil.rmtree(cache, ignore_errors=True)
        print(f"[pipeline] {recipe}: running ({left:.0f} s left)", flush=True)
        row = run_recipe(recipe, src, a.work, overrides, cache, left, a.keep_export, a.device)
        summary["runs"].append(row)
        summary["device"] = summary.get("device") or row.get("device")   # from the run's env (no CUDA here)
        print(f"[pipeline] {recipe}: {row['status']} in {row['process_wall_s']} s; decode "
              f"{row.get('decode_tokens_per_s')} tok/s on {row.get('code_path')}", flush=True)
        write()
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    write()
    print(markdown(summary))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
