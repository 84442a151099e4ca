"""mxq installed as a wheel works anywhere: recipes and eval tasks ship inside it, and the console script
dispatches to every tool. The wheel test builds from a copy of the repository, installs into a fresh
virtualenv (dependencies from this environment, mxq itself only from the wheel) and runs recipes from an
empty folder, as a user who ``pip install``-ed mxq would."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    """pyproject.toml lists mxq's packages by hand (find cannot coexist with the recipes/evals mapping)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mxq").rglob("__init__.py")}
    assert found - listed == set(), "packages missing from [tool.setuptools] packages"
    assert cfg["package-dir"] == {"mxq.recipes": "recipes", "mxq.evals": "evals"}
    assert {"mxq.recipes", "mxq.evals"} <= listed


def test_console_script_dispatches(capsys):
    from mxq.cli import SUBCOMMANDS, main

    main(["--help"])
    out = capsys.readouterr().out
    for name, cmd in SUBCOMMANDS.items():
        assert name in out
        spec = __import__("importlib.util").util.find_spec(cmd.module)
        assert spec is not None, f"subcommand {name}: module {cmd.module} missing"
        tree = ast.parse(Path(spec.origin).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), cmd.module
    with pytest.raises(SystemExit, match="unknown command 'nope'"):
        main(["nope"])


def _copy_repo(dst: Path) -> Path:
    """The tracked tree without build leftovers (a stale build/ could smuggle deleted modules into a wheel)."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "outputs", "multirun", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", "_dev_*", ".whl", ".device_out")
    return Path(shutil.copytree(REPO, dst, ignore=ignore))


def test_wheel_runs_recipes_from_an_empty_folder(tmp_path):
    src = _copy_repo(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("mxq-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-warn-script-location",
                    "--ignore-installed", "--prefix", str(venv), str(wheel)], check=True, capture_output=True)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "MXQ_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(py), "-c", "import mxq, mxq.resources as r; print(mxq.__file__); "
                            "print(r.recipes_dir()); print(r.evals_dir())"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    site = str(venv / "lib")
    assert all(p.startswith(site) for p in where), f"mxq not imported from the wheel: {where}"
    runs = {"default": [], "prune": ["recipe=prune_25pct", "eval=quick"]}
    procs = {k: subprocess.Popen([str(py), "-m", "mxq.run", *a, f"hydra.run.dir=outputs/{k}"], cwd=work, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, a in runs.items()}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{name} run failed:\n{out[-3000:]}"
        run_dir = work / "outputs" / name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "report.md").is_file()
        assert metrics["model"]["num_local_experts"] == (24 if name == "prune" else 32)
    assert (work / "outputs" / "prune" / "model").is_dir()


def test_user_recipe_dir_extends_the_shipped_recipes(tmp_path):
    """A user's recipe folder (``--config-dir``) sits beside the shipped ones and may build on ``_base``."""
    (tmp_path / "mine" / "recipe").mkdir(parents=True)
    (tmp_path / "mine" / "recipe" / "halve.yaml").write_text(
        "defaults: [_base, _self_]\nname: halve\nstats: true\nplanner: prune\nprune:\n  fraction: 0.5\n")
    out = subprocess.run([sys.executable, "-m", "mxq.run", "--config-dir", str(tmp_path / "mine"), "recipe=halve",
                          "--cfg", "job"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    import yaml

    cfg = yaml.safe_load(out)
    assert cfg["recipe"]["name"] == "halve" and cfg["recipe"]["prune"]["fraction"] == 0.5
    assert cfg["recipe"]["prune"]["criterion"] == "reap"           # from the shipped _base
    assert cfg["eval"]["name"] == "quick"                          # the shipped groups still resolve
