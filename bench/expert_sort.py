"""The prefill expert sort: ``expert_tiles`` (two Triton launches, mxq.runtime.tile_kernels) against
``expert_tiles_torch`` (the ~15 torch ops it replaced).

    python bench/expert_sort.py [--json out.json]       GPU: median of 50 CUDA-event timings per call
    python bench/expert_sort.py --sm90 [--json out.json]  any machine: compile the kernels for sm_90, registers/spills
    TRITON_INTERPRET=1 python bench/expert_sort.py      CPU: a tiny size in the interpreter (correctness only)

Each timing brackets one call with CUDA events after warm-up, so it includes the gaps while the host launches
(what an eager prefill pays), for P = N * 4 pairs in (8192, 32768, 262144) and E in (32, 128), bm = 64.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_bench import event_median_ms  # noqa: E402
from mxq.runtime import tile_kernels as TK  # noqa: E402

TOPK, BM = 4, 64


def routes(p: int, e: int, dev: str) -> torch.Tensor:
    """[P / 4, 4] int32 distinct expert ids per token, uniform."""
    g = torch.Generator(device=dev).manual_seed(p + e)
    return torch.rand(p // TOPK, e, device=dev, generator=g).topk(TOPK, dim=1).indices.int()


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def bench(sizes, experts, reps: int) -> list[dict]:
    rows = []
    print(f"{'P':>8} {'E':>4} {'triton us':>10} {'torch us':>10} {'speedup':>8}  equal")
    for p in sizes:
        for e in experts:
            idx = routes(p, e, "cuda")
            ok = same(TK.expert_tiles(idx, e, BM), TK.expert_tiles_torch(idx, e, BM))
            tri = event_median_ms(lambda: TK.expert_tiles(idx, e, BM), reps, 5) * 1e3
            ref = event_median_ms(lambda: TK.expert_tiles_torch(idx, e, BM), reps, 5) * 1e3
            rows.append({"P": p, "E": e, "bm": BM, "triton_us": round(tri, 1), "torch_us": round(ref, 1),
                         "speedup": round(ref / tri, 1), "equal": ok})
            print(f"{p:>8} {e:>4} {tri:>10.1f} {ref:>10.1f} {ref / tri:>8.1f}  {ok}", flush=True)
    return rows


def compile_sm90() -> list[dict]:
    """Both kernels for sm_90 (``triton.compile`` offline, launch options) over the constexpr variants that the
    wrapper picks; registers, stack (> 0: spills) and shared memory from ``cuobjdump -res-usage``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobj = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    ints = ("P", "E", "C", "T")
    out = []
    variants = []
    for idt in ("i32", "i64"):
        for be in (32, 128):
            for block in (256, 1024, 4096):
                variants.append(("hist", TK._chunk_hist_kernel, idt, dict(BE=be, BLOCK=block), TK._HIST_WARPS))
            for bm in (64, 128):
                variants.append(("sort", TK._sort_tiles_kernel, idt,
                                 dict(BE=be, LOG_BE=be.bit_length() - 1, BLOCK=1024, BM=bm, CB=TK._ELEMS // be,
                                      SB=TK._SB, TB=TK._TB), TK._SORT_WARPS))
    for name, fn, idt, consts, warps in variants:
        sig = {n: "constexpr" if n in consts else "i32" if n in ints else f"*{idt}" if n == "ids_ptr" else "*i32"
               for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 3})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([str(cuobj), "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", res)
        row = {"kernel": name, "ids": idt, **{k_: v for k_, v in consts.items() if k_ in ("BE", "BLOCK", "BM")},
               "warps": warps, "regs": int(m.group(1)), "stack_bytes": int(m.group(2)),
               "static_shared": int(m.group(3)), "dyn_shared": k.metadata.shared}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8192,32768,262144")
    ap.add_argument("--experts", default="32,128")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sm90", action="store_true", help="compile for sm_90 offline and report registers/spills")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.sm90:
        res = {"sm90": compile_sm90()}
    elif torch.cuda.is_available():
        res = {"device": torch.cuda.get_device_name(), "rows": bench([int(s) for s in a.sizes.split(",")],
                                                                      [int(s) for s in a.experts.split(",")], a.reps)}
    elif os.environ.get("TRITON_INTERPRET") == "1":
        from mxq.runtime.interp_patch import apply

        apply()
        idx = routes(1024, 32, "cpu")
        t0 = time.perf_counter()
        got = TK.expert_tiles(idx, 32, BM)
        res = {"device": "cpu (Triton interpreter)", "P": 1024, "E": 32, "seconds": round(time.perf_counter() - t0, 2),
               "equal": same(got, TK.expert_tiles_torch(idx, 32, BM))}
        print(f"interpreter, P=1024 E=32: equal to the torch reference: {res['equal']} ({res['seconds']} s; no timing "
              "meaning on CPU)")
    else:
        print("no CUDA GPU: nothing to time (use --sm90 for the offline compile report, or TRITON_INTERPRET=1 for a "
              "tiny correctness run in the interpreter)")
        return 0
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if all(r.get("equal", True) for r in res.get("rows", [res])) else 1


if __name__ == "__main__":
    sys.exit(main())
