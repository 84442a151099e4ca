"""Contract tests that every registered format must pass (docs/architecture.md, docs/formats.md)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxq.formats import FormatError, Packed, get_format, list_formats

NAMES = ["bf16", "fp8", "fp8_block", "int4_g128", "int4_g128_asym", "int4_g32", "int4_g32_asym",
         "mxfp4", "nf4", "nf4_dq", "nvfp4"]
# The input-axis granularity a format needs (a FormatError below it), and the one that makes every format work.
MULTIPLE = {"mxfp4": 32, "nvfp4": 16, "nf4": 64, "nf4_dq": 64, "int4_g32": 2, "int4_g128": 2,
            "int4_g32_asym": 2, "int4_g128_asym": 2, "fp8": 1, "fp8_block": 1, "bf16": 1}
# Measured SQNR (dB) on [256, 1024] seed-0 weights, minus 0.3-0.6 dB: (Gaussian, Student-t df=3).
SQNR_FLOOR = {
    "bf16": (55.0, 53.0), "fp8": (31.0, 31.5), "fp8_block": (31.0, 31.0),
    "int4_g128": (18.1, 12.5), "int4_g128_asym": (19.4, 15.1), "int4_g32": (19.7, 16.3),
    "int4_g32_asym": (21.3, 19.3), "mxfp4": (18.2, 16.0), "nf4": (20.2, 17.7), "nf4_dq": (20.2, 17.6),
    "nvfp4": (19.9, 20.3),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _student_t(shape, seed, df=3):
    g = _gen(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn(df, *shape, generator=g).pow(2).sum(0)
    return z / (chi2 / df).sqrt()


def _sqnr(w: torch.Tensor, d: torch.Tensor) -> float:
    return float(10 * torch.log10(w.double().pow(2).sum() / (w.double() - d.double()).pow(2).sum()))


def test_registered_names():
    assert list_formats() == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_shapes_dtypes_and_bytes(name, dtype):
    f = get_format(name)
    w = torch.randn(64, 256, generator=_gen(0)).to(dtype)
    p = f.quantize(w)
    assert p.format == name and p.shape == (64, 256)
    assert json.loads(json.dumps(p.meta)) == p.meta and p.meta["axis"] == 1
    assert f.nbytes(p.shape) == p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors.values())
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        d = f.dequantize(p, out_dtype)
        assert d.shape == (64, 256) and d.dtype == out_dtype and torch.isfinite(d).all()
    assert p.to("cpu").nbytes == p.nbytes


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 40), blocks=st.integers(1, 4), log_scale=st.floats(-30, 30),
       seed=st.integers(0, 2**31 - 1), axis=st.sampled_from([-1, 1, 0]))
def test_random_shapes_and_scales(name, out, blocks, log_scale, seed, axis):
    f = get_format(name)
    k = 64 * blocks
    w = torch.randn(out, k, generator=_gen(seed)) * 10.0 ** log_scale
    p = f.quantize(w.t() if axis == 0 else w, axis=axis)
    d = f.dequantize(p)
    assert p.shape == (out, k) and d.shape == (out, k)
    assert f.nbytes((out, k)) == p.nbytes
    assert torch.isfinite(d).all()
    assert (d - w).abs().max() <= 0.2 * w.abs().max()              # no format is off by more than 20% of amax
    assert torch.equal(f.dequantize(f.quantize(w)), d)             # axis=0 of w.T == axis=-1 of w


@pytest.mark.parametrize("name", NAMES)
def test_sqnr_floors(name):
    f = get_format(name)
    gauss = torch.randn(256, 1024, generator=_gen(0))
    heavy = _student_t((256, 1024), 0)
    floor_g, floor_t = SQNR_FLOOR[name]
    assert _sqnr(gauss, f.dequantize(f.quantize(gauss))) >= floor_g
    assert _sqnr(heavy, f.dequantize(f.quantize(heavy))) >= floor_t


def test_bits_per_weight():
    shape = (5760, 2880)
    n = shape[0] * shape[1]
    bpw = {name: get_format(name).bits_per_weight(shape) for name in NAMES}
    assert bpw["mxfp4"] == 4.25
    assert bpw["nvfp4"] == pytest.approx(4.5 + 32 / n, abs=1e-12)
    assert bpw["nf4"] == 4.5
    assert bpw["nf4_dq"] == pytest.approx(4.127, abs=5e-4)
    assert get_format("int4_g128").bits_per_weight((5760, 4096)) == 4.125
    assert bpw["int4_g32"] == 4.5 and bpw["int4_g32_asym"] == 4.75
    assert bpw["fp8"] == pytest.approx(8.0, abs=0.02) and bpw["fp8_block"] == pytest.approx(8.0, abs=0.01)
    assert bpw["bf16"] == 16.0


@pytest.mark.parametrize("name", NAMES)
def test_matmul_equals_dense_reference(name):
    f = get_format(name)
    p = f.quantize(torch.randn(48, 128, generator=_gen(1)))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128, generator=_gen(2)).to(dtype)
        assert torch.equal(f.matmul(x, p), x @ f.dequantize(p, dtype).t())
    with pytest.raises(FormatError, match="input features"):
        f.matmul(torch.randn(5, 64), p)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected_with_the_tensor_name(name, bad):
    w = torch.randn(4, 128)
    w[2, 17] = bad
    with pytest.raises(FormatError, match=rf"{name}: layers.3.gate_up\[7\]: non-finite value .* index \[2, 17\]"):
        get_format(name).quantize(w, name="layers.3.gate_up[7]")
    with pytest.raises(FormatError, match=rf"{name}: weight: non-finite"):
        get_format(name).quantize(w.to(torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
def test_edge_values_give_finite_results(name):
    f = get_format(name)
    w = torch.zeros(8, 256)
    w[1] = torch.randn(256, generator=_gen(3)) * 1e-40             # subnormal fp32
    w[2] = torch.randn(256, generator=_gen(4)) * 1e30
    w[3, ::7] = 3e38
    w[4] = -3e38
    w[5, :128] = 1e-45                                             # the smallest subnormal
    w[6] = torch.randn(256, generator=_gen(5))
    w[6, 3] = 1e30                                                 # one outlier among normal values
    w[7, 64:128] = 1.0                                             # constant blocks
    p = f.quantize(w)
    for t in p.tensors.values():
        assert not torch.isnan(t.float()).any()
    d = f.dequantize(p)
    assert torch.isfinite(d).all()
    assert d[0].eq(0).all()                                        # all-zero rows stay exactly zero
    # accuracy per row on its own (mixed together, NVFP4's per-tensor scale legitimately flushes the
    # 1e30 row next to 3e38 ones: its E4M3 block scales span only 448 / 2^-9 ~ 2^17.8)
    for r in (2, 3, 4, 7):
        dr = f.dequantize(f.quantize(w[r:r + 1]))
        assert (dr - w[r]).abs().max() <= 0.2 * w[r].abs().max(), r


@pytest.mark.parametrize("name", [n for n in NAMES if MULTIPLE[n] > 1])
def test_input_axis_not_divisible_is_a_clear_error(name):
    m = MULTIPLE[name]
    with pytest.raises(FormatError, match=rf"{name}: weight: dimension 1 has size {m + 1}, which is not divisible"):
        get_format(name).quantize(torch.randn(4, m + 1))
    with pytest.raises(FormatError, match=rf"dimension 0 has size {m + 1}"):
        get_format(name).quantize(torch.randn(m + 1, 4), axis=0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_weights_are_rejected(name):
    f = get_format(name)
    for w, msg in [(torch.randn(64), "2-D"), (torch.randn(2, 64, 64), "2-D"), (torch.ones(4, 64, dtype=torch.int32),
                   "floating-point"), (torch.randn(4, 64, dtype=torch.float64), "unsupported dtype"),
                   (torch.randn(0, 64), "empty")]:
        with pytest.raises(FormatError, match=msg):
            f.quantize(w)
    with pytest.raises(FormatError, match="out of range"):
        f.quantize(torch.randn(4, 64), axis=2)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_packed_tensors_are_rejected(name):
    f = get_format(name)
    p = f.quantize(torch.randn(8, 128, generator=_gen(6)))
    key = next(iter(p.tensors))
    t = p.tensors[key]
    wrong_dtype = torch.int16 if t.dtype != torch.int16 else torch.int32
    cases = [
        ({**p.tensors, key: t.view(torch.uint8).to(wrong_dtype)}, p.shape, f"'{key}' must be"),
        ({**p.tensors, key: t[:-1]}, p.shape, f"'{key}' must have shape"),
        ({k: v for k, v in p.tensors.items() if k != key}, p.shape, "missing"),
        ({**p.tensors, "extra": t}, p.shape, "unexpected"),
        (p.tensors, (8, 256), "must have shape"),
    ]
    for tensors, shape, msg in cases:
        with pytest.raises(FormatError, match=msg):
            f.dequantize(Packed(name, tensors, shape, p.meta))
    other = "bf16" if name != "bf16" else "fp8"
    with pytest.raises(FormatError, match=f"cannot dequantize a Packed of format '{other}'"):
        f.dequantize(get_format(other).quantize(torch.randn(8, 128)))
