"""The grouped MoE pass gives bit-identical outputs and observer inputs to a plain per-expert loop.

Reference: for each expert in ascending order, its tokens found by a boolean scan of the top-k ids
(ascending token order), ``expert_forward`` on them, then ``out[tok] += f_e(x) * g_e(x)`` in fp32.
Also: collecting statistics never runs ``lm_head`` (``model(..., logits=False)``).
"""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.calib import CalibSet
from mxq.model import observe
from mxq.stats import collect


class Recorder:
    def __init__(self):
        self.route: list[tuple] = []
        self.expert: list[tuple] = []

    def on_route(self, layer, logits, idx, w, valid):
        self.route.append((layer, logits.clone(), idx.clone(), w.clone(), valid.clone()))

    def on_expert(self, layer, e, tok, gw, out):
        self.expert.append((layer, e, tok.clone(), gw.clone(), out.clone()))


def reference_moe(mlp, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """x [B, T, H] -> (out [B, T, H], [(e, tok, gw, f_e(x) fp32)]) by boolean scans, expert by expert."""
    flat = x.reshape(-1, x.shape[-1])
    _, idx, w = mlp.route(flat)
    out = torch.zeros_like(flat, dtype=torch.float32)
    calls = []
    for e in range(mlp.experts.num_experts):
        hit = idx == e                                                    # [N, k]
        tok = hit.any(dim=-1).nonzero().squeeze(-1)
        if tok.numel() == 0:
            continue
        gw = (w * hit).sum(dim=-1)[tok]
        y = mlp.experts.expert_forward(e, flat[tok]).float()
        calls.append((e, tok, gw, y))
        out[tok] += y * gw[:, None]
    return out.to(x.dtype).view_as(x), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_matches_reference_loop_bitwise(make_ckpt, dtype):
    model = mxq.load_model(make_ckpt("mxfp4"), dtype=dtype)
    mlp = model.layers[1].mlp
    x = torch.randn(3, 50, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    valid = torch.ones(3, 50, dtype=torch.bool)
    rec = Recorder()
    with torch.no_grad(), observe(model, rec):
        got, _ = mlp(x, valid)
    with torch.no_grad():
        want, calls = reference_moe(mlp, x)
    assert torch.equal(got, want)
    assert len(rec.expert) == len(calls)
    for (layer, e, tok, gw, y), (e2, tok2, gw2, y2) in zip(rec.expert, calls):
        assert layer == 1 and e == e2 and torch.equal(tok, tok2) and torch.equal(gw, gw2) and torch.equal(y, y2)


def test_collect_never_runs_lm_head(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4"), dtype=torch.float32)
    calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    try:
        stats = collect(model, CalibSet(ids, torch.ones_like(ids), ["a", "b"], "t"), batch_size=2, progress=False)
    finally:
        handle.remove()
    assert calls == [] and stats.tokens == 32
    with torch.no_grad():
        assert model(ids, logits=False).logits is None
