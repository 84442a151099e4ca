"""NF4 / NF4 with double quantization: bit-for-bit agreement with bitsandbytes (the test reference)."""
from __future__ import annotations

import bitsandbytes.functional as bnb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxq.formats import FormatError, get_format
from mxq.formats.nf4 import dynamic_map, nf4_code

NF4, NF4_DQ = get_format("nf4"), get_format("nf4_dq")

# Decision thresholds of bnb's CUDA kernel dQuantizeNF4 (csrc/kernels.cu), low to high; "x > t" goes up.
CUDA_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def _weights(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "student_t":
        chi2 = torch.randn(3, *shape, generator=g).pow(2).sum(0)
        w = w / (chi2 / 3).sqrt()
    elif kind == "edge":
        w[0] = 0.0                                                  # all-zero blocks
        w[1] *= 1e-30                                               # tiny blocks
        w[2, :64] = torch.randn(64, generator=g) * 1e-41            # subnormal block (absmax < 1e-38)
        w[3] *= 1e30                                                # huge blocks
        w[4, :64] = 0.5                                             # constant block
    return w


def _bnb(w: torch.Tensor, dq: bool):
    return bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)


def _assert_same(w: torch.Tensor, dq: bool) -> None:
    q_ref, state = _bnb(w, dq)
    fmt = NF4_DQ if dq else NF4
    p = fmt.quantize(w)
    t = p.tensors
    assert torch.equal(t["packed"].reshape(-1), q_ref.reshape(-1)), "packed codes differ"
    assert torch.equal(state.code, nf4_code())
    if dq:
        assert torch.equal(t["absmax"].reshape(-1), state.absmax)
        assert torch.equal(t["offset"], state.offset.reshape(()))
        assert torch.equal(t["nested_absmax"], state.state2.absmax)
        assert torch.equal(dynamic_map(), state.state2.code)
        assert state.state2.blocksize == 256
    else:
        assert torch.equal(t["absmax"].reshape(-1), state.absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        ref = bnb.dequantize_4bit(q_ref, state)
        assert torch.equal(fmt.dequantize(p, dtype), ref), f"dequantized {dtype} differs"


@pytest.mark.parametrize("dq", [False, True], ids=["nf4", "nf4_dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,shape", [("normal", (96, 640)), ("student_t", (65, 2880)), ("edge", (40, 192))])
def test_bit_identical_to_bitsandbytes(kind, shape, dtype, dq):
    w = _weights(kind, shape, seed=len(kind))
    if dtype == torch.float16 and kind == "edge":
        w[3] /= 1e30                                                # 1e30 is not an fp16 number
    _assert_same(w.to(dtype), dq)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5), st.floats(-20, 20), st.integers(0, 2**31 - 1), st.booleans())
def test_bit_identical_on_random_shapes(rows, blocks, log_scale, seed, dq):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 64 * blocks, generator=g) * 10.0 ** log_scale
    _assert_same(w, dq)


def test_nested_blocks_cross_rows_in_flat_order():
    """45 blocks per row: the 256-wide nested blocks straddle rows exactly as in bnb's flat layout."""
    w = _weights("normal", (13, 2880), 3) * torch.linspace(0.1, 10, 13).unsqueeze(1)
    _assert_same(w, True)
    assert NF4_DQ.quantize(w).tensors["nested_absmax"].shape == (3,)  # ceil(13 * 45 / 256)


def test_code_table_and_thresholds():
    code = nf4_code()
    assert code.tolist()[0] == -1.0 and code.tolist()[7] == 0.0 and code.tolist()[15] == 1.0
    assert torch.equal(code, bnb.get_4bit_type("nf4", device="cpu"))
    mids = 0.5 * (code[:-1] + code[1:])
    assert np.array_equal(mids.numpy(), np.array(CUDA_THRESHOLDS, dtype=np.float32))


def test_exact_midpoints_go_to_the_lower_code():
    mids = (0.5 * (nf4_code()[:-1] + nf4_code()[1:])).tolist()
    row = torch.tensor([1.0] + mids + [0.0] * 48)                  # absmax 1: scaled value == midpoint
    p = NF4.quantize(row.reshape(1, 64))
    b = p.tensors["packed"][0].long()
    codes = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)     # high nibble first
    assert codes[1:16].tolist() == list(range(15))                 # midpoint i -> code i (lower)
    _assert_same(row.reshape(1, 64), False)


def test_high_nibble_first_packing():
    row = torch.zeros(1, 64)
    row[0, 0], row[0, 1] = -2.0, 2.0                               # codes 0 and 15
    assert NF4.quantize(row).tensors["packed"][0, 0].item() == 0x0F


def test_double_quant_survives_sum_overflow():
    """mean(absmax) overflows fp32 near 3e38 (bnb then returns NaN/inf); we fall back to fp64 and stay finite."""
    w = _weights("normal", (64, 256), 0)
    w[:40] = 3e38
    d = NF4_DQ.dequantize(NF4_DQ.quantize(w))
    assert torch.isfinite(d).all()
    assert (d - w).abs().max() <= 0.01 * 3e38


def test_bits_per_weight():
    assert NF4.bits_per_weight((5760, 2880)) == 4.5
    assert NF4_DQ.bits_per_weight((5760, 2880)) == pytest.approx(4.127, abs=5e-4)


def test_rejects_rows_not_divisible_by_the_block():
    with pytest.raises(FormatError, match="not divisible by the block size 64"):
        NF4.quantize(torch.randn(4, 96))
