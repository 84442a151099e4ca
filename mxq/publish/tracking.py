"""Experiment tracking of a finished run (``tracking=mlflow``, ``tracking=wandb``): the run folder's files sent on.

What is logged is read from the run folder, so it is exactly what the folder holds:

* parameters: ``resolved_config.yaml`` flattened to dotted keys (``recipe.prune.fraction``),
* metrics: every number of ``metrics.json`` flattened the same way (strings, lists and nulls are not metrics;
  ``env`` and the evaluation's own settings are parameters, not measurements),
* artifacts: ``report.md``, ``report.html``, the plots, ``plan.json``, ``metrics.json``, ``run_meta.json``,
  ``resolved_config.yaml`` and the model card ``model/README.md`` (never the weights).

A Hydra multirun is one parent run named after the sweep folder with one child run per job (MLflow's
``mlflow.parentRunId`` tag, as ``mlflow.start_run(nested=True)`` sets it); jobs find their parent by the tag
``mxq.sweep_dir``; W&B groups a sweep's jobs by the sweep folder's name. Backends are a registry (``TRACKERS``); ``tracking=none`` logs nothing.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ARTIFACT_GLOBS = ("report.md", "report.html", "*.png", "plan.json", "metrics.json", "run_meta.json",
                  "resolved_config.yaml", "router_stats.md", "generation.txt")
CARD = "model/README.md"
NOT_METRICS = ("env.", "eval.config.", "recipe.", "model.", "schema_version", "precision.", "timings_s.")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif prefix:
        out[prefix[:-1]] = d
    return out


def run_params(run_dir: Path) -> dict[str, str]:
    cfg = yaml.safe_load((run_dir / "resolved_config.yaml").read_text()) or {}
    return {k: "null" if v is None else str(v) for k, v in flatten(cfg).items()}


def run_metrics(run_dir: Path) -> dict[str, float]:
    """The numbers of metrics.json (finite ints and floats, booleans excluded), plus the timings of each stage."""
    m = json.loads((run_dir / "metrics.json").read_text())
    out = {}
    for k, v in flatten(m).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if k.startswith("timings_s.") or not k.startswith(NOT_METRICS):
            out[k] = float(v)
    return out


def run_artifacts(run_dir: Path) -> list[Path]:
    found = sorted({p for g in ARTIFACT_GLOBS for p in run_dir.glob(g) if p.is_file()})
    return found + ([run_dir / CARD] if (run_dir / CARD).is_file() else [])


def _mlflow_key(k: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . space / :``; anything else (e.g. ``@`` in greedy@32) becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in k)


def log_mlflow(run_dir: Path, opts: dict, sweep_dir: Path | None) -> str:
    """Log ``run_dir`` to MLflow; returns the MLflow run id."""
    try:
        import mlflow  # noqa: F401  (the error below names the extra)
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ImportError("tracking=mlflow needs MLflow: pip install 'mxq[mlflow]'") from e
    uri = str(opts.get("uri") or "./mlruns")
    if "://" not in uri:            # a local folder: MLflow's file store (kept in maintenance mode by MLflow 3.x)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = Path(uri).resolve().as_uri()
    client = MlflowClient(uri)
    name = str(opts.get("experiment") or "mxq")
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    tags = {"mxq.run_dir": str(run_dir.resolve())}
    if sweep_dir is not None:
        sweep = str(Path(sweep_dir).resolve())
        parents = client.search_runs([exp_id], filter_string=f"tags.`mxq.sweep_dir` = '{sweep}' "
                                     "and tags.`mxq.role` = 'sweep'", max_results=1)
        parent = parents[0].info.run_id if parents else client.create_run(
            exp_id, run_name=Path(sweep).name, tags={"mxq.sweep_dir": sweep, "mxq.role": "sweep"}).info.run_id
        tags |= {"mlflow.parentRunId": parent, "mxq.sweep_dir": sweep}
    params = run_params(run_dir)
    run = client.create_run(exp_id, run_name=str(opts.get("run_name") or run_dir.name), tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    ts = int(os.path.getmtime(run_dir / "metrics.json") * 1000)
    plist = [Param(_mlflow_key(k), v[:6000]) for k, v in params.items()]
    mlist = [Metric(_mlflow_key(k), v, ts, 0) for k, v in run_metrics(run_dir).items()]
    for i in range(0, len(plist), 100):              # MLflow's per-request limit: 100 params
        client.log_batch(rid, params=plist[i:i + 100])
    for i in range(0, len(mlist), 1000):             # and 1000 metrics
        client.log_batch(rid, metrics=mlist[i:i + 1000])
    if opts.get("artifacts", True):
        for p in run_artifacts(run_dir):
            rel = p.relative_to(run_dir).parent
            client.log_artifact(rid, str(p), None if str(rel) == "." else str(rel))
    client.set_terminated(rid)
    if "mlflow.parentRunId" in tags:      # the sweep's run ends (again) with each job, so it never stays RUNNING
        client.set_terminated(tags["mlflow.parentRunId"])
    return rid


def log_wandb(run_dir: Path, opts: dict, sweep_dir: Path | None) -> str:
    """Log ``run_dir`` to Weights & Biases (offline unless ``tracking.mode=online``); returns the W&B run id.

    The resolved config is the run's config (nested, as W&B shows it), the metrics one ``log`` step plus the
    summary, the files one artifact of type ``mxq-run``; a sweep's jobs share the W&B ``group`` named after the
    sweep folder (W&B's grouping of runs).
    """
    try:
        import wandb
    except ImportError as e:
        raise ImportError("tracking=wandb needs wandb: pip install 'mxq[wandb]'") from e
    cfg = yaml.safe_load((run_dir / "resolved_config.yaml").read_text()) or {}
    metrics = run_metrics(run_dir)
    run = wandb.init(project=str(opts.get("project") or "mxq"), entity=opts.get("entity"),
                     dir=str(Path(opts.get("dir") or ".").resolve()), mode=str(opts.get("mode") or "offline"),
                     name=str(opts.get("run_name") or run_dir.name), config=cfg,
                     group=Path(sweep_dir).resolve().name if sweep_dir is not None else None,
                     tags=["mxq"], notes=str(run_dir.resolve()), reinit="create_new",
                     settings=wandb.Settings(silent=True, console="off", save_code=False))
    try:
        run.log(metrics, step=0)
        run.summary.update(metrics)
        if opts.get("artifacts", True):
            name = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"mxq-{run_dir.name}")
            art = wandb.Artifact(name, type="mxq-run", description=f"mxq run folder {run_dir.resolve()}")
            for p in run_artifacts(run_dir):
                art.add_file(str(p), name=p.relative_to(run_dir).as_posix())
            run.log_artifact(art)
    finally:
        run.finish()
    return run.id


TRACKERS: dict[str, Callable[[Path, dict, Path | None], str]] = {"mlflow": log_mlflow, "wandb": log_wandb}


def track(cfg: Any, run_dir: str | Path, sweep_dir: str | Path | None = None) -> str | None:
    """Log a finished run folder with the backend ``cfg.tracking.backend`` (``none``: nothing); its run id."""
    from omegaconf import OmegaConf

    t = cfg.get("tracking") if hasattr(cfg, "get") else None
    opts = OmegaConf.to_container(t, resolve=True) if t is not None and not isinstance(t, dict) else dict(t or {})
    backend = opts.get("backend", "none")
    if backend in (None, "none"):
        return None
    if backend not in TRACKERS:
        raise ValueError(f"tracking.backend={backend!r}: unknown (choose none or {', '.join(sorted(TRACKERS))})")
    return TRACKERS[backend](Path(run_dir), opts, Path(sweep_dir) if sweep_dir is not None else None)


def hydra_sweep_dir() -> Path | None:
    """The multirun's sweep folder when running as a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
