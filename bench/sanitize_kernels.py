"""Drive every Triton kernel of ``mxq.runtime`` once per launch variant, for NVIDIA compute-sanitizer.

The numeric GPU tests compare against a torch reference that is far too slow (and, with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, too memory-hungry) under memcheck; this script only runs the kernels, at
gpt-oss-20b shapes, and checks that outputs are finite. The sanitizer's own ``ERROR SUMMARY`` is the verdict.
One part per process (parts run in parallel on one GPU):

  model    2-layer gpt-oss-20b checkpoints (MXFP4 and bf16 experts): fast prefill (300 tokens, past the sliding
           window: grouped GEMMs with ``tl.dot_scaled``, the expert sort, top-k) and graph-replayed decode at
           batch 2 with programmatic dependent launch, greedy and sampled
  moe      every decode GEMV config and every grouped GEMM config of ``moe_kernels`` (MXFP4 and bf16; each
           tile size BM for the first grouped config)
  fmt      every expert format through ``fmt_kernels`` (first configs) and a mixed-format layer; every GEMV
           config for nvfp4 and int4_g32_asym
  misc     the expert sort at 8k-262k pairs (32/128 experts, skewed), attention (decode split/unsplit, prefill,
           full and sliding), every dense-GEMV config, the router (fused and top-k), RMSNorm variants, argmax

Usage (the ``prepare`` step writes the checkpoints outside the tool)::

    python bench/sanitize_kernels.py prepare --ckpt /tmp/san
    compute-sanitizer --tool memcheck python bench/sanitize_kernels.py model --ckpt /tmp/san
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import synthetic_moe_layer  # noqa: E402

DEV = "cuda"
H, I, E, K = 2880, 2880, 32, 4
E_FMT = 12          # experts of the fmt_kernels layers (quantized one by one: few keep the run short under the tool)


def finite(name: str, *ts: torch.Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t.float()).all():
            raise SystemExit(f"{name}: non-finite output")
    print(f"ok {name}", flush=True)


def routing(n: int, e: int, k: int, seed: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [n, k] int32 (k distinct experts per token; ``skew``: half the tokens on experts 0..k-1), wt [n, k]."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    idx = torch.rand(n, e, device=DEV, generator=g).argsort(-1)[:, :k].int()
    if skew:
        idx[: n // 2] = torch.arange(k, device=DEV, dtype=torch.int32)
    return idx, torch.softmax(torch.randn(n, k, device=DEV, generator=g), -1)


def ckpt_paths(root: Path) -> dict[str, Path]:
    return {fmt: root / fmt for fmt in ("mxfp4", "bf16")}


def part_prepare(a) -> None:
    from mxq.synth import synth

    for fmt, path in ckpt_paths(a.ckpt).items():
        if not (path / "config.json").exists():
            synth(path, "gpt-oss-20b", fmt, 0, DEV, False, {"num_hidden_layers": 2}, overwrite=True)
        print(f"ok checkpoint {path}", flush=True)


def part_model(a) -> None:
    import mxq
    from mxq.runtime.engine import Runtime

    # graph capture needs torch's caching allocator; without it (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that
    # memcheck sees every buffer's own bounds) the same kernels run eagerly, PDL included
    graph = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "1"
    for fmt, path in ckpt_paths(a.ckpt).items():
        if fmt not in a.experts.split(","):
            continue
        model = mxq.load_model(path, device=DEV, dtype=torch.bfloat16)
        rt = Runtime(model, use_graph=graph)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size - 1100, (2, 300), generator=g).to(DEV)
        st = rt.new_state(2, 512)
        lg = rt.prefill(st, ids)
        st.seq[:, 300] = lg.argmax(-1).to(torch.int32)
        steps = [rt.step(st).clone() for _ in range(4)]
        finite(f"model {fmt} prefill + 4 {'graph' if graph else 'eager'} steps", lg, *steps)
        out = rt.generate(ids[:1, :140], 4, do_sample=True, temperature=0.8, top_p=0.9, top_k=50)
        finite(f"model {fmt} sampled generate", out.float())
        del rt, st, model, lg, steps
        gc.collect()
        torch.cuda.empty_cache()


def part_moe(a) -> None:
    from mxq.runtime import moe_kernels as M
    from mxq.runtime._common import forced_config
    from mxq.runtime.moe_kernels import down_gemv, gate_up_gemv, kernel_x, moe_grouped

    g = torch.Generator(device=DEV).manual_seed(0)
    for fmt in ("mxfp4", "bf16"):
        ex, gu, dn = synthetic_moe_layer(fmt, E, H, I, DEV, g)
        x2 = torch.randn(2, H, device=DEV, generator=g).bfloat16()
        idx2, wt2 = routing(2, E, K, 1)
        for c in M._GEMV_CONFIGS:
            with forced_config([M._gate_up_gemv_kernel, M._down_gemv_kernel], c):
                y = gate_up_gemv(kernel_x(x2, gu.fp4), idx2, gu, ex.gate_up_bias, 1.702, 7.0, yperm=dn.fp4)
                z = down_gemv(y, idx2, wt2, dn, ex.down_bias)
            finite(f"gemv {fmt} {c}", y, z)
        xp = torch.randn(600, H, device=DEV, generator=g).bfloat16()
        idxp, wtp = routing(600, E, K, 2)
        default_bm = M.MOE_BM[fmt]
        runs = [(c, default_bm) for c in M._GROUPED_CONFIGS] + \
            [(M._GROUPED_CONFIGS[0], bm) for bm in (32, 64, 128) if bm != default_bm]
        for c, bm in runs:
            with forced_config([M._gate_up_grouped_kernel, M._down_grouped_kernel], c):
                z = moe_grouped(xp, idxp, wtp, gu, ex.gate_up_bias, dn, ex.down_bias, 1.702, 7.0, bm=bm)
            finite(f"grouped {fmt} BM={bm} {c}", z)
        del ex, gu, dn
        torch.cuda.empty_cache()


def _fmt_layer(fmts: list[str], g: torch.Generator):
    """A PackedExperts layer with expert e quantized in fmts[e % len(fmts)] (both kinds), fmt_kernels' views."""
    from mxq.formats import get_format
    from mxq.model.experts import PackedExperts
    from mxq.runtime.fmt_kernels import FmtExperts

    ex = PackedExperts(E_FMT, H, I, 1.702, 7.0).to(DEV)
    for kind, shape in (("gate_up", (2 * I, H)), ("down", (H, I))):
        for e in range(E_FMT):
            f = fmts[e % len(fmts)]
            w = torch.randn(*shape, device=DEV, generator=g) * shape[-1] ** -0.5
            ex.set_expert(kind, e, get_format(f).quantize(w.bfloat16() if f == "bf16" else w))
    ex.gate_up_bias.data = ex.gate_up_bias.data.bfloat16()
    ex.down_bias.data = ex.down_bias.data.bfloat16()
    return ex, FmtExperts(ex, "gate_up"), FmtExperts(ex, "down")


def part_fmt(a) -> None:
    from mxq.runtime import fmt_kernels as FK
    from mxq.runtime._common import forced_config
    from mxq.runtime.fmt_kernels import fmt_down_gemv, fmt_gate_up_gemv, fmt_moe_grouped

    formats = list(FK.FORMATS)                        # every format fmt_kernels has a kernel for

    g = torch.Generator(device=DEV).manual_seed(0)
    gemv = [FK._fmt_gate_up_gemv_kernel, FK._fmt_down_gemv_kernel]
    grouped = [FK._fmt_gate_up_grouped_kernel, FK._fmt_down_grouped_kernel]
    x2 = torch.randn(2, H, device=DEV, generator=g).bfloat16()
    idx2, wt2 = routing(2, E_FMT, K, 1)
    xp = torch.randn(600, H, device=DEV, generator=g).bfloat16()
    idxp, wtp = routing(600, E_FMT, K, 2)
    layers = [[f] for f in formats] + [formats]
    for fmts in layers:
        ex, gu, dn = _fmt_layer(fmts, g)
        name = fmts[0] if len(fmts) == 1 else "mixed(all formats)"
        sweep = FK._FMT_GEMV_CONFIGS if name in ("nvfp4", "int4_g32_asym") else FK._FMT_GEMV_CONFIGS[:1]
        for c in sweep:
            with forced_config(gemv, c):
                y = fmt_gate_up_gemv(x2.float(), idx2, gu, ex.gate_up_bias, 1.702, 7.0)
                z = fmt_down_gemv(y, idx2, wt2, dn, ex.down_bias)
            finite(f"fmt gemv {name} {c}", y, z)
        with forced_config(grouped, FK._FMT_GROUPED_CONFIGS[0]):
            z = fmt_moe_grouped(xp, idxp, wtp, gu, ex.gate_up_bias, dn, ex.down_bias, 1.702, 7.0)
        finite(f"fmt grouped {name}", z)
        del ex, gu, dn
        torch.cuda.empty_cache()


def part_misc(a) -> None:
    from mxq.runtime import linear_kernels as LK
    from mxq.runtime._common import forced_config
    from mxq.runtime.attn_kernels import argmax_advance, rmsnorm, rope_cache, sink_attention
    from mxq.runtime.linear_kernels import linear_gemv
    from mxq.runtime.moe_kernels import expert_tiles, router_topk

    g = torch.Generator(device=DEV).manual_seed(0)
    for p, e, bm, skew in ((8192, 32, 64, False), (8192, 128, 128, True), (262144, 128, 64, False),
                           (262144, 32, 128, True), (8, 32, 64, False)):
        idx, _ = routing(p // K, e, K, 3, skew)
        order, te, ts, tn = expert_tiles(idx, e, bm)
        finite(f"expert_tiles P={p} E={e} BM={bm} skew={skew}", order.float(), te.float(), ts.float(), tn.float())
    nh, kv, d, L = 64, 8, 64, 512
    cos = torch.randn(L, d // 2, device=DEV, generator=g).bfloat16()
    sin = torch.randn(L, d // 2, device=DEV, generator=g).bfloat16()
    sinks = torch.randn(nh, device=DEV, generator=g)
    for b, t, split in ((2, 300, False), (2, 1, True), (1, 1, True)):
        kc = torch.randn(b, kv, L, d, device=DEV, generator=g).bfloat16()
        vc = torch.randn_like(kc)
        pos = torch.tensor([0 if t > 1 else 437], dtype=torch.int32, device=DEV)
        q = torch.randn(b * t, nh * d, device=DEV, generator=g).bfloat16()
        k = torch.randn(b * t, kv * d, device=DEV, generator=g).bfloat16()
        qr = rope_cache(q, k, k.clone(), cos, sin, kc, vc, pos, t)
        for window in (0, 128):
            o = sink_attention(qr, kc, vc, sinks, pos, t, window, d ** -0.5, split=split)
            finite(f"attention B={b} T={t} split={split} window={window}", o)
    x = torch.randn(2, H, device=DEV, generator=g).bfloat16()
    ws = [(torch.randn(n, H, device=DEV, generator=g).bfloat16() * 0.02, torch.randn(n, device=DEV).bfloat16())
          for n in (4096, 512, 512)]
    wo = (torch.randn(H, 4096, device=DEV, generator=g).bfloat16() * 0.02, torch.randn(H, device=DEV).bfloat16())
    xo = torch.randn(2, 4096, device=DEV, generator=g).bfloat16()
    for c in LK._CONFIGS:
        with forced_config([LK._gemv3_kernel], c):
            outs = linear_gemv(x, ws) + linear_gemv(xo, [wo])
        finite(f"linear_gemv {c}", *outs)
    wr = torch.randn(E, H, device=DEV, generator=g).bfloat16() * 0.02
    br = torch.randn(E, device=DEV, generator=g).bfloat16()
    for n in (1, 2, 64, 300):
        idx, wt = router_topk(torch.randn(n, H, device=DEV, generator=g).bfloat16(), wr, br, K)
        finite(f"router n={n}", idx.float(), wt)
    w = torch.randn(H, device=DEV, generator=g).bfloat16()
    for n in (1, 2, 300):
        xr = torch.randn(n, H, device=DEV, generator=g).bfloat16()
        delta = torch.randn_like(xr)
        moe = torch.randn(n, K, H, device=DEV, generator=g)
        outs = [rmsnorm(xr, w, 1e-5)] + list(rmsnorm(xr, w, 1e-5, delta=delta)) + \
            list(rmsnorm(xr, w, 1e-5, moe=moe, hs="fp32")) + [rmsnorm(xr, w, 1e-5, delta=delta, hs="h2perm")[2].x]
        finite(f"rmsnorm n={n}", *outs)
    for b in (1, 2):
        seq = torch.zeros(b, 65, dtype=torch.int32, device=DEV)
        pos = torch.tensor([3], dtype=torch.int32, device=DEV)
        argmax_advance(torch.randn(b, 201088, device=DEV, generator=g).bfloat16(), seq, pos)
        finite(f"argmax_advance B={b}", seq.float())


PARTS = {"prepare": part_prepare, "model": part_model, "moe": part_moe, "fmt": part_fmt, "misc": part_misc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=sorted(PARTS))
    ap.add_argument("--experts", default="mxfp4,bf16", help="model part: which checkpoints to run")
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/mxq-sanitize"), help="2-layer checkpoints (model)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sanitize_kernels: needs a CUDA GPU")
    t0 = time.perf_counter()
    PARTS[a.part](a)
    torch.cuda.synchronize()
    print(f"done {a.part} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
