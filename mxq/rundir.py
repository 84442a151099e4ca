"""Run folders that are never reused by accident and never look complete when they are not.

* Names: the default ``hydra.run.dir`` ends in ``${mxq_uid:}``, six random hex digits drawn once per process,
  so two runs of one recipe started in the same second get different folders.
* Claim: ``claim(run_dir, ...)`` takes a folder for one run. It creates ``.incomplete`` exclusively
  (``O_EXCL``: of two processes given the same folder one wins, the other is refused at once) holding the
  pid, host and start time. An existing non-empty folder is refused unless ``run.overwrite=true`` (only a
  folder that is an mxq run folder: never a user's directory) or ``run.resume=true`` (only an interrupted
  run, i.e. still marked incomplete, with the same resolved configuration). Both clear the earlier outputs;
  statistics and the KL reference then come from the cache, so redoing the stages costs only what was
  never cached.
* Completion: ``complete(run_dir)`` removes the marker after the last file; a failed run keeps it with
  ``status: failed`` and the error. A folder without ``.incomplete`` holds one consistent run.

``RunDirGuard`` is the Hydra callback that claims the folder in ``on_run_start``, before Hydra writes its
``.hydra/`` files and ``run.log`` into it (recipes/run.yaml registers it).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .atomic import pid_alive, write_atomic

log = logging.getLogger("mxq.run")

MARKER = ".incomplete"
HYDRA_FILES = (".hydra", "run.log")            # what Hydra writes before the task starts
RUN_FILES = ("resolved_config.yaml", "run_meta.json", MARKER, ".hydra")   # any of these: an mxq run folder
_UID = secrets.token_hex(3)


def uid() -> str:
    """Six hex digits, fixed for this process (the ``mxq_uid`` resolver of ``hydra.run.dir``)."""
    return _UID


if not OmegaConf.has_resolver("mxq_uid"):
    OmegaConf.register_new_resolver("mxq_uid", uid, use_cache=True)


class RunDirError(FileExistsError):
    """A run folder that is in use, holds another run, or is not a run folder at all."""


def _read_marker(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: Any, host: Any) -> bool:
    if host != socket.gethostname() or not isinstance(pid, int):
        return host != socket.gethostname()       # another machine's run: assume it may be alive
    return pid_alive(pid)


def _comparable(cfg_yaml: str) -> Any:
    import yaml

    d = yaml.safe_load(cfg_yaml) or {}
    d.pop("run", None)
    return d


def _clear(run_dir: Path) -> None:
    """Delete an earlier run's outputs (run.log is kept: it is appended to, and holds the history)."""
    for p in run_dir.iterdir():
        if p.name == "run.log":
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _create_marker(run_dir: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "status": "running",
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    try:
        fd = os.open(run_dir / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        other = _read_marker(run_dir)
        raise RunDirError(f"{run_dir}: claimed by another run (pid {other.get('pid')} on {other.get('host')}) "
                          "at the same moment; choose another hydra.run.dir") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info) + "\n")


def claim(run_dir: str | Path, overwrite: bool = False, resume: bool = False, cfg_yaml: str | None = None) -> None:
    """Take ``run_dir`` for this run (see the module docstring); idempotent within one process."""
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise RunDirError("run.overwrite and run.resume are exclusive: choose one")
    marker = _read_marker(run_dir)
    if (marker.get("pid") == os.getpid() and marker.get("host") == socket.gethostname()
            and marker.get("status") == "running"):
        return                                                      # claimed earlier by this process
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    entries = [p for p in run_dir.iterdir()] if run_dir.is_dir() else []
    ours = [p for p in entries if p.name not in HYDRA_FILES]
    if ours or (entries and (overwrite or resume)):
        if marker and marker.get("status") == "running" and _alive(marker.get("pid"), marker.get("host")):
            raise RunDirError(f"{run_dir}: in use by a running mxq run (pid {marker.get('pid')} on "
                              f"{marker.get('host')}); choose another hydra.run.dir")
        if not (overwrite or resume):
            raise RunDirError(f"{run_dir}: not empty (it holds an earlier run: {sorted(p.name for p in entries)[:6]}). "
                              "Pass run.overwrite=true to replace it, run.resume=true to finish an interrupted run, "
                              "or leave hydra.run.dir at its default (a new folder per run)")
        if not any((run_dir / n).exists() for n in RUN_FILES):
            raise RunDirError(f"{run_dir}: not an mxq run folder (no resolved_config.yaml, run_meta.json or "
                              f"{MARKER}); refusing to {'overwrite' if overwrite else 'resume'} it")
        if resume:
            if not (run_dir / MARKER).exists():
                raise RunDirError(f"{run_dir}: run.resume=true, but the run there completed (no {MARKER}); "
                                  "use run.overwrite=true to redo it")
            old = run_dir / "resolved_config.yaml"
            if cfg_yaml is not None and old.is_file() and _comparable(old.read_text()) != _comparable(cfg_yaml):
                raise RunDirError(f"{run_dir}: run.resume=true, but {old} differs from this run's configuration; "
                                  "resume with the same options, or use run.overwrite=true")
        log.warning("%s: %s the earlier run's outputs", run_dir, "resuming: redoing" if resume else "overwriting")
        _clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _create_marker(run_dir)


def fail(run_dir: str | Path, exc: BaseException) -> None:
    """Leave the marker with ``status: failed`` and the error (the folder stays marked incomplete)."""
    run_dir = Path(run_dir)
    info = _read_marker(run_dir) | {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:4000],
                                    "failed": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    try:
        write_atomic(run_dir / MARKER, json.dumps(info, indent=1) + "\n")
    except OSError:
        pass


def complete(run_dir: str | Path) -> None:
    """Remove the marker: every file of the run is written."""
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


def is_complete(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "run_meta.json").is_file() and not (run_dir / MARKER).exists()


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class RunDirGuard(Callback):
    """Hydra callback: claim the run folder before Hydra writes into it (single runs; sweeps claim per job)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        opts = OmegaConf.select(config, "run", default=None) or {}
        task = OmegaConf.to_container(config, resolve=False)
        task.pop("hydra", None)
        try:
            cfg_yaml = OmegaConf.to_yaml(OmegaConf.create(
                OmegaConf.to_container(OmegaConf.masked_copy(config, list(task)), resolve=True)))
        except Exception:  # noqa: BLE001 - an interpolation that only resolves inside the job: compare later
            cfg_yaml = None
        try:
            claim(run_dir, bool(opts.get("overwrite", False)), bool(opts.get("resume", False)), cfg_yaml)
        except RunDirError as e:     # Hydra turns a callback's Exception into a warning and goes on: exit here
            raise SystemExit(f"Error: {e}") from None
