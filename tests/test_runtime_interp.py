"""CPU tests of the fast path's expert-format kernels (mxq.runtime.fmt_kernels) in the Triton interpreter.

Each check runs ``tests/_runtime_interp_worker.py`` in a subprocess with TRITON_INTERPRET=1 (the switch is read
when the kernels are defined, so it cannot be turned on inside a test process that may import them for a GPU);
the worker applies ``mxq.runtime.interp_patch`` (numpy 2.x gaps of the interpreter). Skipped without triton.

* ``test_decoders_exact_every_format`` (CI, ~15 s): for every format, the prefill tile decoder reproduces
  ``dequantize(bf16)`` bit for bit and the decode GEMV's dot is within 1e-5 of an fp64 matmul of
  ``dequantize(fp32)``, on a 320 x 320 weight with ragged groups/blocks, a zero block, an outlier row and a
  tiny row, for the third expert of a stack.
* ``test_padded_batch_equals_per_sequence`` (CI, ~1 min): a left-padded batch decoded greedily on the
  batch-1 kernels equals each prompt decoded alone (``tests/_batch_decode_check.py``), stacked MXFP4 experts;
  ``slow``: the grouped-GEMM decode path, and both paths with every format in each layer.
* ``slow`` (skipped unless ``--runslow`` or MXQ_RUN_SLOW=1; minutes): moe_kernels on stacked MXFP4 and bf16 experts
  (every decode GEMV config), a MoE layer per format and a mixed-format
  layer against ``PackedExperts.expert_forward`` (relative L2 < 1e-2: both round the same intermediates to
  bf16; the GEMV keeps fp32 weights where the reference rounds them to bf16), and a tiny model with a plan
  using every format and pruning, fast path against the reference model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

WORKER = Path(__file__).with_name("_runtime_interp_worker.py")


def run_worker(check: str, fmts: str = "", timeout: int = 3600) -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(WORKER), check, fmts], capture_output=True, text=True, env=env,
                       timeout=timeout)
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            out[d["fmt"]] = d
    assert r.returncode == 0 and out, f"worker failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out


def all_formats() -> list[str]:
    from mxq.formats import list_formats

    return list_formats()


def test_decoders_exact_every_format():
    res = run_worker("decoders")
    bad = {f: r for f, r in res.items() if "error" in r or r["w_tile_mismatches"] != 0 or r["w_gemv_rel"] >= 1e-5}
    assert sorted(res) == all_formats()
    assert not bad, bad


@pytest.mark.slow
def test_moe_layer_every_format():
    res = run_worker("moe")
    assert sorted(res) == all_formats()
    bad = {f: r for f, r in res.items() if "error" in r or r["decode_rel"] >= 1e-2 or r["grouped_rel"] >= 1e-2}
    assert not bad, bad


@pytest.mark.slow
def test_mixed_format_layer():
    r = run_worker("mixed")["mixed"]
    assert "error" not in r, r
    assert sorted(r["stacks"]) == all_formats() and sorted(r["down_stacks"]) == all_formats()
    assert r["decode_rel"] < 1e-2 and r["grouped_rel"] < 1e-2, r
    assert r["buffer_bytes_after"] == r["buffer_bytes_before"], r       # stacks replace, never duplicate


@pytest.mark.slow
def test_tiny_model_mixed_plan():
    r = run_worker("model")["mixed-plan"]
    assert "error" not in r, r
    assert sorted(r["formats"]) == all_formats()
    assert r["logits_rel"] < 5e-2 and r["top1_equal"] == 1.0 and r["greedy_prefix_equal"] == r["steps"], r


@pytest.mark.slow
def test_stacked_mxfp4_and_bf16_every_gemv_config():
    """moe_kernels (a checkpoint's stacked experts): the MXFP4 GEMVs read x in the f16 ``h2perm`` layout; every
    autotune config of the decode GEMVs, and the grouped prefill, against the reference (~6 min)."""
    res = run_worker("stacked")
    assert sorted(res) == ["bf16", "mxfp4"]
    for fmt, r in res.items():
        assert "error" not in r, r
        assert max(r["decode_rel"].values()) < 1e-2 and r["grouped_rel"] < 1e-2, r


def _padded_ok(which: str) -> None:
    res = run_worker("padded", which)
    assert res, which
    for name, r in res.items():
        assert "error" not in r, r
        assert r["ok"], (name, r)


def test_padded_batch_equals_per_sequence():
    _padded_ok("stacked/gemv")


@pytest.mark.slow
def test_padded_batch_grouped_path():
    _padded_ok("stacked/grouped")


@pytest.mark.slow
def test_padded_batch_every_format():
    res = run_worker("padded", "every-format")
    assert sorted(next(iter(res.values()))["formats"]) == all_formats()
    assert all(r["ok"] for r in res.values()), res
