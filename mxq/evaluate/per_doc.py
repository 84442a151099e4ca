"""Per-unit evaluation values of one run (``per_doc.json`` in the run folder) and the intervals built on them.

metrics.json holds one number per metric; ``per_doc.json`` holds what that number is a ratio of, per
evaluation unit, so that intervals can be recomputed and two runs compared *paired* on the same units
(``mxq.evaluate.paired``). Units:

* held-out perplexity / KL / top-1 agreement: blocks of ``block_tokens`` consecutive scored tokens of one
  domain (the scored tokens of a sliding-window pass, in order). Blocks, not tokens: the losses of
  neighbouring tokens are correlated, and a block bootstrap keeps that correlation inside the unit
  (Kuensch, "The jackknife and the bootstrap for general stationary observations", Ann. Stat. 1989).
  Default 32 tokens: the quick preset's 256 tokens per domain give 8 blocks per domain.
* lm-eval tasks: one unit per document (item), with lm-eval's own per-sample values (``log_samples``).

Layout (JSON, a few tens of KB):

    {"version": 1,
     "heldout": {"block_tokens": 32, "ids": ["austen:0", ...], "domain": [...], "tokens": [...],
                 "nll": [...], "kl": [...] | null, "top1": [...] | null},
     "lm_eval": {"<task>": {"doc_id": [...], "metrics": {"acc": {"transform", "num", "den"}, ...}}}}
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_atomic
from .intervals import Settings, Units, interval

FILENAME = "per_doc.json"
VERSION = 1
BLOCK_TOKENS = 32

# held-out metric -> (field of "heldout" holding the numerator, transform); the denominator is "tokens"
HELDOUT_METRICS: dict[str, tuple[str, str]] = {
    "perplexity": ("nll", "exp"),
    "kl_mean": ("kl", "identity"),
    "top1_agreement": ("top1", "identity"),
}

# lm-eval aggregation name -> how one sample's value becomes (num, den, transform).
# lm-eval 0.4 (api/metrics.py): mean of values; perplexity = exp(-mean loglik); weighted_perplexity =
# exp(-sum loglik / sum weight); bits_per_byte = -sum loglik / sum bytes / ln 2.
LMEVAL_AGGREGATIONS: dict[str, tuple[str, str]] = {
    "mean": ("value", "identity"),
    "perplexity": ("neg_loglik", "exp"),
    "weighted_perplexity": ("neg_weighted", "exp"),
    "bits_per_byte": ("neg_weighted", "bits"),
}


def heldout_units(domains: Sequence[str], dom: torch.Tensor, pos: torch.Tensor, nll: torch.Tensor,
                  kl: torch.Tensor | None = None, agree: torch.Tensor | None = None,
                  block_tokens: int = BLOCK_TOKENS) -> dict[str, Any]:
    """Sum per-token values [N] into blocks of ``block_tokens`` scored tokens per domain (JSON-ready).

    ``dom`` [N] domain index and ``pos`` [N] target position inside the domain's token sequence of every
    scored token; a block is ``(domain, (pos - 1) // block_tokens)``, so blocks do not depend on batching
    or window size.
    """
    if block_tokens < 1:
        raise ValueError(f"perplexity.block_tokens must be >= 1, got {block_tokens}")
    blk = (pos.long() - 1).clamp_min(0) // block_tokens                                   # [N]
    key = dom.long() * (int(blk.max()) + 1 if blk.numel() else 1) + blk
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)                      # [U], [N]

    def sums(v: torch.Tensor) -> list[float]:
        return torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, v.double().cpu()).tolist()

    n_blk = int(blk.max()) + 1 if blk.numel() else 1
    out: dict[str, Any] = {
        "block_tokens": block_tokens,
        "ids": [f"{domains[int(k) // n_blk]}:{int(k) % n_blk}" for k in uniq],
        "domain": [domains[int(k) // n_blk] for k in uniq],
        "tokens": torch.bincount(inv, minlength=len(uniq)).tolist(),
        "nll": sums(nll), "kl": sums(kl) if kl is not None else None,
        "top1": sums(agree.double()) if agree is not None else None,
    }
    return out


def heldout_metric(h: dict[str, Any], metric: str, domain: str | None = None) -> Units | None:
    """``Units`` of one held-out metric (``HELDOUT_METRICS``), all domains or one; None if not recorded."""
    field_, transform = HELDOUT_METRICS[metric]
    if h.get(field_) is None:
        return None
    keep = [i for i, d in enumerate(h["domain"]) if domain is None or d == domain]
    return Units(np.asarray(h[field_])[keep], np.asarray(h["tokens"])[keep], transform,
                 tuple(h["ids"][i] for i in keep))


def _ci(u: Units | None, s: Settings) -> list[float] | None:
    ci = interval(u, s) if u is not None else None
    return None if ci is None else [ci[0], ci[1]]


def heldout_intervals(h: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Intervals of perplexity (per domain and ``mean``), KL mean and top-1 agreement (all and per domain)."""
    domains = list(dict.fromkeys(h["domain"]))
    out: dict[str, Any] = {"perplexity": {d: _ci(heldout_metric(h, "perplexity", d), s) for d in domains}}
    out["perplexity"]["mean"] = _ci(heldout_metric(h, "perplexity"), s)
    for m in ("kl_mean", "top1_agreement"):
        if h.get(HELDOUT_METRICS[m][0]) is not None:
            out[m] = {"all": _ci(heldout_metric(h, m), s), **{d: _ci(heldout_metric(h, m, d), s) for d in domains}}
    out["units"] = {"kind": f"blocks of {h['block_tokens']} consecutive scored tokens of one domain",
                    "count": len(h["ids"])}
    return out


# ------------------------------------------------------------------------------------------------ lm-eval
def aggregation_name(task_config: dict[str, Any] | None, metric: str) -> str:
    """lm-eval's aggregation of ``metric`` in a task, by name: the task config's ``metric_list`` entry when it
    names one, else lm-eval's registered default for the metric, else ``mean`` (what lm-eval itself falls
    back to)."""
    import lm_eval.api.metrics  # noqa: F401  (registers lm-eval's metrics and aggregations)
    from lm_eval.api.registry import AGGREGATION_REGISTRY, METRIC_AGGREGATION_REGISTRY

    for entry in (task_config or {}).get("metric_list") or []:
        if entry.get("metric") == metric and isinstance(entry.get("aggregation"), str):
            return entry["aggregation"]
    fn = METRIC_AGGREGATION_REGISTRY.get(metric, None)
    return next((k for k, v in AGGREGATION_REGISTRY.items() if v is fn), "mean") if fn else "mean"


def _sample_values(values: list[Any], how: str) -> tuple[list[float], list[float]]:
    if how == "value":
        return [float(v) for v in values], [1.0] * len(values)
    if how == "neg_loglik":
        return [-float(v) for v in values], [1.0] * len(values)
    return [-float(v[0]) for v in values], [float(v[1]) for v in values]      # (loglik, weight) pairs


def lmeval_units(samples: dict[str, list[dict[str, Any]]], configs: dict[str, Any],
                 metrics: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Per-document (num, den) of every metric of every task, from lm-eval's ``log_samples`` output.

    ``configs`` maps task name -> lm-eval's task config (``results["configs"]``, for each metric's
    aggregation); ``metrics`` maps task name -> the metric names reported for it. Documents sorted by id.
    """
    out: dict[str, Any] = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        entry: dict[str, Any] = {"doc_id": [int(r["doc_id"]) for r in rows], "metrics": {}}
        for m in metrics.get(task, ()):
            if not rows or m not in rows[0]:
                continue
            agg = aggregation_name(configs.get(task), m)
            if agg not in LMEVAL_AGGREGATIONS:
                continue                               # an aggregation without a ratio form: no interval
            how, transform = LMEVAL_AGGREGATIONS[agg]
            num, den = _sample_values([r[m] for r in rows], how)
            entry["metrics"][m] = {"aggregation": agg, **Units(np.asarray(num), np.asarray(den), transform).to_json()}
        out[task] = entry
    return out


def lmeval_metric(t: dict[str, Any], metric: str) -> Units | None:
    d = t["metrics"].get(metric)
    return None if d is None else Units.from_json(d, [str(i) for i in t["doc_id"]])


def lmeval_intervals(per_task: dict[str, Any], s: Settings) -> dict[str, dict[str, list[float] | None]]:
    return {task: {m: _ci(lmeval_metric(t, m), s) for m in t["metrics"]} for task, t in per_task.items()}


# --------------------------------------------------------------------------------------------------- file
def write(run_dir: Path, data: dict[str, Any]) -> Path:
    path = Path(run_dir) / FILENAME
    write_atomic(path, json.dumps({"version": VERSION, **data}, allow_nan=True) + "\n")
    return path


def load(run_dir: Path) -> dict[str, Any] | None:
    """The run's per-unit values, or None when the run has none (older runs, evaluation disabled)."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if d.get("version") != VERSION:
        raise ValueError(f"{path}: version {d.get('version')!r}, this mxq reads version {VERSION}")
    return d
