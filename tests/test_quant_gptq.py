"""Calibrated quantization (mxq.quant): GPTQ beats RTN per format, routed-token Hessians, fallbacks, options."""
from __future__ import annotations

import json

import pytest
import torch

from mxq.formats import get_format
from mxq.plan import Plan, PlanError, validate
from mxq.quant import quantize_
from mxq.quant.calibrate import LayerCalibrator, output_error
from mxq.quant.gptq import GPTQSettings, gptq
from mxq.quant.grid import GRIDS, make_grid
from mxq.quant.hessian import ExpertHessians
from mxq.quant.options import GPTQOptions


def _routed_activations(n: int, k: int, seed: int) -> torch.Tensor:
    """[n, k] correlated, anisotropic inputs (a few loud channels), like post-norm hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) * torch.linspace(0.2, 3.0, k)) @ mix


@pytest.mark.parametrize("fmt", sorted(GRIDS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_calibration_error(fmt, act_order):
    """One expert's weight, its routed tokens' Hessian: GPTQ's tr(D H D^T) is below RTN's, for every grid."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 32, 128, generator=g) * 0.02                                  # [B, out, in]
    x = _routed_activations(256, 128, 2)
    h = (2.0 * x.t() @ x / x.shape[0]).unsqueeze(0)                                   # [1, in, in]
    grid = make_grid(fmt, w)
    res = gptq(w, h, grid, GPTQSettings(block_size=32, act_order=act_order))
    (p,) = grid.pack(res.codes, res.states, res.values)                                # checks bytes <-> values
    f = get_format(fmt)
    assert torch.equal(f.dequantize(p), res.values[0])
    rtn = f.dequantize(f.quantize(w[0])).unsqueeze(0)
    e_gptq, e_rtn = float(output_error(w, res.values, h)), float(output_error(w, rtn, h))
    assert e_gptq < 0.8 * e_rtn, (fmt, e_gptq, e_rtn)


def test_mse_clip_never_worse_per_group_on_the_weighted_error():
    from mxq.quant.gptq import _choose_one, _group_error

    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 16, 32, generator=g)
    w[:, :, 0] *= 8.0                                                                  # an outlier column
    hd = torch.rand(2, 32, generator=g) + 0.1
    for fmt in ("int4_g32", "mxfp4", "nvfp4", "nf4"):
        grid = make_grid(fmt, w)
        plain = _group_error(grid, w, hd, grid.choose(w, None))
        best = _group_error(grid, w, hd, _choose_one(grid, w, hd, GPTQOptions(mse_clip=True).shrink))
        assert (best <= plain).all() and (best < plain).any(), fmt


def test_expert_hessians_sum_weighted_and_plain():
    g = torch.Generator().manual_seed(4)
    x, gate = torch.randn(50, 6, generator=g), torch.rand(50, generator=g)
    hs, hw = ExpertHessians(3, 6, "cpu"), ExpertHessians(3, 6, "cpu", gate_weighted=True)
    for s in range(0, 50, 16):                                                         # batches of any split
        hs.add(1, x[s:s + 16], gate[s:s + 16])
        hw.add(1, x[s:s + 16], gate[s:s + 16])
    torch.testing.assert_close(hs.hessian([1])[0], 2 * x.t() @ x / 50, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hw.hessian([1])[0], 2 * (x * gate[:, None]).t() @ x / gate.sum(), rtol=1e-5, atol=1e-6)
    assert hs.hessian([0]).abs().sum() == 0 and int(hs.tokens[0]) == 0


@pytest.fixture(scope="module")
def model_and_calib(make_ckpt):
    import mxq
    from mxq.calib import build_calibration

    ckpt = make_ckpt("bf16", layers=2)
    model = mxq.load_model(ckpt, device="cpu", dtype=torch.float32)
    calib = build_calibration({"num_sequences": 4, "seq_len": 48}, mxq.load_tokenizer(model.source))
    return ckpt, calib


def test_routed_hessian_matches_brute_force(model_and_calib):
    """Layer 0's per-expert gate_up Hessians equal 2/n X_e^T X_e over the MoE inputs the model's own forward
    routes to e (captured with a hook on the unmodified model)."""
    import mxq

    ckpt, calib = model_and_calib
    model = mxq.load_model(ckpt, device="cpu", dtype=torch.float32)
    captured = []
    hook = model.layers[0].mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(calib.input_ids, attention_mask=calib.attention_mask, logits=False)
    hook.remove()
    u = captured[0][calib.attention_mask.bool()]                                      # [n, H]
    _, idx, _ = model.layers[0].mlp.route(u)
    plan = Plan.uniform(2, model.config.num_local_experts, "int4_g32")
    cal = LayerCalibrator(model, plan, calib, GPTQOptions())
    cal._attention(model.layers[0])
    hs, _ = cal.gate_up_hessians(model.layers[0], [])
    for e in range(model.config.num_local_experts):
        xe = u[(idx == e).any(dim=1)]
        assert int(hs.tokens[e]) == xe.shape[0]
        if xe.shape[0]:
            torch.testing.assert_close(hs.hessian([e])[0], 2 * xe.t() @ xe / xe.shape[0], rtol=1e-4, atol=1e-5)


def test_zero_token_expert_falls_back_and_is_reported(model_and_calib, tmp_path):
    import mxq

    ckpt, calib = model_and_calib
    model = mxq.load_model(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.layers[1].mlp.router.bias[5] = -1e4                                     # expert 5 of layer 1: no token
    src = get_format("bf16").dequantize(model.layers[1].mlp.experts.packed("down", 5))
    plan = Plan.uniform(2, model.config.num_local_experts, "int4_g32")
    recipe = {"planner": "uniform", "quant": {"format": "int4_g32", "method": "gptq", "gptq": {"min_tokens": 8}}}
    rep = quantize_(model, plan, recipe, calib=calib, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "calibration.json").read_text())
    assert on_disk["fallbacks"] == rep["fallbacks"]
    fb = {(f["layer"], f["expert"]): f for f in rep["fallbacks"]}
    assert fb[(1, 5)]["tokens"] == 0 and fb[(1, 5)]["fallback"] == "rtn"
    ent = rep["layers"][1]["experts"][5]
    assert ent["method"] == "fallback" and "min_tokens=8" in ent["fallback_reason"]
    for L in rep["layers"]:                                                            # every expert accounted for
        assert [e["expert"] for e in L["experts"]] == list(range(model.config.num_local_experts))
        for e in L["experts"]:
            assert e["method"] in ("gptq", "fallback")
            assert (e["method"] == "fallback") == (e["tokens"] < 8)
            if e["method"] == "gptq":
                assert e["down"]["rel_err_gptq"] < e["down"]["rel_err_rtn"]
    got = model.layers[1].mlp.experts.packed("down", 5)
    want = get_format("int4_g32").quantize(src)
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)    # documented fallback: RTN
    assert model.mxq_plan is plan


def test_expert_balanced_calibration_forces_tokens_into_a_thin_expert(model_and_calib):
    import mxq

    ckpt, calib = model_and_calib
    model = mxq.load_model(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model.layers[0].mlp.router.bias[3] -= 20.0                                    # expert 3 of layer 0: no token
    plan = Plan.uniform(2, model.config.num_local_experts, "int4_g32")
    cal = LayerCalibrator(model, plan, calib, GPTQOptions(balance_tokens=16))
    cal._attention(model.layers[0])
    hs, _ = cal.gate_up_hessians(model.layers[0], [])
    assert int(hs.forced[3]) == 16 and int(hs.tokens[3]) == 16                         # all 16 forced
    rows, gate = cal._forced[3]
    assert ((gate > 0) & (gate < 1)).all()
    u = model.layers[0].post_attention_layernorm(cal.x)[calib.attention_mask.bool()]   # [n, H]
    torch.testing.assert_close(hs.hessian([3])[0], 2 * u[rows].t() @ u[rows] / 16, rtol=1e-4, atol=1e-5)
    routed = hs.tokens - hs.forced
    assert all(int(hs.forced[e]) == max(0, 16 - int(routed[e])) for e in range(model.config.num_local_experts))


@pytest.mark.parametrize("opt,value,match", [
    ("damp", -0.1, r"recipe\.quant\.gptq\.damp=-0\.1"),
    ("block_size", 0, r"recipe\.quant\.gptq\.block_size=0"),
    ("act_order", "yes", r"recipe\.quant\.gptq\.act_order='yes'"),
    ("fallback", "zero", r"recipe\.quant\.gptq\.fallback='zero'"),
    ("min_tokens", 0, r"recipe\.quant\.gptq\.min_tokens=0"),
    ("balance_tokens", -1, r"recipe\.quant\.gptq\.balance_tokens=-1"),
    ("mse_min_shrink", 1.5, r"recipe\.quant\.gptq\.mse_min_shrink=1\.5"),
    ("blocksize", 64, r"recipe\.quant\.gptq\.blocksize=64: unknown option"),
])
def test_gptq_options_are_validated_naming_the_option(opt, value, match, make_ckpt):
    import mxq

    cfg = mxq.load_model(make_ckpt("mxfp4", layers=2), device="cpu").config
    r = {"planner": "uniform", "quant": {"format": "int4_g128", "method": "gptq", "gptq": {opt: value}}}
    with pytest.raises(PlanError, match=match):
        validate(r, cfg)


def test_method_is_validated_against_the_planner(make_ckpt):
    import mxq

    cfg = mxq.load_model(make_ckpt("mxfp4", layers=2), device="cpu").config
    with pytest.raises(PlanError, match=r"recipe\.quant\.method='awq'"):
        validate({"planner": "uniform", "quant": {"format": "int4_g128", "method": "awq"}}, cfg)
    with pytest.raises(PlanError, match=r"recipe\.quant\.method='gptq'.*nothing to calibrate"):
        validate({"planner": "uniform", "quant": {"format": "keep", "method": "gptq"}}, cfg)
    validate({"planner": "uniform", "quant": {"format": "nvfp4", "method": "gptq", "gptq": {"damp": 0.05}}}, cfg)
