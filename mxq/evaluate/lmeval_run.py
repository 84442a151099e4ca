"""Running lm-eval tasks on an in-memory mxq model (``accuracy.lm_eval`` of metrics.json).

Local ``tiny_*`` tasks come from ``evals/`` through ``mxq.data.evals.task_manager`` (include_path); any other
task name is looked up in lm-eval's own index, e.g. for real checkpoints. Results are kept per task.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ..console import lm_eval_quiet
from .lmeval_adapter import MxqLM


def _clean(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """Indexing the task folders takes seconds; a sweep or a test session builds it once per process."""
    from ..data.evals import task_manager

    return task_manager(include_path, include_defaults=include_defaults)


def run_lm_eval(model, tokenizer, cfg: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory mxq model; results per task (never only an average).

    Task names starting with ``tiny_`` come from mxq's ``evals/`` folder (``include_path``); any other name
    is looked up in lm-eval's own task index too (``include_defaults: auto``), e.g. for real checkpoints.
    """
    import lm_eval

    tasks = list(cfg.get("tasks") or [])
    if not tasks:
        return {"tasks": {}, "groups": {}, "config": {"tasks": []}}
    inc = cfg.get("include_defaults", "auto")
    inc = any(not t.startswith("tiny_") for t in tasks) if inc == "auto" else bool(inc)
    tm = _task_manager(cfg.get("include_path"), inc)
    lm = MxqLM(model, tokenizer, batch_size=cfg.get("batch_size", 8), max_length=cfg.get("max_length"),
               chat_format=cfg.get("chat_format", False), max_gen_toks=cfg.get("max_gen_toks", 256),
               rolling_stride=cfg.get("rolling_stride"))
    seed = int(cfg.get("seed", 0))
    with lm_eval_quiet():
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=cfg.get("limit"),
                                      num_fewshot=cfg.get("num_fewshot"),
                                      bootstrap_iters=int(cfg.get("bootstrap_iters", 0)),
                                      log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed,
                                      apply_chat_template=bool(cfg.get("apply_chat_template", False)))
    group_names = set((res.get("groups") or {}).keys())
    per_task: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for name, metrics in (res.get("results") or {}).items():
        clean = {k.removesuffix(",none"): _clean(v) for k, v in metrics.items()
                 if k not in ("alias", "name", "sample_len", "sample_count") and "_stderr" not in k
                 and not (isinstance(v, str) and v in ("N/A", " "))}
        (groups if name in group_names else per_task)[name] = clean
        se = {k.split("_stderr")[0]: float(v) for k, v in metrics.items()      # lm-eval's own standard errors
              if "_stderr" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if se:
            stderr[name] = se
    n = {k: (v.get("effective") if isinstance(v, dict) else v) for k, v in (res.get("n-samples") or {}).items()}
    from .per_doc import lmeval_units

    samples = {t: [{k: v for k, v in r.items() if k == "doc_id" or k in per_task.get(t, {})} for r in rows]
               for t, rows in (res.pop("samples", None) or {}).items() if t in per_task}
    out = {"tasks": per_task, "groups": groups, "n_samples": n, "stderr": stderr,
           "_per_doc": lmeval_units(samples, res.get("configs") or {}, {t: list(m) for t, m in per_task.items()}),
           "config": {"tasks": tasks, "limit": cfg.get("limit"), "num_fewshot": cfg.get("num_fewshot"),
                      "chat_format": lm.chat_format, "max_length": lm.max_length,
                      "versions": {k: _clean(v) for k, v in (res.get("versions") or {}).items()},
                      "lm_eval": lm_eval.__version__}}
    if run_dir is not None:
        from .. import jsonout
        from ..atomic import write_atomic

        write_atomic(Path(run_dir, "lm_eval_results.json"), jsonout.dumps(       # lm-eval reports NaN stderrs
            {k: res.get(k) for k in ("results", "groups", "n-samples", "versions", "higher_is_better")},
            indent=2, default=str) + "\n")
    return out

