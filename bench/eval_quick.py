"""Wall time of ``eval=quick`` on the embedded tiny model on this CPU.

    python bench/eval_quick.py [--out bench/results/eval_quick_cpu.md]

Composes the real Hydra preset (recipes/eval/quick.yaml), loads the embedded model the way ``mxq.run``
does on a CPU (float32), and times ``evaluate`` + ``write_run_outputs`` twice per variant in one process:
cold (empty cache: the KL reference is computed by loading the baseline) and warm (reference from the
disk cache) -- the second is what every run of a sweep after the first pays. Variants: the preset as
shipped, and with ``eval.threads=2`` (torch's default on this machine) to show what the thread setting costs.
If ``mxq/assets/tiny/config.json`` does not exist yet, a synthetic checkpoint of the same preset
(4 layers x 32 experts, MXFP4) stands in, and the result file says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose_quick(cache_dir: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base=None):
        cfg = compose(config_name="run", overrides=["eval=quick", f"cache_dir={cache_dir}", *overrides])
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_quick_cpu.md")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--variants", default=",eval.threads=2",
                    help="comma-separated Hydra overrides to time besides the preset itself (empty = the preset)")
    a = ap.parse_args()
    import torch

    import mxq
    from mxq.runmeta import environment

    work = a.work or Path(tempfile.mkdtemp(prefix="mxq-eval-quick-"))
    embedded = (ROOT / "mxq" / "assets" / "tiny" / "config.json").is_file()
    if embedded:
        source, what = "tiny", "the embedded tiny model (mxq/assets/tiny)"
    else:
        from mxq.synth import synth

        source = str(synth(work / "ckpt", "tiny", "mxfp4", 0, overwrite=True))
        what = ("a synthetic checkpoint of the tiny preset (4 layers x 32 experts, top-4, H=192, MXFP4 experts): "
                "mxq/assets/tiny/config.json does not exist yet")
    t0 = time.perf_counter()   # once per process, measured apart so that every row below pays the same
    import lm_eval.evaluator  # noqa: F401

    from mxq.evaluate.lmeval_run import _task_manager

    _task_manager(None, False)
    import_s = time.perf_counter() - t0
    model = mxq.load_model(source, dtype=torch.float32)
    tok = mxq.load_tokenizer(model.source)
    from mxq.evaluate import evaluate, write_run_outputs

    runs = []
    for vi, variant in enumerate(a.variants.split(",")):
        cfg = compose_quick(work / f"cache_{vi}", [variant] if variant else [])   # a fresh KL cache per variant
        name = variant or f"eval=quick as shipped (threads: {cfg.eval.threads})"
        for label in ("cold cache", "warm cache"):
            run_dir = work / f"v{vi}_{label.replace(' ', '_')}"
            load1 = os.getloadavg()[0]
            t0 = time.perf_counter()
            m = evaluate(model, tok, cfg.eval, run_dir, baseline_source=source)
            t_eval = time.perf_counter() - t0
            m["recipe"], m["model"] = {"name": "baseline"}, {"source": source}
            t0 = time.perf_counter()
            write_run_outputs(run_dir, m)
            t_out = time.perf_counter() - t0
            runs.append({"label": f"{name}, {label}", "evaluate_s": t_eval,
                         "outputs_s": t_out, "stages": m["eval"]["timings_s"], "load_before": load1,
                         "load_after": os.getloadavg()[0], "metrics": m})
    env = environment()
    lines = ["# `eval=quick` on the CPU (bench/eval_quick.py)\n",
             f"Model: {what}. Device: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, float32, "
             f"path `{runs[0]['metrics']['precision']['path']}`. "
             f"Date {env['date']}, git {env['git_revision']}.\n",
             f"Import of lm-eval and indexing of the local tasks (once per process, not in the times below): "
             f"{import_s:.1f} s.\n",
             "| run | evaluate (s) | memory | speed | accuracy (ppl + KL + lm-eval) | report + plots (s) | total (s) "
             "| load avg before/after |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        st = r["stages"]
        lines.append(f"| {r['label']} | {r['evaluate_s']:.1f} | {st['memory']:.1f} | {st['speed']:.1f} | "
                     f"{st['accuracy']:.1f} | {r['outputs_s']:.1f} | {r['evaluate_s'] + r['outputs_s']:.1f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    m = runs[1]["metrics"]
    lines += ["", "Numbers of the shipped preset's warm run (the model is evaluated against itself, so KL is 0 by "
              "construction):", "",
              f"* weight bytes {m['memory']['weight_bytes']:,}; bits per expert weight "
              f"{m['memory']['bits_per_expert_weight']}",
              f"* perplexity {json.dumps({k: round(v, 2) for k, v in m['accuracy']['perplexity'].items()})}",
              f"* KL mean {m['accuracy']['kl_vs_baseline']['mean']}, top-1 agreement "
              f"{m['accuracy']['kl_vs_baseline']['top1_agreement']}",
              f"* decode {m['speed']['decode_tokens_per_s']:.2f} tokens/s, TTFT {m['speed']['ttft_s'] * 1e3:.0f} ms "
              f"(context 32, reference torch path)",
              f"* lm-eval tasks: {', '.join(sorted(m['accuracy']['lm_eval']['tasks']))}", "",
              "The load average column matters: this 2-core machine is shared with other jobs. Under load, 2 torch",
              "threads lose far more than the load suggests (OpenMP threads wait for each other whenever one is",
              "descheduled), which is why the quick preset sets `threads: 1`."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
