"""Compile every expert-format kernel (mxq.runtime.fmt_kernels) for sm_90 on a machine without a GPU.

    python bench/compile_fmt_sm90.py [--formats nvfp4,fp8] [--kernels gate_up_gemv,down_grouped] [--json out.json]

For each kernel x format x autotune config: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
with the argument types of that format's stacks and gpt-oss-20b's integer arguments (H = I = 2880, 32 experts,
top-4; integers divisible by 16 and all pointers marked 16-byte aligned, as Triton specialises them on a GPU),
then ``cuobjdump -res-usage`` on the cubin for registers and spills. Prints one line per variant; exit status 1
if any variant failed to compile.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mxq.formats import get_format  # noqa: E402
from mxq.runtime import fmt_kernels as FK  # noqa: E402

_TY = {torch.int32: "i32", torch.float32: "fp32", torch.uint8: "u8", torch.bfloat16: "bf16", torch.int64: "i64"}
H = I = 2880
E, TOPK, P = 32, 4, 4


def jit_of(k):
    while not isinstance(k, triton.runtime.JITFunction):
        k = k.fn
    return k


def stack_for(fmt: str, out_f: int, in_f: int) -> FK.FmtStack:
    """A 2-expert stack of small random weights (only the dtypes matter; ints come from the 20b shapes)."""
    w = torch.randn(2, 256, 256)
    ps = [get_format(fmt).quantize(w[e].bfloat16() if fmt == "bf16" else w[e]) for e in range(2)]
    return FK.FmtStack(fmt, {n: torch.stack([p.tensors[n] for p in ps]) for n in ps[0].tensors}, 256, 256)


def args_for(kernel: str, st: FK.FmtStack):
    """(name -> value) of every runtime argument, with 20b-shaped integers."""
    t32 = torch.empty(1, dtype=torch.int32)
    f32 = torch.empty(1, dtype=torch.float32)
    b16 = torch.empty(1, dtype=torch.bfloat16)
    gate = kernel.startswith("gate_up")
    out_f, in_f = (2 * I, H) if gate else (H, I)
    wpr = in_f // st.epw
    if st.code == FK.BF16:
        s_sr = s_se = 0
    elif st.code == FK.FP8 and st.srow > 1:                            # fp8_block: [out/128, in/128] per expert
        s_sr = -(-in_f // 128)
        s_se = -(-out_f // 128) * s_sr
    elif st.code == FK.FP8:                                            # fp8: [out, 1]
        s_sr, s_se = 1, out_f
    else:
        s_sr = -(-in_f // (st.gw * st.epw))
        s_se = out_f * s_sr
    s_ne = -(-(out_f * in_f // 64) // 256) if st.code == FK.NF4DQ else 0
    w = dict(w_ptr=st.w, s_ptr=st.s, z_ptr=st.z, g_ptr=st.g, n_ptr=st.n, lut_ptr=st.lut, WPR=wpr,
             s_we=out_f * wpr, s_wr=wpr, s_se=s_se, s_sr=s_sr, s_sg=st.s_sg, s_ne=s_ne, slot_ptr=t32, sidx_ptr=t32,
             slot=2)
    if kernel == "gate_up_gemv":
        w.update(x_ptr=f32, idx_ptr=t32, bias_ptr=b16, y_ptr=f32, P=P, K=H, I=I, alpha=1.702, limit=7.0)
    elif kernel == "down_gemv":
        w.update(y_ptr=f32, idx_ptr=t32, wt_ptr=f32, bias_ptr=b16, z_out=f32, P=P, K=I, H=H)
    elif kernel == "gate_up_grouped":
        w.update(x_ptr=b16, order_ptr=t32, te_ptr=t32, ts_ptr=t32, tn_ptr=t32, bias_ptr=b16, y_ptr=b16, P=8192,
                 K=H, I=I, alpha=1.702, limit=7.0)
    else:
        w.update(y_ptr=b16, order_ptr=t32, wt_ptr=f32, te_ptr=t32, ts_ptr=t32, tn_ptr=t32, bias_ptr=b16, z_out=f32,
                 P=8192, K=I, H=H)
    return w


KERNELS = {"gate_up_gemv": (FK._fmt_gate_up_gemv_kernel, FK._FMT_GEMV_CONFIGS),
           "down_gemv": (FK._fmt_down_gemv_kernel, FK._FMT_GEMV_CONFIGS),
           "gate_up_grouped": (FK._fmt_gate_up_grouped_kernel, FK._FMT_GROUPED_CONFIGS),
           "down_grouped": (FK._fmt_down_grouped_kernel, FK._FMT_GROUPED_CONFIGS)}


def compile_one(kernel: str, fmt: str, conf, st: FK.FmtStack) -> dict:
    fn = jit_of(KERNELS[kernel][0])
    vals = args_for(kernel, st)
    consts = {**st.meta(), **conf.kwargs}
    if kernel.startswith("gate_up"):
        consts["TOPK"] = TOPK
    if kernel.endswith("grouped"):
        consts.update(BM=FK.GROUP_BM, DOT_F32=False)
    else:
        consts["PDL"] = True                      # the decode GEMVs wait on the previous grid (mxq.runtime.pdl)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        v = vals[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name != "slot" and v % 16 == 0 and v != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in consts if n not in fn.arg_names]
    assert not missing, missing
    src = ASTSource(fn, sig, {k: v for k, v in consts.items()}, attrs)
    t0 = time.perf_counter()
    res = {"kernel": kernel, "fmt": fmt, "config": {**conf.kwargs, "warps": conf.num_warps, "stages": conf.num_stages}}
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": conf.num_warps, "num_stages": conf.num_stages})
    except Exception as exc:                                              # report every failure, keep going
        while exc.__cause__ is not None or exc.__context__ is not None:   # the innermost cause says why
            exc = exc.__cause__ or exc.__context__
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        return res
    res.update(ok=True, seconds=round(time.perf_counter() - t0, 1))
    cuobj = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobj), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if m:
        res.update(regs=int(m.group(1)), stack_bytes=int(m.group(2)))          # stack > 0: register spills
    ptx = k.asm["ptx"]
    res.update(shared_bytes=k.metadata.shared, wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
               cp_async=ptx.count("cp.async.c"))         # > 0: the loop is software-pipelined
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=",".join(FK.FORMATS))
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--first-config-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    results, bad = [], 0
    for fmt in a.formats.split(","):
        st = stack_for(fmt, 256, 256)
        for kernel in a.kernels.split(","):
            confs = KERNELS[kernel][1][:1] if a.first_config_only else KERNELS[kernel][1]
            for conf in confs:
                r = compile_one(kernel, fmt, conf, st)
                results.append(r)
                bad += not r["ok"]
                print(json.dumps(r), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{len(results) - bad}/{len(results)} compiled", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
