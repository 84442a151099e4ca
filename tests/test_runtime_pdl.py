"""The programmatic-dependent-launch contract of ``mxq.runtime.pdl`` (CPU checks; the GPU test
``test_pdl_changes_only_timing`` compares decode results with PDL on and off).

Every kernel of the decode chain must take a ``PDL`` constexpr and call ``grid_dep(PDL)`` before anything else:
a kernel launched with PDL that read or wrote memory before its ``griddepcontrol.wait`` would race with the
previous grid, and one that never waited would break the transitivity that lets kernels read the output of
any earlier kernel."""
from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# every Triton kernel that a decode step launches (engine._decode_body, all expert formats, greedy pick)
DECODE_CHAIN = {
    "attn_kernels": ["_rmsnorm_kernel", "_rope_cache_kernel", "_attn_kernel", "_attn_combine_kernel",
                     "_embed_kernel", "_advance_kernel", "_argmax_part_kernel", "_argmax_advance_kernel"],
    "linear_kernels": ["_gemv3_kernel"],
    "moe_kernels": ["_router_fused_kernel", "_gate_up_gemv_kernel", "_down_gemv_kernel"],
    "fmt_kernels": ["_fmt_gate_up_gemv_kernel", "_fmt_down_gemv_kernel"],
}


def _jit_fn(k):
    while type(k).__name__ != "JITFunction":           # autotuner -> JITFunction
        k = k.fn
    return k


def _body(fn) -> list[ast.stmt]:
    src = textwrap.dedent(inspect.getsource(fn.fn))
    body = ast.parse(src).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]                               # the docstring
    return body


def _kernels():
    mods = {m: importlib.import_module(f"mxq.runtime.{m}") for m in DECODE_CHAIN}
    for m, mod in mods.items():
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(obj, "run"):
                yield m, name, _jit_fn(obj)


def test_decode_chain_kernels_wait_first():
    seen = {(m, n) for m, n, _ in _kernels()}
    for m, names in DECODE_CHAIN.items():
        for n in names:
            assert (m, n) in seen, f"{m}.{n} is gone: update DECODE_CHAIN"
    for m, n, fn in _kernels():
        if n not in DECODE_CHAIN[m]:
            continue
        assert "PDL" in fn.arg_names, f"{m}.{n} has no PDL constexpr"
        first = ast.unparse(_body(fn)[0])
        assert first == "grid_dep(PDL)", f"{m}.{n} starts with {first!r}, not grid_dep(PDL)"


def test_every_pdl_kernel_waits_first():
    """Also the kernels outside the decode chain: a PDL parameter means the wait comes first."""
    for m, n, fn in _kernels():
        if "PDL" in fn.arg_names:
            assert ast.unparse(_body(fn)[0]) == "grid_dep(PDL)", f"{m}.{n}"


def test_pdl_off_on_cpu_and_switchable(monkeypatch):
    from mxq.runtime import pdl

    x = torch.zeros(2)
    assert pdl.pdl_kw(x) == {"PDL": False}             # a CPU tensor never launches with PDL
    monkeypatch.setattr(pdl, "USE_PDL", False)
    assert not pdl.pdl_on(x)
