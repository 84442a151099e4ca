"""Run labels of an ablation and aggregation over calibration seeds.

A sweep such as ``recipe=prune_50pct recipe.prune.criterion=reap,frequency calib.seed=0,1,2`` gives six runs
with one recipe name. Labels keep the recipe name and add only what differs between runs of that name:
the differing recipe values, then ``s<calib.seed>`` (e.g. ``prune_50pct/frequency/s1``); the full settings
stay in each run's ``resolved_config.yaml``. Runs whose labels differ only by the seed form a seed group;
the report gives each group's mean and spread over seeds (the calibration sample is a source of variance
that a single-seed ablation hides: which experts REAP keeps depends on the calibration tokens).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .intervals import spread

SEED_SUFFIX = re.compile(r"/s(-?\d+)$")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved Hydra config (``resolved_config.yaml`` written by ``mxq.run``), or {} if absent."""
    path = Path(run_dir) / "resolved_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None


def calib_seed(run: dict[str, Any]) -> int | None:
    seed = (run.get("config") or {}).get("calib", {}) or {}
    return seed.get("seed") if isinstance(seed, dict) else None


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True, default=str)}


def labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Short unique labels (module docstring); the run folder name is the last resort."""
    out = [str(r["recipe"]) for r in runs]
    by_name: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        by_name.setdefault(str(r["recipe"]), []).append(i)
    for name, idx in by_name.items():
        if len(idx) == 1:
            continue
        leaves = [_leaves(runs[i]["metrics"].get("recipe") or {}) for i in idx]
        keys = sorted({k for lv in leaves for k in lv})
        differ = [k for k in keys if len({lv.get(k) for lv in leaves}) > 1]
        seeds = [calib_seed(runs[i]) for i in idx]
        for i, lv in zip(idx, leaves):
            parts = [json.loads(lv[k]) if k in lv else "-" for k in differ]
            out[i] = "/".join([name, *map(str, parts)])
            if len(set(seeds)) > 1:
                out[i] += f"/s{calib_seed(runs[i])}"
    dup = {lab for lab in out if out.count(lab) > 1}     # still ambiguous (the same recipe run twice): folder
    return [f"{lab} [{r['dir'].name}]" if lab in dup else lab for lab, r in zip(out, runs)]


def group_of(label: str) -> str:
    return SEED_SUFFIX.sub("", label)


def seed_frame(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and spread over calibration seeds of ``metrics`` (columns of ``df``), one row per seed group of
    two or more runs; columns ``<metric>_mean``, ``<metric>_std``, ``<metric>_min``, ``<metric>_max``."""
    if df.empty or "label" not in df:
        return pd.DataFrame()
    grp = df["label"].map(group_of)
    rows = []
    for g, sub in df.groupby(grp, sort=False):
        seeds = [SEED_SUFFIX.search(lab) for lab in sub["label"]]
        if len(sub) < 2 or not all(seeds):
            continue
        row: dict[str, Any] = {"group": g, "seeds": ",".join(m.group(1) for m in seeds), "n": len(sub)}
        for m in metrics:
            if m not in sub:
                continue
            sp = spread(pd.to_numeric(sub[m], errors="coerce").tolist())
            row.update({f"{m}_mean": sp["mean"], f"{m}_std": sp["std"], f"{m}_min": sp["min"],
                        f"{m}_max": sp["max"]})
        rows.append(row)
    return pd.DataFrame(rows)
