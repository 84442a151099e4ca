"""Ablation reports over many runs: ``python -m mxq.report DIR...`` (CLI in ``mxq/report.py``).

Reads every metrics.json below the given folders (single runs or a Hydra multirun folder), one row per
run labelled by its recipe name (plus what differs, ``mxq.evaluate.seeds``), deltas against the run whose
recipe is named ``baseline``, paired differences with intervals and p-values on the same documents
(``mxq.evaluate.paired``, from each run's per_doc.json), mean and spread over calibration seeds, a
per-domain perplexity table, a per-task lm-eval table (never only an average: one collapsed task can hide in
it) and a Pareto plot of accuracy against weight bytes. Only the runs' self-describing outputs are read
(metrics.json, per_doc.json, resolved_config.yaml), so a report can be rebuilt at any time from the files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from . import paired as P
from . import per_doc
from .intervals import Settings
from .metrics import LOGLIKELIHOOD_NOTE, get_path
from .report import fmt
from .seeds import labels, run_config, seed_frame

BASELINE = "baseline"
MiB = 1024 ** 2
# (column, dotted path in metrics.json); the main table in this order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("weight_bytes", "memory.weight_bytes"),
    ("bits_per_expert_weight", "memory.bits_per_expert_weight"),
    ("experts", "memory.params.experts"),
    ("active_params", "memory.params.active_excl_embedding"),
    ("ppl_mean", "accuracy.perplexity.mean"),
    ("kl_mean", "accuracy.kl_vs_baseline.mean"),
    ("kl_p99", "accuracy.kl_vs_baseline.p99"),
    ("top1_agreement", "accuracy.kl_vs_baseline.top1_agreement"),
    ("decode_tok_s", "speed.decode_tokens_per_s"),
    ("speed_path", "speed.code_path"),
    ("ttft_s", "speed.ttft_s"),
    ("e2e_p95_s", "speed.e2e_p95_s"),
    ("peak_gpu_bytes", "memory.peak.peak_allocated_bytes"),
    ("host_rss_bytes", "memory.peak.host_rss_bytes_with_cache"),
)
DELTAS = ("weight_bytes", "ppl_mean", "kl_mean", "top1_agreement", "decode_tok_s", "ttft_s")
# (column prefix, dotted path of a [low, high] interval or a spread dict in metrics.json): a run's own uncertainty
INTERVALS: tuple[tuple[str, str], ...] = (
    ("ppl_mean", "accuracy.perplexity_ci.mean"),
    ("kl_mean", "accuracy.kl_vs_baseline.mean_ci"),
    ("top1_agreement", "accuracy.kl_vs_baseline.top1_agreement_ci"),
)
SPREADS: tuple[tuple[str, str], ...] = (("decode_tok_s", "speed.decode_tokens_per_s_spread"),)
# the paired metrics shown in ablation.md and printed (every compared metric is in the CSVs)
HEADLINE = ("ppl_mean", "kl_mean", "top1_agreement")
SEED_METRICS = ("ppl_mean", "kl_mean", "top1_agreement", "decode_tok_s")


def find_metrics(dirs: Sequence[str | Path]) -> list[Path]:
    """Every metrics.json at or below each folder (sorted, deduplicated)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if d.is_file() and d.name == "metrics.json":
            found.append(d.resolve())
        elif d.is_dir():
            found += [p.resolve() for p in sorted(d.rglob("metrics.json"))]
        else:
            raise FileNotFoundError(f"{d}: neither a folder nor a metrics.json")
    return sorted(dict.fromkeys(found))


def load_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """``[{"dir", "label", "recipe", "metrics", "config"}]``; labels from ``mxq.evaluate.seeds.labels``."""
    runs = []
    for p in find_metrics(dirs):
        try:
            m = json.loads(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        recipe = get_path(m, "recipe.name") or p.parent.name
        runs.append({"dir": p.parent, "recipe": str(recipe), "metrics": m, "config": run_config(p.parent)})
    for r, lab in zip(runs, labels(runs)):
        r["label"] = lab
    return runs


def runs_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r["metrics"]
        row: dict[str, Any] = {"label": r["label"], "recipe": r["recipe"]}
        row.update({c: get_path(m, p) for c, p in COLUMNS})
        for c, p in INTERVALS:
            ci = get_path(m, p)
            row[f"{c}_lo"], row[f"{c}_hi"] = (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)
        for c, p in SPREADS:
            sp = get_path(m, p) or {}
            row[f"{c}_min"], row[f"{c}_max"] = sp.get("min"), sp.get("max")
        for d, v in (get_path(m, "accuracy.perplexity") or {}).items():
            if d != "mean":
                row[f"ppl_{d}"] = v
        prec = m.get("precision") or get_path(m, "speed.precision") or {}
        row["path"] = prec.get("path")
        row["compute_dtype"] = prec.get("compute_dtype")
        row["expert_formats"] = json.dumps(prec.get("expert_formats"), sort_keys=True)
        row["run_dir"] = str(r["dir"])
        rows.append(row)
    df = pd.DataFrame(rows)
    return add_deltas(df) if not df.empty else df


def add_deltas(df: pd.DataFrame) -> pd.DataFrame:
    """``d_<col>`` (absolute) and ``d_<col>_pct`` columns against the first run whose recipe is "baseline"."""
    base = df[df["recipe"] == BASELINE]
    if base.empty:
        return df
    b = base.iloc[0]
    for c in DELTAS:
        if c not in df:
            continue
        col = pd.to_numeric(df[c], errors="coerce")
        bv = pd.to_numeric(pd.Series([b[c]]), errors="coerce").iloc[0]
        df[f"d_{c}"] = col - bv
        df[f"d_{c}_pct"] = 100.0 * (col - bv) / bv if bv not in (0, None) and pd.notna(bv) else None
    return df


def task_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """lm-eval results: one row per (task, metric), one column per run (+ delta vs baseline)."""
    recs: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        for task, ms in (get_path(r["metrics"], "accuracy.lm_eval.tasks") or {}).items():
            for metric, v in ms.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    recs.setdefault((task, metric), {"task": task, "metric": metric})[r["label"]] = v
    df = pd.DataFrame(list(recs.values()))
    base = [r["label"] for r in runs if r["recipe"] == BASELINE]
    if not df.empty and base and base[0] in df:
        for r in runs:
            if r["label"] != base[0] and r["label"] in df:
                df[f"d[{r['label']}]"] = df[r["label"]] - df[base[0]]
    return df.sort_values(["task", "metric"]).reset_index(drop=True) if not df.empty else df


def _md_table(df: pd.DataFrame, cols: Sequence[str]) -> str:
    cols = [c for c in cols if c in df]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df[cols].iterrows():
        lines.append("| " + " | ".join(fmt(None if (not isinstance(v, str) and pd.isna(v)) else
                                           (v.item() if hasattr(v, "item") else v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def baseline_label(runs: list[dict[str, Any]], wanted: str | None = None) -> str | None:
    """``wanted`` (must be a label), else the first run whose recipe is ``baseline``, else None."""
    labs = [r["label"] for r in runs]
    if wanted is not None:
        if wanted not in labs:
            raise ValueError(f"--baseline {wanted!r} is not a run label; labels: {', '.join(labs)}")
        return wanted
    return next((r["label"] for r in runs if r["recipe"] == BASELINE), None)


def paired_pairs(runs: list[dict[str, Any]], base: str | None,
                 extra: Sequence[tuple[str, str]] = ()) -> list[P.Pair]:
    """Every run against the baseline (other baseline runs included: a check that they agree), then ``extra``."""
    labs = [r["label"] for r in runs]
    out = [P.Pair(lab, base) for lab in labs if base is not None and lab != base]
    for a, b in extra:
        for x in (a, b):
            if x not in labs:
                raise ValueError(f"--pair {a}:{b}: {x!r} is not a run label; labels: {', '.join(labs)}")
        out.append(P.Pair(a, b))
    return out


def paired_md(long: pd.DataFrame, metrics: Sequence[str] | None = None) -> str:
    """Compact table: variant | vs | metric | value | delta | CI | p | verdict (80-column friendly)."""
    sub = long[long["skipped"].isna()]
    if metrics is not None:
        sub = sub[sub["metric"].isin(metrics)]
    rows = [[r["variant"], r["reference"], r["metric"], fmt(r["a"], 4), fmt(r["delta"], 3),
             P.interval_text(r["ci_low"], r["ci_high"]), P.p_text(r["p"]), r["verdict"]] for _, r in sub.iterrows()]
    head = ["variant", "vs", "metric", "value", "delta", "95% CI", "p", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_ablation(dirs: Sequence[str | Path], out: str | Path | None = None, baseline: str | None = None,
                   pairs: Sequence[tuple[str, str]] = (), settings: Settings | None = None) -> dict[str, Path]:
    """Write ablation.md, ablation.csv (+ ablation_tasks.csv, ablation_paired.csv, ablation_seeds.csv) and
    pareto.png into ``out`` (default: dirs[0]). ``baseline``: the reference label (default: recipe
    ``baseline``); ``pairs``: extra (variant, reference) label pairs to compare."""
    from .plots import plot_pareto

    settings = settings or Settings()
    runs = load_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no metrics.json below {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    df, tasks = runs_frame(runs), task_frame(runs)
    base = baseline_label(runs, baseline)
    units = {r["label"]: P.run_units(per_doc.load(r["dir"])) for r in runs}
    long = P.paired_frame(units, paired_pairs(runs, base, pairs), settings)
    if base is not None and not long.empty:
        wide = P.wide_columns(long, base)
        df = df.merge(wide, how="left", left_on="label", right_index=True)
    seeds = seed_frame(df, [*SEED_METRICS, *(f"{m}_delta" for m in HEADLINE)])
    df.to_csv(out / "ablation.csv", index=False)
    paths = {"md": out / "ablation.md", "csv": out / "ablation.csv", "pareto": out / "pareto.png"}
    if not tasks.empty:
        tasks.to_csv(out / "ablation_tasks.csv", index=False)
        paths["tasks_csv"] = out / "ablation_tasks.csv"
    if not long.empty:
        long.to_csv(out / "ablation_paired.csv", index=False)
        paths["paired_csv"] = out / "ablation_paired.csv"
    if not seeds.empty:
        seeds.to_csv(out / "ablation_seeds.csv", index=False)
        paths["seeds_csv"] = out / "ablation_seeds.csv"
    num = lambda c: [None if pd.isna(v) else float(v) for v in pd.to_numeric(df[c], errors="coerce")]  # noqa: E731
    plot_pareto(list(df["label"]), num("weight_bytes"), num("ppl_mean"), num("kl_mean"), out / "pareto.png")
    has_base = base is not None
    parts = [f"# Ablation over {len(runs)} runs\n",
             f"Sources: {', '.join(f'`{d}`' for d in dirs)}. Baseline: "
             f"{f'`{base}`' if has_base else 'none found (no deltas)'}.\n",
             f"> {LOGLIKELIHOOD_NOTE}\n",
             "## Summary\n", _md_table(df, ["label"] + [c for c, _ in COLUMNS]),
             "\n![pareto](pareto.png)\n"]
    if df.filter(like="_lo").notna().any().any():
        parts += ["## Intervals of each run\n",
                  f"{int(settings.confidence * 100)}% bootstrap intervals over documents / token blocks "
                  "(metrics.json `accuracy.intervals`); decode speed: min and max over the timed repeats.\n\n",
                  _md_table(df, ["label", "ppl_mean", "ppl_mean_lo", "ppl_mean_hi", "kl_mean", "kl_mean_lo",
                                 "kl_mean_hi", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max"])]
    if not long.empty:
        n_skip = int(long["skipped"].notna().sum())
        parts += ["## Paired differences\n",
                  f"delta = variant - reference on the same documents / token blocks; {int(settings.confidence * 100)}% "
                  f"paired bootstrap interval ({settings.n_resamples} resamples, seed {settings.seed}) and two-sided "
                  "p-value; `~` = the interval contains 0 (inside the noise). Held-out metrics here; every lm-eval "
                  "task metric is in ablation_paired.csv"
                  + (f" ({n_skip} comparisons skipped, reasons there)" if n_skip else "") + ".\n\n",
                  paired_md(long, HEADLINE)]
        task_rows = long[long["skipped"].isna() & long["metric"].str.contains(".", regex=False)]
        if not task_rows.empty:
            parts += ["\n### lm-eval tasks, paired\n\n", paired_md(task_rows)]
    if not seeds.empty:
        cols = ["group", "seeds"] + [f"{m}_{k}" for m in ("ppl_mean", "ppl_mean_delta", "kl_mean")
                                     for k in ("mean", "std")]
        parts += ["## Calibration seeds\n", "Mean and standard deviation over runs that differ only in "
                  "`calib.seed` (min and max in ablation_seeds.csv).\n\n", _md_table(seeds, cols)]
    if has_base:
        parts += ["## Deltas vs baseline\n",
                  _md_table(df, ["label"] + [f"d_{c}{s}" for c in DELTAS for s in ("", "_pct")])]
    domains = {d for r in runs for d in (get_path(r["metrics"], "accuracy.perplexity") or {}) if d != "mean"}
    ppl_cols = [c for c in df.columns if c.startswith("ppl_") and c[4:] in domains]
    if ppl_cols:
        parts += ["## Perplexity per domain\n", _md_table(df, ["label"] + ppl_cols + ["ppl_mean"])]
    if not tasks.empty:
        parts += ["## lm-eval per task\n", "One row per task and metric (a format can collapse "
                  "one task while the average looks fine).\n\n", _md_table(tasks, list(tasks.columns))]
    parts += ["## What ran\n", "Precision and code path as recorded by each run.\n\n",
              _md_table(df, ["label", "path", "compute_dtype", "expert_formats", "run_dir"])]
    (out / "ablation.md").write_text("\n".join(parts))
    return paths
