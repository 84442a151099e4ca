"""INT4 group-wise RTN (GPTQ/AWQ conventions): exact scale/zero rules against a scalar reference, layout, edges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxq.formats import FormatError, get_format

NAMES = ["int4_g32", "int4_g128", "int4_g32_asym", "int4_g128_asym"]


def _bf16(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).float())


def _sym_codes_error(x: list[float], s: float) -> float:
    """Squared error of group ``x`` with bf16 scale ``s`` (float64, relative to amax as the rule scores it)."""
    amax = max(abs(v) for v in x)
    if s == 0:
        return 0.0
    err = 0.0
    for v in x:
        q = min(max(np.round(np.float32(v) / np.float32(s)), -8), 7)
        err += (float(q) * s / amax - v / amax) ** 2
    return err


def _sym_reference_scale(x: list[float]) -> float:
    """The documented symmetric rule restated per group: first minimum over s0 * f (f = 1 .. 0.82), amax/7.5, amax/7."""
    amax = max(abs(v) for v in x)
    if amax == 0:
        return 0.0
    s0 = max(float(np.float32(max(max(x), 0.0)) / np.float32(7.0)), float(np.float32(-min(min(x), 0.0)) / np.float32(8.0)))
    cands = [_bf16(float(np.float32(s0) * np.float32(round(1.0 - 0.02 * i, 2)))) for i in range(10)]
    cands.append(_bf16(float(np.float32(amax) / np.float32(7.5))))
    cands.append(_bf16(float(np.float32(amax) / np.float32(7.0))))
    errs = [_sym_codes_error(x, c) for c in cands]
    return cands[int(np.argmin(errs))]


def _reference(w: np.ndarray, group: int, asym: bool):
    """Per-group scalar restatement of the module docstring's rules; returns (codes, scales, zeros)."""
    rows, k = w.shape
    ng = -(-k // group)
    codes = np.zeros((rows, k), dtype=np.uint8)
    scales = np.zeros((rows, ng), dtype=np.float32)
    zeros = np.zeros((rows, ng), dtype=np.uint8)
    for r in range(rows):
        for gi in range(ng):
            x = [float(v) for v in w[r, gi * group:(gi + 1) * group]]
            if asym:
                lo, hi = min(min(x), 0.0), max(max(x), 0.0)
                s = _bf16((hi - lo) / 15.0)
                z = 0 if s == 0 else int(min(max(np.round(np.float32(-lo) / np.float32(s)), 0), 15))
                q = [0 if s == 0 else int(min(max(np.round(np.float32(v) / np.float32(s)) + z, 0), 15)) for v in x]
                zeros[r, gi] = z
            else:
                s = _sym_reference_scale(x)
                q = [8 if s == 0 else int(min(max(np.round(np.float32(v) / np.float32(s)), -8), 7)) + 8 for v in x]
            scales[r, gi] = s
            codes[r, gi * group:(gi + 1) * group] = q
    return codes, scales, zeros


def _codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)   # low nibble first


@pytest.mark.parametrize("name", NAMES)
def test_matches_scalar_reference(name):
    f = get_format(name)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 320, generator=g) * torch.tensor([[0.01], [1.0], [30.0], [1e-3]])  # ragged for g128
    w[0, :128] = w[0, :128].abs() + 0.5                             # an all-positive group (asym widens to 0)
    w[1, :32] = 0.0                                                  # an all-zero group
    p = f.quantize(w)
    codes, scales, zeros = _reference(w.numpy(), f.group, f.asym)
    assert np.array_equal(p.tensors["scales"].float().numpy(), scales)
    assert np.array_equal(_codes(p.tensors["packed"]).numpy(), codes)
    if f.asym:
        assert np.array_equal(p.tensors["zeros"].numpy(), zeros)


def test_symmetric_rule_and_offset_binary_storage():
    f = get_format("int4_g32")
    w = torch.zeros(1, 32)
    w[0, :5] = torch.tensor([7.0, -7.0, 3.0, -2.0, 0.0])             # on the grid of scale 1: error 0
    p = f.quantize(w)
    assert p.tensors["scales"].float().tolist() == [[1.0]]
    assert _codes(p.tensors["packed"])[0, :5].tolist() == [15, 1, 11, 6, 8]   # stored as q + 8
    w[0, :5] = torch.tensor([-8.0, 7.0, 3.0, -3.0, 0.0])            # the full code range -8..7 is used
    p = f.quantize(w)
    assert p.tensors["scales"].float().tolist() == [[1.0]]
    assert _codes(p.tensors["packed"])[0, :5].tolist() == [0, 15, 11, 5, 8]
    assert f.dequantize(p)[0, :5].tolist() == [-8.0, 7.0, 3.0, -3.0, 0.0]
    p.tensors["packed"][0, 0] = 0x00                                 # code 0 = q -8 is a valid stored value
    assert f.dequantize(p)[0, :2].tolist() == [-8.0, -8.0]


def test_asymmetric_rule_includes_zero():
    f = get_format("int4_g32_asym")
    w = torch.full((1, 32), 2.0)
    w[0, 0] = 17.0                                                   # min 2 -> widened to 0; scale 17/15
    p = f.quantize(w)
    assert p.tensors["zeros"].tolist() == [[0]]
    assert p.tensors["scales"].float().item() == _bf16(17.0 / 15.0)
    assert f.dequantize(p)[0, 0].item() == pytest.approx(17.0, rel=1e-2)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), pairs=st.integers(1, 200), log_scale=st.floats(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_rounding_error_is_at_most_half_a_step(name, rows, pairs, log_scale, seed):
    f = get_format(name)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 2 * pairs, generator=g) * 10.0 ** log_scale     # any even width: ragged last group
    p = f.quantize(w)
    d = f.dequantize(p)
    step = p.tensors["scales"].float().repeat_interleave(f.group, dim=1)[:, :w.shape[1]]  # [rows, in]
    if f.asym:
        # half a step, plus saturation when the bf16 scale rounded down (<= 2^-8 relative, |q - zero| <= 15)
        assert ((d - w).abs() <= step * (0.5 + 16 * 2.0 ** -8) + 1e-37).all()
        return
    # symmetric: the MSE rule may clip, so bound each group's squared error by the amax/7 and amax/7.5 rules
    k, g = w.shape[1], f.group
    ng = -(-k // g)
    pad = torch.nn.functional.pad
    wg = pad(w, (0, ng * g - k)).reshape(rows, ng, g).double()
    dg = pad(d, (0, ng * g - k)).reshape(rows, ng, g).double()
    amax = wg.abs().amax(-1, keepdim=True)
    norm = torch.where(amax > 0, amax, torch.ones_like(amax))
    err = ((dg - wg) / norm).pow(2).sum(-1)
    for div in (7.0, 7.5):
        s = (amax.float() / div).to(torch.bfloat16).double()
        s = torch.where(s > 0, s, torch.ones_like(s))
        ref = ((torch.round(wg / s).clamp(-8, 7) * s - wg) / norm).pow(2).sum(-1)
        assert (err <= ref * (1 + 1e-6) + 1e-30).all(), div


def test_edge_values_stay_finite():
    for name in NAMES:
        f = get_format(name)
        for w in (torch.zeros(2, 128), torch.full((2, 128), 3e38), torch.full((2, 128), -3.4e38),
                  torch.full((2, 128), 1e-40), torch.randn(2, 128) * 1e30):
            d = f.dequantize(f.quantize(w))
            assert torch.isfinite(d).all(), name
            # asymmetric: half a step; symmetric: the MSE rule may clip the extreme by up to 18% (shrink 0.82)
            assert (d - w).abs().max() <= (0.15 if f.asym else 0.2) * w.abs().max(), name


def test_layout_and_bits():
    assert get_format("int4_g128").bits_per_weight((2880, 4096)) == 4.125
    assert get_format("int4_g128").bits_per_weight((2880, 2880)) == 4 + 16 * 23 / 2880   # 22 full groups + 64
    assert get_format("int4_g32").bits_per_weight((2880, 2880)) == 4.5
    assert get_format("int4_g32_asym").bits_per_weight((2880, 2880)) == 4.75
    assert get_format("int4_g128_asym").bits_per_weight((2880, 4096)) == 4.1875
    p = get_format("int4_g128_asym").quantize(torch.randn(3, 384))
    assert {k: (tuple(v.shape), v.dtype) for k, v in p.tensors.items()} == {
        "packed": ((3, 192), torch.uint8), "scales": ((3, 3), torch.bfloat16), "zeros": ((3, 3), torch.uint8)}


def test_ragged_last_group_equals_zero_padding():
    """gpt-oss's 2880 = 22.5 groups of 128: the last group holds 64 elements; same as padding with zeros."""
    for name in ("int4_g128", "int4_g128_asym"):
        f = get_format(name)
        w = torch.randn(3, 2880)
        p, pp = f.quantize(w), f.quantize(torch.nn.functional.pad(w, (0, 64)))
        assert p.tensors["scales"].shape == (3, 23)
        assert torch.equal(p.tensors["scales"], pp.tensors["scales"])
        assert torch.equal(p.tensors["packed"], pp.tensors["packed"][:, :1440])
        assert torch.equal(f.dequantize(p), f.dequantize(pp)[:, :2880])


def test_odd_input_axis_is_rejected():
    with pytest.raises(FormatError, match="size 7, which is not divisible by the block size 2"):
        get_format("int4_g32").quantize(torch.randn(7, 4), axis=0)          # HF [in, out] layout: axis 0 = in
    assert get_format("int4_g32").quantize(torch.randn(2880, 4), axis=0).shape == (4, 2880)
