"""Load mxq's local lm-eval tasks (``evals/``) from any working directory.

Why this exists: the task YAMLs name their data as ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: austen.jsonl}}``, relative to the YAML, because absolute paths
cannot be committed. lm-eval 0.4.x passes ``data_files`` straight to ``datasets.load_dataset``, which
resolves relative paths against the *current directory*. ``task_manager()`` returns a TaskManager whose
task factory rewrites relative ``data_files`` to absolute paths beside the YAML they came from.

    tm = task_manager()
    lm_eval.simple_evaluate(model=lm, tasks=["tiny_all"], task_manager=tm)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

EVALS_DIR = Path(__file__).resolve().parents[2] / "evals"
GROUPS = ("tiny_ppl", "tiny_cloze", "tiny_wordchoice", "tiny_nextsent", "tiny_all")


def _absolute(files: Any, base: Path) -> Any:
    """``data_files`` (str, list or {split: str|list}) with every relative path made absolute."""
    if isinstance(files, str):
        return files if "://" in files or Path(files).is_absolute() else str(base / files)
    if isinstance(files, (list, tuple)):
        return [_absolute(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    return files


def resolve_data_files(cfg: dict[str, Any], yaml_dir: Path) -> dict[str, Any]:
    """Rewrite ``cfg['dataset_kwargs']['data_files']`` in place relative to ``yaml_dir``; returns cfg."""
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], yaml_dir)
    return cfg


def task_manager(include_path: str | Path | None = None, include_defaults: bool = False, **kwargs: Any):
    """An ``lm_eval.tasks.TaskManager`` that sees ``evals/`` and resolves data paths beside each YAML.

    ``include_defaults=False`` skips indexing lm-eval's ~14k built-in YAMLs (seconds saved per call);
    pass True to mix the tiny tasks with lm-eval's own.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    class _LocalDataFactory(TaskFactory):
        def _load_full_config(self, entry, overrides=None):  # noqa: ANN001, ANN202 (lm-eval's signature)
            cfg = super()._load_full_config(entry, overrides)
            if entry.yaml_path is not None:
                resolve_data_files(cfg, Path(entry.yaml_path).resolve().parent)
            return cfg

    path = Path(include_path) if include_path is not None else EVALS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"no evaluation task folder at {path}; run `python -m mxq.data.build_evals`")
    tm = TaskManager(include_path=str(path), include_defaults=include_defaults, **kwargs)
    if not isinstance(getattr(tm, "_factory", None), TaskFactory):
        raise RuntimeError("this lm-eval version has no TaskManager._factory "
                           "(mxq.data.evals is tested with lm-eval 0.4.13)")
    tm._factory = _LocalDataFactory(meta=kwargs.get("metadata"))
    return tm
