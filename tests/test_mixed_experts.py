"""A layer may hold every expert in a different format; the forward pass runs through each format's path."""
from __future__ import annotations

import torch

import mxq
from mxq.formats import get_format, list_formats


def test_mixed_formats_in_one_layer(make_ckpt):
    path = make_ckpt("mxfp4")
    ref = mxq.load_model(path, dtype=torch.float32)
    m = mxq.load_model(path, dtype=torch.float32)
    ex = m.layers[0].mlp.experts
    fmts = list_formats()
    expect_bytes = 0
    for e in range(ex.num_experts):
        f = get_format(fmts[e % len(fmts)])
        for kind in ("gate_up", "down"):
            src = ex.packed(kind, e)
            w = get_format(src.format).dequantize(src)                         # exact MXFP4 values
            p = f.quantize(w.to(torch.bfloat16) if f.name == "bf16" else w)
            ex.set_expert(kind, e, p)
            expect_bytes += f.nbytes(tuple(w.shape))
            assert ex.packed(kind, e).format == f.name
    assert sorted(set(ex.formats())) == fmts
    # bytes held = packed sizes of the new tensors (+ the stacked MXFP4 buffers still registered)
    own = sum(b.numel() * b.element_size() for n, b in ex.named_buffers() if n[len("gate_up_"):].split("_")[0].isdigit()
              or n[len("down_"):].split("_")[0].isdigit())
    assert own == expect_bytes
    ids = torch.randint(0, 6144, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, m(ids).logits
    assert torch.isfinite(b).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.2, rel          # re-quantizing one layer perturbs, but only a little
    # the bf16/fp8 experts reproduce MXFP4 values exactly, so those experts' outputs are unchanged
    x = torch.randn(5, 192)
    e_bf16 = fmts.index("bf16")
    assert torch.allclose(ex.expert_forward(e_bf16, x), ref.layers[0].mlp.experts.expert_forward(e_bf16, x), atol=1e-5)
