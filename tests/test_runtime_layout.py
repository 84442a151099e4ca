"""The MXFP4 GEMV's f16 arithmetic, CPU only: its x layout (``mxq.runtime._common.h2perm_index``), the bit trick
that turns two E2M1 nibbles into an f16 pair (the PTX in ``_FP4_F16_ASM`` / ``fp4_pair_f16``), and the
power-of-two scales that keep its f16 products in range.

Within each block of 32, element 8w + n (nibble n of the block's int32 word w, low nibble first) sits at
8 (n % 4) + 2w + n // 4, so the GEMV reads the x pairs of nibbles (j, j + 4) for the block's 4 words as one
16-byte vector. A wrong layout or decode would pair weights with the wrong activations or values everywhere,
so both are pinned here independently of any kernel. The PTX strings of ``fp4_dot_f16`` and
``fp4_group_dot_f16`` are also executed instruction by instruction (``run_ptx``, exact f16 rounding) against an
E2M1-table reference of their documented arithmetic, bit for bit, and the group routine's f16 sums against
fp64 on a gpt-oss-sized GEMV."""
from __future__ import annotations

import math

import numpy as np
import torch

from mxq.formats.mxfp4 import FP4_VALUES
from mxq.runtime._common import (FP4_GROUP_CHAINS, FP4_PAIR_SHIFTS, X_EXP, Y_EXP, _fp4_f16_asm, _fp4_group_f16_asm,
                                 h2perm_index, y_f16_ok)


def pair_f16(w: int, j: int) -> tuple[float, float]:
    """Pair slot j of the 32-bit word w decoded exactly as the kernel's PTX (built from ``FP4_PAIR_SHIFTS``) does,
    as two Python floats."""
    vs, ss = FP4_PAIR_SHIFTS[j]
    v = ((w << vs) if vs >= 0 else (w >> -vs)) & 0x0E000E00
    v |= (w << ss) & 0x80008000
    v &= 0xFFFFFFFF
    halves = torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
    return float(halves[0]), float(halves[1])


def test_h2perm_is_a_permutation_within_each_block():
    n = 2880                                                     # gpt-oss hidden size: 90 blocks
    p = h2perm_index(n)
    assert sorted(p.tolist()) == list(range(n))
    assert torch.equal(p // 32, torch.arange(n) // 32)           # never leaves its block


def test_x_pairs_of_one_slot_are_contiguous_over_the_words():
    """What the kernel loads for slot j: 4 f16 pairs (x[8w + j], x[8w + j + 4]) for words w = 0..3."""
    x = torch.arange(64.0)
    stored = torch.empty(64)
    stored[h2perm_index(64)] = x
    for blk in range(2):
        for j in range(4):
            got = stored[32 * blk + 8 * j:32 * blk + 8 * j + 8].tolist()
            want = [32 * blk + v for w in range(4) for v in (8 * w + j, 8 * w + j + 4)]
            assert got == want


def test_every_nibble_pair_decodes_to_its_e2m1_value_times_2_pow_minus_14():
    """All 16 x 16 code pairs in every slot: f16 = E2M1 value x 2^-14, exactly (e = 0 lands on f16 subnormals)."""
    for j in range(4):
        for lo in range(16):
            for hi in range(16):
                w = (lo << (4 * j)) | (hi << (4 * (j + 4)))
                # other nibbles hold 0b0111 / 0b1111 junk that must not leak into the pair
                junk = sum(0xF << (4 * n) for n in range(8) if n not in (j, j + 4))
                for word in (w, w | junk, w | (junk & 0x77777777)):
                    a, b = pair_f16(word, j)
                    assert a == float(FP4_VALUES[lo]) * 2.0 ** -14, (j, lo, hi, hex(word))
                    assert b == float(FP4_VALUES[hi]) * 2.0 ** -14, (j, lo, hi, hex(word))


def test_f16_products_stay_in_range():
    """|x| < 2^X_EXP and |w| <= 6 x 2^-14: products below 12, sums of 4 below 48 (f16 max 65504), and the
    smallest nonzero weight times an x of 2^-8 of the row maximum is still a normal f16."""
    big = 6 * 2.0 ** -14 * 2.0 ** X_EXP
    assert big <= 12 and 4 * big < 65504
    assert 0.5 * 2.0 ** -14 * 2.0 ** (X_EXP - 1 - 8) >= 2.0 ** -14


def test_swiglu_limit_bounds_the_f16_y():
    assert y_f16_ok(7.0)                                         # gpt-oss: |y| <= 56 < 2^(15 - 9)
    assert (7.0 + 1) * 7.0 * 2.0 ** Y_EXP < 2.0 ** X_EXP
    assert not y_f16_ok(8.0) and not y_f16_ok(math.inf) and not y_f16_ok(float("nan"))


# ----------------------------------------------------------------------------------------------- the PTX itself

F16_OPS = {"mul": lambda a, b: a * b, "fma": lambda a, b, c: a * b + c, "add": lambda a, b: a + b}


def f16_halves(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint32 f16 pairs -> (low, high) as fp64."""
    return ((v & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64),
            (v >> 16).astype(np.uint16).view(np.float16).astype(np.float64))


def f16_pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round two fp64 arrays to f16 (nearest even: numpy's float64 -> float16 cast rounds once, correctly) and
    pack them as uint32 pairs."""
    return (lo.astype(np.float16).view(np.uint16).astype(np.uint32)
            | (hi.astype(np.float16).view(np.uint16).astype(np.uint32) << 16))


def run_ptx(asm: str, args: list[np.ndarray]) -> np.ndarray:
    """Execute the straight-line PTX of an MXFP4 dot routine elementwise on numpy arrays: ``args`` are the
    uint32 inputs $1, $2, ..; returns $0 (fp32). Knows the instructions the generators emit. The f16x2 ops
    compute in fp64 and round once to f16: fp64 holds the exact result for the kernels' operands (f16 values
    below 2^15 times E2M1 x 2^-14 are multiples of 2^-39 below 2^4, their sums stay far below 2^14)."""
    reg: dict[str, np.ndarray] = {f"${i + 1}": a.astype(np.uint32) for i, a in enumerate(args)}

    def val(tok: str) -> np.ndarray | int:
        return int(tok, 0) if tok[0].isdigit() else reg[tok]

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32":                                   # mov.b32 {l, h}, a
            halves, src = rest.rsplit(",", 1)
            lo, hi = (t.strip() for t in halves.strip(" {}").split(","))
            reg[lo], reg[hi] = reg[src.strip()] & 0xFFFF, reg[src.strip()] >> 16
            continue
        d, *src = (t.strip() for t in rest.split(","))
        vals = [val(t) for t in src]
        if op in ("shl.b32", "shr.b32", "and.b32", "or.b32"):
            a, b = vals
            r = {"shl": lambda: a << b, "shr": lambda: a >> b, "and": lambda: a & b, "or": lambda: a | b}[op[:-4]]()
            reg[d] = np.asarray(r, dtype=np.uint64).astype(np.uint32) & 0xFFFFFFFF
        elif op.endswith(".rn.f16x2"):
            halves = [f16_halves(v) for v in vals]
            f = F16_OPS[op.split(".")[0]]
            reg[d] = f16_pack(f(*(h[0] for h in halves)), f(*(h[1] for h in halves)))
        elif op == "cvt.f32.f16":
            reg[d] = vals[0].astype(np.uint16).view(np.float16).astype(np.float32)
        elif op == "add.f32":
            reg[d] = (vals[0].astype(np.float64) + vals[1]).astype(np.float32)
        else:
            raise AssertionError(f"unknown PTX instruction {op}")
    return reg["$0"]


def gemv_operands(rows: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random MXFP4 rows and a bf16-valued x scaled like ``kernel_x`` (|x| < 2^X_EXP), with outliers: (words
    [rows, groups, 4] uint32, scale exponents [rows, groups], x as f16 pairs [groups, 4 words, 4 slots] uint32,
    x [groups * 32] fp64 in natural order)."""
    from mxq.formats.mxfp4 import quantize_mxfp4

    g = torch.Generator().manual_seed(seed)
    k = 32 * groups
    blocks, scales = quantize_mxfp4(torch.randn(rows, k, generator=g) * k ** -0.5)
    words = blocks.reshape(rows, groups, 4, 4).numpy().astype(np.uint32)
    words = words[..., 0] | words[..., 1] << 8 | words[..., 2] << 16 | words[..., 3] << 24
    x = torch.randn(k, generator=g)
    x[torch.randperm(k, generator=g)[:4]] *= 50
    x = x.bfloat16().float()
    x = (x * 2.0 ** (X_EXP - torch.frexp(x.abs().max()).exponent)).double().numpy()
    n = np.arange(8)
    xw = x.reshape(groups, 4, 8)                                   # [group, word, nibble]
    pairs = f16_pack(xw[..., n[:4]], xw[..., n[:4] + 4])           # [group, word, slot j]: (x_j, x_{j+4})
    return words, scales.numpy().astype(np.int64) - 127, pairs, x


def chain_reference(words: np.ndarray, pairs: np.ndarray, chains) -> np.ndarray:
    """The documented arithmetic, written independently of the PTX: per chain of words, per lane, the products
    (E2M1 value x 2^-14) * x in order (word, then slot j) summed with one f16 rounding each, the chains added
    in f16, the two lanes added in fp32. words [..., 4], pairs [..., 4 words, 4 slots] (broadcast)."""
    e2m1 = np.array(FP4_VALUES)
    acc = None
    for chain in chains:
        c = None
        for w in chain:
            for j in range(4):
                xl, xh = f16_halves(pairs[..., w, j])
                vl = e2m1[(words[..., w] >> (4 * j)) & 15] * 2.0 ** -14
                vh = e2m1[(words[..., w] >> (4 * j + 16)) & 15] * 2.0 ** -14
                c = (vl * xl, vh * xh) if c is None else (vl * xl + c[0], vh * xh + c[1])
                c = tuple(v.astype(np.float16).astype(np.float64) for v in c)
        acc = c if acc is None else tuple((a + b).astype(np.float16).astype(np.float64) for a, b in zip(acc, c))
    return (acc[0].astype(np.float32).astype(np.float64) + acc[1].astype(np.float32)).astype(np.float32)


def test_word_ptx_matches_its_documented_arithmetic():
    """``fp4_dot_f16``'s PTX, executed instruction by instruction, equals the E2M1-table reference bit for bit."""
    words, _, pairs, _ = gemv_operands(64, 90, seed=1)
    for w in range(4):
        got = run_ptx(_fp4_f16_asm(), [words[..., w]] + [pairs[None, :, w, j] + 0 * words[..., w] for j in range(4)])
        want = chain_reference(words[..., w:w + 1], pairs[None, :, w:w + 1], [(0,)])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), w


def test_group_ptx_matches_its_documented_arithmetic():
    """``fp4_group_dot_f16``'s PTX (operands $1..$4 the words, $(5 + 4w + j) the x pair of slot j of word w)
    equals the reference of its chains ``FP4_GROUP_CHAINS`` bit for bit, on random rows and on the extreme
    group (every weight +-6, every x the largest f16 below 2^X_EXP: 16 products of ~12 per lane, no overflow)."""
    words, _, pairs, _ = gemv_operands(64, 90, seed=2)
    big = int(np.float16(2.0 ** X_EXP).view(np.uint16)) - 1           # bits of the largest f16 below 2^15
    words = np.concatenate([words, np.full((1, 90, 4), 0x77777777, np.uint32),          # all +6, all -6
                            np.full((1, 90, 4), 0xFFFFFFFF, np.uint32)])
    pairs = np.broadcast_to(pairs, (66, 90, 4, 4)).copy()
    pairs[64:] = big * 0x10001
    args = [words[..., w] for w in range(4)] + [pairs[..., w, j] for w in range(4) for j in range(4)]
    got = run_ptx(_fp4_group_f16_asm(), args)
    want = chain_reference(words, pairs, FP4_GROUP_CHAINS)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    big_x = float(np.uint16(big).view(np.float16))
    assert np.isfinite(got).all()
    assert abs(float(got[64, 0]) - 32 * 6 * 2.0 ** -14 * big_x) < 0.5 and float(got[65, 0]) == -float(got[64, 0])


def test_group_f16_sums_keep_the_gemv_error_below_1e_3():
    """The GEMV of 256 rows of 2880 through the group PTX (f16 chains of 8 products per lane), scaled and summed
    in fp64, against the exact fp64 dot of the same weights and x: relative L2 error below 1e-3 (the bf16
    rounding of the output that follows is 1.6e-3)."""
    words, sexp, pairs, x = gemv_operands(256, 90, seed=3)
    args = [words[..., w] for w in range(4)] + [pairs[None, :, w, j] + 0 * words[..., 0] for w in range(4)
                                                for j in range(4)]
    y = (run_ptx(_fp4_group_f16_asm(), args).astype(np.float64) * np.exp2(sexp + 14.0)).sum(1)
    e2m1 = np.array(FP4_VALUES)
    nib = np.stack([(words >> (4 * n)) & 15 for n in range(8)], -1)        # [rows, groups, word, nibble]
    wv = e2m1[nib].reshape(256, 90, 32) * np.exp2(sexp)[..., None].astype(np.float64)
    exact = wv.reshape(256, -1) @ x
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert rel < 1e-3, rel
