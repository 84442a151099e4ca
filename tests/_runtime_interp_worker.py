"""CPU checks of the expert-format kernels (mxq.runtime.fmt_kernels) in the Triton interpreter.

Run by tests/test_runtime_interp.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before
any kernel module is imported, so these checks cannot share a process with GPU tests):

    TRITON_INTERPRET=1 python tests/_runtime_interp_worker.py decoders nvfp4,int4_g128
    TRITON_INTERPRET=1 python tests/_runtime_interp_worker.py moe|mixed|model [formats]
    TRITON_INTERPRET=1 python tests/_runtime_interp_worker.py stacked [mxfp4,bf16]   (moe_kernels)

Prints one JSON object per line: {"check": ..., "fmt": ..., measured errors...}.
Shapes are small but ragged where gpt-oss's are: H = 320 (2.5 x 128), I = 192 (1.5 x 128), so int4_g128's
last group, fp8_block's last row and column blocks and nf4_dq's 256-statistic blocks (straddling rows) are
partial.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mxq.runtime.interp_patch import apply as _patch  # noqa: E402

_patch()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mxq.formats import get_format  # noqa: E402
from mxq.model.experts import PackedExperts  # noqa: E402
from mxq.runtime import fmt_kernels as FK  # noqa: E402

ALL = list(FK.FORMATS)
H, I = 320, 192
torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def weights(shape, seed: int, edges: bool = False) -> torch.Tensor:
    """Gaussian; with ``edges`` an all-zero 128-block, a row of outliers and a tiny row (edge cases of every
    format; not used in the MoE checks, where an outlier row of down dominates the relative error through
    cancellation between the k experts' outputs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * shape[-1] ** -0.5
    if edges:
        w[..., 1, :128] = 0.0
        w[..., 2, :] *= 50.0
        w[..., 3, :] *= 1e-3
    return w


def quant(fmt: str, w: torch.Tensor):
    return get_format(fmt).quantize(w.bfloat16() if fmt == "bf16" else w)


# ----------------------------------------------------------------------------------------------- decoders


@triton.jit
def _tile_probe(w_ptr, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, out_ptr, OUT, K, WPR, s_we, s_wr, s_se, s_sr, s_sg,
                s_ne, j, FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr,
                ASYM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    BW: tl.constexpr = BK // EPW
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cm = cols < OUT
    w0 = tl.program_id(1) * BW
    t = FK._fmt_w_tile(w_ptr + j * s_we, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, cols, cm, w0, WPR, s_wr, s_se, s_sr,
                       s_sg, s_ne, FMT, EPW, GW, SROW, ASYM, BN, BW)
    kk = w0 * EPW + tl.arange(0, BK)
    tl.store(out_ptr + cols[:, None] * K + kk[None, :], t, mask=cm[:, None] & (kk < K)[None, :])


@triton.jit
def _rows_probe(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, out_ptr, OUT, K, WPR, s_we, s_wr, s_se, s_sr,
                s_sg, s_ne, j, FMT: tl.constexpr, EPW: tl.constexpr, GW: tl.constexpr, SROW: tl.constexpr,
                ASYM: tl.constexpr, R: tl.constexpr, BW: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rm = rows < OUT
    acc = FK._fmt_rows_dot(x_ptr, w_ptr + j * s_we, s_ptr, z_ptr, g_ptr, n_ptr, lut_ptr, j, rows, rm, WPR, WPR, s_wr,
                           s_se, s_sr, s_sg, s_ne, FMT, EPW, GW, SROW, ASYM, R, BW, 2)
    tl.store(out_ptr + rows, acc, mask=rm)


def check_decoders(fmt: str) -> dict:
    """The prefill tile decoder against ``dequantize(bf16)`` bit for bit, and the GEMV decoder's fp32 dot
    against an fp64 matmul of ``dequantize(fp32)``, for the last expert of a stack of 3 (non-zero strides)."""
    t0 = time.perf_counter()
    res = {"check": "decoders", "fmt": fmt}
    for name, (out_f, in_f) in (("w", (H, H)),):             # 2.5 x 128 both ways: every edge is ragged
        ps = [quant(fmt, weights((out_f, in_f), 10 * e, edges=True)) for e in range(3)]
        st = FK.FmtStack(fmt, {n: torch.stack([p.tensors[n] for p in ps]) for n in ps[0].tensors}, out_f, in_f)
        j = 2
        ref16 = get_format(fmt).dequantize(ps[j], torch.bfloat16)
        tile = torch.zeros(out_f, in_f, dtype=torch.bfloat16)
        bn, bk = 64, 256
        _tile_probe[(triton.cdiv(out_f, bn), triton.cdiv(in_f, bk))](*st.args(), tile, out_f, in_f, *st.strides(), j,
                                                                    **st.meta(), BN=bn, BK=bk)
        x = torch.randn(in_f, generator=torch.Generator().manual_seed(7))
        acc = torch.zeros(out_f)
        r, bw = 32, 64
        _rows_probe[(triton.cdiv(out_f, r),)](x, *st.args(), acc, out_f, in_f, *st.strides(), j, **st.meta(), R=r,
                                              BW=bw)
        ref32 = get_format(fmt).dequantize(ps[j], torch.float32).double() @ x.double()
        res[f"{name}_tile_mismatches"] = int((tile.view(torch.int16) != ref16.view(torch.int16)).sum())
        res[f"{name}_gemv_rel"] = rel(acc, ref32)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------- MoE layer


def make_experts(e_n: int, fmts_gu: list[str], fmts_dn: list[str], seed: int = 0, stacked_base: bool = False):
    """A PackedExperts layer with expert e's gate_up in fmts_gu[e] and down in fmts_dn[e] (``set_expert``);
    with ``stacked_base`` the layer is first loaded as stacked MXFP4 (a checkpoint) and only experts whose
    format is not mxfp4 are overridden (the stacked buffer then serves the mxfp4 experts)."""
    from mxq.formats.mxfp4 import quantize_mxfp4

    g = torch.Generator().manual_seed(seed)
    ex = PackedExperts(e_n, H, I, 1.702, 7.0)
    for kind, fmts, shape in (("gate_up", fmts_gu, (2 * I, H)), ("down", fmts_dn, (H, I))):
        w = weights((e_n, *shape), seed + len(kind))
        if stacked_base:
            b, s = quantize_mxfp4(w)
            ex.set_stacked(kind, "mxfp4", {"blocks": b, "scales": s}, {"axis": 1, "block": 32})
        for e in range(e_n):
            if not (stacked_base and fmts[e] == "mxfp4"):
                ex.set_expert(kind, e, quant(fmts[e], w[e]))
    ex.gate_up_bias.data = (torch.randn(e_n, 2 * I, generator=g) * 0.5).bfloat16()
    ex.down_bias.data = (torch.randn(e_n, H, generator=g) * 0.1).bfloat16()
    return ex


def routing(n: int, e_n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e_n, generator=g)[:k] for _ in range(n)]).int()
    return idx, torch.softmax(torch.randn(n, k, generator=g), -1)


def ref_moe(ex, x, idx, wt):
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            out[t] += wt[t, j] * ex.expert_forward(int(idx[t, j]), x[t:t + 1])[0].float()
    return out


def moe_errors(ex, k: int = 4, n_dec: int = 4, n_pre: int = 24, seed: int = 1) -> dict:
    gu, dn = FK.FmtExperts(ex, "gate_up"), FK.FmtExperts(ex, "down")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pre, H, generator=g).bfloat16()
    idx, wt = routing(n_pre, ex.num_experts, k, seed + 1)
    ref = ref_moe(ex, x, idx, wt)
    y = FK.fmt_gate_up_gemv(x[:n_dec].float(), idx[:n_dec], gu, ex.gate_up_bias, 1.702, 7.0)
    z = FK.fmt_down_gemv(y, idx[:n_dec], wt[:n_dec], dn, ex.down_bias)
    zg = FK.fmt_moe_grouped(x, idx, wt, gu, ex.gate_up_bias, dn, ex.down_bias, 1.702, 7.0)
    return {"decode_rel": rel(z.sum(1), ref[:n_dec]), "grouped_rel": rel(zg.sum(1), ref),
            "stacks": [s.fmt for s in gu.stacks], "down_stacks": [s.fmt for s in dn.stacks]}


def check_moe(fmt: str) -> dict:
    t0 = time.perf_counter()
    e_n = 8
    ex = make_experts(e_n, [fmt] * e_n, [fmt] * e_n)
    res = {"check": "moe", "fmt": fmt, **moe_errors(ex)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def buffer_bytes(m: torch.nn.Module) -> int:
    """Bytes of distinct storages behind the module's buffers."""
    seen = {}
    for b in m.buffers():
        s = b.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def check_mixed(_fmt: str = "") -> dict:
    """12 experts over every format, gate_up and down in different formats, on top of a stacked MXFP4 layer."""
    t0 = time.perf_counter()
    fmts = ALL + ["mxfp4"]                                               # 12 experts
    gu_f, dn_f = fmts, fmts[5:] + fmts[:5]
    ex = make_experts(len(fmts), gu_f, dn_f, seed=3, stacked_base=True)
    before = buffer_bytes(ex)
    res = {"check": "mixed", "fmt": "mixed", **moe_errors(ex, seed=5)}
    res["buffer_bytes_before"], res["buffer_bytes_after"] = before, buffer_bytes(ex)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def check_stacked(fmt: str) -> dict:
    """``moe_kernels`` (a checkpoint's stacked MXFP4 or bf16 experts): decode GEMVs with the f16 ``h2perm`` x layout
    and the grouped prefill against the reference, every autotune config of the GEMVs."""
    from mxq.formats.mxfp4 import quantize_mxfp4
    from mxq.runtime import moe_kernels as M
    from mxq.runtime.engine import layer_experts

    t0 = time.perf_counter()
    e_n, k, n_dec, n_pre = 8, 4, 3, 20
    ex = PackedExperts(e_n, H, I, 1.702, 7.0)
    for kind, shape in (("gate_up", (2 * I, H)), ("down", (H, I))):
        w = weights((e_n, *shape), 5 + len(kind))
        if fmt == "mxfp4":
            b, s = quantize_mxfp4(w)
            ex.set_stacked(kind, "mxfp4", {"blocks": b, "scales": s}, {"axis": 1, "block": 32})
        else:
            ex.set_stacked(kind, "bf16", {"weight": w.bfloat16()}, {})
    g = torch.Generator().manual_seed(3)
    ex.gate_up_bias.data = (torch.randn(e_n, 2 * I, generator=g) * 0.5).bfloat16()
    ex.down_bias.data = (torch.randn(e_n, H, generator=g) * 0.1).bfloat16()
    gu, dn = layer_experts(ex)
    assert isinstance(gu, M.ExpertWeights), type(gu)
    x = torch.randn(n_pre, H, generator=g).bfloat16()
    idx, wt = routing(n_pre, e_n, k, 4)
    ref = ref_moe(ex, x, idx, wt)
    res = {"check": "stacked", "fmt": fmt, "decode_rel": {}}
    for c in M._GEMV_CONFIGS:                  # the interpreter runs whichever config the kernel is given
        meta = dict(c.kwargs)
        for kern in (M._gate_up_gemv_kernel, M._down_gemv_kernel):
            kern._mxq_default = meta
        y = M.gate_up_gemv(M.kernel_x(x[:n_dec], gu.fp4), idx[:n_dec], gu, ex.gate_up_bias, 1.702, 7.0,
                           yperm=dn.fp4)
        z = M.down_gemv(y, idx[:n_dec], wt[:n_dec], dn, ex.down_bias)
        res["decode_rel"][str(meta)] = rel(z.sum(1), ref[:n_dec])
    zg = M.moe_grouped(x, idx, wt, gu, ex.gate_up_bias, dn, ex.down_bias, 1.702, 7.0)
    res["grouped_rel"] = rel(zg.sum(1), ref)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------- whole model


def check_model(_fmt: str = "") -> dict:
    """Tiny model (2 layers, 32 experts), a plan with every format and 4 pruned experts per layer: fast path
    (prefill + decode, no graph) against the reference generate and the reference logits."""
    import tempfile

    import mxq
    from mxq.plan import PRUNE, Plan, apply_
    from mxq.runtime import Runtime
    from mxq.synth import synth

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = synth(Path(tmp) / "tiny", "tiny", "mxfp4", 0, "cpu", False, {"num_hidden_layers": 2})
        model = mxq.load_model(path, dtype=torch.bfloat16)
    e_n = model.config.num_local_experts
    rows = []
    for i in range(model.config.num_hidden_layers):
        row = [ALL[(e + 3 * i) % len(ALL)] for e in range(e_n)]
        for e in range(4):
            row[(7 * e + i) % e_n] = PRUNE
        rows.append(row)
    apply_(model, Plan(rows))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.config.vocab_size, (1, 24), generator=g)
    steps = 3
    rt = Runtime(model, use_graph=False)
    st = rt.new_state(1, 64)
    pre = rt.prefill(st, ids).float()
    forced = torch.randint(2, model.config.vocab_size, (steps,), generator=g)
    fast = torch.stack([pre[0]] + [rt.step(st, forced[i:i + 1]).float()[0].clone() for i in range(steps)])
    with torch.no_grad():
        ref = model(torch.cat([ids, forced[None]], 1)).logits[0, ids.shape[1] - 1:].float()
    out = rt.generate(ids, steps)
    ref_out = model.generate(ids, max_new_tokens=steps)
    a, b = out[0, ids.shape[1]:].tolist(), ref_out[0, ids.shape[1]:].tolist()
    agree = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
    return {"check": "model", "fmt": "mixed-plan", "formats": sorted({f for r in rows for f in r if f != PRUNE}),
            "experts_per_layer": e_n - 4, "layer_formats": [L.gu.fmt for L in rt.layers],
            "logits_rel": rel(fast, ref), "top1_equal": float((fast.argmax(-1) == ref.argmax(-1)).float().mean()),
            "greedy_prefix_equal": agree, "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}


def check_padded(which: str = "") -> list[dict]:
    """A small gpt-oss (2 layers: sliding window 8, then full attention; 8 experts, top-4) with prompts of 4
    and 11 tokens, the first left-padded to 11, 3 greedy tokens (``tests/_batch_decode_check.py``), on the
    per-pair GEMV decode path and on the grouped-GEMM one. ``which``: "stacked" (the checkpoint as loaded:
    stacked MXFP4, ``moe_kernels``) or "every-format" (a plan that gives each layer's experts every format:
    ``fmt_kernels``, one launch per format stack on both paths), optionally with "/gemv" or "/grouped" for
    one path only."""
    import tempfile

    from _batch_decode_check import compare

    import mxq
    from mxq.plan import Plan, apply_
    from mxq.runtime import Runtime
    from mxq.synth import synth

    with tempfile.TemporaryDirectory() as tmp:
        path = synth(Path(tmp) / "tiny", "tiny", "mxfp4", 0, "cpu", False,
                     {"num_hidden_layers": 2, "sliding_window": 8, "num_local_experts": 8, "hidden_size": 128,
                      "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1})
        model = mxq.load_model(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(2, model.config.vocab_size, (n,), generator=g) for n in (4, 11)]
    e_n = model.config.num_local_experts
    which, _, only = which.partition("/")
    if which == "every-format":
        apply_(model, Plan([[ALL[(e + 4 * i) % len(ALL)] for e in range(e_n)]
                            for i in range(model.config.num_hidden_layers)]))
    elif which != "stacked":
        raise ValueError(f"padded: which must be stacked or every-format, got {which!r}")
    rt = Runtime(model, use_graph=False)
    res = []
    for path, (dense_max, grouped_min) in {"gemv": (1 << 30, 1 << 30), "grouped": (0, 1)}.items():
        if only and path != only:
            continue
        t0 = time.perf_counter()
        rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens = dense_max, grouped_min
        r = compare(rt, rows, 3)
        res.append({"check": "padded", "fmt": f"{which}/{path}", "seconds": round(time.perf_counter() - t0, 1),
                    "formats": sorted({f for L in rt.layers for f in getattr(L.gu, "counts", {L.gu.fmt: 1})}),
                    **r})
    return res

CHECKS = {"decoders": check_decoders, "moe": check_moe, "mixed": check_mixed, "model": check_model,
          "stacked": check_stacked, "padded": check_padded}

if __name__ == "__main__":
    check = sys.argv[1]
    fmts = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else ALL
    if check == "stacked" and fmts == ALL:
        fmts = ["mxfp4", "bf16"]
    if check == "padded":
        fmts = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else ["stacked", "every-format"]
    for f in (fmts if check in ("decoders", "moe", "stacked", "padded") else [""]):
        try:
            res = CHECKS[check](f)
            for r in (res if isinstance(res, list) else [res]):
                emit(**r)
        except Exception as exc:                                          # report, keep going
            emit(check=check, fmt=f or check, error=f"{type(exc).__name__}: {exc}")
