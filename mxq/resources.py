"""Where mxq's shipped configuration lives, in a checkout and in an installed wheel alike.

The repository keeps the Hydra config root at ``recipes/`` and the local lm-eval tasks at ``evals/``; the
build maps them into the package as ``mxq.recipes`` and ``mxq.evals`` (``[tool.setuptools.package-dir]`` in
pyproject.toml), so an editable install reads the checkout's files and a wheel carries its own copies.
Hydra finds the recipes through its ``pkg://`` search path; users add their own with ``--config-dir`` or
``hydra.searchpath``.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

RECIPES_PACKAGE = "mxq.recipes"
EVALS_PACKAGE = "mxq.evals"
RECIPES_SEARCH_PATH = f"pkg://{RECIPES_PACKAGE}"


def _package_dir(package: str) -> Path:
    """The folder of a data package on disk (mxq is never installed zipped: lm-eval needs real paths)."""
    path = Path(str(files(package)))
    if not path.is_dir():
        raise FileNotFoundError(f"mxq's data package {package} is not a folder on disk ({path}); "
                                "reinstall mxq from a wheel or a checkout")
    return path


def recipes_dir() -> Path:
    """The Hydra config root (``run.yaml`` and the groups ``model/``, ``calib/``, ``eval/``, ``recipe/``)."""
    return _package_dir(RECIPES_PACKAGE)


def evals_dir() -> Path:
    """The local lm-eval task folder (``tiny_*`` tasks, their YAML and JSONL side by side)."""
    return _package_dir(EVALS_PACKAGE)
