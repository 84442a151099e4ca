"""Run folders: never reused by accident, claimed by one run, marked incomplete until the last file, errors in run.log.

Before ``mxq.rundir``: a second run into the same folder rewrote plan.json, resolved_config.yaml and the
statistics and then died on ``model/`` existing; the default folder name had one-second resolution; a failed
run's run.log lacked the error and nothing marked the folder as unfinished.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mxq import rundir
from mxq.options import OptionError
from mxq.run import RECIPES, run

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(ckpt: Path, tmp_path: Path, *extra: str):
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return compose("run", overrides=["recipe=baseline", f"model.path={ckpt}", "eval=none",
                                         "generate.max_new_tokens=1", f"cache_dir={tmp_path / 'cache'}", *extra])


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("mxfp4", layers=1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_into_a_finished_folder_is_refused_and_changes_nothing(ckpt, tmp_path):
    out = tmp_path / "run"
    run(cfg_for(ckpt, tmp_path), out)
    assert rundir.is_complete(out) and not (out / rundir.MARKER).exists()
    before = snapshot(out)
    with pytest.raises(rundir.RunDirError, match="not empty.*run.overwrite=true"):
        run(cfg_for(ckpt, tmp_path, "generate.max_new_tokens=2"), out)
    assert snapshot(out) == before


def test_overwrite_replaces_a_run_folder_but_never_a_user_folder(ckpt, tmp_path):
    out = tmp_path / "run"
    run(cfg_for(ckpt, tmp_path), out)
    (out / "stale.txt").write_text("from the first run")
    run(cfg_for(ckpt, tmp_path, "run.overwrite=true", "generate.max_new_tokens=2"), out)
    assert not (out / "stale.txt").exists() and rundir.is_complete(out)
    assert "max_new_tokens: 2" in (out / "resolved_config.yaml").read_text()
    user = tmp_path / "home"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(rundir.RunDirError, match="not an mxq run folder"):
        run(cfg_for(ckpt, tmp_path, "run.overwrite=true"), user)
    assert (user / "thesis.tex").read_text() == "precious"


def test_failed_run_is_marked_incomplete_with_the_error_in_run_log(ckpt, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OptionError, match="batch_size=0"):
        run(cfg_for(ckpt, tmp_path, "batch_size=0"), out)
    marker = json.loads((out / rundir.MARKER).read_text())
    assert marker["status"] == "failed" and "batch_size=0" in marker["error"]
    assert "batch_size=0" in (out / "run.log").read_text()
    assert not rundir.is_complete(out)


def test_resume_needs_an_interrupted_run_with_the_same_config(ckpt, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OptionError):
        run(cfg_for(ckpt, tmp_path, "generate.max_new_tokens=-5"), out)
    with pytest.raises(rundir.RunDirError, match="differs from this run's configuration"):
        run(cfg_for(ckpt, tmp_path, "generate.max_new_tokens=3", "run.resume=true"), out)
    (out / "resolved_config.yaml").write_text(
        (out / "resolved_config.yaml").read_text().replace("max_new_tokens: -5", "max_new_tokens: 1"))
    run(cfg_for(ckpt, tmp_path, "run.resume=true"), out)
    assert rundir.is_complete(out)
    with pytest.raises(rundir.RunDirError, match="completed"):
        run(cfg_for(ckpt, tmp_path, "run.resume=true"), out)


def test_a_folder_claimed_by_a_live_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    import socket

    (out / rundir.MARKER).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                 "status": "running"}))
    (out / "resolved_config.yaml").write_text("x: 1\n")
    with pytest.raises(rundir.RunDirError, match="in use by a running mxq run"):
        rundir.claim(out, overwrite=True)
    assert (out / "resolved_config.yaml").exists()


def test_exclusive_marker_lets_only_one_of_two_claims_win(tmp_path, monkeypatch):
    """Two processes pass the emptiness check at once: O_EXCL on the marker decides (simulated by a marker
    appearing between the check and the creation)."""
    out = tmp_path / "run"
    real = rundir._create_marker

    def racing(d: Path) -> None:
        (d / rundir.MARKER).write_text(json.dumps({"pid": 1, "host": "other"}))
        real(d)

    monkeypatch.setattr(rundir, "_create_marker", racing)
    with pytest.raises(rundir.RunDirError, match="claimed by another run"):
        rundir.claim(out)


def test_default_run_folder_is_unique_per_process():
    cfg = (Path(RECIPES) / "run.yaml").read_text()
    assert "_${mxq_uid:}" in cfg.split("run:\n    dir:")[1].splitlines()[0]
    import importlib.util

    uids = set()
    for i in range(3):          # a fresh import of the module is what a new process does
        spec = importlib.util.spec_from_file_location(f"_rundir_copy{i}", ROOT / "mxq" / "rundir.py",
                                                      submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "mxq"
        spec.loader.exec_module(mod)
        uids.add(mod.uid())
    assert len(uids) == 3 and all(len(u) == 6 for u in uids)
    from omegaconf import OmegaConf

    assert OmegaConf.create({"d": "x_${mxq_uid:}"}).d == f"x_{rundir.uid()}"


def test_cli_refuses_before_hydra_writes_into_the_folder(tmp_path):
    """The Hydra callback claims the folder before Hydra rewrites .hydra/ and appends to run.log."""
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("first run\n")
    (out / "run.log").write_text("first run log\n")
    (out / "resolved_config.yaml").write_text("first run\n")
    r = subprocess.run([sys.executable, "-m", "mxq.run", "recipe=baseline", "eval=none", f"hydra.run.dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    assert (out / ".hydra" / "config.yaml").read_text() == "first run\n"
    assert (out / "run.log").read_text() == "first run log\n"
