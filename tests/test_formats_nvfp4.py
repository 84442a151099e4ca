"""NVFP4: two-level scales (ModelOpt convention), E2M1 round-to-nearest-even, an independent scalar reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxq.formats import FormatError, Packed, get_format

F = get_format("nvfp4")
MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e2m1_rne(v: float) -> int:
    """Nearest E2M1 magnitude, ties to the even code, saturating; sign bit for v < 0."""
    a = min(abs(v), 6.0)
    dist = [abs(a - m) for m in MAGS]
    best = min(dist)
    cands = [i for i, d in enumerate(dist) if d == best]
    code = cands[0] if len(cands) == 1 else next(i for i in cands if i % 2 == 0)
    return code | (8 if v < 0 else 0)


def _reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Scalar restatement of ModelOpt's NVFP4QTensor.quantize for one [out, in] weight (fp32 arithmetic)."""
    f32 = np.float32
    g = f32(np.abs(w).max()) / f32(6.0 * 448.0)
    rows, k = w.shape
    codes = np.zeros((rows, k), dtype=np.uint8)
    scales = np.zeros((rows, k // 16), dtype=np.float32)
    for r in range(rows):
        for b in range(k // 16):
            blk = w[r, 16 * b: 16 * b + 16].astype(np.float32)
            bamax = f32(np.abs(blk).max())
            s = f32(bamax / f32(f32(6.0) * g)) if bamax > 0 else f32(1.0)
            s8 = float(torch.tensor(min(float(s), 448.0)).to(torch.float8_e4m3fn).float())
            scales[r, b] = s8
            denom = f32(f32(s8) * g)
            for j in range(16):
                codes[r, 16 * b + j] = _e2m1_rne(float(f32(blk[j] / denom)))
    return codes, scales, g


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)   # low nibble first


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_scalar_reference(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 64, generator=g) * torch.logspace(-2, 2, 5).unsqueeze(1)
    w[0, :16] = 0.0                                                 # all-zero block -> scale 1
    p = F.quantize(w)
    codes, scales, gs = _reference(w.numpy())
    assert p.tensors["global_scale"].item() == float(gs)
    assert np.array_equal(p.tensors["scales"].float().numpy(), scales)
    assert np.array_equal(_unpack(p.tensors["packed"]).numpy(), codes)


def test_two_level_scale_values():
    w = torch.zeros(2, 32)
    w[0, 0] = 2688.0                                                # global amax -> global scale exactly 1
    w[1, 16] = 6.0                                                  # block amax 6 -> block scale 1
    p = F.quantize(w)
    assert p.tensors["global_scale"].item() == 1.0
    assert p.tensors["scales"].float().tolist() == [[448.0, 1.0], [1.0, 1.0]]
    assert F.dequantize(p)[0, 0].item() == 2688.0 and F.dequantize(p)[1, 16].item() == 6.0


def test_ties_to_even_and_saturation():
    w = torch.zeros(1, 16)
    w[0, :10] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -0.1])
    w = w * (2688.0 / 6.0)                                          # global scale 1/6 * ... keep block scale 448
    p = F.quantize(w)
    codes = _unpack(p.tensors["packed"])[0, :10].tolist()
    # 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4 (even codes); -0.1 -> -0 (code 8)
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 10, 8]


def test_layout_and_bits():
    p = F.quantize(torch.randn(48, 2880))
    assert p.tensors["packed"].shape == (48, 1440) and p.tensors["packed"].dtype == torch.uint8
    assert p.tensors["scales"].shape == (48, 180) and p.tensors["scales"].dtype == torch.float8_e4m3fn
    assert p.tensors["global_scale"].shape == () and p.tensors["global_scale"].dtype == torch.float32
    n = 5760 * 2880
    assert F.bits_per_weight((5760, 2880)) == pytest.approx(4.5 + 32 / n, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.floats(-35, 35), st.integers(0, 2**31 - 1))
def test_error_bound(rows, blocks, log_scale, seed):
    """Each element is within half an E2M1 step of its block's grid (or saturated at 6 * scale)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 16 * blocks, generator=g) * 10.0 ** log_scale
    p = F.quantize(w)
    d = F.dequantize(p)
    assert torch.isfinite(d).all()
    unit = (p.tensors["scales"].float() * p.tensors["global_scale"]).repeat_interleave(16, dim=1)  # [rows, in]
    # the widest E2M1 gap is 2 (between 4 and 6): half of it bounds the rounding error; plus fp32 slack
    assert ((d - w).abs() <= unit * 1.0 + w.abs() * 1e-6).all()


def test_degenerate_inputs_stay_finite():
    for w in (torch.zeros(3, 32), torch.full((2, 16), 3e38), torch.full((2, 16), 1e-42), torch.randn(2, 32) * 1e30):
        p = F.quantize(w)
        d = F.dequantize(p)
        assert torch.isfinite(d).all() and not torch.isnan(p.tensors["scales"].float()).any()
        if w.abs().max() > 1e-40:
            assert (d - w).abs().max() <= 0.25 * w.abs().max()
    assert F.quantize(torch.zeros(3, 32)).tensors["global_scale"].item() == 1.0


def test_rejects_bad_packed_tensors():
    p = F.quantize(torch.randn(4, 32))
    bad = Packed("nvfp4", {**p.tensors, "scales": p.tensors["scales"].float()}, p.shape, p.meta)
    with pytest.raises(FormatError, match="'scales' must be torch.float8_e4m3fn"):
        F.dequantize(bad)
    bad = Packed("nvfp4", {**p.tensors, "global_scale": p.tensors["global_scale"].reshape(1)}, p.shape, p.meta)
    with pytest.raises(FormatError, match="'global_scale' must have shape"):
        F.dequantize(bad)
