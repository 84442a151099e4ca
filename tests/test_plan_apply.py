"""``apply_``: pruned layers stay stacked in their own (copied, smaller) buffers, re-packing goes through
exact dequantization, a format kept is kept byte for byte, fp8 attention runs on the stored values."""
from __future__ import annotations

import torch

import mxq
from mxq.formats import get_format
from mxq.plan import Plan, apply_, current_plan

E = 12                       # experts per layer of the test checkpoint


def test_pruned_mxfp4_layer_stays_stacked_in_a_smaller_buffer(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    src = model.layers[0].mlp.experts.gate_up_blocks.clone()             # [E, 2I, H/32, 16]
    rows = [["prune" if e % 4 == 0 else "mxfp4" for e in range(E)] for _ in range(2)]
    apply_(model, Plan(rows))
    ex = model.layers[0].mlp.experts
    kept = [e for e in range(E) if e % 4]
    assert ex.num_experts == 9 and model.layers[0].mlp.router.weight.shape[0] == 9
    assert ex.gate_up_blocks.shape[0] == 9                              # still one stacked tensor
    assert ex.gate_up_blocks.untyped_storage().nbytes() == ex.gate_up_blocks.numel()   # owns only the kept bytes
    assert torch.equal(ex.gate_up_blocks, src[kept])
    assert model.config.num_local_experts == 9 and current_plan(model).formats_used() == {"mxfp4": 18}


def test_repacking_goes_through_exact_dequantization(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    before = [model.layers[1].mlp.experts.packed("down", e) for e in range(E)]
    before = [get_format("mxfp4").dequantize(p) for p in before]
    rows = [["nvfp4" if e % 2 else "int4_g32" for e in range(E)] for _ in range(2)]
    apply_(model, Plan(rows))
    ex = model.layers[1].mlp.experts
    assert ex.formats()[:2] == ["int4_g32", "nvfp4"]
    for e in (0, 1):
        want = get_format(rows[1][e]).quantize(before[e])
        got = ex.packed("down", e)
        assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    # applying a plan that keeps those formats changes no byte
    kept = {e: {k: v.clone() for k, v in ex.packed("gate_up", e).tensors.items()} for e in (0, 1)}
    rows2 = [[f if e not in (5, 6, 7, 8) else "prune" for e, f in enumerate(r)] for r in rows]
    apply_(model, Plan(rows2))
    ex = model.layers[1].mlp.experts
    for e in (0, 1):
        assert all(torch.equal(ex.packed("gate_up", e).tensors[k], v) for k, v in kept[e].items())


def test_fp8_attention_and_lm_head_run_on_the_stored_values(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    w = model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    apply_(model, Plan([["mxfp4"] * E] * 2, attention="fp8", lm_head="fp8_block"))
    lin = model.layers[0].self_attn.q_proj
    p = get_format("fp8").quantize(w)
    assert torch.equal(lin._mxq_packed.tensors["weight"].view(torch.uint8), p.tensors["weight"].view(torch.uint8))
    assert torch.equal(lin.weight, get_format("fp8").dequantize(p))
    assert current_plan(model).attention == "fp8" and current_plan(model).lm_head == "fp8_block"
    with torch.no_grad():
        out = model(ids).logits
    rms = lambda t: t.pow(2).mean().sqrt().item()                     # noqa: E731
    assert 0 < rms(out - ref) < 0.1 * rms(ref)                          # fp8 noise, not garbage
    apply_(model, Plan([["mxfp4"] * E] * 2))                          # back to bf16: stash dropped
    assert not hasattr(lin, "_mxq_packed") and current_plan(model).attention == "bf16"
