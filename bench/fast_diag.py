"""Locate where the fast path (mxq.runtime) departs from mxq's reference forward, stage by stage.

Each stage of each layer runs the fast kernel on the *reference's own input* to that stage (teacher forcing),
so an error shows where it is made, not where it has accumulated. Prefill over T tokens (grouped MoE, no key
split) and then one decode step at position T (GEMV kernels, split-K attention), both against the reference
with its KV cache. Prints one line per (mode, layer, stage) and writes JSON lines to --out.

    python bench/fast_diag.py --work /tmp/diag --layers 2 --tokens 300 --out diag.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def capture(model, ids: torch.Tensor, cache) -> list[dict]:
    """Reference forward with hooks: per layer the inputs/outputs of every stage."""
    rec: list[dict] = [dict() for _ in model.layers]
    hooks = []
    for i, lyr in enumerate(model.layers):
        r = rec[i]
        hooks += [
            lyr.register_forward_pre_hook(lambda m, a, r=r: r.__setitem__("x_in", a[0].detach().clone())),
            lyr.input_layernorm.register_forward_hook(lambda m, a, o, r=r: r.__setitem__("h", o.detach().clone())),
            lyr.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, r=r: r.__setitem__("o", a[0].detach().clone())),
            lyr.self_attn.register_forward_hook(lambda m, a, o, r=r: r.__setitem__("attn", o.detach().clone())),
            lyr.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, r=r: r.__setitem__("x_mid", a[0].detach().clone())),
            lyr.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, r=r: r.__setitem__("h2", o.detach().clone())),
            lyr.mlp.register_forward_hook(lambda m, a, o, r=r: r.__setitem__("moe", o[0].detach().clone())),
            lyr.register_forward_hook(lambda m, a, o, r=r: r.__setitem__("x_out", o[0].detach().clone())),
        ]
    try:
        with torch.no_grad():
            logits = model(ids, cache=cache).logits
    finally:
        for h in hooks:
            h.remove()
    rec.append({"logits": logits})
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mxq_diag")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import mxq
    from mxq.runtime import enable
    from mxq.runtime.attn_kernels import rmsnorm, rope_cache, sink_attention
    from mxq.runtime.linear_kernels import linear_gemv
    from mxq.runtime.moe_kernels import down_gemv, gate_up_gemv, moe_grouped, router_topk
    from mxq.synth import synth

    dev = a.device
    path = Path(a.work) / f"{a.preset}_l{a.layers}_{a.experts}"
    if not (path / "config.json").exists():
        synth(path, a.preset, a.experts, 0, dev, False, {"num_hidden_layers": a.layers}, overwrite=True)
    model = mxq.load_model(path, device=dev, dtype=torch.bfloat16)
    mxq.model.set_attention_impl(model, "eager")     # the fast kernels reproduce the eager bf16 rounding
    rt = enable(model)
    T = a.tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 1100, (1, T + 1), generator=g).to(dev)

    # reference: prefill T tokens into a cache, then one decode step
    cache = model.new_cache(1, T + 64)
    ref_pre = capture(model, ids[:, :T], cache)
    ref_dec = capture(model, ids[:, T:T + 1], cache)

    st = rt.new_state(1, T + 64)            # own cache for the fast kernels
    rows = []

    def out(mode, layer, stage, err, **kw):
        row = {"mode": mode, "layer": layer, "stage": stage, "rel": round(err, 6), **kw}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for mode, rec, t, p0 in (("prefill", ref_pre, T, 0), ("decode", ref_dec, 1, T)):
        decode = mode == "decode"
        st.pos.fill_(p0)
        for i, L in enumerate(rt.layers):
            r = rec[i]
            x = r["x_in"].reshape(t, -1)
            h = rmsnorm(x, L.ln1, rt.eps)
            out(mode, i, "rmsnorm1", rel(h, r["h"].reshape(t, -1)))
            hr = r["h"].reshape(t, -1)
            if decode:
                q, k, v = linear_gemv(hr, [(L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)])
            else:
                q, k, v = F.linear(hr, L.wq, L.bq), F.linear(hr, L.wk, L.bk), F.linear(hr, L.wv, L.bv)
            kc, vc = st.cache.k[i], st.cache.v[i]
            qr = rope_cache(q, k, v, st.cos, st.sin, kc, vc, st.pos, t)
            s = p0 + t
            out(mode, i, "k_cache", rel(kc[:, :, :s], cache.k[i][:, :, :s]))
            out(mode, i, "v_cache", rel(vc[:, :, :s], cache.v[i][:, :, :s]))
            o = sink_attention(qr, kc, vc, L.sinks, st.pos, t, L.window, rt.scale, split=decode)
            ro = r["o"].reshape(t, -1)
            out(mode, i, "attention", rel(o.view(t, -1), ro), window=L.window,
                per_pos_max=round(max(rel(o.view(t, -1)[j], ro[j]) for j in range(t)), 6))
            if decode:
                att = linear_gemv(ro, [(L.wo, L.bo)])[0]
            else:
                att = F.linear(ro, L.wo, L.bo)
            out(mode, i, "o_proj", rel(att, r["attn"].reshape(t, -1)))
            xm, h2 = rmsnorm(x, L.ln2, rt.eps, delta=r["attn"].reshape(t, -1))
            out(mode, i, "residual1", rel(xm, r["x_mid"].reshape(t, -1)))
            out(mode, i, "rmsnorm2", rel(h2, r["h2"].reshape(t, -1)))
            h2r = r["h2"].reshape(t, -1).contiguous()
            idx, wt = router_topk(h2r, L.wr, L.br, rt.top_k)
            logits_r, idx_r, w_r = model.layers[i].mlp.route(h2r)
            same = (idx.long().sort(-1).values == idx_r.sort(-1).values).all(-1).float().mean().item()
            out(mode, i, "router_sets_equal", 1 - same, weights_rel=round(rel(wt.sort(-1).values,
                                                                             w_r.sort(-1).values), 6))
            idx_r32 = idx_r.int().contiguous()
            if decode:
                _, _, hs = rmsnorm(x, L.ln2, rt.eps, delta=r["attn"].reshape(t, -1),
                                   hs="h2perm" if L.gu.fp4 else "fp32")
                y = gate_up_gemv(hs, idx_r32, L.gu, L.gu_bias, rt.alpha, rt.limit, yperm=L.dn.fp4)
                z = down_gemv(y, idx_r32, w_r.contiguous(), L.dn, L.dn_bias)
            else:
                z = moe_grouped(h2r, idx_r32, w_r.contiguous(), L.gu, L.gu_bias, L.dn, L.dn_bias, rt.alpha, rt.limit)
            out(mode, i, "moe", rel(z.sum(1), r["moe"].reshape(t, -1)))        # z [t, k, H] fp32
            nxt = rt.layers[i + 1].ln1 if i + 1 < len(rt.layers) else model.norm.weight
            xo, _ = rmsnorm(r["x_mid"].reshape(t, -1), nxt, rt.eps, moe=z)
            out(mode, i, "residual2", rel(xo, r["x_out"].reshape(t, -1)))
        st.pos.fill_(p0 + t)

    # the end-to-end numbers for context
    st2 = rt.new_state(1, T + 64)
    fast_logits = rt.prefill(st2, ids[:, :T]).float()
    out("e2e", -1, "prefill_last_logits", rel(fast_logits[0], ref_pre[-1]["logits"][0, -1]))
    step = rt.step(st2, ids[0, T:T + 1]).float()
    out("e2e", -1, "decode_logits", rel(step[0], ref_dec[-1]["logits"][0, -1]))
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
