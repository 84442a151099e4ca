"""MXFP4: worked examples, an independent scalar reference, round-trip properties.

Dequantizer: OCP MX v1.0 sections 5.3.3 / 5.4.1 with the gpt-oss nibble order (openai/gpt-oss
``gpt_oss/torch/weights.py``); quantizer: triton's ``downcast_to_mxfp_torch`` ROUND_UP rule
(``triton_kernels/numerics_details/mxfp.py``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mxq.formats.base as base
from mxq.formats import FormatError, dequantize_mxfp4, get_format, quantize_mxfp4

F = get_format("mxfp4")
MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_dequantize_worked_example():
    """Byte 0x2F = codes (15, 2) = (-6, +1), scale byte 128 = x2; codes 8 = -0, 9 = -0.5."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)                     # [out=1, G=1, 16]
    blocks[0, 0, :4] = torch.tensor([0x2F, 0x71, 0x00, 0x98], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8))  # [1, 32]
    expect = torch.tensor([-12.0, 2.0, 1.0, 12.0, 0.0, 0.0, -0.0, -1.0])
    assert torch.equal(out[0, :8], expect)
    assert torch.equal(torch.signbit(out[0, :8]), torch.signbit(expect))  # -0.0 really is negative zero
    assert torch.equal(out[0, 8:], torch.zeros(24))


def test_quantize_worked_example():
    """amax 1.6: amax/6 = 0.267 rounds up to the power of two 0.5 = 2^-1 (scale byte 126)."""
    x = torch.tensor([0.1 * i - 1.5 for i in range(32)], dtype=torch.float32).reshape(1, 32)
    p = F.quantize(x)
    assert p.tensors["scales"].tolist() == [[126]]
    assert p.tensors["blocks"][0, 0, :4].tolist() == [0xDD, 0xCD, 0xCC, 0xBC]
    deq = F.dequantize(p)[0, :8]
    assert deq.tolist() == [-1.5, -1.5, -1.5, -1.0, -1.0, -1.0, -1.0, -0.75]


def _reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scalar re-statement of triton's ROUND_UP rule in Python floats (no torch): one block at a time."""
    rows, k = x.shape
    blocks = np.zeros((rows, k // 32, 16), dtype=np.uint8)
    scales = np.zeros((rows, k // 32), dtype=np.uint8)
    for r in range(rows):
        for g in range(k // 32):
            blk = [float(v) for v in x[r, 32 * g: 32 * g + 32]]
            amax = max(abs(v) for v in blk)
            if amax == 0:
                continue
            d6 = float(np.float32(amax) / np.float32(6.0))                 # fp32 division, as the reference
            m, e = math.frexp(d6)                                          # d6 = m * 2^e, m in [0.5, 1)
            exp = e - 1 if m == 0.5 else e                                 # ceil(log2(d6))
            exp = max(exp, -126)                                           # the bit trick never goes below 2^-126
            s = exp + 127
            codes = []
            for v in blk:
                a = abs(v) / 2.0 ** exp
                code = 0
                for i, mid in enumerate([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]):
                    if a >= mid:                                           # ties away from zero
                        code = i + 1
                codes.append(code | (8 if (v < 0 and code > 0) else 0))
            scales[r, g] = s
            for j in range(16):
                blocks[r, g, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return blocks, scales


def test_matches_scalar_reference_on_random_and_tie_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-3, 3, 6).unsqueeze(1)
    # exact ties: amax 6 (scale byte 127) and every midpoint, positive and negative
    x[0, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5,
                              -3.5, -5.0, 0.0, -0.0, 0.1, -0.1, 5.9, 6.0, -6.0] + [0.0] * 10)
    x[1, 32:64] = 0.0                                                      # an all-zero block
    x = x.to(torch.bfloat16).float()
    blocks, scales = quantize_mxfp4(x)
    rb, rs = _reference_quantize(x.numpy())
    assert np.array_equal(scales.numpy(), rs)
    assert np.array_equal(blocks.numpy(), rb)


def test_ties_away_from_zero_and_negative_zero():
    x = torch.tensor([[6.0, 0.25, 0.75, 2.5, 5.0, -0.25, -5.0, -0.0] + [0.0] * 24])
    p = F.quantize(x)
    assert p.tensors["scales"].item() == 127
    assert F.dequantize(p)[0, :8].tolist() == [6.0, 0.5, 1.0, 3.0, 6.0, -0.5, -6.0, 0.0]
    assert p.tensors["blocks"][0, 0, 3].item() >> 4 == 0                   # -0.0 is encoded as +0 (code 0)


def test_nibble_order_low_first():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 6.0, -0.5                                           # codes 7 and 9
    assert F.quantize(x).tensors["blocks"][0, 0, 0].item() == 0x97


def test_zero_block_and_huge_values_stay_finite():
    x = torch.zeros(2, 64)
    x[1, :32] = 3e38
    x[1, 32:] = torch.linspace(-1.0, 1.0, 32) * 3.3e38
    p = F.quantize(x)
    assert p.tensors["scales"][0].tolist() == [0, 0]
    assert torch.equal(p.tensors["blocks"][0], torch.zeros(2, 16, dtype=torch.uint8))
    assert p.tensors["scales"][1].tolist() == [253, 253]
    d = F.dequantize(p)
    assert torch.isfinite(d).all()
    assert d[1, :32].eq(3.0 * 2.0 ** 126).all()                            # saturated at magnitude 3


def test_3d_expert_tensor_and_chunking(monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 40, 96, generator=g, dtype=torch.float32).to(torch.bfloat16)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3)
    for e in range(3):
        b, s = quantize_mxfp4(w[e])
        assert torch.equal(b, blocks[e]) and torch.equal(s, scales[e])
    monkeypatch.setattr(base, "CHUNK_ELEMS", 96 * 7)                       # several chunks, a ragged last one
    b2, s2 = quantize_mxfp4(w)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)
    assert torch.equal(dequantize_mxfp4(b2, s2), dequantize_mxfp4(blocks, scales))


def test_axis_zero_is_the_transposed_layout():
    w = torch.randn(64, 48)                                                # HF layout [in, out]
    a, b = F.quantize(w, axis=0), F.quantize(w.t().contiguous())
    assert a.shape == (48, 64)
    assert torch.equal(a.tensors["blocks"], b.tensors["blocks"])


def test_dequantize_rejects_bad_tensors():
    with pytest.raises(FormatError, match="uint8"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(FormatError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(FormatError, match="not divisible"):
        quantize_mxfp4(torch.zeros(2, 33))


# --- round-trip properties over arbitrary valid encodings -------------------------------------------

blocks_st = st.lists(st.integers(0, 255), min_size=16, max_size=16)


def _requant(blocks: torch.Tensor, scales: torch.Tensor):
    w = dequantize_mxfp4(blocks, scales)
    b2, s2 = quantize_mxfp4(w)
    return w, b2, s2, dequantize_mxfp4(b2, s2)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(blocks_st, st.integers(1, 254)), min_size=1, max_size=8))
def test_requantize_reproduces_values_of_any_finite_encoding(rows):
    """Any encoding with scale byte >= 1 and finite values: dequantized values come back exactly."""
    blocks = torch.tensor([r[0] for r in rows], dtype=torch.uint8)         # [B, 16]
    scales = torch.tensor([r[1] for r in rows], dtype=torch.uint8)         # [B]
    w = dequantize_mxfp4(blocks, scales)
    keep = torch.isfinite(w).all(dim=-1)
    if not keep.any():
        return
    w, _, _, w2 = _requant(blocks[keep], scales[keep])
    assert torch.equal(w, w2)                                              # -0.0 == +0.0 here: values, not bits


def _canonical(codes: list[int]) -> list[int]:
    """Force a block into canonical form: no negative zero, largest magnitude code 6 or 7."""
    codes = [0 if c == 8 else c for c in codes]
    if max(c & 7 for c in codes) < 6:
        codes[0] = (codes[0] & 8) | 7
    return codes


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=32, max_size=32), st.integers(1, 252), st.integers(0, 31))
def test_requantize_reproduces_bytes_of_canonical_blocks(codes, scale, pos):
    codes = _canonical(codes)
    codes[pos] = (codes[pos] & 8) | 6                                      # a 4 somewhere keeps it canonical
    blocks = torch.tensor([[codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]], dtype=torch.uint8)
    scales = torch.tensor([scale], dtype=torch.uint8)
    _, b2, s2, _ = _requant(blocks, scales)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 15).filter(lambda c: (c & 7) < 6), st.integers(2, 252))
def test_non_canonical_blocks_change_bytes_but_not_values(code, scale):
    """A block whose largest magnitude is below 4 is re-encoded with a smaller scale byte."""
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = code
    w, b2, s2, w2 = _requant(blocks, torch.tensor([scale], dtype=torch.uint8))
    assert torch.equal(w, w2)
    if code & 7:
        assert s2.item() < scale
    else:
        assert s2.item() == 0 and b2.eq(0).all()                           # all-zero (or -0) block


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.floats(-30, 30), st.integers(0, 2**31 - 1))
def test_quantize_is_idempotent_on_values(rows, groups, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 32 * groups, generator=g) * 10.0 ** log_scale
    p = F.quantize(w)
    d1 = F.dequantize(p)
    d2 = F.dequantize(F.quantize(d1))
    assert torch.isfinite(d1).all() and torch.equal(d1, d2)


def test_scale_byte_zero_is_the_only_value_exception():
    """Exhaustive over scale bytes: every finite encoding round-trips its values, except scale byte 0."""
    pairs = torch.arange(256, dtype=torch.uint8)
    blocks = torch.zeros(255, 256, 16, dtype=torch.uint8)                 # [scale byte (row), block, 16]
    blocks[:, :, 0], blocks[:, :, 7] = pairs, pairs.flip(0)
    scales = torch.arange(255, dtype=torch.uint8).unsqueeze(1).expand(255, 256).contiguous()
    w = dequantize_mxfp4(blocks, scales).reshape(255, 256, 32)
    finite = torch.isfinite(w).all(dim=-1, keepdim=True)                  # [255, 256, 1]
    w = torch.where(finite, w, torch.zeros_like(w)).reshape(255, 256 * 32)
    b2, s2 = quantize_mxfp4(w)
    same = (dequantize_mxfp4(b2, s2) == w).all(dim=-1)                    # [255]
    assert not same[0] and same[1:].all()
    assert finite[:253].all() and not finite[253].all() and not finite[254].all()  # 4 * 2^126 = 2^128


def test_bf16_dequantize_path_is_bit_identical_to_fp32_path():
    """The GPU's bf16 dequantization (bf16 tables, one bf16 multiply) equals fp32 ldexp + cast, bit for bit,
    on every byte value and every scale byte (0 = subnormal scale, 255 = inf)."""
    from mxq.formats.mxfp4 import _dequantize_bf16, dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 256, (256, 8, 16), dtype=torch.uint8, generator=g)
    b[:, 0] = torch.arange(256, dtype=torch.uint8)[:, None]
    s = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 8)
    got = _dequantize_bf16(b, s, torch.empty(256, 8 * 32, dtype=torch.bfloat16))
    ref = dequantize_mxfp4(b, s, torch.float32).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
