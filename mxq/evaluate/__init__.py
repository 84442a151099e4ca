"""Evaluation of (compressed) GPT-OSS models: memory, speed, accuracy, per-run reports and ablations.

    metrics = evaluate(model, tokenizer, eval_cfg, run_dir, baseline_source="tiny")
    write_run_outputs(run_dir, {**metrics, "recipe": {...}})   # metrics.json, metrics.csv, report.md

Speed follows Yadav & Patel, "GPT-OSS-20B: A Comprehensive Deployment-Centric Analysis" (arXiv 2508.16700);
see docs/evaluation.md for every definition, preset key and file.
"""
from .pipeline import DEFAULTS, evaluate, resolve_cfg, write_run_outputs

__all__ = ["DEFAULTS", "evaluate", "resolve_cfg", "write_run_outputs"]
