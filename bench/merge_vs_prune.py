"""Pruning vs merging on one model, one calibration set and one evaluation: a table for BENCHMARKS.md.

    python bench/merge_vs_prune.py --work /tmp/mvp [--fractions 0.25,0.5] [--eval eval=quick ...]

Runs ``python -m mxq.run`` once per method and fraction (each a fresh process, the same calibration set,
router-statistics cache and evaluation preset), then ``python -m mxq.report`` over all of them (ablation.md
with the per-task table) and writes ``merge_vs_prune.md``: one row per run with perplexity, KL and top-1
agreement against the uncompressed model, and lm-eval accuracy per task and on average.

Methods: prune by frequency and by REAP (Lasby et al., arXiv 2510.13999); merge with HC-SMoE grouping
(Chen et al., arXiv 2410.08589), M-SMoE's dominant-expert grouping with frequency weights (Li et al.,
arXiv 2310.01334) and REAM-style saliency grouping and weights; ``--ablations`` adds, at the largest
fraction, HC-SMoE without neuron alignment, REAP pruning and HC-SMoE merging each followed by router
repair (``recipe.repair``), and the router-logit and weight groupings (HC-SMoE's baselines); ``--skipping`` adds dynamic expert skipping (Lu et al., arXiv 2402.14800)
on the uncompressed model with the calibrated beta, and the same model without it, both with the speed
section on (the reference path on a CPU, which is where skipping saves work).
Runs whose folder already holds a metrics.json are reused, so a second call only adds what is new.
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

ROOT = Path(__file__).resolve().parents[1]

METHODS: dict[str, list[str]] = {
    "prune_frequency": ["recipe=prune_50pct", "recipe.prune.criterion=frequency"],
    "prune_reap": ["recipe=prune_50pct", "recipe.prune.criterion=reap"],
    "merge_hc_smoe": ["recipe=merge_50pct"],
    "merge_m_smoe": ["recipe=merge_50pct", "recipe.merge.grouping=dominant", "recipe.merge.weighting=frequency"],
    "merge_ream": ["recipe=merge_50pct", "recipe.merge.grouping=saliency", "recipe.merge.weighting=saliency"],
}
# eval=quick with both kinds of task, since the papers disagree by task type: cloze (last word, greedy: a
# generative check) and next-unit (4-way multiple choice), ``--limit`` items per domain and task (lm-eval's
# stderr kept); perplexity and KL on 512 held-out tokens per domain. Sized for a shared 2-core CPU.
COMMON = ["eval=quick", "generate.max_new_tokens=0", "eval.lm_eval.tasks=[tiny_cloze,tiny_nextsent]",
          "++eval.lm_eval.bootstrap_iters=100", "eval.perplexity.max_tokens=512",
          "eval.speed.enabled=false", "eval.memory.measure_peak=false", "eval.report.plots=false"]
ABLATIONS: dict[str, list[str]] = {
    "merge_hc_smoe_noalign": ["recipe=merge_50pct", "recipe.merge.align=false"],
    "prune_reap_repair": ["recipe=prune_50pct", "recipe.prune.criterion=reap", "recipe.repair.enabled=true"],
    "merge_hc_smoe_repair": ["recipe=merge_50pct", "recipe.repair.enabled=true"],
    "merge_router_logits": ["recipe=merge_50pct", "recipe.merge.grouping=router_logits"],
    "merge_weights": ["recipe=merge_50pct", "recipe.merge.grouping=weights"],
}
SKIPPING: dict[str, list[str]] = {
    "baseline_speed": ["recipe=baseline", "eval.speed.enabled=true"],
    "skip_calibrated": ["recipe=baseline", "skip.beta=calibrated", "eval.speed.enabled=true"],
}


def fraction_override(args: list[str], frac: float) -> list[str]:
    part = "prune" if "prune" in args[0] else "merge"
    return [*args, f"recipe.{part}.fraction={frac}"]


def run_one(name: str, overrides: list[str], work: Path, common: list[str]) -> dict:
    out = work / name
    if (out / "metrics.json").is_file():
        return {"name": name, "seconds": None, "cached": True}
    merged = {o.split("=", 1)[0].lstrip("+"): o for o in [*common, *overrides]}      # a run's own override wins
    cmd = [sys.executable, "-m", "mxq.run", *merged.values(), f"recipe.name={name}", f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    (work / f"{name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}); see {work / f'{name}.log'}")
    return {"name": name, "seconds": round(time.perf_counter() - t0, 1), "cached": False}


def get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def pooled_acc(m: dict, prefix: str, metric: str) -> tuple[float, float, int] | None:
    """``metric`` over every item of the tasks named ``prefix*`` (domains pooled), its 95% Wald half-width
    and the item count: acc +- 1.96 sqrt(acc (1 - acc) / n)."""
    tasks = get(m, "accuracy.lm_eval.tasks") or {}
    ns = get(m, "accuracy.lm_eval.n_samples") or {}
    hits = n = 0
    for t, v in tasks.items():
        if t.startswith(prefix) and v.get(metric) is not None and ns.get(t):
            hits += v[metric] * ns[t]
            n += ns[t]
    if not n:
        return None
    p = hits / n
    return p, 1.96 * (p * (1 - p) / n) ** 0.5, n


def kl_interval(run: Path, block: int = 32, n_boot: int = 2000) -> tuple[float, float] | None:
    """95% interval of the mean per-token KL (``kl_per_token.safetensors``) by a block bootstrap: each
    domain's tokens cut into blocks of ``block`` consecutive tokens (neighbouring tokens' KL is correlated,
    so tokens are not resampled one by one), blocks resampled with replacement, percentile interval."""
    f = run / "kl_per_token.safetensors"
    if not f.is_file():
        return None
    import numpy as np
    from safetensors.numpy import load_file

    blocks = [v[i:i + block] for v in load_file(str(f)).values() for i in range(0, len(v) - block + 1, block)]
    if not blocks:
        return None
    sums = np.array([b.astype(np.float64).sum() for b in blocks])
    idx = np.random.default_rng(0).integers(0, len(blocks), (n_boot, len(blocks)))
    means = sums[idx].sum(1) / (block * len(blocks))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


# next-unit: acc_mutual_info, the metric the embedded model is documented with (evals/README.md)
KINDS = (("cloze acc (generative)", "tiny_cloze_", "acc"),
         ("next-unit acc_mutual_info (4-way MC)", "tiny_nextsent_", "acc_mutual_info"))


def table(work: Path, names: list[str]) -> str:
    head = ["run", "experts/layer", "ppl (mean of domains)", "KL vs baseline (mean) [95% block bootstrap]",
            "top-1 agreement",
            *[f"{k} +- 95%" for k, _, _ in KINDS], "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, nd=4):
        return "-" if x is None else f"{x:.{nd}f}"

    for n in names:
        m = json.loads((work / n / "metrics.json").read_text())
        accs = [pooled_acc(m, pre, metric) for _, pre, metric in KINDS]
        lines.append("| " + " | ".join([n, str(get(m, "model.num_local_experts")),
                                         f(get(m, "accuracy.perplexity.mean"), 3),
                                         f(get(m, "accuracy.kl_vs_baseline.mean")) + (
                                             "" if (ci := kl_interval(work / n)) is None or n == "baseline"
                                             else f" [{ci[0]:.4f}, {ci[1]:.4f}]"),
                                         f(get(m, "accuracy.kl_vs_baseline.top1_agreement")),
                                         *["-" if a is None else f"{a[0]:.3f} +- {a[1]:.3f} (n={a[2]})"
                                           for a in accs], f(get(m, "speed.decode_tokens_per_s"), 1)]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--skipping", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated run names: run only these now (the table "
                    "still lists every finished run of the plan)")
    ap.add_argument("--limit", type=int, default=20, help="lm-eval items per domain and task")
    ap.add_argument("--common", nargs="*", default=COMMON,
                    help="Hydra overrides of every run (the same evaluation for all)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fracs = [float(x) for x in a.fractions.split(",")]
    plan: list[tuple[str, list[str]]] = [("baseline", ["recipe=baseline"])]
    for fr in fracs:
        pct = round(fr * 100)
        plan += [(f"{k}_{pct}", fraction_override(v, fr)) for k, v in METHODS.items()]
    if a.ablations:
        pct = round(max(fracs) * 100)
        plan += [(f"{k}_{pct}", fraction_override(v, max(fracs))) for k, v in ABLATIONS.items()]
    if a.skipping:
        plan += list(SKIPPING.items())
    t0 = time.time()
    done = []
    only = set(a.only.split(",")) if a.only else None
    for name, ov in plan:
        if only is not None and name not in only:
            continue
        done.append(run_one(name, ov, a.work, [*a.common, f"eval.lm_eval.limit={a.limit}"]))
        print(json.dumps(done[-1]), flush=True)
    subprocess.run([sys.executable, "-m", "mxq.report", str(a.work)], cwd=ROOT, check=True, capture_output=True)
    flags = (" --ablations" if a.ablations else "") + (" --skipping" if a.skipping else "")
    ran = ", ".join(f"{d['name']} {d['seconds']}" for d in done if not d["cached"]) or "none"
    md = [f"# Pruning vs merging ({time.strftime('%Y-%m-%d', time.gmtime(t0))})\n",
          (f"Host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads as "
           "set by the evaluation preset.\n"),
          (f"Command: `python bench/merge_vs_prune.py --work {a.work} --fractions {a.fractions}{flags} "
           f"--limit {a.limit}` (every run: {' '.join(a.common)})\n"),
          table(a.work, [n for n, _ in plan if (a.work / n / "metrics.json").is_file()]),
          f"\nPer-run wall seconds (runs made by this call; reused runs are in <work>/<run>.log): {ran}\n"]
    (a.work / "merge_vs_prune.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
