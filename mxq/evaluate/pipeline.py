"""``evaluate(model, tokenizer, eval_cfg, run_dir, baseline_source)`` and ``write_run_outputs(run_dir, metrics)``.

Order matters: memory (exact bytes, then the peak probe) and speed run first, on a model no other
evaluation has touched, and before a baseline copy is loaded for KL (which would inflate the peak);
accuracy runs last. Every section says which precision and code path ran (transformers would
silently run bf16 where its MXFP4 kernels are missing; mxq states what ran).
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .. import jsonout
from ..atomic import write_atomic
from .metrics import SCHEMA_VERSION, missing_keys, precision

# Defaults of every key (the CPU ``quick`` preset's spirit); a preset only states what differs.
DEFAULTS: dict[str, Any] = {
    "enabled": True, "name": "custom", "progress": True, "cache_dir": None, "threads": None,
    "memory": {"enabled": True, "measure_peak": True, "context": 128, "new_tokens": 16, "batch": 1, "seed": 0},
    "speed": {"enabled": True, "contexts": [32], "new_tokens": 8, "repeats": 3, "warmup": 1, "batch_size": 1,
              "modes": ["greedy"], "temperature": 1.0, "top_p": 1.0, "seed": 0, "headline_context": None,
              "runtime": "auto"},
    "perplexity": {"enabled": True, "domains": "all", "max_tokens": 512, "max_length": 256, "stride": 128,
                   "batch_size": 4},
    "kl": {"enabled": True, "cache_dtype": "float16", "max_cache_bytes": 256 << 20},
    "lm_eval": {"enabled": False, "tasks": [], "limit": None, "num_fewshot": None, "batch_size": 8,
                "max_length": None, "chat_format": False, "max_gen_toks": 256, "include_path": None,
                "include_defaults": "auto", "bootstrap_iters": 0, "seed": 0},
    "report": {"plots": True, "print_summary": True},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_cfg(eval_cfg: Any) -> dict[str, Any]:
    """A plain dict of every key: ``eval_cfg`` (dict or OmegaConf) merged over ``DEFAULTS``."""
    if eval_cfg is not None and not isinstance(eval_cfg, dict):
        from omegaconf import OmegaConf

        eval_cfg = OmegaConf.to_container(eval_cfg, resolve=True)
    return _merge(DEFAULTS, eval_cfg or {})


def _cache_dir(cfg: dict[str, Any]) -> Path:
    d = cfg.get("cache_dir") or os.environ.get("MXQ_CACHE") or Path.home() / ".cache" / "mxq"
    return Path(d).expanduser()


def evaluate(model, tokenizer, eval_cfg: Any, run_dir: str | Path, baseline_source: str | None = None) -> dict:
    """Memory, speed and accuracy of ``model`` -> ``{"memory", "speed", "accuracy", "precision", "eval"}``.

    ``baseline_source`` is the uncompressed checkpoint (the recipe's source) for KL / top-1 agreement;
    None skips KL. Writes auxiliary files (per-token KL, raw lm-eval results) into ``run_dir``.
    """
    cfg = resolve_cfg(eval_cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    if cfg.get("threads"):          # CPU threads for the evaluation only; restored afterwards
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _evaluate(model, tokenizer, cfg, run_dir, baseline_source)
    finally:
        torch.set_num_threads(prev_threads)


def _evaluate(model, tokenizer, cfg: dict[str, Any], run_dir: Path, baseline_source: str | None) -> dict:
    prog = bool(cfg["progress"])
    model.eval()
    out: dict[str, Any] = {"precision": precision(model), "eval": {"preset": cfg["name"], "config": cfg}}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from .memory import memory_report

    mem_cfg = dict(cfg["memory"])
    if not mem_cfg["enabled"]:
        mem_cfg["measure_peak"] = False               # exact bytes are free; only the probe is skipped
    out["memory"] = memory_report(model, mem_cfg)
    timings["memory"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg["speed"]["enabled"]:
        from .speed import speed_report

        out["speed"] = speed_report(model, cfg["speed"], prog)
    else:
        out["speed"] = {"decode_tokens_per_s": None, "precision": out["precision"], "skipped": True}
    timings["speed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from .accuracy import accuracy_report

    out["accuracy"] = accuracy_report(model, tokenizer, cfg, baseline_source, _cache_dir(cfg), run_dir, prog)
    out["accuracy"]["precision"] = out["precision"]
    timings["accuracy"] = time.perf_counter() - t0
    out["eval"]["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _environment() -> dict[str, Any]:
    from ..runmeta import environment

    env = environment()
    try:
        import lm_eval

        env["lm_eval"] = lm_eval.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def write_run_outputs(run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge ``metrics`` into ``run_dir/metrics.json`` and write metrics.csv, report.md (+ PNGs).

    ``mxq.run`` fills ``model``, ``recipe``, ``plan``, ``env``; keys it does not give are kept from an
    existing metrics.json or set to None (``env`` is measured here if absent). Prints a summary table.
    """
    from .report import print_summary, write_csv, write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.json"
    merged: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(metrics)       # section by section: a section given now replaces the stored one whole
    for key in ("model", "recipe", "plan"):
        merged.setdefault(key, None)
    if not merged.get("env"):
        merged["env"] = _environment()
    merged.setdefault("memory", {"weight_bytes": None})
    merged.setdefault("speed", {"decode_tokens_per_s": None})
    merged.setdefault("accuracy", {"perplexity": None, "kl_vs_baseline": None})
    merged["schema_version"] = SCHEMA_VERSION
    missing = missing_keys(merged)
    if missing:
        raise ValueError(f"metrics for {run_dir} lack required keys {missing}")
    write_atomic(path, jsonout.dumps(merged, indent=2, default=str) + "\n")
    write_csv(run_dir, merged)
    cfg = (merged.get("eval") or {}).get("config") or DEFAULTS
    write_report(run_dir, merged, plots=bool(cfg.get("report", {}).get("plots", True)))
    if cfg.get("report", {}).get("print_summary", True):
        print_summary(merged, run_dir)
    return merged
