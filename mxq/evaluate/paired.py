"""Paired comparisons between the runs of an ablation, on the same evaluation units (``per_doc.json``).

Two compressed variants of one model scored on the same documents differ far less than their separate
intervals suggest: most of the variance is between documents (some text is hard for every variant), and it
cancels in the per-document difference. Each comparison therefore resamples units jointly for both runs
(``mxq.evaluate.intervals.paired_difference``) and reports delta = variant - reference, its interval, a
p-value, and a verdict: ``better`` / ``worse`` when the interval excludes 0, ``~`` (inside the noise)
otherwise. Runs are only paired when they saw the same units (same ids and the same token / word / byte
counts per unit); otherwise the metric is skipped with the reason.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from . import per_doc
from .intervals import Comparison, Settings, Units, paired_difference

NOISE = "~"
# metric name (last part of the key) -> higher is better; anything else (accuracies) is higher-is-better
LOWER_IS_BETTER = ("ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "kl_mean")


def higher_is_better(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return not (last in LOWER_IS_BETTER or last.startswith("ppl_"))


def run_units(pd_: dict[str, Any] | None) -> dict[str, Units]:
    """Every comparable metric of one run: ``ppl_mean``, ``ppl_<domain>``, ``kl_mean``, ``top1_agreement``
    (held-out blocks) and ``<task>.<metric>`` (lm-eval documents)."""
    out: dict[str, Units] = {}
    if not pd_:
        return out
    h = pd_.get("heldout")
    if h:
        if (u := per_doc.heldout_metric(h, "perplexity")) is not None:
            out["ppl_mean"] = u
        for d in dict.fromkeys(h["domain"]):
            out[f"ppl_{d}"] = per_doc.heldout_metric(h, "perplexity", d)
        for m in ("kl_mean", "top1_agreement"):
            if (u := per_doc.heldout_metric(h, m)) is not None:
                out[m] = u
    for task, t in (pd_.get("lm_eval") or {}).items():
        for m in t["metrics"]:
            out[f"{task}.{m}"] = per_doc.lmeval_metric(t, m)
    return out


def verdict(c: Comparison, key: str) -> str:
    if not c.significant:
        return NOISE
    return "better" if (c.delta > 0) == higher_is_better(key) else "worse"


@dataclass(frozen=True)
class Pair:
    variant: str
    reference: str


def compare(a: dict[str, Units], b: dict[str, Units], s: Settings,
            metrics: Sequence[str] | None = None) -> tuple[dict[str, Comparison], dict[str, str]]:
    """Paired comparisons of the metrics both runs have (or ``metrics``); second dict: skipped key -> why."""
    done: dict[str, Comparison] = {}
    skipped: dict[str, str] = {}
    for key in (metrics or [k for k in a if k in b]):
        if key not in a or key not in b:
            skipped[key] = "not recorded in both runs"
            continue
        try:
            done[key] = paired_difference(a[key], b[key], s)
        except ValueError as e:
            skipped[key] = str(e)
    return done, skipped


def paired_frame(units: dict[str, dict[str, Units]], pairs: Sequence[Pair], s: Settings) -> pd.DataFrame:
    """Long table, one row per (pair, metric): variant, reference, metric, a, b, delta, ci_low, ci_high, p,
    verdict (or ``skipped`` with the reason)."""
    rows = []
    for pr in pairs:
        done, skipped = compare(units.get(pr.variant, {}), units.get(pr.reference, {}), s)
        for key, c in done.items():
            rows.append({"variant": pr.variant, "reference": pr.reference, "metric": key, "a": c.a, "b": c.b,
                         "delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p, "n_units": c.n,
                         "verdict": verdict(c, key), "skipped": None})
        for key, why in skipped.items():
            rows.append({"variant": pr.variant, "reference": pr.reference, "metric": key, "verdict": None,
                         "skipped": why})
    cols = ["variant", "reference", "metric", "a", "b", "delta", "ci_low", "ci_high", "p", "n_units", "verdict",
            "skipped"]
    return pd.DataFrame(rows, columns=cols)


def wide_columns(long: pd.DataFrame, reference: str) -> pd.DataFrame:
    """``<metric>_delta``, ``<metric>_ci_low``, ``<metric>_ci_high``, ``<metric>_p`` per variant vs ``reference``
    (index: variant label), for the ablation CSV."""
    sub = long[(long["reference"] == reference) & long["skipped"].isna()]
    out: dict[str, dict[str, float]] = {}
    for _, r in sub.iterrows():
        row = out.setdefault(r["variant"], {})
        for part, col in (("delta", "delta"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("p", "p")):
            row[f"{r['metric']}_{part}"] = r[col]
    return pd.DataFrame.from_dict(out, orient="index")


def interval_text(lo: float | None, hi: float | None, digits: int = 3) -> str:
    """``[lo, hi]`` with ``digits`` significant digits; ``-`` when unknown."""
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return "-"
    return f"[{lo:.{digits}g}, {hi:.{digits}g}]"


def p_text(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
