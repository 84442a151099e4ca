"""``MXQ_AUTOTUNE_FIRST=1`` (for compute-sanitizer runs): every autotuned runtime kernel must launch with exactly its
first config, launch parameters included, and without the variable stay autotuned. The switch is read when the
kernel modules are imported, so each case runs in a fresh interpreter."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

PROBE = """
import json
from mxq.runtime import fmt_kernels as F, linear_kernels as L, moe_kernels as M
out = {}
for mod in (M, F, L):
    for name in dir(mod):
        k = getattr(mod, name)
        if hasattr(k, "_mxq_default"):
            out[mod.__name__ + "." + name] = k._mxq_default
print(json.dumps(out))
"""


def probe(flag: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MXQ_AUTOTUNE_FIRST", "TRITON_INTERPRET")}
    if flag is not None:
        env["MXQ_AUTOTUNE_FIRST"] = flag
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_autotune_first_pins_the_first_config_with_its_launch_parameters():
    from mxq.runtime import moe_kernels as M

    pinned = probe("1")
    assert len(pinned) >= 6                                             # MoE, fmt and linear kernels
    assert all(v is not None for v in pinned.values()), pinned
    c = M._GROUPED_CONFIGS[0]
    assert pinned["mxq.runtime.moe_kernels._gate_up_grouped_kernel"] == {
        **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def test_without_the_variable_kernels_stay_autotuned():
    assert all(v is None for v in probe(None).values())
    assert all(v is None for v in probe("0").values())
