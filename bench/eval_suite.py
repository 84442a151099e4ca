"""Does the default evaluation suite tell compression plans apart? Baseline vs pruned variants of the embedded
model, every task with its 95% interval and a paired test, beside each task's no-model floor.

    python bench/eval_suite.py --work /tmp/mxq-suite [--variants reap50,freq50,reap25,freq25] [--seeds 1,2]

Runs ``python -m mxq.run`` once per variant into ``WORK/<variant>`` (CPU, float32, speed off: this is about
accuracy), with the ``standard`` preset's held-out perplexity (4,096 tokens per domain, window 1,024,
stride 512) and the default lm-eval suite ``tiny_all`` over all items, then the ablation report
(``mxq.evaluate.ablation.write_ablation``) over the run folders: per-task paired differences against the
baseline on the same documents. ``--seeds`` adds REAP 50% runs with other calibration seeds (held-out
perplexity and KL only, to save CPU time). Writes
``bench/results/eval_suite_cpu.{md,json}``; every run folder stays usable with ``python -m mxq.report WORK``.
Runs that already have a metrics.json in WORK are reused (``--fresh`` reruns them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# label -> Hydra overrides of the run
VARIANTS: dict[str, list[str]] = {
    "baseline": ["recipe=baseline"],
    "reap50": ["recipe=prune_50pct", "recipe.prune.criterion=reap"],
    "freq50": ["recipe=prune_50pct", "recipe.prune.criterion=frequency"],
    "reap25": ["recipe=prune_25pct", "recipe.prune.criterion=reap"],
    "freq25": ["recipe=prune_25pct", "recipe.prune.criterion=frequency"],
}
COMMON = ["eval=standard", "++eval.speed.enabled=false", "++eval.memory.measure_peak=false", "++eval.threads=1",
          "++eval.progress=false", "++eval.report.print_summary=false", "++eval.lm_eval.tasks=[tiny_all]",
          "++eval.lm_eval.batch_size=32", "++eval.lm_eval.bootstrap_iters=1000", "recipe.export.enabled=false",
          "generate.max_new_tokens=0", "device=cpu"]
FLOORS = {"tiny_wordchoice": ("mxq.data.wordchoice_baseline", "acc"), "tiny_nextsent": ("mxq.data.nextsent_baseline", "acc")}


def run_variant(label: str, overrides: list[str], work: Path, cache: Path, fresh: bool) -> tuple[Path, float]:
    run_dir = work / label
    if (run_dir / "metrics.json").is_file() and not fresh:
        return run_dir, float("nan")
    cmd = [sys.executable, "-m", "mxq.run", *overrides, *COMMON, f"cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    with open(work / f"{label}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir, time.perf_counter() - t0


def unigram_ppl(domain: str, tokenizer) -> float:
    """Held-out perplexity of an add-one unigram over the train split's tokens (the no-model floor of perplexity)."""
    import math
    from collections import Counter

    from mxq.data.corpus import load_text

    train = Counter(tokenizer(load_text(domain, "train"), add_special_tokens=False).input_ids)
    total, vocab = sum(train.values()), len(tokenizer)
    held = tokenizer(load_text(domain, "heldout")[:4096 * 8], add_special_tokens=False).input_ids[:4096]
    nll = -sum(math.log((train[t] + 1) / (total + vocab)) for t in held[1:])
    return math.exp(nll / (len(held) - 1))


def _v(x: list | None, digits: int = 4) -> str:
    """``value [lo, hi]`` of a ``[value, lo, hi]`` triple."""
    if not x or x[0] is None:
        return "-"
    ci = f" [{x[1]:.{digits}g}, {x[2]:.{digits}g}]" if x[1] is not None else ""
    return f"{x[0]:.{digits}g}{ci}"


def _d(row: dict) -> str:
    return f"{row['delta']:+.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"


# (family, metric) rows of the table: the default suite's primary metrics, then the secondary and left-out ones
ROWS = (("tiny_ppl", "word_perplexity"), ("tiny_cloze", "perplexity"), ("tiny_cloze", "acc"),
        ("tiny_wordchoice", "acc"), ("tiny_wordchoice", "acc_norm"))


def unigram_target_ppl(domain: str, tokenizer, family: str = "tiny_cloze") -> float:
    """lm-eval's cloze ``perplexity`` (exp of the mean target NLL per item) under an add-one train-split token
    unigram: the no-model floor of the target-word perplexity."""
    import math
    from collections import Counter

    from mxq.data.corpus import load_text
    from mxq.data.evals import EVALS_DIR

    train = Counter(tokenizer(load_text(domain, "train"), add_special_tokens=False).input_ids)
    total, vocab = sum(train.values()), len(tokenizer)
    items = [json.loads(x) for x in (EVALS_DIR / family / f"{domain}.jsonl").read_text().splitlines()]
    nll = [-sum(math.log((train[t] + 1) / (total + vocab))
                for t in tokenizer(it["target"], add_special_tokens=False).input_ids) for it in items]
    return math.exp(sum(nll) / len(nll))


def unigram_word_ppl(domain: str, tokenizer) -> float:
    """lm-eval's ``word_perplexity`` of the ``tiny_ppl`` documents (exp of total NLL / words) under an add-one
    train-split token unigram: the no-model floor of ``tiny_ppl``, in the same unit."""
    import math
    import re
    from collections import Counter

    from mxq.data.corpus import load_text
    from mxq.data.evals import EVALS_DIR

    train = Counter(tokenizer(load_text(domain, "train"), add_special_tokens=False).input_ids)
    total, vocab = sum(train.values()), len(tokenizer)
    docs = [json.loads(x)["text"] for x in (EVALS_DIR / "tiny_ppl" / f"{domain}.jsonl").read_text().splitlines()]
    nll = sum(-math.log((train[t] + 1) / (total + vocab)) for d in docs
              for t in tokenizer(d, add_special_tokens=False).input_ids)
    words = sum(len(re.split(r"\s+", d)) for d in docs)          # lm-eval's word count (split on whitespace)
    return math.exp(nll / words)


def pooled(work: Path, base: str, variant: str, family: str, metric: str) -> dict | None:
    """Paired comparison over all domains' items of a family at once (the group, not per-domain tasks)."""
    import numpy as np

    from mxq.evaluate import per_doc
    from mxq.evaluate.intervals import Settings, Units, paired_difference

    a, b = per_doc.load(work / variant), per_doc.load(work / base)
    if not a or not b:
        return None
    ts = sorted(t for t in (b.get("lm_eval") or {}) if t.startswith(family + "_") and t in (a.get("lm_eval") or {}))
    if not ts:
        return None
    ua, ub = (Units(np.concatenate([d["lm_eval"][t]["metrics"][metric]["num"] for t in ts]),
                    np.ones(sum(len(d["lm_eval"][t]["doc_id"]) for t in ts)),
                    d["lm_eval"][ts[0]]["metrics"][metric]["transform"]) for d in (a, b))
    return paired_difference(ua, ub, Settings(seed=0)).to_json()


def render(out: dict) -> str:
    """BENCHMARKS-ready markdown of the JSON this script writes."""
    from mxq.evaluate.paired import p_text

    runs, paired = out["runs"], out["paired"]
    base = "baseline"
    p50 = next((lab for lab, r in runs.items() if r["folder"] == "reap50"), None)
    idx = {(r["variant"], r["reference"], r["metric"]): r for r in paired if r.get("verdict")}
    lines = ["# Evaluation suite on the embedded model (bench/eval_suite.py)\n",
             f"Date {out['date']}; {out['env']['cpu']}, {out['env']['cpu_count']} cores, torch {out['env']['torch']}, "
             f"float32; git {out['env']['git_revision']}. Command: `{out['command']}`. Load average at the end "
             f"{out['load_avg'][0]:.1f} (shared machine: wall times are upper bounds).\n",
             "Intervals: 95%; a run's own: Wilson (accuracies) or BCa bootstrap over documents / 32-token blocks; "
             "paired delta: percentile bootstrap over the same items (2,000 resamples, seed 0) and its p-value.\n"]
    if p50:
        suite = out.get("default_suite", [])
        lines += [f"## Every task: baseline vs `{p50}` (REAP 50%)\n",
                  "| task | metric | baseline [95% CI] | REAP 50% [95% CI] | paired delta [95% CI] | p | separated | "
                  "no-model floor |", "|---|---|---|---|---|---|---|---|"]
        fl = out["floors"].get("tiny_wordchoice", {})
        for fam, m in ROWS:
            for dom in out["unigram_token_ppl"]:
                task = f"{fam}_{dom}"
                if task not in runs[base]["tasks"] or m not in runs[base]["tasks"][task]:
                    continue
                row = idx.get((p50, base, f"{task}.{m}"))
                if fam == "tiny_wordchoice":
                    floor = (f"chance 0.25, unigram {fl['unigram']['per_domain'][dom]:.3f}, in-context "
                             f"{fl['context_count']['per_domain'][dom]:.3f}; bigram {fl['bigram']['per_domain'][dom]:.3f}")
                elif m == "perplexity":
                    floor = f"unigram {out['unigram_target_ppl'][dom]:,.0f}"
                elif m == "acc":
                    floor = "unigram argmax: ~0"
                else:
                    floor = f"unigram {out['unigram_word_ppl'][dom]:,.0f}"
                sep = "-" if not row else ("yes" if row["verdict"] != "~" else "**no**")
                name = task if fam in suite else f"{task} (not in suite)"
                lines.append(f"| {name} | {m} | {_v(runs[base]['tasks'][task].get(m))} | "
                             f"{_v(runs[p50]['tasks'].get(task, {}).get(m))} | {_d(row) if row else '-'} | "
                             f"{p_text(row['p'])} | {sep} | {floor} |" if row else
                             f"| {name} | {m} | {_v(runs[base]['tasks'][task].get(m))} | - | - | - | - | {floor} |")
        lines.append("")
        pl = out.get("pooled") or {}
        if pl:
            lines += ["All four domains' items pooled (the group, 800 items; paired, same items):\n",
                      "| family | metric | baseline | REAP 50% | paired delta [95% CI] | p |", "|---|---|---|---|---|---|"]
            lines += [f"| {k.split('.')[0]} | {k.split('.')[1]} | {c['b']:.4g} | {c['a']:.4g} | {_d(c)} | {p_text(c['p'])} |"
                      for k, c in pl.items() if c]
            lines.append("")
    lines += ["## REAP vs frequency pruning\n",
              "| run | held-out ppl [95% CI] | delta vs baseline [95% CI] | KL mean [95% CI] | top-1 agreement | "
              "wordchoice acc |", "|---|---|---|---|---|---|"]
    for lab, r in runs.items():
        row = idx.get((lab, base, "ppl_mean"))
        wc = [r["tasks"].get(f"tiny_wordchoice_{d}", {}).get("acc", [None])[0] for d in out["unigram_token_ppl"]]
        wc_mean = sum(wc) / len(wc) if all(w is not None for w in wc) else None
        lines.append(f"| {lab} | {_v(r['ppl_mean'])} | {_d(row) if row else '-'} | {_v(r['kl_mean'], 3)} | "
                     f"{_v(r['top1_agreement'], 3)} | {'-' if wc_mean is None else f'{wc_mean:.3f}'} |")
    pairs = [r for r in paired if r.get("verdict") and r["reference"] != base and r["metric"] == "ppl_mean"]
    if pairs:
        lines += ["", "| paired on the same tokens | held-out ppl delta [95% CI] | p | verdict |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} - {r['reference']} | {_d(r)} | {p_text(r['p'])} | {r['verdict']} |" for r in pairs]
    from mxq.evaluate.intervals import spread
    from mxq.evaluate.seeds import SEED_SUFFIX, group_of

    groups: dict[str, list[str]] = {}
    for lab in runs:
        if SEED_SUFFIX.search(lab):
            groups.setdefault(group_of(lab), []).append(lab)
    rows = [(g, labs) for g, labs in groups.items() if len(labs) > 1]
    if rows:
        lines += ["", "Calibration seeds (`calib.seed`; the calibration sample decides which experts REAP keeps):", "",
                  "| variant | seeds | held-out ppl per seed | mean | std | KL mean, mean over seeds |",
                  "|---|---|---|---|---|---|"]
        for g, labs in rows:
            sp, kl = spread([runs[x]["ppl_mean"][0] for x in labs]), spread([runs[x]["kl_mean"][0] for x in labs])
            lines.append(f"| {g} | {', '.join(SEED_SUFFIX.search(x).group(1) for x in labs)} | "
                         f"{', '.join(format(runs[x]['ppl_mean'][0], '.1f') for x in labs)} | {sp['mean']:.1f} | "
                         f"{sp['std']:.1f} | {kl['mean']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--variants", default="reap50,freq50,reap25,freq25")
    ap.add_argument("--seeds", default="", help="extra calib.seed values for REAP 50%% (e.g. 1,2)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--ppl_only", default="", help="variants run without lm-eval (held-out perplexity and KL only)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_suite_cpu")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    a = ap.parse_args()
    if a.render:
        a.out.with_suffix(".md").write_text(render(json.loads(a.out.with_suffix(".json").read_text())))
        return
    from mxq.runmeta import environment

    a.work.mkdir(parents=True, exist_ok=True)
    cache = a.work / "cache"
    plan = [("baseline", VARIANTS["baseline"])]
    lean = ["++eval.lm_eval.enabled=false"]
    plan += [(v, VARIANTS[v] + (lean if v in a.ppl_only.split(",") else [])) for v in a.variants.split(",") if v]
    plan += [(f"reap50_s{s}", [*VARIANTS["reap50"], f"calib.seed={s}", *lean])
             for s in a.seeds.split(",") if s]               # seeds: held-out perplexity and KL only (CPU time)
    walls = {}
    for label, ov in plan:
        t = time.strftime("%H:%M:%S")
        print(f"[{t}] {label}: {' '.join(ov)}", flush=True)
        _, walls[label] = run_variant(label, ov, a.work, cache, a.fresh)
    from mxq.evaluate.ablation import write_ablation
    from mxq.evaluate.intervals import Settings

    from mxq.evaluate.ablation import load_runs

    dirs = [a.work / lab for lab, _ in plan]
    label_of = {r["dir"].name: r["label"] for r in load_runs(dirs)}        # folder name -> report label
    pairs = [(label_of[r], label_of[f]) for r, f in (("reap50", "freq50"), ("reap25", "freq25"))
             if r in label_of and f in label_of]
    paths = write_ablation(dirs, a.work / "report", pairs=pairs, settings=Settings(seed=0))
    import pandas as pd

    long = pd.read_csv(paths["paired_csv"])
    floors = {fam: __import__(mod, fromlist=["measure"]).measure() for fam, (mod, _) in FLOORS.items()}
    from mxq import load_tokenizer

    tok = load_tokenizer("tiny")
    from mxq.data.corpus import DOMAINS

    uni = {d: unigram_ppl(d, tok) for d in DOMAINS}
    uni_t = {d: unigram_target_ppl(d, tok) for d in DOMAINS}
    uni_w = {d: unigram_word_ppl(d, tok) for d in DOMAINS}
    p50 = label_of.get("reap50")
    pool = {f"{fam}.{m}": pooled(a.work, "baseline", "reap50", fam, m) for fam, m in ROWS if fam != "tiny_ppl"} \
        if p50 else {}
    from mxq.data.build_evals import DEFAULT_SUITE
    runs = {}
    for r in load_runs(dirs):
        acc = r["metrics"].get("accuracy") or {}
        le, kl = acc.get("lm_eval") or {}, acc.get("kl_vs_baseline") or {}
        runs[r["label"]] = {
            "folder": r["dir"].name,
            "ppl_mean": [acc["perplexity"]["mean"], *(acc.get("perplexity_ci", {}).get("mean") or [None, None])],
            "kl_mean": [kl.get("mean"), *(kl.get("mean_ci") or [None, None])],
            "top1_agreement": [kl.get("top1_agreement"), *(kl.get("top1_agreement_ci") or [None, None])],
            "tasks": {t: {m: [v, *((le.get("ci") or {}).get(t, {}).get(m) or [None, None])]
                          for m, v in ms.items() if isinstance(v, (int, float))}
                      for t, ms in (le.get("tasks") or {}).items()}}
    env = environment()             # git and /proc are read once, not once per key
    out = {"date": env["date"], "runs": runs,
           "env": {k: env.get(k) for k in ("cpu", "cpu_count", "torch", "git_revision")},
           "command": "python bench/eval_suite.py " + " ".join(sys.argv[1:]), "wall_s": walls,
           "load_avg": os.getloadavg(), "floors": floors, "unigram_token_ppl": uni, "unigram_target_ppl": uni_t, "unigram_word_ppl": uni_w,
           "pooled": pool, "default_suite": list(DEFAULT_SUITE),
           "paired": json.loads(long.to_json(orient="records"))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(render(out))
    print(json.dumps({k: out[k] for k in ("date", "wall_s", "load_avg")}, indent=1))
    print(f"report: {paths['md']}\nresults: {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
