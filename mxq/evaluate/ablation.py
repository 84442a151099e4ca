"""Ablation reports over many runs: ``python -m mxq.report DIR...`` (CLI in ``mxq/report.py``).

Reads every metrics.json below the given folders (single runs or a Hydra multirun folder), one row per run
labelled by its recipe name, deltas against the run whose recipe is named ``baseline``, a per-domain perplexity
table, a per-task lm-eval table (never only an average: one collapsed task can hide in it) and a Pareto plot of
accuracy against weight bytes. Only metrics.json files are read, so a report can be rebuilt at any time from the
files a run left.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .metrics import LOGLIKELIHOOD_NOTE, get_path
from .report import fmt

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
    """``[{"dir", "label", "recipe", "metrics"}]``; labels are recipe names, made unique with the folder name."""
    runs = []
    for p in find_metrics(dirs):
        m = json.loads(p.read_text())
        recipe = get_path(m, "recipe.name") or p.parent.name
        runs.append({"dir": p.parent, "recipe": str(recipe), "metrics": m})
    names = [r["recipe"] for r in runs]
    for r in runs:
        r["label"] = r["recipe"] if names.count(r["recipe"]) == 1 else f"{r['recipe']} [{r['dir'].name}]"
    return runs


def runs_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r["metrics"]
        row: dict[str, Any] = {"label": r["label"], "recipe": r["recipe"]}
        row.update({c: get_path(m, p) for c, p in COLUMNS})
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


def write_ablation(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write ablation.md, ablation.csv, ablation_tasks.csv and pareto.png into ``out`` (default: dirs[0])."""
    from .plots import plot_pareto

    runs = load_runs(dirs)
    if not runs:
        raise FileNotFoundError(f"no metrics.json below {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    df, tasks = runs_frame(runs), task_frame(runs)
    df.to_csv(out / "ablation.csv", index=False)
    if not tasks.empty:
        tasks.to_csv(out / "ablation_tasks.csv", index=False)
    num = lambda c: [None if pd.isna(v) else float(v) for v in pd.to_numeric(df[c], errors="coerce")]  # noqa: E731
    plot_pareto(list(df["label"]), num("weight_bytes"), num("ppl_mean"), num("kl_mean"), out / "pareto.png")
    has_base = (df["recipe"] == BASELINE).any()
    parts = [f"# Ablation over {len(runs)} runs\n",
             f"Sources: {', '.join(f'`{d}`' for d in dirs)}. Baseline: "
             f"{'recipe `baseline`' if has_base else 'none found (no deltas)'}.\n",
             f"> {LOGLIKELIHOOD_NOTE}\n",
             "## Summary\n", _md_table(df, ["label"] + [c for c, _ in COLUMNS]),
             "\n![pareto](pareto.png)\n"]
    if has_base:
        parts += ["## Deltas vs baseline\n",
                  _md_table(df, ["label"] + [f"d_{c}{s}" for c in DELTAS for s in ("", "_pct")])]
    ppl_cols = [c for c in df.columns if c.startswith("ppl_") and c != "ppl_mean"]
    if ppl_cols:
        parts += ["## Perplexity per domain\n", _md_table(df, ["label"] + ppl_cols + ["ppl_mean"])]
    if not tasks.empty:
        parts += ["## lm-eval per task\n", "One row per task and metric (a format can collapse "
                  "one task while the average looks fine).\n\n", _md_table(tasks, list(tasks.columns))]
    parts += ["## What ran\n", "Precision and code path as recorded by each run.\n\n",
              _md_table(df, ["label", "path", "compute_dtype", "expert_formats", "run_dir"])]
    (out / "ablation.md").write_text("\n".join(parts))
    paths = {"md": out / "ablation.md", "csv": out / "ablation.csv", "pareto": out / "pareto.png"}
    if not tasks.empty:
        paths["tasks_csv"] = out / "ablation_tasks.csv"
    return paths
