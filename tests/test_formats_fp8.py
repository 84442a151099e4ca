"""FP8 E4M3: per-channel and 128x128 block scales; element rounding is torch's float8_e4m3fn cast."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mxq.formats.base as base
from mxq.formats import FormatError, Packed, get_format
from mxq.formats.fp8 import to_fp8

CH, BLK = get_format("fp8"), get_format("fp8_block")


def test_per_channel_scale_and_cast():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 200, generator=g) * torch.logspace(-4, 4, 16).unsqueeze(1)
    p = CH.quantize(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    assert torch.equal(p.tensors["scale"], scale)
    assert torch.equal(p.tensors["weight"].view(torch.uint8), (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(CH.dequantize(p), p.tensors["weight"].float() * scale)
    assert p.tensors["weight"].float().abs().amax(dim=1).eq(448.0).all()     # each row's amax hits 448


def test_block_scales_follow_128x128_tiles_with_ragged_edges():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 2880, generator=g)                            # 3 x 23 tiles, partial at both edges
    w[130:, 1000:] *= 1000.0                                           # tiles with very different ranges
    p = BLK.quantize(w)
    assert p.tensors["scale"].shape == (3, 23)
    for bi in range(3):
        for bj in (0, 7, 22):
            tile = w[128 * bi: 128 * bi + 128, 128 * bj: 128 * bj + 128]
            s = tile.abs().amax() / 448.0
            assert p.tensors["scale"][bi, bj] == s
            q = p.tensors["weight"][128 * bi: 128 * bi + 128, 128 * bj: 128 * bj + 128]
            assert torch.equal(q.view(torch.uint8), (tile / s).to(torch.float8_e4m3fn).view(torch.uint8))


def test_block_chunking_is_invisible(monkeypatch):
    w = torch.randn(520, 300)
    ref = BLK.quantize(w)
    monkeypatch.setattr(base, "CHUNK_ELEMS", 300 * 5)                  # forces one 128-row stripe per chunk
    p = BLK.quantize(w)
    assert torch.equal(p.tensors["scale"], ref.tensors["scale"])
    assert torch.equal(p.tensors["weight"].view(torch.uint8), ref.tensors["weight"].view(torch.uint8))
    assert torch.equal(BLK.dequantize(p), BLK.dequantize(ref))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 260), st.integers(1, 140), st.floats(-35, 35), st.integers(0, 2**31 - 1))
def test_relative_error_bound(rows, cols, log_scale, seed):
    """E4M3 has 3 mantissa bits: normal values are within 2^-4 relative; tiny ones within half a subnormal step."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10.0 ** log_scale
    for f in (CH, BLK):
        p = f.quantize(w)
        d = f.dequantize(p)
        assert torch.isfinite(d).all()
        unit = d.abs().max() if f is BLK else d.abs().amax(dim=1, keepdim=True)
        assert ((d - w).abs() <= w.abs() * 2.0 ** -4 + unit * 2.0 ** -10 / 448 * 1.01).all()


def test_saturation_zero_rows_and_extremes():
    q = to_fp8(torch.tensor([1e4, -1e4, 448.5, 464.0, 1e-4]), torch.tensor(1.0))
    assert q.float().tolist() == [448.0, -448.0, 448.0, 448.0, 0.0]    # saturates instead of NaN
    w = torch.zeros(3, 8)
    w[1] = torch.tensor([3e38, -3e38, 1.0, 0.0, 1e-45, 2e-45, 1e30, -1e30])
    w[2] = 1e-42
    for f in (CH, BLK):
        p = f.quantize(w)
        d = f.dequantize(p)
        assert torch.isfinite(d).all()
        assert d[1, 0].item() == pytest.approx(3e38, rel=1e-6) and d[1, 1].item() == pytest.approx(-3e38, rel=1e-6)
    p = CH.quantize(w)
    assert p.tensors["scale"][0].item() == 1.0 and CH.dequantize(p)[0].eq(0).all()  # all-zero row -> scale 1
    assert p.tensors["scale"][2].item() > 0                             # 1e-42 / 448 is raised, not flushed to 0


def test_bits_and_layout():
    assert CH.bits_per_weight((5760, 2880)) == 8 + 32 / 2880
    assert BLK.bits_per_weight((5760, 2880)) == 8 + 32 * 45 * 23 / (5760 * 2880)
    p = BLK.quantize(torch.randn(5, 7), axis=0)                         # [in, out] input
    assert p.shape == (7, 5) and p.tensors["weight"].dtype == torch.float8_e4m3fn
    assert p.tensors["scale"].shape == (1, 1) and p.tensors["scale"].dtype == torch.float32


def test_rejects_bad_packed():
    p = CH.quantize(torch.randn(4, 8))
    with pytest.raises(FormatError, match="'weight' must be torch.float8_e4m3fn"):
        CH.dequantize(Packed("fp8", {"weight": p.tensors["weight"].view(torch.uint8), "scale": p.tensors["scale"]},
                             p.shape))
    with pytest.raises(FormatError, match="cannot dequantize a Packed of format 'fp8'"):
        BLK.dequantize(p)
