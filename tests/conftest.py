"""Shared fixtures: small synthetic GPT-OSS checkpoints in the exact published layout.

``make_ckpt(name, **kw)`` builds (once per session) a checkpoint with ``mxq.synth.synth``; the defaults
are the embedded model's dimensions with 2 layers, so every test exercises the real layout and math.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (skipped by default; or set MXQ_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (minutes, e.g. kernels in the Triton interpreter) are skipped unless asked for."""
    if config.getoption("--runslow") or os.environ.get("MXQ_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or MXQ_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory) -> Callable[..., Path]:
    from mxq.synth import synth

    made: dict[tuple, Path] = {}

    def make(experts: str = "mxfp4", seed: int = 0, layers: int = 2, with_original: bool = False,
             **overrides) -> Path:
        key = (experts, seed, layers, with_original, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / f"{experts}-{seed}-{layers}"
            over = {"num_hidden_layers": layers, **overrides}
            made[key] = synth(out, "tiny", experts, seed, "cpu", with_original, over)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt) -> Path:
    """2-layer tiny-preset checkpoint with MXFP4 experts (and the original/ folder)."""
    return make_ckpt("mxfp4", with_original=True)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test models are tiny: one torch thread per worker is as fast on an idle CPU and several times
    faster on a shared one (OpenMP threads spin-wait whenever another process takes a core)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
